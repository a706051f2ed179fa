"""The help screen (F1): every key, read from the bindings themselves so that it never goes stale, and every
command of the palette and the chat input."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

CHAT_COMMANDS = (
    ("/system TEXT", "set the system instruction (a new chat)"),
    ("/new", "start a new chat"),
    ("!! then Enter", "a line with just !! sends what stands above it"),
)


def key_rows(
    bindings: Iterable[Binding], keymap: Mapping[str, str], display: Callable[[Binding], str]
) -> list[tuple[str, str]]:
    """(keys, what they do) for each binding with a description, with the user's keymap applied; one row per
    action (Textual lists a binding once per key)."""
    rows: dict[str, tuple[list[str], str]] = {}
    for binding in bindings:
        if not binding.description:
            continue
        keys = keymap.get(binding.id, binding.key) if binding.id else binding.key
        shown = [display(Binding(key.strip(), binding.action)) for key in keys.split(",") if key.strip()]
        what = binding.description + (f": {binding.tooltip}" if binding.tooltip else "")
        known, _ = rows.setdefault(binding.action, ([], what))
        known.extend(key for key in shown if key not in known)
    return [(" / ".join(keys), what) for keys, what in rows.values()]


class HelpScreen(ModalScreen[None]):
    """Keys and commands; Esc, F1 or q closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,q", "close", "Close", id="close_help"),
    ]

    def __init__(self, keys: list[tuple[str, str]], commands: list[tuple[str, str]]) -> None:
        super().__init__()
        self._keys = keys
        self._commands = commands

    def compose(self) -> ComposeResult:
        width = max((len(keys) for keys, _ in [*self._keys, *CHAT_COMMANDS]), default=0) + 2
        with Vertical(id="dialog"):
            yield Label("Keys and commands (Esc closes)", id="question")
            with VerticalScroll(id="help"):
                yield Static(
                    "\n".join(f"{keys:<{width}}{what}" for keys, what in self._keys), id="help-keys", markup=False
                )
                yield Label("Chat input", classes="help-heading")
                yield Static("\n".join(f"{name:<{width}}{what}" for name, what in CHAT_COMMANDS), markup=False)
                yield Label("Command palette (ctrl+p)", classes="help-heading")
                yield Static("\n".join(f"{name}: {what}" for name, what in self._commands), markup=False)
        yield Footer()

    def action_close(self) -> None:
        self.dismiss(None)
