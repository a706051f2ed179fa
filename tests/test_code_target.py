"""Where F7 puts a chat's code block (tui/code_target.py) and the diff it shows (widgets/diff_view.py)."""

from __future__ import annotations

from tui.code_target import Target, defined_name, fitted, target_around
from widgets.diff_view import diff_counts, unified_diff

CLASS = """import os


class Shape:
    @property
    def area(self) -> float:
        return 0.0

    def scale(
        self,
        by: float,
    ) -> None:
        if by:
            self.size *= by

        print("scaled")


def main():
    pass
"""
LINES = CLASS.split("\n")


def rows(target: Target) -> tuple[int, int]:
    return target.start[0], target.end[0]


def test_the_innermost_definition_around_the_cursor() -> None:
    target = target_around(LINES, (13, 4), True, "x = 1")  # inside `if by:` of scale
    assert rows(target) == (8, 15) and target.what == "scale (lines 9-16)"
    assert target.text.startswith("    def scale(\n") and target.text.endswith('print("scaled")')
    assert target.end == (15, len(LINES[15]))
    assert rows(target_around(LINES, (14, 0), True, "")) == (8, 15)  # a blank line inside the body
    assert rows(target_around(LINES, (8, 0), True, "")) == (8, 15)  # on the header
    assert rows(target_around(LINES, (10, 0), True, "")) == (8, 15)  # in the signature


def test_decorators_come_with_their_definition() -> None:
    target = target_around(LINES, (6, 0), True, "")
    assert rows(target) == (4, 6) and target.text.startswith("    @property")


def test_the_definition_the_block_names_wins() -> None:
    assert rows(target_around(LINES, (13, 0), True, "class Shape:\n    pass")) == (3, 15)
    assert rows(target_around(LINES, (19, 4), True, "def main():\n    run()")) == (18, 19)


def test_otherwise_the_paragraph_or_the_cursor() -> None:
    assert rows(target_around(LINES, (0, 0), True, "")) == (0, 0)  # outside any definition: the paragraph
    text = ["one", "two", "", "three", "four", "five", ""]
    target = target_around(text, (4, 1), False, "def four(): pass")  # not Python: no definitions
    assert rows(target) == (3, 5) and target.what == "the paragraph (lines 4-6)"
    blank = target_around(text, (2, 0), False, "x")
    assert (blank.start, blank.end, blank.text) == ((2, 0), (2, 0), "")


def test_a_block_is_indented_like_what_it_replaces() -> None:
    method = target_around(LINES, (13, 0), True, "")
    assert fitted("def scale(self, by):\n    self.size *= by", method) == (
        "    def scale(self, by):\n        self.size *= by"
    )
    inline = Target((5, 8), (5, 12), "area", "the selection")
    assert fitted("  size", inline) == "  size"  # mid-line: taken as it is
    assert defined_name("# comment\nasync def go():\n    pass") == "go"


def test_the_diff_is_numbered_as_in_the_file() -> None:
    diff = unified_diff("a\nb\nc", "a\nB\nc", first_line=10)
    assert diff == ["@@ -10,3 +10,3 @@", " a", "-b", "+B", " c"]
    assert diff_counts(diff) == (1, 1)
    assert unified_diff("", "new", first_line=5) == ["@@ -4,0 +5 @@", "+new"]  # inserted after line 4
    assert unified_diff("same", "same") == []
