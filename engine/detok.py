"""Streaming detokenization: UTF-8-safe incremental decoding and user stop strings.

Byte-fallback pieces (`<0xE2>`, ...) split characters across tokens, so text is released only once
a character is complete; stop strings may span tokens, so a tail that could start one is held back.
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
