"""Streaming detokenization: UTF-8-safe incremental decoding, user stop strings and the end of a block.

Byte-fallback pieces (`<0xE2>`, ...) split characters across tokens, so text is released only once
a character is complete; stop strings may span tokens, so a tail that could start one is held back; whether a
suggestion's block goes on is told by its next line's indentation and first word, so a line break is held back
until they show.
"""

from __future__ import annotations

import codecs
import re

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


# A line that closes a block (kept, as the last line of the block it closes): a closing bracket, or a keyword that
# ends a block or goes on with its statement (`else:`, `except:`, Ruby's and Lua's `end`).
_CLOSING = re.compile(r"[}\])]|(?:end|else|elif|except|finally|catch|rescue|ensure)\b")


def line_indent(line: str) -> str:
    """The leading spaces and tabs of a line."""
    return line[: len(line) - len(line.lstrip(" \t"))]


class BlockEnd:
    """End a code suggestion where the block it started ends, as editor copilots do (`Request.stop_at_block_end`).

    `cursor_line` is the cursor's line up to the cursor: its indentation (spaces and tabs, each one character) is
    the cursor's level, and the suggestion's first line goes on with that line (on a line of only indentation, the
    first line's own indentation adds to the level). Each later line is judged by its indentation once its first
    word shows:

    - deeper than the level: inside a block, kept;
    - shallower: the block that holds the cursor has ended, cut;
    - at the level, back from the block the cursor's line opened (`def f():`, `if (x) {`): a line that closes it
      (`}`, `)`, `end`, `else:`, `except:`) is kept, and the suggestion ends after it unless the next line goes
      deeper again (`} else {`); any other line (the next `def`, the statement after an `if` body) is cut;
    - at the level otherwise: kept (statements one after another, and the blocks they open);
    - a blank line after a line at the level (once the suggestion wrote something), or after a closing line: cut.

    A cut also drops the line break and the blank lines in front of it. Until a line is judged, its line break,
    indentation and first word are held back; `flush` releases them when the stream ends first.
    """

    def __init__(self, cursor_line: str) -> None:
        self._level = len(line_indent(cursor_line))
        self._first = True  # still on the cursor's line
        self._first_blank = not cursor_line.strip(" \t")  # ... and it holds only indentation so far
        self._held = ""  # the line break(s), indentation and first word of a line not yet judged ("" when none)
        self._width = 0  # the indentation of the line being judged
        self._word = ""  # its first word so far
        self._deeper = False  # a line deeper than the level came since the last one at the level
        self._opened: bool | None = None  # whether the cursor's line opened a block (its next line is deeper)
        self._closed = False  # the last line at the level closed the block the cursor's line opened
        self._wrote = False  # the suggestion wrote a non-blank character
        self._hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether the block ended); after the end, nothing more."""
        if self._hit:
            return "", True
        out: list[str] = []
        for char in text:
            if not self._held:
                self._on_line(char, out)
            elif not self._take(char, out):
                self._hit, self._held = True, ""
                return "".join(out), True
        return "".join(out), False

    def flush(self) -> str:
        """The held-back text of a line not yet judged, when the stream ends first (nothing after the end)."""
        held, self._held = ("" if self._hit else self._held), ""
        return held

    def _on_line(self, char: str, out: list[str]) -> None:
        """A character of a line already judged (or of the cursor's line): emitted, unless it breaks the line."""
        if char == "\n":
            self._first, self._held, self._width, self._word = False, "\n", 0, ""
            return
        if self._first and self._first_blank:
            if char in " \t":
                self._level += 1
            else:
                self._first_blank = False
        self._wrote = self._wrote or not char.isspace()
        out.append(char)

    def _take(self, char: str, out: list[str]) -> bool:
        """A character of the line being judged; False when the block ends before that line."""
        if self._word:
            if char.isalnum() or char == "_":
                self._word += char
                self._held += char
                return True
            if not self._keeps():
                return False
            out.append(self._held)
            self._held = ""
            self._on_line(char, out)
            return True
        if char in " \t\r":
            self._held += char
            self._width += char != "\r"
            return True
        if char == "\n":
            if self._closed or (not self._deeper and self._wrote):
                return False
            self._held, self._width = self._held + char, 0
            return True
        self._held += char
        if char.isalnum() or char == "_":
            self._word = char  # judged once the word is whole
            return True
        self._word = char
        if not self._keeps():
            return False
        out.append(self._held)
        self._held, self._wrote = "", True
        return True

    def _keeps(self) -> bool:
        """Judge the line whose indentation is `_width` and whose first word is `_word`, updating the state."""
        width, level, closing = self._width, self._level, _CLOSING.match(self._word) is not None
        self._word, self._wrote = "", True
        if self._opened is None:
            self._opened = width > level
        if width > level:
            self._deeper, self._closed = True, False
            return True
        if width < level or self._closed:
            return False
        if self._deeper and self._opened:  # back from the block the cursor's line opened
            if not closing:
                return False
            self._closed = True
        self._deeper = False
        return True
