"""The chat input: multi-line, sent only by a `!!` line or by the send key (F5), never by Enter.

Enter always inserts a newline, so pasted code with blank lines stays whole however it arrives.
The seed's convention — a line that is exactly `!!`, then Enter — sends what stands above it.
Without bracketed paste (some SSH and tmux links) a paste arrives as a burst of key events, and the
pasted text may itself hold a `!!` line; an Enter that comes within `BURST_S` of the key before it
cannot have been typed by a person, so it is taken as part of the paste and never sends.
"""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

SEND_LINE = "!!"
BURST_S = 0.008
"""Keys closer together than this are a paste: people type at most ~20 keys/s (50 ms apart)."""


class ChatInput(TextArea):
    """Multi-line chat input; posts `ChatInput.Submitted` with the text to send."""

    DEFAULT_CSS = """
    ChatInput {
        height: 6;
        border: round $border-blurred;
        border-title-color: $text-muted;
        &:focus { border: round $border; }
    }
    ChatInput.-narrow { height: 4; }
    """

    class Submitted(Message):
        """The user asked to send `text` (already stripped of the `!!` line)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            "",
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            placeholder="Ask CodeLlama… (F5 sends; or a line with just !! then Enter)",
            id=id,
        )
        self.border_title = "chat input"
        self._last_key_time: float | None = None

    async def _on_key(self, event: events.Key) -> None:
        previous, self._last_key_time = self._last_key_time, event.time
        in_burst = previous is not None and event.time - previous < BURST_S
        if event.key in ("enter", "ctrl+j") and not in_burst and self._on_send_line():
            event.stop()
            event.prevent_default()
            self._send_above()
            return
        if event.key == "ctrl+j":  # a bare line feed (some links send it for pasted newlines)
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def _on_send_line(self) -> bool:
        row, column = self.cursor_location
        line = self.document[row]
        return line.strip() == SEND_LINE and column >= len(line.rstrip())

    def send(self) -> None:
        """Send the whole input (F5) and clear it."""
        self._send(self.text, "")

    def _send_above(self) -> None:
        """Send the lines above the `!!` line the cursor stands on; keep the lines below it."""
        lines = self.text.split("\n")
        row, _ = self.cursor_location
        self._send("\n".join(lines[:row]), "\n".join(lines[row + 1 :]))

    def _send(self, text: str, keep: str) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        self.load_text(keep)
        self.post_message(self.Submitted(text))
