"""Modal screens: the unsaved-changes guard on quit and a one-line prompt (save as, system instruction)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label


class QuitScreen(ModalScreen[str]):
    """Asks what to do with unsaved changes; dismisses with "save", "discard" or "cancel"."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "choose('save')", "Save and quit"),
        Binding("d", "choose('discard')", "Quit without saving"),
        Binding("escape", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"{self._name} has unsaved changes.", id="question")
            yield Label("s: save and quit   d: quit without saving   Esc: keep editing")
        yield Footer()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class PromptScreen(ModalScreen["str | None"]):
    """A one-line question; dismisses with the answer, or None on Esc."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self._question = question
        self._value = value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._question, id="question")
            yield Input(self._value, id="answer")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
