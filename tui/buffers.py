"""The open files: each tab's file on disk, its recovery copy, and how it is named in titles and questions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tui.files import OpenFile

MODIFIED = "●"  # the marker of a buffer with unsaved changes (tab, border title, terminal title)


@dataclass
class Buffer:
    """One open file: `pane_id` names its tab (and the editor in it); the editor holds the text being edited."""

    file: OpenFile
    pane_id: str
    recovery_file: Path | None = None  # its recovery copy, once written
    dirty: bool = False  # edited since its recovery copy was last written

    @property
    def name(self) -> str:
        return os.path.basename(self.file.path) if self.file.path else "new buffer"

    def label(self, modified: bool, folder: bool = False) -> str:
        """The name (with its folder's, `folder`, when another open file has the same name) and the unsaved-changes
        marker: the tab's and the border's title."""
        name = self.name
        if folder and self.file.path:
            name = f"{name} · {os.path.basename(os.path.dirname(os.path.realpath(self.file.path)))}"
        return f"{name} {MODIFIED}" if modified else name

    def is_file(self, path: str) -> bool:
        """True when this buffer edits `path` (the same file by inode, or by its resolved name)."""
        if self.file.path is None:
            return False
        try:
            return os.path.samefile(self.file.path, path)
        except OSError:
            return os.path.realpath(self.file.path) == os.path.realpath(path)
