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
from textual.widgets import TabPane

from widgets.chat_input import ChatInput
from widgets.chat_log import ChatLog
from widgets.file_tabs import FileTabs
from widgets.find_bar import FindBar
from widgets.footer import Footer
from widgets.status_bar import StatusBar

# The footer's keys, most important first: at 80 columns the last ones make way for the first.
FOOTER_FIRST = (
    "stop", "help", "send", "switch_cap", "new_chat", "complete", "infill", "insert_code", "ask", "accept",
    "copy_answer", "copy_code", "maximize", "save", "quit", "switch_pane",
)  # fmt: skip


class MainScreen(Screen[None]):
    """The workspace around the open files."""

    ALLOW_IN_MAXIMIZED_VIEW = "StatusBar, Footer"  # a maximised chat log keeps the status line and the keys

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "app.help", "Help", id="help", tooltip="Every key and command"),
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
        Binding("ctrl+l", "app.focus_log", "Log", id="focus_log", show=False, tooltip="Focus the chat log"),
        Binding(
            "ctrl+r", "app.history", "History", id="history", tooltip="Resume or delete a kept conversation", show=False
        ),
        Binding(
            "escape", "app.stop", "Stop", id="stop", tooltip="Stop generating, or dismiss the suggestion", priority=True
        ),
        Binding(
            "ctrl+o", "app.open_file", "Open", id="open_file", tooltip="Open a file by part of its path", show=False
        ),
        Binding(
            "ctrl+t", "app.toggle_tree", "Files", id="toggle_tree", tooltip="Show or hide the file tree", show=False
        ),
        # priority: TextArea deletes a word on ctrl+w (ctrl+backspace and alt+backspace still do)
        Binding(
            "ctrl+w", "app.close_file", "Close", id="close_file", tooltip="Close the file", show=False, priority=True
        ),
        Binding("ctrl+pagedown", "app.next_file", "Next file", id="next_file", tooltip="The next tab", show=False),
        Binding(
            "ctrl+pageup",
            "app.next_file(-1)",
            "Previous file",
            id="previous_file",
            tooltip="The tab before it",
            show=False,
        ),
        Binding("ctrl+g", "app.goto_line", "Go to line", id="goto_line", tooltip="Go to line[:column]", show=False),
        Binding("ctrl+f", "app.find", "Find", id="find", tooltip="Find in the file", show=False),
        # most terminals send ctrl+h as Backspace; those that tell them apart (the kitty protocol) send ctrl+h
        Binding(
            "ctrl+h,ctrl+backslash", "app.replace", "Replace", id="replace", tooltip="Find and replace", show=False
        ),
    ]

    class Composed(Message):
        """The screen's widgets are mounted: the app can fill them in and start the engine."""

    def __init__(self, first: TabPane) -> None:
        """`first` is the first file's tab (FileTabs.pane)."""
        super().__init__()
        self._first = first

    def compose(self) -> ComposeResult:
        with Vertical(id="main"):
            with Vertical(id="editor-pane"):
                with FileTabs(id="file-tabs"):
                    yield self._first
                yield FindBar(id="find-bar")
            with Vertical(id="chat-pane"):
                yield ChatLog(id="chat-log")
                yield ChatInput(id="chat-input")
        yield StatusBar(id="status")
        yield Footer(FOOTER_FIRST)

    def on_mount(self) -> None:
        self.post_message(self.Composed())
