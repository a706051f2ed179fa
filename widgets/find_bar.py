"""Find and replace in the editor (ctrl+f, ctrl+h), and go to line[:column] (ctrl+g).

Matching is literal and smart-case, as in vim's `smartcase` and most editors: a query in lower case matches any
case, one with a capital letter matches exactly. Finding wraps round the end (and the start, backwards) and says
so; replace all is one edit, so one ctrl+z undoes it.
"""

from __future__ import annotations

import re
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Label, TextArea
from textual.widgets.text_area import Location


def pattern_for(query: str) -> re.Pattern[str]:
    """The literal, smart-case pattern of `query`."""
    return re.compile(re.escape(query), 0 if any(char.isupper() for char in query) else re.IGNORECASE)


def find(editor: TextArea, query: str, forward: bool = True) -> tuple[Location, Location, bool] | None:
    """The next match of `query` after the selection (before it, backwards), wrapping round: (start, end, wrapped),
    or None when the text holds none."""
    if not query:
        return None
    document = editor.document
    text = editor.text
    start, end = sorted(editor.selection)
    pattern = pattern_for(query)
    if forward:
        found = pattern.search(text, document.get_index_from_location(end))
        wrapped = found is None
        found = found or pattern.search(text)
    else:
        before = document.get_index_from_location(start)
        matches = list(pattern.finditer(text))
        earlier = [match for match in matches if match.start() < before]
        wrapped = not earlier
        found = (earlier or matches or [None])[-1]
    if found is None:
        return None
    return document.get_location_from_index(found.start()), document.get_location_from_index(found.end()), wrapped


def replace_all(editor: TextArea, query: str, replacement: str) -> int:
    """Replace every match of `query` as one edit (one undo step); returns how many were replaced."""
    text = editor.text
    matches = list(pattern_for(query).finditer(text)) if query else []
    if not matches:
        return 0
    first, last = matches[0].start(), matches[-1].end()
    middle = pattern_for(query).sub(lambda _match: replacement, text[first:last])
    document = editor.document
    editor.history.checkpoint()
    editor.replace(middle, document.get_location_from_index(first), document.get_location_from_index(last))
    editor.history.checkpoint()
    return len(matches)


def parse_location(answer: str, line_count: int) -> tuple[Location, str]:
    """The 0-based location that `line[:column]` (1-based) names, clamped to the text, and a note when it was
    clamped; ValueError with a one-line message for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", answer)
    if match is None:
        raise ValueError(f"go to line: {answer.strip()!r} is not line[:column] (for example 12 or 12:5)")
    line, column = int(match[1]), int(match[2] or 1)
    note = ""
    if line > line_count:
        note = f"line {line} is past the end: the last line is {line_count}"
    row = min(max(line, 1), line_count) - 1
    return (row, max(column, 1) - 1), note


class FindBar(Horizontal):
    """The find (and replace) fields under the editor; it posts what to do and the app does it to the editor.

    Enter or down: next match; up: previous; in the replace field Enter replaces the match and finds the next, ctrl+a
    replaces all; Esc closes the bar.
    """

    DEFAULT_CSS = """
    FindBar {
        height: auto;
        display: none;
        &.-open { display: block; }
        & Input { width: 1fr; border: none; height: 1; padding: 0 1; }
        & #find-replacement { display: none; }
        &.-replace #find-replacement { display: block; }
        & #find-note { width: auto; max-width: 40%; padding: 0 1; color: $text-muted; }
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", priority=True),
        Binding("down", "find(True)", "Next", show=False),
        Binding("up", "find(False)", "Previous", show=False),
        Binding("ctrl+a", "replace_all", "Replace all", priority=True),
    ]

    class Find(Message):
        """Select the next (`forward`) or previous match of `query`."""

        def __init__(self, query: str, forward: bool) -> None:
            super().__init__()
            self.query = query
            self.forward = forward

    class Replace(Message):
        """Replace the selected match of `query` (and find the next), or every match (`every`)."""

        def __init__(self, query: str, replacement: str, every: bool) -> None:
            super().__init__()
            self.query = query
            self.replacement = replacement
            self.every = every

    class Closed(Message):
        """The bar was closed: the editor takes the keys again."""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="find", id="find-query", select_on_focus=True)
        yield Input(placeholder="replace with", id="find-replacement", select_on_focus=True)
        yield Label("", id="find-note", markup=False)

    @property
    def query_text(self) -> str:
        return self.query_one("#find-query", Input).value

    def open(self, query: str = "", replace: bool = False) -> None:
        """Show the bar (with the replace field for ctrl+h), the query field filled with `query` when given."""
        self.set_class(True, "-open")
        self.set_class(replace, "-replace")
        field = self.query_one("#find-query", Input)
        if query:
            field.value = query
        (self.query_one("#find-replacement", Input) if replace and field.value else field).focus()

    def say(self, note: str) -> None:
        self.query_one("#find-note", Label).update(note)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "replace_all":
            return self.has_class("-replace")
        return True

    @on(Input.Submitted, "#find-query")
    def _next(self) -> None:
        self.action_find(True)

    @on(Input.Submitted, "#find-replacement")
    def _replace_one(self) -> None:
        self.post_message(self.Replace(self.query_text, self.query_one("#find-replacement", Input).value, False))

    def action_find(self, forward: bool) -> None:
        self.post_message(self.Find(self.query_text, forward))

    def action_replace_all(self) -> None:
        self.post_message(self.Replace(self.query_text, self.query_one("#find-replacement", Input).value, True))

    def action_close(self) -> None:
        self.set_class(False, "-open")
        self.say("")
        self.post_message(self.Closed())
