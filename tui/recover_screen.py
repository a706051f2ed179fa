"""The offer of a recovery copy when its file is opened again: recover it, discard it, or keep it for later."""

from __future__ import annotations

import os
import time
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.files import pid_alive
from tui.recovery import RecoveryCopy
from tui.screens import diff_lines
from widgets.footer import Footer


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s ago"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min ago"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h ago"
    return f"{round(seconds / 86400)} days ago"


def _lines(count: int) -> str:
    return f"{count} line" if count == 1 else f"{count} lines"


def describe(copy: RecoveryCopy, current: str, name: str) -> str:
    """When and by whom `copy` was written, and its size against `current` (the file as it is now)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.written))
    where = "on disk" if copy.path is not None else "now"
    lines = [
        f"Written {stamp} ({_ago(time.time() - copy.written)}) by process {copy.pid}.",
        f"The copy has {_lines(len(copy.text.splitlines()))}, {name} {where} has {len(current.splitlines())}.",
    ]
    if copy.pid != os.getpid() and pid_alive(copy.pid):
        lines.append(f"Process {copy.pid} is still running: another codellama-tui may be editing it.")
    return "\n".join(lines)


class RecoverScreen(ModalScreen[str]):
    """Offers one recovery copy; dismisses with "recover", "discard" or "keep" (for later: nothing changes)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "choose('recover')", "Recover"),
        Binding("d", "choose('discard')", "Discard the copy"),
        Binding("k,escape", "choose('keep')", "Keep it for later"),
    ]

    def __init__(self, copy: RecoveryCopy, current: str, name: str) -> None:
        super().__init__()
        self._copy = copy
        self._current = current
        self._name = name

    def compose(self) -> ComposeResult:
        summary, diff = diff_lines(self._current, self._copy.text, "in the copy")
        with Vertical(id="dialog"):
            yield Label(f"{self._name} has a recovery copy with unsaved changes.", id="question", markup=False)
            yield Label(describe(self._copy, self._current, self._name), id="recovery-summary", markup=False)
            yield Label(summary, id="diff-summary", markup=False)
            with VerticalScroll(id="diff"):
                yield Static("\n".join(diff), markup=False)
            yield Label("r: recover it   d: discard it   k / Esc: keep it for later")
        yield Footer()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
