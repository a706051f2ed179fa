"""The offer of a recovery copy when its file is opened again: recover it, discard it, or keep it for later."""

from __future__ import annotations

import difflib
import os
import time
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.recovery import RecoveryCopy
from widgets.footer import Footer

PREVIEW_LINES = 8


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


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and another user's
    return True


def describe(copy: RecoveryCopy, current: str, name: str) -> tuple[str, str]:
    """What the dialog says about `copy` against `current` (the file as it is now): a summary, and the first
    changed lines as a diff."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.written))
    ours, theirs = copy.text.splitlines(), current.splitlines()
    diff = list(difflib.unified_diff(theirs, ours, lineterm="", n=0))[2:]
    added = sum(1 for line in diff if line.startswith("+"))
    removed = sum(1 for line in diff if line.startswith("-"))
    where = "on disk" if copy.path is not None else "in the new buffer"
    summary = [
        f"Written {stamp} ({_ago(time.time() - copy.written)}) by process {copy.pid}.",
        f"The copy has {_lines(len(ours))}, {name} {where} has {len(theirs)}: "
        f"the copy adds {_lines(added)} and removes {removed}.",
    ]
    if _running(copy.pid):
        summary.append(f"Process {copy.pid} is still running: another codellama-tui may be editing it.")
    preview = [line for line in diff if not line.startswith("@@")][:PREVIEW_LINES]
    return "\n".join(summary), "\n".join(line[:200] for line in preview)


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
        summary, preview = describe(self._copy, self._current, self._name)
        with Vertical(id="dialog"):
            yield Label(f"{self._name} has a recovery copy with unsaved changes.", id="question")
            yield Label(summary, id="recovery-summary")
            yield Static(preview, id="recovery-diff", markup=False)
            yield Label("r: recover it   d: discard it   k: keep it for later")
        yield Footer()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
