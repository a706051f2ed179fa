"""Recovery copies of unsaved buffers, as vim's swap files: the app writes one a moment after the last edit and
when it is killed, offers it when the file is opened next, and removes it once the buffer is saved or discarded.

One JSON file per buffer and session under `$XDG_STATE_HOME/codellama-tui/recovery/` (default
`~/.local/state/codellama-tui/recovery/`), named for the edited file (`NAME.HASH.SESSION.json`, the hash of its
absolute path) or `new-buffer.SESSION.json` for a buffer that has no file yet. A session never writes over
another session's copy, so a copy kept for later stays as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

NEW_BUFFER = "new-buffer"


def recovery_dir() -> Path:
    """Where recovery copies live, following the XDG base directory convention (state, not config or cache)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "codellama-tui" / "recovery"


def file_key(path: str | None) -> str:
    """The name prefix of every copy of `path` (its absolute, symlink-free path) or of a new buffer."""
    if path is None:
        return NEW_BUFFER
    real = os.path.realpath(path)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(real))[:48] or "file"
    return f"{name}.{digest}"


@dataclass(frozen=True)
class RecoveryCopy:
    """One copy on disk: the buffer's text, the file it belongs to, and when and by whom it was written."""

    file: Path
    path: str | None  # the edited file's absolute path; None for a new buffer
    text: str
    written: float  # seconds since the epoch
    pid: int


class RecoveryStore:
    """The recovery folder, as one session of the app sees it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or recovery_dir()
        self.session = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def file_for(self, path: str | None) -> Path:
        """This session's copy of `path`."""
        return self.root / f"{file_key(path)}.{self.session}.json"

    def write(self, path: str | None, text: str, previous: Path | None = None) -> Path:
        """Write the copy of `path` atomically (temporary file, fsync, rename) and return its file.

        `previous` is the buffer's last copy: written over while it belongs to the same file (a copy this session
        wrote, or one it recovered), removed once the new one is written when the buffer got a new name.
        Raises OSError (a full disk, an unwritable folder).
        """
        file = previous if previous is not None and previous.name.startswith(f"{file_key(path)}.") else None
        file = file or self.file_for(path)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "path": os.path.realpath(path) if path is not None else None,
            "written": time.time(),
            "pid": os.getpid(),
            "text": text,
        }
        data = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if previous is not None and previous != file:
            self.remove(previous)
        return file

    def copies_of(self, path: str | None) -> list[RecoveryCopy]:
        """Every readable copy of `path` (or of new buffers), newest first."""
        key = file_key(path)
        real = os.path.realpath(path) if path is not None else None
        try:
            names = [entry for entry in self.root.iterdir() if entry.name.startswith(f"{key}.")]
        except OSError:
            return []
        copies = [copy for entry in names if (copy := read_copy(entry)) is not None and copy.path == real]
        return sorted(copies, key=lambda copy: copy.written, reverse=True)

    def remove(self, file: Path) -> None:
        """Delete one copy (gone already is fine)."""
        with contextlib.suppress(FileNotFoundError):
            file.unlink()


def read_copy(file: Path) -> RecoveryCopy | None:
    """The copy in `file`, or None when it is not one (a half-written temporary file, something else)."""
    if file.suffix != ".json":
        return None
    try:
        record = json.loads(file.read_bytes().decode("utf-8", "surrogatepass"))
        path, text, written, pid = record["path"], record["text"], record["written"], record["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(text, str) and isinstance(written, (int, float)) and isinstance(pid, int)):
        return None
    if path is not None and not isinstance(path, str):
        return None
    return RecoveryCopy(file, path, text, float(written), pid)
