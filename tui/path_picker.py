"""ctrl+o: open a file by typing part of its path, matched as the command palette matches commands.

The files below the working directory are listed in a worker thread (ignored folders skipped, see
`widgets.file_tree`; files too big to edit or binary left out), at most MAX_FILES of them, so a home directory or a
monorepo never hangs the app. Matching runs in a worker too: the newest query cancels the one before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.fuzzy import Matcher
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from widgets.editor import MAX_BYTES
from widgets.file_tree import ignored_dir

MAX_FILES = 20_000  # files listed at most (a bigger tree is cut, and the picker says so)
SHOWN = 50  # matches shown at once
_BINARY_SUFFIXES = frozenset(
    {".pyc", ".pyo", ".so", ".o", ".a", ".dylib", ".dll", ".exe", ".bin", ".pt", ".pth", ".safetensors", ".gguf",
     ".npy", ".npz", ".pkl", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".tar", ".whl", ".jar", ".class", ".png",
     ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".pdf", ".mp3", ".mp4", ".wav", ".woff", ".woff2", ".ttf",
     ".otf", ".sqlite", ".db"}
)  # fmt: skip


def _is_text(path: Path, size: int) -> bool:
    """A file the editor can take: not too big, not binary by its name or its first bytes."""
    if size > MAX_BYTES or path.suffix.lower() in _BINARY_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(1024)
    except OSError:
        return False


def workspace_files(root: Path, limit: int = MAX_FILES) -> Iterator[str]:
    """The editable files below `root` as paths relative to it, breadth first (near files first), at most `limit`.

    Symlinked folders are not followed (a loop, or a link to `/`, would never end)."""
    folders = [root]
    found = 0
    while folders:
        folder = folders.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not ignored_dir(path):
                        folders.append(path)
                elif entry.is_file() and _is_text(path, entry.stat().st_size):
                    yield str(path.relative_to(root))
                    found += 1
                    if found >= limit:
                        return
            except OSError:
                continue


def best_matches(query: str, candidates: list[str], count: int = SHOWN) -> list[str]:
    """The `count` candidates that match `query` best (all, shortest first, for an empty query)."""
    if not query:
        return sorted(candidates, key=lambda path: (path.count(os.sep), len(path), path))[:count]
    matcher = Matcher(query)
    folded = query.lower()
    scored = []
    for path in candidates:
        rest = iter(path.lower())
        if all(char in rest for char in folded):  # a cheap subsequence test first: most paths fail it
            scored.append((-matcher.match(path), len(path), path))
    scored.sort()
    return [path for score, _, path in scored[:count] if score < 0]


class PathPicker(ModalScreen["str | None"]):
    """Type to filter, up/down to move, Enter to open; dismisses with the chosen file's path, or None on Esc."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
    ]

    class Listed(Message):
        """The scan found more files (`done`: it finished; `cut`: at MAX_FILES)."""

        def __init__(self, paths: list[str], done: bool = False, cut: bool = False) -> None:
            super().__init__()
            self.paths = paths
            self.done = done
            self.cut = cut

    class Matched(Message):
        """The best matches of `query`."""

        def __init__(self, query: str, paths: list[str]) -> None:
            super().__init__()
            self.query = query
            self.paths = paths

    def __init__(self, root: str | Path, limit: int = MAX_FILES) -> None:
        super().__init__()
        self.root = Path(root)
        self._limit = limit
        self._paths: list[str] = []
        self._shown: str | None = None  # the query whose matches the list shows

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label(f"Open a file below {self.root.name or self.root}{os.sep}", id="question", markup=False)
            yield Input(placeholder="part of the path; ↑/↓ choose, Enter opens, Esc cancels", id="picker-query")
            yield Label("listing files…", id="picker-note")  # above the list: a long list never hides it
            yield OptionList(id="picker-matches")

    def on_mount(self) -> None:
        self.query_one("#picker-matches", OptionList).can_focus = False  # keys stay in the query
        self._list_files()

    @work(thread=True, exclusive=True, group="list")
    def _list_files(self) -> None:
        worker = get_current_worker()
        batch: list[str] = []
        count = 0
        for path in workspace_files(self.root, self._limit):
            if worker.is_cancelled:
                return
            batch.append(path)
            count += 1
            if len(batch) == 500:
                self.post_message(self.Listed(batch))
                batch = []
        self.post_message(self.Listed(batch, done=True, cut=count >= self._limit))

    @on(Listed)
    def _listed(self, message: Listed) -> None:
        self._paths.extend(message.paths)
        count = f"{len(self._paths):,} file{'s' * (len(self._paths) != 1)}"
        if message.cut:
            note = f"the first {count} only: type more of the path, or open it from a folder further down"
        else:
            note = count if message.done else f"listing files… {count}"
        self.query_one("#picker-note", Label).update(note)
        self._match(self.query_one("#picker-query", Input).value)

    @on(Input.Changed, "#picker-query")
    def _typed(self, event: Input.Changed) -> None:
        self._match(event.value)

    def _match(self, query: str) -> None:
        self._find(query.strip(), list(self._paths))

    @work(thread=True, exclusive=True, group="match")
    def _find(self, query: str, candidates: list[str]) -> None:
        paths = best_matches(query, candidates)
        if not get_current_worker().is_cancelled:
            self.post_message(self.Matched(query, paths))

    @on(Matched)
    def _matched(self, message: Matched) -> None:
        if message.query != self.query_one("#picker-query", Input).value.strip():
            return  # a stale answer: the one for the newest query is on its way
        matcher = Matcher(message.query) if message.query else None
        options = [Option(matcher.highlight(path) if matcher else path, id=path) for path in message.paths]
        matches = self.query_one("#picker-matches", OptionList)
        matches.set_options(options)
        matches.highlighted = 0 if options else None
        self._shown = message.query

    def action_move(self, step: int) -> None:
        matches = self.query_one("#picker-matches", OptionList)
        if matches.option_count:
            matches.highlighted = ((matches.highlighted or 0) + step) % matches.option_count

    @on(Input.Submitted, "#picker-query")
    def _submitted(self) -> None:
        query = self.query_one("#picker-query", Input).value.strip()
        if query != self._shown:  # Enter came before the matches of what was typed: the list is an older query's
            best = best_matches(query, self._paths, 1)
            if best:
                self.dismiss(str(self.root / best[0]))
            return
        option = self.query_one("#picker-matches", OptionList).highlighted_option
        if option is not None and option.id is not None:
            self.dismiss(str(self.root / option.id))

    @on(OptionList.OptionSelected, "#picker-matches")
    def _clicked(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None:
            self.dismiss(str(self.root / event.option.id))

    def action_cancel(self) -> None:
        self.dismiss(None)
