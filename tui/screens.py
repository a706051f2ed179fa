"""Modal screens: the unsaved-changes guard on quit, a one-line prompt (save as, system instruction), a yes/no
question, and what to do when the file changed on disk."""

from __future__ import annotations

import difflib
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, Static

DIFF_LINES = 40  # the most diff lines the conflict dialog shows


class QuitScreen(ModalScreen[str]):
    """Asks what to do with unsaved changes; dismisses with "save", "discard" or "cancel". `more` is how many
    other files will be asked about after this one."""

    VERB = "quit"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('save')", "Save and quit"),
        Binding("d", "choose('discard')", "Quit without saving"),
        Binding("escape", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, name: str, more: int = 0) -> None:
        super().__init__()
        self._name = name
        self._more = more

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"{self._name} has unsaved changes.", id="question", markup=False)
            if self._more:
                yield Label(f"({self._more} more unsaved file{'s' * (self._more > 1)} after this one)")
            yield Label(f"s: save and {self.VERB}   d: {self.VERB} without saving   Esc: keep editing")
        yield Footer()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class CloseScreen(QuitScreen):
    """The same question when one tab is closed."""

    VERB = "close"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('save')", "Save and close"),
        Binding("d", "choose('discard')", "Close without saving"),
        Binding("escape", "choose('cancel')", "Cancel"),
    ]


class PromptScreen(ModalScreen["str | None"]):
    """A one-line question, with why the last answer failed when it did; dismisses with the answer, or None on Esc."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "", problem: str = "") -> None:
        super().__init__()
        self._question = question
        self._value = value
        self._problem = problem

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._question, id="question")
            if self._problem:
                yield Label(self._problem, id="problem", markup=False)
            yield Input(self._value, id="answer", select_on_focus=False)  # a retry edits the name
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True for y, False for n or Esc."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self._question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._question, id="question", markup=False)
            yield Label("y: yes   n / Esc: no")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def diff_lines(before: str, after: str, where: str = "on disk") -> tuple[str, list[str]]:
    """A one-line count of what changed from `before` to `after` (`where` names the after), and the unified diff
    (clipped to DIFF_LINES)."""
    diff = list(difflib.unified_diff(before.split("\n"), after.split("\n"), "before", where, n=1, lineterm=""))[2:]
    added = sum(1 for line in diff if line.startswith("+"))
    removed = sum(1 for line in diff if line.startswith("-"))
    summary = f"{added} line{'s' * (added != 1)} added, {removed} removed {where}"
    if len(diff) > DIFF_LINES:
        diff = [*diff[:DIFF_LINES], f"… {len(diff) - DIFF_LINES} more diff lines"]
    return summary, diff


class ConflictScreen(ModalScreen[str]):
    """The file changed on disk since it was read or saved: shows how, and dismisses with "overwrite",
    "reload", "save_as" or "cancel". `on_disk` None means the file is no longer text (no reload then)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "choose('overwrite')", "Overwrite"),
        Binding("r", "choose('reload')", "Reload"),
        Binding("a", "choose('save_as')", "Save as"),
        Binding("escape", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, reason: str, before: str, on_disk: str | None) -> None:
        super().__init__()
        self._reason = reason
        self._before = before
        self._on_disk = on_disk

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Not saved: {self._reason}.", id="question", markup=False)
            if self._on_disk is None:
                yield Label("It is not text any more.", markup=False)
            else:
                summary, diff = diff_lines(self._before, self._on_disk)
                yield Label(summary, id="diff-summary", markup=False)
                with VerticalScroll(id="diff"):
                    yield Static("\n".join(diff), markup=False)
            yield Label("o: overwrite it with yours   a: save as   Esc: keep editing")
            if self._on_disk is not None:
                yield Label("r: reload from disk (ctrl+z brings yours back)")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action == "choose" and parameters == ("reload",) and self._on_disk is None)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
