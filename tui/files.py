"""The edited file on disk: read it, and save it without ever losing what the user or the disk holds.

`OpenFile` keeps what a save needs to know about the file it read: its line endings, whether it
started with a UTF-8 byte-order mark, and what was on disk at open or at the last save. A save:

- is atomic: a temporary file beside the target, fsynced, then renamed over it, keeping the mode, owner
  and group. A file with other hard links, or whose owner or group this user cannot give a new file, is
  written in place instead, after a backup copy is written and fsynced (it restores the file if the
  write fails, and is removed after success);
- refuses, with a one-line reason, to replace what changed on disk since it was read (`ChangedOnDisk`),
  an existing file when saving under a new name (`AlreadyExists`), a read-only file or anything that is
  not a regular file (`Refused`), and it creates a missing folder only when asked (`MissingFolder`);
- writes each unchanged line with the ending it had on disk (a file may mix `\\n` and `\\r\\n`); new lines
  get the file's most common ending. The editor only ever sees `\\n`, and never the byte-order mark.

Temporary files and backups are named `.NAME.codellama-tui-PID-XXXX.tmp/.bak`: those of dead processes
beside a file are found when it is opened or saved; temporaries are removed, backups are reported (an
interrupted in-place write may have left the only intact copy in one).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import re
import stat
import tempfile
from collections import Counter
from pathlib import Path

BOM = b"\xef\xbb\xbf"
_TAG = "codellama-tui"
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.{_TAG}-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|bak)\Z")
_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines (and TextArea) breaks
_NEWLINES = ("\n", "\r\n", "\r")
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class FileError(Exception):
    """The file cannot be read, or saved as asked; the message is one line that names it."""


class Refused(FileError):
    """Saving over this path is refused (read-only, a directory, a device): save under another name."""


class MissingFolder(FileError):
    """The folder to save into does not exist; saving again with `make_folder=True` creates it."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"the folder {folder} does not exist")
        self.folder = folder


class AlreadyExists(FileError):
    """Save-as would replace an existing file; saving again with `overwrite=True` replaces it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


class ChangedOnDisk(FileError):
    """The file on disk is no longer what was read or last saved; `overwrite=True` replaces it anyway."""

    def __init__(self, path: str, on_disk: str | None, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path
        self.on_disk = on_disk  # its text now, None when it is not readable as text


def split_lines(text: str) -> tuple[list[str], list[str]]:
    """The text's lines (as the editor breaks them) and the ending after each; one fewer ending than lines."""
    lines: list[str] = []
    endings: list[str] = []
    for piece in text.splitlines(keepends=True):
        if piece.endswith("\r\n"):
            lines.append(piece[:-2])
            endings.append("\r\n")
        elif piece[-1] in _BREAKS:
            lines.append(piece[:-1])
            endings.append(piece[-1])
        else:
            lines.append(piece)
            return lines, endings
    lines.append("")
    return lines, endings


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def pid_alive(pid: int) -> bool:
    """False only for a process that surely is gone (another user's, or an impossible pid, counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return pid > 0


def _clean_leftovers(target: Path) -> list[Path]:
    """Remove the temporary files that dead processes of this app left beside `target`; return their backups."""
    backups: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = _LEFTOVER.match(entry.name)
            if not match or match["name"] != target.name or pid_alive(int(match["pid"])):
                continue
            if match["kind"] == "bak":
                backups.append(Path(entry.path))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    return sorted(backups)


def _mkstemp(directory: Path, name: str, kind: str) -> tuple[int, str]:
    return tempfile.mkstemp(dir=directory, prefix=f".{name}.{_TAG}-{os.getpid()}-", suffix=f".{kind}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _KeepInPlace(Exception):
    """The atomic rename would break a link or drop the owner: write in place instead."""


def _replace(target: Path, data: bytes, st: os.stat_result | None) -> None:
    """Write `data` to a temporary file beside `target` and rename it over `target`, keeping mode, owner, group."""
    if st is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    else:
        mode = stat.S_IMODE(st.st_mode)
    fd, tmp = _mkstemp(target.parent, target.name, "tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            new = os.fstat(f.fileno())
            if st is not None and (st.st_uid, st.st_gid) != (new.st_uid, new.st_gid):
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    raise _KeepInPlace from None
            os.fchmod(f.fileno(), mode)  # after the chown, which may clear set-id bits
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _copy_into(src: str | Path, fd: int) -> int:
    """Write the whole of file `src` to `fd` from its start, fsynced; returns the size copied."""
    os.lseek(fd, 0, os.SEEK_SET)
    size = 0
    with open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            _write_all(fd, chunk)
            size += len(chunk)
    os.ftruncate(fd, size)
    os.fsync(fd)
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_in_place(target: Path, data: bytes) -> None:
    """Overwrite `target` itself (its inode, links and owner stay), after a fsynced backup copy of it."""
    fd = os.open(target, os.O_RDWR)  # fails before anything is touched when the file is not writable
    try:
        try:
            backup_fd, backup = _mkstemp(target.parent, target.name, "bak")
        except PermissionError:  # a folder this user cannot write into: the backup goes to the temp folder
            backup_fd, backup = _mkstemp(Path(tempfile.gettempdir()), target.name, "bak")
        try:
            _copy_into(target, backup_fd)
        except BaseException:
            os.close(backup_fd)
            os.unlink(backup)
            raise
        os.close(backup_fd)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, data)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        except BaseException:
            try:
                _copy_into(backup, fd)
            except OSError as err:
                raise FileError(f"{target}: the save failed, and so did putting it back; see {backup}") from err
            os.unlink(backup)
            raise
        os.unlink(backup)
    finally:
        os.close(fd)


def save_atomic(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that no failure leaves half a file; through a symlink, never over it."""
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    _write_bytes(target, text.encode("utf-8"), st)


