"""The ctrl+r dialog: the kept conversations, newest first, filtered as you type (fuzzy), to resume or delete one."""

from __future__ import annotations

import time
from typing import ClassVar

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.fuzzy import FuzzySearch
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from tui.history import ChatSummary, HistoryError, HistoryStore
from tui.screens import ConfirmScreen

_MATCH = Style(bold=True, underline=True)


def when(seconds: float) -> str:
    """A conversation's date, in local time."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def matching(query: str, chats: list[ChatSummary]) -> list[tuple[ChatSummary, tuple[int, ...]]]:
    """The conversations whose title or model fuzzily match `query` (all for an empty one), still newest first, each
    with the offsets of its title's matched characters."""
    if not query.strip():
        return [(chat, ()) for chat in chats]
    search = FuzzySearch()
    found = []
    for chat in chats:
        score, offsets = search.match(query, chat.title)
        if score:
            found.append((chat, offsets))
        elif search.match(query, chat.model)[0]:
            found.append((chat, ()))
    return found


def _row(chat: ChatSummary, offsets: tuple[int, ...]) -> Table:
    title = Text(chat.title or "(no message)", no_wrap=True, overflow="ellipsis")
    for offset in offsets:
        title.stylize(_MATCH, offset, offset + 1)
    row = Table.grid(padding=(0, 1), expand=True)
    row.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    row.add_column(width=16, no_wrap=True)
    row.add_column(width=24, no_wrap=True, overflow="ellipsis")
    row.add_row(title, Text(when(chat.updated), style="dim"), Text(chat.model, style="dim"))
    return row


class HistoryScreen(ModalScreen["str | None"]):
    """Dismisses with the id of the conversation to resume, or None. `deleted` holds the ids deleted meanwhile."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "resume", "Resume", priority=True),  # from the filter as from the list
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("escape", "close", "Close"),
        Binding("down", "move(1)", "Down", show=False),
        Binding("up", "move(-1)", "Up", show=False),
    ]

    def __init__(self, store: HistoryStore) -> None:
        super().__init__()
        self._store = store
        self._chats: list[ChatSummary] = []
        self._shown: list[ChatSummary] = []
        self._problem = ""
        self.deleted: set[str] = set()

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Conversations", id="question")
            yield Input(placeholder="filter (fuzzy): title or model", id="history-filter", compact=True)
            yield OptionList(id="history-list", compact=True)
            yield Label("", id="problem", markup=False)
            yield Label("Enter: resume   ctrl+d: delete   Esc: close", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self._reload()
        self.query_one(Input).focus()

    def _reload(self) -> None:
        try:
            self._chats = self._store.conversations()
        except HistoryError as err:
            self._chats, self._problem = [], str(err)
        self._fill()

    @on(Input.Changed, "#history-filter")
    def _fill(self) -> None:
        query = self.query_one(Input).value
        found = matching(query, self._chats)
        self._shown = [chat for chat, _ in found]
        options = self.query_one(OptionList)
        options.set_options(Option(_row(chat, offsets), id=chat.id) for chat, offsets in found)
        if found:
            options.highlighted = 0
        empty = "no conversation matches" if self._chats else "no conversations kept yet"
        label = self.query_one("#problem", Label)
        label.update(self._problem or ("" if found else empty))
        label.display = bool(self._problem or not found)

    def _highlighted(self) -> ChatSummary | None:
        index = self.query_one(OptionList).highlighted
        return self._shown[index] if index is not None and index < len(self._shown) else None

    def action_move(self, step: int) -> None:
        options = self.query_one(OptionList)
        if options.option_count:
            options.highlighted = max(0, min(options.option_count - 1, (options.highlighted or 0) + step))

    @on(OptionList.OptionSelected, "#history-list")
    def action_resume(self) -> None:
        """Enter (or a click): resume the highlighted conversation."""
        chat = self._highlighted()
        if chat is not None:
            self.dismiss(chat.id)

    def action_delete(self) -> None:
        """ctrl+d: delete the highlighted conversation, after a yes."""
        chat = self._highlighted()
        if chat is None:
            return

        def decided(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self._store.delete(chat.id)
            except HistoryError as err:
                self._problem = str(err)
                self._fill()
                return
            self.deleted.add(chat.id)
            index = self.query_one(OptionList).highlighted or 0
            self._reload()
            options = self.query_one(OptionList)
            if options.option_count:
                options.highlighted = min(index, options.option_count - 1)  # the next one, where the deleted stood

        self.app.push_screen(ConfirmScreen(f"Delete the conversation “{chat.title}”?"), decided)

    def action_close(self) -> None:
        self.dismiss(None)
