"""A coloured unified diff (difflib's) of two texts, with the line numbers of the file they stand in."""

from __future__ import annotations

import difflib
import re
from typing import ClassVar

from rich.text import Text
from textual.widgets import Static

_HUNK_RE = re.compile(r"^@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def unified_diff(before: str, after: str, first_line: int = 1, context: int = 3) -> list[str]:
    """The hunks of the unified diff from `before` to `after` (no file headers), numbered as if `before` started at
    line `first_line` of its file."""
    before_lines, after_lines = (text.split("\n") if text else [] for text in (before, after))
    lines = list(difflib.unified_diff(before_lines, after_lines, n=context, lineterm=""))[2:]
    shift = first_line - 1

    def renumber(match: re.Match[str]) -> str:
        old, old_len, new, new_len = match.groups()
        return f"@@ -{int(old) + shift}{old_len or ''} +{int(new) + shift}{new_len or ''} @@"

    return [_HUNK_RE.sub(renumber, line) if line.startswith("@@") else line for line in lines]


def diff_counts(lines: list[str]) -> tuple[int, int]:
    """(lines added, lines removed) of a diff from `unified_diff`."""
    added = sum(1 for line in lines if line.startswith("+"))
    removed = sum(1 for line in lines if line.startswith("-"))
    return added, removed


class DiffView(Static):
    """Shows `unified_diff(before, after, first_line)`: additions, removals and hunk headers in the theme's colours."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"diff-view--added", "diff-view--removed", "diff-view--hunk"}
    DEFAULT_CSS = """
    DiffView {
        width: 100%;
        height: auto;
        & > .diff-view--added { color: $text-success; background: $success-muted; }
        & > .diff-view--removed { color: $text-error; background: $error-muted; }
        & > .diff-view--hunk { color: $text-accent; text-style: bold; }
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)
        self.lines: list[str] = []

    def show(self, before: str, after: str, first_line: int = 1) -> None:
        self.lines = unified_diff(before, after, first_line)
        self.update(self._render_diff())

    def _render_diff(self) -> Text:
        styles = {
            "+": self.get_component_rich_style("diff-view--added"),
            "-": self.get_component_rich_style("diff-view--removed"),
            "@": self.get_component_rich_style("diff-view--hunk"),
        }
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, line in enumerate(self.lines):
            if i:
                text.append("\n")
            text.append(line, styles.get(line[:1]))
        return text

    def on_mount(self) -> None:
        self.watch(self.app, "theme", lambda: self.update(self._render_diff()), init=False)
