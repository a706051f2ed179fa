"""The terminal around the app: input bytes that are not UTF-8, and the signals that end a session.

- Textual 8's drivers decode input strictly: one stray byte (a terminal not set to UTF-8, line noise, a
  multiplexer's garbage) raises in the input thread, which ends the app. `tolerate_invalid_input` makes them
  decode each invalid byte as U+FFFD instead, which the editor shows as `�`.
- SIGHUP (the SSH connection dropped), SIGTERM (kill, systemd) and SIGINT from outside the app (the terminal's
  ctrl+c is a key to Textual) would end the process at once: unsaved edits lost, the terminal left in the
  alternate screen with mouse reporting on. `ExitSignals` keeps the work first, then stops the app as a quit
  does, so that the driver restores the terminal; the exit status is 128 + the signal, as for a shell.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib
import os
import signal
import threading
from asyncio import AbstractEventLoop
from collections.abc import Callable
from types import FrameType

EXIT_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
GRACE_S = 5.0  # a clean stop that takes longer (a terminal that is gone can block the driver's writes) is cut short
_DRIVERS = ("textual.drivers.linux_driver", "textual.drivers.linux_inline_driver", "textual.drivers.web_driver")


def _replacing_decoder(encoding: str) -> Callable[..., codecs.IncrementalDecoder]:
    return functools.partial(codecs.getincrementaldecoder(encoding), errors="replace")


def tolerate_invalid_input() -> None:
    """Make Textual's drivers decode input with errors="replace" (each makes its decoder when its input thread
    starts, from the `getincrementaldecoder` it imported)."""
    for name in _DRIVERS:
        with contextlib.suppress(ImportError):  # a driver for another platform
            module = importlib.import_module(name)
            if hasattr(module, "getincrementaldecoder"):
                module.getincrementaldecoder = _replacing_decoder


class ExitSignals:
    """Ends the app cleanly on SIGHUP, SIGTERM and SIGINT.

    The handler runs on the main thread between two bytecodes, so it works even while the event loop is busy or
    blocked: `keep()` (write the recovery copies) runs there at once, `stop(code)` is handed to the event loop.
    A process still alive GRACE_S later, or one that gets a second signal, ends at once with the same code.
    """

    def __init__(self, loop: AbstractEventLoop, keep: Callable[[], object], stop: Callable[[int], None]) -> None:
        self._loop = loop
        self._keep = keep
        self._stop = stop
        self._previous: dict[int, object] = {}
        self._stopping = False

    def install(self) -> None:
        """Take over the exit signals (from the main thread)."""
        for signum in EXIT_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the exit signals back to whoever had them."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        code = 128 + signum
        self._keep()
        if self._stopping:
            os._exit(code)
        self._stopping = True
        watchdog = threading.Timer(GRACE_S, os._exit, (code,))
        watchdog.daemon = True
        watchdog.start()
        with contextlib.suppress(RuntimeError):  # the loop already closed: the watchdog ends the process
            self._loop.call_soon_threadsafe(self._stop, code)


TITLE_PUSH = "\x1b[22;2t"  # xterm's window-title stack (XTWINOPS): the app's title goes, the shell's comes back
TITLE_POP = "\x1b[23;2t"
_CONTROLS = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)])


def title_sequence(title: str) -> str:
    """The OSC 2 sequence that sets the terminal's (and tmux's) window title; control characters are dropped, so a
    file name cannot end the sequence early and write to the terminal."""
    return f"\x1b]2;{title.translate(_CONTROLS)}\x07"
