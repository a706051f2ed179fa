"""Streaming detokenization: UTF-8-safe incremental decoding, user stop strings and the end of a block.

Byte-fallback pieces (`<0xE2>`, ...) split characters across tokens, so text is released only once
a character is complete; stop strings may span tokens, so a tail that could start one is held back; a new line's
fate waits for its indentation, so a line break is held back until the line that follows it shows its first
character.
"""

from __future__ import annotations

import codecs

from engine.tokenizer import Tokenizer


class IncrementalDecoder:
    """Turn generated ids into text chunks that never split a UTF-8 character.

    All pushes plus `flush()` concatenate to `tok.decode(ids)`.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self._token_bytes = tok.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (may be empty while a character is incomplete)."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left at the end: a U+FFFD for a trailing incomplete character, else ""."""
        return self._utf8.decode(b"", final=True)


class StopStrings:
    """Cut a text stream at the first user stop string, holding back tails that might start one.

    The stop that completes first in the stream wins (ties: the one that starts first), so the
    result does not depend on how the text was chunked.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit); after a hit, nothing more."""
        if self._hit:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut is not None:
            self._held, self._hit = "", True
            return buf[:cut], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release the held-back tail when the stream ends without a stop."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buf: str) -> int | None:
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_tail(self, buf: str) -> int:
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class BlockEnd:
    """End a code suggestion where the block it started ends, as editor copilots do (`Request.stop_at_dedent`).

    `indent` is the indentation (leading spaces and tabs, counted as characters) of the line the suggestion starts
    on; the suggestion's first line continues that line. Each later line is judged once its first character shows:

    - a line indented less than `indent`: the block that holds the cursor has ended;
    - a blank line while the text is at the cursor's level (its last line was indented `indent` or less): the
      statements at the cursor's level are done;
    - a line back at the cursor's level right after a blank line (Python's next `def` after a body);
    - a second line at the cursor's level after one that closed a deeper block (a `}`, an `else:` whose body did
      not follow, the statement after an `if` body).

    The text is cut before that line, and before the line break and blank lines in front of it; a line at the
    cursor's level that closes a deeper block (`}`, `end`, `else:`) is kept. `indent=None` passes text through.
    """

    def __init__(self, indent: int | None) -> None:
        self._indent = indent
        self._held = ""  # the line break(s) and indentation of a line not yet judged
        self._width = 0  # the indentation so far of the line being judged
        self._judging = False  # past a line break, before the new line's first character
        self._last = indent or 0  # the indentation of the last non-blank line
        self._after_blank = False
        self._closed = False  # the last non-blank line came back to `indent` from deeper
        self._hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether the block ended); after the end, nothing more."""
        if self._hit:
            return "", True
        if self._indent is None:
            return text, False
        out: list[str] = []
        for char in text:
            if not self._judging:
                if char == "\n":
                    self._judging, self._held, self._width = True, "\n", 0
                else:
                    out.append(char)
            elif char in " \t\r":
                self._held += char
                self._width += char != "\r"
            elif char == "\n":
                if self._last <= self._indent:
                    return self._end(out)
                self._held += char
                self._width, self._after_blank = 0, True
            else:
                if self._ends_here():
                    return self._end(out)
                out.append(self._held + char)
                self._held, self._judging, self._after_blank = "", False, False
        return "".join(out), False

    def flush(self) -> str:
        """Release the held-back line break and indentation when the stream ends before the line is judged."""
        held, self._held = ("" if self._hit else self._held), ""
        return held

    def _ends_here(self) -> bool:
        """Judge the line whose first character just came (its indentation is `_width`), and update the state."""
        assert self._indent is not None
        width, indent = self._width, self._indent
        if width < indent or (width == indent and (self._after_blank or self._closed)):
            return True
        self._closed = width == indent and self._last > indent
        self._last = width
        return False

    def _end(self, out: list[str]) -> tuple[str, bool]:
        self._hit, self._held = True, ""
        return "".join(out), True
