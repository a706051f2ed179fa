"""Reading and atomically saving the edited file: a crash or a full disk never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def read_text(path: str) -> str:
    """The file's text (empty for a file that does not exist yet: it is created on save).

    Raises OSError or UnicodeDecodeError, which the caller reports before the app starts; anything but a regular
    file is refused before it is opened (a FIFO would block the open, /dev/zero never ends).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError(f"{path}: not a regular file")
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def save_atomic(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`.

    The file's permission bits are kept (a new file gets the umask's default). On any failure the
    temporary file is removed and OSError propagates; `path` is untouched.
    """
    target = Path(os.path.realpath(path))  # save through a symlink, never over it
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
