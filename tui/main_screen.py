"""The main screen: the editor with the chat beside it, the status line, the footer, and the keys that work there.

The keys are the screen's (the App keeps only quit, which works on every screen); their actions are the App's,
which holds the engine client and the jobs.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen

from widgets.chat_input import ChatInput
from widgets.chat_log import ChatLog
from widgets.editor import EditorPane
from widgets.footer import Footer
from widgets.status_bar import StatusBar


class MainScreen(Screen[None]):
    """The workspace around one buffer."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "app.save", "Save", id="save", tooltip="Save the file", priority=True),
        # F12, not ctrl+shift+s: terminals (and tmux) send ctrl+shift+s as ctrl+s.
        Binding("f12", "app.save_as", "Save as", id="save_as", show=False, priority=True),
        Binding("f2", "app.complete", "Complete", id="complete", tooltip="Suggest a completion at the cursor"),
        Binding("f3", "app.infill", "Infill", id="infill", tooltip="Fill the <FILL> markers (or at the cursor)"),
        Binding("f4", "app.switch_pane", "Pane", id="switch_pane", tooltip="Focus the other pane"),
        Binding("f5", "app.send", "Send", id="send", tooltip="Send the chat input"),
        # priority: TextArea binds F6/F7 to select line / select all; F6 still selects a line when
        # nothing is selected (the binding then stands aside), so a second F6 asks about it.
        Binding("f6", "app.ask", "Ask", id="ask", tooltip="Ask the chat about the selection", priority=True),
        Binding(
            "f7", "app.apply_code", "Apply", id="insert_code", tooltip="Apply a code block of the chat", priority=True
        ),
        Binding("f8", "app.switch_cap", "Cap", id="switch_cap", tooltip="Cycle the chat input's cap"),
        Binding("ctrl+n", "app.new_chat", "New chat", id="new_chat", tooltip="Forget the conversation"),
        Binding(
            "ctrl+r", "app.history", "History", id="history", tooltip="Resume or delete a kept conversation", show=False
        ),
        Binding(
            "escape", "app.stop", "Stop", id="stop", tooltip="Stop generating, or dismiss the suggestion", priority=True
        ),
    ]

    class Composed(Message):
        """The screen's widgets are mounted: the app can fill them in and start the engine."""

    def __init__(self, text: str, path: str | None) -> None:
        super().__init__()
        self._text = text
        self._path = path

    def compose(self) -> ComposeResult:
        with Vertical(id="main"):
            yield EditorPane(self._text, path=self._path, id="editor-pane")
            with Vertical(id="chat-pane"):
                yield ChatLog(id="chat-log")
                yield ChatInput(id="chat-input")
        yield StatusBar(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.post_message(self.Composed())
