"""The file tree side panel, and which folders a workspace's file lists leave out (version control, virtual
environments, caches): the tree and the path picker skip the same ones."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.widgets import DirectoryTree

IGNORED_DIRS = frozenset(
    {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".nox", ".mypy_cache",
     ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints", ".eggs"}
)  # fmt: skip


def ignored_dir(path: Path) -> bool:
    """True for a folder no one opens a file in: version control, a cache, or a virtual environment (any folder
    holding a `pyvenv.cfg`, whatever its name)."""
    return path.name in IGNORED_DIRS or path.name.endswith(".egg-info") or (path / "pyvenv.cfg").is_file()


class FileTree(DirectoryTree):
    """A DirectoryTree of the working directory without the ignored folders; Enter on a file posts FileSelected
    (the app opens it)."""

    DEFAULT_CSS = """
    FileTree {
        dock: left;
        width: 30;
        max-width: 40%;
        height: 1fr;
        border: round $border-blurred;
        border-title-color: $text-muted;
        &:focus { border: round $border; }
    }
    """

    def __init__(self, path: str | Path, *, id: str | None = None) -> None:
        super().__init__(path, id=id)
        self.border_title = "files"

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [path for path in paths if not (path.is_dir() and ignored_dir(path))]
