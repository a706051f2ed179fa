"""The real `codellama-tui FILE` in a pseudo-terminal: signals, a dropped connection and invalid input bytes never
lose the edits, and the terminal is given back as it was (the demo model loads on the CPU meanwhile)."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tui.recovery import RecoveryCopy, RecoveryStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARKER = "unique_marker_line = 1"
REPLACEMENT = "\ufffd"


def _controlling_terminal() -> None:
    """In the child, after setsid: stdin (the pty) becomes its controlling terminal, as a login shell's is, so that
    closing the other end sends it SIGHUP."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A pty with the app on its far end; everything the app writes is collected."""

    def __init__(self, file: Path, state: Path, rows: int = 30, cols: int = 100) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {
            **os.environ,
            "TERM": "xterm-256color",
            "PYTHONPATH": str(ROOT),
            "XDG_STATE_HOME": str(state),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "tui.cli", str(file), "--device", "cpu"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the app's end is closed, or ours was
                return
            if not data:
                return
            self.output += data

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        """Until the app has drawn `text` (a screen update draws a changed line whole)."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            assert self.proc.poll() is None, f"the app ended ({self.proc.returncode}) before drawing {text!r}"
            assert time.monotonic() < deadline, f"{text!r} never drawn"
            time.sleep(0.05)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def hang_up(self) -> None:
        """What a dropped SSH connection does: the terminal's other end goes away."""
        os.close(self.master)
        self._reader.join(5)

    def end(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader.is_alive():
            os.close(self.master)


@pytest.fixture
def file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(f"{MARKER}\n")
    return path


@pytest.fixture
def terminal(file: Path, tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(file, tmp_path / "state")
    yield term
    term.close()


def copies(file: Path, tmp_path: Path) -> list[RecoveryCopy]:
    return RecoveryStore(tmp_path / "state" / "codellama-tui" / "recovery").copies_of(str(file))


def assert_terminal_restored(output: bytes) -> None:
    """After the last time the app set each mode, it reset it: alternate screen left, mouse reporting off,
    the cursor shown."""
    for on, off in ((b"\x1b[?1049h", b"\x1b[?1049l"), (b"\x1b[?1000h", b"\x1b[?1000l"), (b"\x1b[?25l", b"\x1b[?25h")):
        assert output.rfind(on) >= 0, f"the app never set {on!r}"
        assert output.rfind(off) > output.rfind(on), f"{on!r} is still set when the app ended"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_keeps_the_edits_restores_the_terminal_and_the_next_open_offers_them(
    signum: int, terminal: Terminal, file: Path, tmp_path: Path
) -> None:
    terminal.wait_for(MARKER)
    terminal.type(b"typed_")
    terminal.wait_for("typed_" + MARKER)
    terminal.proc.send_signal(signum)
    assert terminal.end() == 128 + signum
    assert_terminal_restored(bytes(terminal.output))
    (copy,) = copies(file, tmp_path)
    assert copy.text == f"typed_{MARKER}\n" and file.read_text() == f"{MARKER}\n"
    assert f"codellama-tui: the unsaved changes are kept in {copy.file}".encode() in terminal.output

    again = Terminal(file, tmp_path / "state")
    try:
        again.wait_for("notes.txt has a recovery copy with unsaved changes.")
        again.wait_for("1 line added, 1 removed in the copy")
        again.type(b"r")
        again.wait_for("typed_" + MARKER)
        again.proc.send_signal(signal.SIGTERM)
        assert again.end() == 128 + signal.SIGTERM
    finally:
        again.close()
    assert [copy.text for copy in copies(file, tmp_path)] == [f"typed_{MARKER}\n"]  # the recovered copy, once


def test_a_dropped_connection_keeps_the_edits_and_ends_the_app(terminal: Terminal, file: Path, tmp_path: Path) -> None:
    """The terminal goes away (SIGHUP from the kernel, then reads and writes that fail): the copy is written and
    the process ends instead of hanging on a terminal that is gone."""
    terminal.wait_for(MARKER)
    terminal.type(b"before_the_drop_")
    terminal.wait_for("before_the_drop_" + MARKER)
    terminal.hang_up()
    assert terminal.end() == 128 + signal.SIGHUP
    assert [copy.text for copy in copies(file, tmp_path)] == [f"before_the_drop_{MARKER}\n"]


def test_an_invalid_input_byte_does_not_end_the_app(terminal: Terminal, file: Path, tmp_path: Path) -> None:
    """`tmux send-keys -H e9` then a key: a lone UTF-8 lead byte. It becomes U+FFFD and the app goes on."""
    terminal.wait_for(MARKER)
    terminal.type(b"ok")
    terminal.wait_for("ok" + MARKER)
    terminal.type(b"\xe9")
    terminal.type(b"z")
    terminal.wait_for(f"ok{REPLACEMENT}z{MARKER}")
    terminal.type(b"_still_typing_")
    terminal.wait_for(f"ok{REPLACEMENT}z_still_typing_{MARKER}")
    terminal.proc.send_signal(signal.SIGTERM)
    assert terminal.end() == 128 + signal.SIGTERM
    assert [copy.text for copy in copies(file, tmp_path)] == [f"ok{REPLACEMENT}z_still_typing_{MARKER}\n"]