def _write_bytes(target: Path, data: bytes, st: os.stat_result | None) -> None:
    if st is not None and st.st_nlink > 1:
        _write_in_place(target, data)
        return
    try:
        _replace(target, data, st)
    except _KeepInPlace:
        _write_in_place(target, data)
    except PermissionError:
        if st is None:
            raise
        _write_in_place(target, data)  # the folder refuses new files, the file itself may still be writable


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if b"\0" in data[:8192]:
            raise FileError(f"{path}: a binary file, not text") from None
        line = data.count(b"\n", 0, err.start) + 1
        raise FileError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); only UTF-8 files can be edited"
        ) from None


class OpenFile:
    """One edited file: where it is, how its text is written, and what was on disk when last seen.

    `text` is the buffer's text as last read or saved, lines joined with `\\n`, without the BOM.
    """

    def __init__(self, path: str | None, text: str = "", *, on_disk: bytes | None = None, note: str = "") -> None:
        """A buffer for `path` holding `text`; `on_disk` is the file's raw content as read (None: no file)."""
        self.path = path
        self.note = note
        self.bom = on_disk is not None and on_disk.startswith(BOM)
        lines, endings = split_lines(text)
        counts = Counter(ending for ending in endings if ending in _NEWLINES)
        self.newline = counts.most_common(1)[0][0] if counts else "\n"
        self.text = "\n".join(lines)
        self._lines = lines
        self._endings = endings
        self._digest = None if on_disk is None else hashlib.sha256(on_disk).digest()

    @classmethod
    def open(cls, path: str) -> OpenFile:
        """Read `path` (a missing file is a new, empty one); FileError says why it cannot be edited.

        Anything but a regular file is refused without blocking (a FIFO, /dev/zero).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            folder = os.path.dirname(os.path.abspath(path))
            if os.path.isdir(folder):
                return cls(path, note="new file")
            return cls(path, note=f"new file; the folder {folder} does not exist: saving offers to create it")
        except OSError as err:
            raise FileError(f"{path}: cannot open ({err.strerror or err})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise FileError(f"{path}: {_kind(mode)}, not a file that can be edited")
        with os.fdopen(fd, "rb") as f:
            try:
                data = f.read()
            except OSError as err:
                raise FileError(f"{path}: cannot read ({err.strerror or err})") from None
        text = _decode(path, data)
        backups = _clean_leftovers(Path(os.path.realpath(path)))
        note = f"an interrupted save left a backup of this file: {backups[0]}" if backups else ""
        return cls(path, text.removeprefix("\ufeff"), on_disk=data, note=note)

    def encode(self, text: str) -> bytes:
        """The bytes that `text` (from the editor) is saved as: the file's line endings and BOM restored."""
        return self._encode(text.split("\n"))[0]

    def _encode(self, lines: list[str]) -> tuple[bytes, list[str]]:
        endings = self._endings_for(lines)
        body = "".join(line + ending for line, ending in zip(lines, [*endings, ""], strict=True))
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError:
            raise FileError(f"{self.path}: the text holds a character that is not valid Unicode") from None
        return (BOM + data if self.bom else data), endings

    def _endings_for(self, lines: list[str]) -> list[str]:
        """Each line's old ending where the line (edited or not) stands where it stood; the file's own elsewhere."""
        endings = [self.newline] * (len(lines) - 1)
        old = self._lines
        if all(ending == self.newline for ending in self._endings):
            return endings
        head = 0  # the unchanged lines above and below the edits pair up directly; only the middle is matched
        while head < min(len(old), len(lines)) and old[head] == lines[head]:
            head += 1
        tail = 0
        while tail < min(len(old), len(lines)) - head and old[-1 - tail] == lines[-1 - tail]:
            tail += 1
        pairs = [(k, k) for k in range(head)] + [(len(old) - 1 - k, len(lines) - 1 - k) for k in range(tail)]
        matcher = difflib.SequenceMatcher(None, old[head : len(old) - tail], lines[head : len(lines) - tail])
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag in ("equal", "replace"):
                pairs.extend((head + i1 + k, head + j1 + k) for k in range(min(i2 - i1, j2 - j1)))
        for i, j in pairs:
            if i < len(self._endings) and j < len(endings):
                endings[j] = self._endings[i]
        return endings

    def save(self, text: str, path: str | None = None, *, overwrite: bool = False, make_folder: bool = False) -> None:
        """Save `text` to this file, or to `path` (save-as: `~` expanded; it becomes this file's path).

        `overwrite` replaces what the checks protect: an existing file at a new path, or a change made on
        disk since this file was read. On any failure nothing on disk has changed and this object neither.
        """
        if path is not None:
            path = os.path.expanduser(path)
        current = self.path
        if path is None or (current is not None and _same_file(path, current)):
            assert current is not None, "an unnamed buffer is saved with a path"
            path, new_name = current, False
        else:
            new_name = True
        if path.endswith(os.sep):
            raise Refused(f"{path} names a folder: add a file name")
        target = Path(os.path.realpath(path))
        folder = target.parent
        if not folder.is_dir():
            if folder.exists():
                raise Refused(f"{folder} is not a folder")
            if not make_folder:
                raise MissingFolder(str(folder))
            os.makedirs(folder, exist_ok=True)
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{path} is {_kind(st.st_mode)}: only regular files are saved")
            if not st.st_mode & 0o222 or not os.access(target, os.W_OK):
                raise Refused(f"{path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}): save it under another name")
            if new_name and not overwrite:
                raise AlreadyExists(path)
        if not new_name and not overwrite:
            self._check_disk(path, target, st)
        lines = text.split("\n")
        data, endings = self._encode(lines)
        _clean_leftovers(target)
        _write_bytes(target, data, st)
        self.path, self.text, self._lines, self._endings, self.note = path, text, lines, endings, ""
        self._digest = hashlib.sha256(data).digest()

    def _check_disk(self, path: str, target: Path, st: os.stat_result | None) -> None:
        """Raise ChangedOnDisk when the file's bytes are not those read or last saved (a deleted file is fine;
        a touch or an identical rewrite is no change)."""
        if st is None:
            return
        try:
            data = target.read_bytes()
        except OSError as err:
            raise FileError(f"{path}: cannot read it to check for changes ({err.strerror or err})") from None
        if self._digest is None:
            raise ChangedOnDisk(path, _text_of(path, data), "was created on disk after it was opened here")
        if hashlib.sha256(data).digest() != self._digest:
            raise ChangedOnDisk(path, _text_of(path, data), "changed on disk since it was opened or saved here")


def _text_of(path: str, data: bytes) -> str | None:
    """The file's content as the editor shows it, or None when it is not text."""
    try:
        return "\n".join(split_lines(_decode(path, data).removeprefix("\ufeff"))[0])
    except FileError:
        return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
