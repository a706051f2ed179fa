"""The chat log: the user's messages, answers streamed as Markdown (code blocks highlighted), notices."""

from __future__ import annotations

import re
from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Markdown, Static

_FENCE_RE = re.compile(r"^```[^\n`]*\n(.*?)(?:^```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks (an unclosed last one counts), in order."""
    return [block.rstrip("\n") for block in _FENCE_RE.findall(markdown)]


def last_code_block(markdown: str) -> str | None:
    """The body of the last fenced code block, or None without any."""
    blocks = code_blocks(markdown)
    return blocks[-1] if blocks else None


class UserMessage(Static):
    """What the user sent."""

    DEFAULT_CSS = """
    UserMessage {
        margin: 1 0 0 0;
        padding: 0 1;
        background: $boost;
        border-left: outer $accent;
    }
    """


class Answer(Markdown):
    """One streamed answer; `source` grows as text arrives."""

    DEFAULT_CSS = """
    Answer {
        margin: 0;
        padding: 0 1;
        border-left: outer $primary;
        &.-failed { border-left: outer $error; }
    }
    """


class Notice(Static):
    """A line about the conversation itself (turns dropped, stopped, errors, new chat)."""

    DEFAULT_CSS = """
    Notice {
        color: $text-muted;
        text-style: italic;
        padding: 0 1;
        &.-warning { color: $warning; }
        &.-error { color: $error; text-style: bold; }
    }
    """


class ChatLog(VerticalScroll):
    """The conversation, newest at the bottom, following the end while answers stream.

    Focused (shift+tab from the chat input), it scrolls with the arrows, PageUp/PageDown and Home/End, fills the
    screen, and copies the last answer or its last code block (posting `ChatLog.Copy`; the app copies).
    """

    ALLOW_MAXIMIZE = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy_answer", "Copy", id="copy_answer", tooltip="Copy the last answer to the clipboard"),
        Binding("y", "copy_code", "Copy code", id="copy_code", tooltip="Copy the last code block to the clipboard"),
        Binding("m", "maximize", "Maximise", id="maximize", tooltip="Fill the screen with the log (again: back)"),
    ]

    DEFAULT_CSS = """
    ChatLog {
        height: 1fr;
        scrollbar-size-vertical: 1;
        &:focus { background: $boost; }
    }
    """

    class Copy(Message):
        """Copy `text` (`what` names it for the status line) to the clipboard."""

        def __init__(self, text: str, what: str) -> None:
            super().__init__()
            self.text = text
            self.what = what

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._answer: Answer | None = None
        self._answers: list[str] = []  # the Markdown of every answer, oldest first

    def on_mount(self) -> None:
        self.anchor()  # follow the end while answers grow, until the user scrolls up

    def add_user(self, text: str) -> None:
        self.mount(UserMessage(text, markup=False))

    def begin_answer(self, opening: str = "") -> None:
        """Start a new answer; `opening` is Markdown put before the streamed text (e.g. a fence)."""
        self._answer = Answer(opening)
        self._answers.append(opening)
        self.mount(self._answer)

    def append(self, text: str) -> None:
        """Add streamed text to the current answer."""
        if self._answer is None or not text:
            return
        self._answers[-1] += text
        self._answer.append(text)

    def end_answer(self, closing: str = "", failed: bool = False) -> None:
        """Finish the current answer (`closing` ends an opened fence)."""
        if self._answer is None:
            return
        if closing:
            self.append(closing)
        self._answer.set_class(failed, "-failed")
        self._answer = None

    def add_notice(self, text: str, level: str = "info") -> None:
        """A notice; level is "info", "warning" or "error"."""
        notice = Notice(text, markup=False)
        if level != "info":
            notice.add_class(f"-{level}")
        self.mount(notice)

    @property
    def last_answer(self) -> str:
        """The Markdown of the most recent answer."""
        return self._answers[-1] if self._answers else ""

    def last_code(self) -> str | None:
        """The last code block of the most recent answer."""
        return last_code_block(self.last_answer)

    def code_blocks(self) -> list[str]:
        """Every code block of every answer in the log, oldest first."""
        return [block for answer in self._answers for block in code_blocks(answer)]

    def clear_log(self) -> None:
        self._answer = None
        self._answers = []
        self.remove_children()

    def action_copy_answer(self) -> None:
        if self.last_answer.strip():
            self.post_message(self.Copy(self.last_answer.strip("\n"), "the last answer"))

    def action_copy_code(self) -> None:
        if (code := self.last_code()) is not None:
            self.post_message(self.Copy(code, "the last code block"))

    def action_maximize(self) -> None:
        """Fill the screen with the log, or give the screen back."""
        if self.screen.maximized is self:
            self.screen.minimize()
        else:
            self.screen.maximize(self, container=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "copy_answer":
            return bool(self.last_answer.strip()) or None
        if action == "copy_code":
            return self.last_code() is not None or None
        return True
