"""The F7 dialog: what applying a chat's code block would change in the editor, as a diff, before anything changes."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label

from tui.code_target import Target, fitted
from widgets.diff_view import DiffView, diff_counts


class ApplyScreen(ModalScreen["str | None"]):
    """Shows the diff from the target's text to a code block (the last one first; ←/→ picks another) and dismisses
    with the text to put in its place, or None when cancelled."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y,enter", "apply", "Apply"),
        Binding("left", "pick(-1)", "Previous block", priority=True),  # before the diff's own scrolling
        Binding("right", "pick(1)", "Next block", priority=True),
        Binding("escape,n", "cancel", "Cancel"),
    ]

    def __init__(self, target: Target, blocks: list[str]) -> None:
        super().__init__()
        self._target = target
        self._blocks = blocks
        self._index = len(blocks) - 1

    @property
    def replacement(self) -> str:
        return fitted(self._blocks[self._index], self._target)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Apply the code block to {self._target.what}?", id="question", markup=False)
            yield Label("", id="diff-summary", markup=False)
            with VerticalScroll(id="diff"):
                yield DiffView(id="apply-diff")
            yield Label("y / Enter: apply (one undo step)   Esc: leave the text as it is", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self._show()

    def _show(self) -> None:
        view = self.query_one(DiffView)
        target = self._target
        view.show(
            target.head + target.text + target.tail, target.head + self.replacement + target.tail, target.start[0] + 1
        )
        added, removed = diff_counts(view.lines)
        which = f"block {self._index + 1} of {len(self._blocks)} (←/→ picks)" if len(self._blocks) > 1 else "block"
        change = f"{added} line{'s' * (added != 1)} added, {removed} removed" if view.lines else "no change"
        self.query_one("#diff-summary", Label).update(f"The chat's {which}: {change}")
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "pick":
            return len(self._blocks) > 1
        if action == "apply":
            return bool(self.query_one(DiffView).lines)  # the block is what stands there already
        return True

    def action_pick(self, step: int) -> None:
        self._index = (self._index + step) % len(self._blocks)
        self._show()

    def action_apply(self) -> None:
        self.dismiss(self.replacement)

    def action_cancel(self) -> None:
        self.dismiss(None)
