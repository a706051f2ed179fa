"""The code editor: a TextArea with `<FILL>` markers, a ghost suggestion and streamed insertions.

Two kinds of model output reach the editor, and neither may mix with the user's typing:

- a *ghost* suggestion (completion at the cursor) is only displayed until accepted, so it never
  touches the document or the undo history until Tab inserts it as one edit (ctrl+right takes its next word,
  ctrl+down its next line, each one edit, and the rest stays a ghost that may go on streaming);
- a *stream* (infilling) writes into the document where a marker stood, with the undo history
  paused; when it ends, the region is rewritten as a single recorded edit, so one ctrl+z brings
  the marker back.

Any edit or cursor move the user makes ends the stream (keeping what arrived) or drops the ghost
first, and posts `CodeEditor.Interrupted` so that the app cancels the request behind it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.style import Style
from textual import events
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.document._edit import Edit
from textual.document._history import EditHistory
from textual.geometry import Offset, Size
from textual.message import Message
from textual.widgets import Static, TextArea
from textual.widgets.text_area import EditResult, Location, TextAreaTheme

from engine.requests import FILL

FILL_HIGHLIGHT = "fill.marker"
_FILL_RE = re.compile(re.escape(FILL))
_GHOST_WORD = re.compile(r"\s*(?:\w+|[^\w\s]+)")  # as ctrl+right moves: blanks, then a word or a run of symbols

# What the editor takes: Textual's TextArea re-highlights the whole file and sums every line's height on each
# keystroke, so past these a keystroke takes seconds (BENCHMARKS.md, "The editor and big files").
MAX_BYTES = 2 * 2**20
MAX_LINES = 30_000
HIGHLIGHT_MAX_BYTES = 128 * 2**10  # a bigger file is edited as plain text

# File suffix -> tree-sitter language shipped with textual[syntax]; anything else is plain text.
_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".md": "markdown", ".json": "json", ".toml": "toml",
    ".yaml": "yaml", ".yml": "yaml", ".html": "html", ".htm": "html", ".css": "css",
    ".js": "javascript", ".mjs": "javascript", ".ts": "javascript", ".rs": "rust", ".go": "go",
    ".sql": "sql", ".java": "java", ".sh": "bash", ".bash": "bash", ".xml": "xml",
}  # fmt: skip

# Editor themes per app theme: syntax colours that suit the background, and a marker style
# (bold + underline + its own colours) that still shows with NO_COLOR or 16 colours.
_EDITOR_THEMES = {
    "codellama-dark": TextAreaTheme(
        name="codellama-dark",
        syntax_styles={
            **TextAreaTheme.get_builtin_theme("vscode_dark").syntax_styles,
            FILL_HIGHLIGHT: Style(color="#000000", bgcolor="#ffd700", bold=True, underline=True),
        },
    ),
    "codellama-light": TextAreaTheme(
        name="codellama-light",
        syntax_styles={
            **TextAreaTheme.get_builtin_theme("github_light").syntax_styles,
            FILL_HIGHLIGHT: Style(color="#ffffff", bgcolor="#af00af", bold=True, underline=True),
        },
    ),
    "codellama-contrast": TextAreaTheme(
        name="codellama-contrast",
        syntax_styles={
            "comment": Style(color="#00ff00", italic=True),
            "string": Style(color="#ffff00"),
            "keyword": Style(color="#00ffff", bold=True),
            "function": Style(color="#ffffff", bold=True),
            "number": Style(color="#ff87ff"),
            FILL_HIGHLIGHT: Style(color="#000000", bgcolor="#ffffff", bold=True, underline=True),
        },
    ),
}


def language_for(path: str | None) -> str | None:
    """The highlighting language for a file name (Python for a new buffer), or None for plain text."""
    if path is None:
        return "python"
    return _LANGUAGES.get(Path(path).suffix.lower())


def size_problem(size: int, lines: int) -> str | None:
    """Why a text of `size` bytes and `lines` lines is too big for the editor, or None when it is not."""
    if size > MAX_BYTES:
        return f"{size / 2**20:.1f} MiB, more than the {MAX_BYTES // 2**20} MiB the editor takes"
    if lines > MAX_LINES:
        return f"{lines:,} lines, more than the {MAX_LINES:,} the editor takes"
    return None


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def fill_markers(text: str) -> list[tuple[int, int]]:
    """(row, column) of each `<FILL>` marker, in document order."""
    found = []
    for row, line in enumerate(text.split("\n")):
        found.extend((row, m.start()) for m in _FILL_RE.finditer(line))
    return found


class _PausableHistory(EditHistory):
    """Edit history that can stop recording while a stream writes into the document."""

    paused: bool = False

    def record(self, edit: Edit) -> None:
        if not self.paused:
            super().record(edit)


@dataclass
class _Stream:
    start: Location
    end: Location
    original: str
    text: str = ""


class CodeEditor(TextArea):
    """The code editor pane's TextArea (see the module docstring for ghost text and streams)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("tab", "accept_ghost", "Accept", id="accept", priority=True),
        Binding("ctrl+right", "accept_ghost_word", "Accept word", id="accept_word", show=False, priority=True),
        Binding("ctrl+down", "accept_ghost_line", "Accept line", id="accept_line", show=False, priority=True),
    ]

    _ghost = ""  # TextArea's constructor sizes the widget before ours sets it

    DEFAULT_CSS = """
    CodeEditor {
        height: 1fr;
        border: none;
        &:focus { border: none; }
        & .text-area--suggestion { color: $text-muted; text-style: italic; }
    }
    """

    class Interrupted(Message):
        """The user edited or moved while a ghost or a stream was live: its request should stop."""

    class Typed(Message):
        """The user changed the text from the keyboard (typed, deleted or pasted): the moment to suggest."""

    class GhostChanged(Message):
        """The ghost text changed (the pane redraws the lines below the cursor, the app its keys)."""

    class PasteRefused(Message):
        """A paste would have made the text too big for the editor; `reason` says by how much."""

        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    def __init__(self, text: str = "", *, path: str | None = None, id: str | None = None) -> None:
        language = language_for(path)
        self.plain_for_size = language is not None and utf8_size(text) > HIGHLIGHT_MAX_BYTES
        super().__init__(
            text,
            language=None if self.plain_for_size else language,
            soft_wrap=False,
            tab_behavior="indent",
            show_line_numbers=True,
            id=id,
        )
        self.history = _PausableHistory(max_checkpoints=200, checkpoint_timer=2.0, checkpoint_max_characters=100)
        for theme in _EDITOR_THEMES.values():
            self.register_theme(theme)
        self._ghost = ""
        self._ghost_anchor: Location | None = None
        self._stream: _Stream | None = None
        self._writing = False

    # ----- themes and highlighting

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._follow_app_theme())
        self._follow_app_theme()

    def _follow_app_theme(self) -> None:
        """Pick the editor theme that suits the app theme's background."""
        current = self.app.current_theme
        if current.name == "codellama-contrast":
            self.theme = "codellama-contrast"
        else:
            self.theme = "codellama-dark" if current.dark else "codellama-light"

    def _build_highlight_map(self) -> None:
        """Syntax highlights plus one for every `<FILL>` marker (also in plain-text buffers)."""
        super()._build_highlight_map()
        for row, line in enumerate(self.document.lines):
            if FILL in line:
                encoded = line.encode("utf-8")
                for m in re.finditer(re.escape(FILL.encode()), encoded):
                    self._highlights[row].append((m.start(), m.end(), FILL_HIGHLIGHT))

    # ----- ghost suggestion

    @property
    def ghost(self) -> str:
        """The suggestion shown at the cursor (not part of the document)."""
        return self._ghost

    def begin_ghost(self) -> None:
        """Start an empty suggestion anchored at the cursor."""
        self._ghost = ""
        self._ghost_anchor = self.cursor_location
        self._show_ghost()

    def extend_ghost(self, text: str) -> None:
        """Append streamed text to the suggestion, if it is still live."""
        if self._ghost_anchor is not None and text:
            self._ghost += text
            self._show_ghost()

    def action_accept_ghost(self) -> None:
        """Insert the whole suggestion at the cursor as one undo step."""
        text = self._ghost
        self.dismiss_ghost()
        if text:
            self.insert_as_one_step(text)

    def insert_as_one_step(self, text: str) -> None:
        """Insert `text` at the cursor as one undo step, and bring the cursor (at its end) into view."""
        self.history.checkpoint()
        self.insert(text, maintain_selection_offset=False)
        self.history.checkpoint()
        self.scroll_cursor_visible()

    def action_accept_ghost_word(self) -> None:
        """Insert the suggestion's next word (with the blanks before it) as one undo step; the rest stays. Without
        a suggestion, ctrl+right moves by word as usual (this binding takes TextArea's key)."""
        if not self._ghost:
            self.action_cursor_word_right()
            return
        match = _GHOST_WORD.match(self._ghost)
        self._accept_part(match.group() if match else self._ghost)

    def action_accept_ghost_line(self) -> None:
        """Insert the rest of the suggestion's current line (or, at a line break, its next line) as one undo
        step; the rest stays."""
        if not self._ghost:
            raise SkipAction()
        start = 1 if self._ghost.startswith("\n") else 0
        end = self._ghost.find("\n", start)
        self._accept_part(self._ghost if end < 0 else self._ghost[:end])

    def _accept_part(self, part: str) -> None:
        """Insert the start of the suggestion; the ghost keeps the rest, anchored after it, still live."""
        if not part:
            return
        self.history.checkpoint()
        with self._model_writing():
            self.insert(part, maintain_selection_offset=False)
        self.history.checkpoint()
        self._ghost = self._ghost[len(part) :]
        self._ghost_anchor = self.cursor_location
        self.scroll_cursor_visible()
        self._show_ghost()

    def dismiss_ghost(self) -> None:
        """Forget the suggestion."""
        if self._ghost_anchor is not None:
            self._ghost = ""
            self._ghost_anchor = None
            self._show_ghost()

    @property
    def ghost_active(self) -> bool:
        return self._ghost_anchor is not None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "accept_ghost":
            return bool(self._ghost)
        return True

    def ghost_tail(self) -> list[str]:
        """The suggestion's lines after the first (drawn below the cursor by the pane)."""
        return self._ghost.split("\n")[1:] if self._ghost else []

    def update_suggestion(self) -> None:
        """Show the first line of the ghost inline through TextArea's own suggestion display."""
        self.suggestion = self._ghost.split("\n", 1)[0]

    def _show_ghost(self) -> None:
        self.update_suggestion()
        self._refresh_size()
        self._scroll_ghost_into_view()
        self.refresh()
        self.post_message(self.GhostChanged())

    def _refresh_size(self) -> None:
        """Room below the document for the ghost's lines, so that a suggestion at the end can be scrolled to."""
        super()._refresh_size()
        if tail := len(self.ghost_tail()):
            self.virtual_size = self.virtual_size + Size(0, tail)

    def _scroll_ghost_into_view(self) -> None:
        """Scroll down so the ghost's lines below the cursor show, as far as the cursor's line stays in view."""
        if not self._ghost or self._ghost_anchor is None:
            return
        row = self.cursor_location[0]
        height = self.scrollable_content_region.height
        top = min(row, row + len(self.ghost_tail()) + 1 - height)
        if height and top > self.scroll_y:
            self.scroll_to(y=top, animate=False, immediate=True)

    def action_cursor_right(self, select: bool = False) -> None:
        if self._ghost and not select:
            self.action_accept_ghost()
        else:
            super().action_cursor_right(select)

    def on_text_area_selection_changed(self, event: TextArea.SelectionChanged) -> None:
        if self._ghost_anchor is not None and self.cursor_location != self._ghost_anchor:
            self.dismiss_ghost()
            self.post_message(self.Interrupted())

    # ----- streamed insertion

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    def begin_stream(self, start: Location, end: Location) -> None:
        """Replace start..end (a marker, or nothing at the cursor) by text that streams in."""
        self.end_stream()
        self.history.checkpoint()
        original = self.get_text_range(start, end)
        self._stream = _Stream(start, start, original)
        self._unrecorded(Edit("", start, end, True))

    def extend_stream(self, text: str) -> None:
        """Insert streamed text at the end of the region, keeping the user's cursor where it is."""
        stream = self._stream
        if stream is None or not text:
            return
        stream.text += text
        result = self._unrecorded(Edit(text, stream.end, stream.end, True))
        stream.end = result.end_location

    def end_stream(self, keep: bool = True) -> Location | None:
        """Close the stream as one undo step (or restore the original text); returns the region's end."""
        stream, self._stream = self._stream, None
        if stream is None:
            return None
        restored = self._unrecorded(Edit(stream.original, stream.start, stream.end, True))
        if not keep or stream.text == stream.original:
            return restored.end_location
        self.history.checkpoint()
        result = self.replace(stream.text, stream.start, restored.end_location)
        self.history.checkpoint()
        return result.end_location

    def _unrecorded(self, edit: Edit) -> EditResult:
        assert isinstance(self.history, _PausableHistory)
        self.history.paused = True
        try:
            with self._model_writing():
                return self.edit(edit)
        finally:
            self.history.paused = False

    @contextmanager
    def _model_writing(self) -> Iterator[None]:
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def on_paste(self, event: events.Paste) -> None:
        """Refuse a paste that would make the text too big to edit (the editor would freeze on it)."""
        size = utf8_size(self.text) + utf8_size(event.text)
        if problem := size_problem(size, self.document.line_count + event.text.count("\n")):
            event.prevent_default()
            self.post_message(self.PasteRefused(problem))

    # ----- the user's edits come first

    def _replace_via_keyboard(self, insert: str, start: Location, end: Location) -> EditResult | None:
        result = super()._replace_via_keyboard(insert, start, end)
        if result is not None:
            self.post_message(self.Typed())
        return result

    def _delete_via_keyboard(self, start: Location, end: Location) -> EditResult | None:
        result = super()._delete_via_keyboard(start, end)
        if result is not None:
            self.post_message(self.Typed())
        return result

    def edit(self, edit: Edit) -> EditResult:
        """Any edit that is not the model's own ends the stream and drops the ghost first."""
        if not self._writing and (self._stream is not None or self._ghost_anchor is not None):
            self.dismiss_ghost()
            if self._stream is not None:
                with self._model_writing():
                    self.end_stream()
            self.post_message(self.Interrupted())
        return super().edit(edit)

    def undo(self) -> None:
        self._interrupt()
        super().undo()

    def redo(self) -> None:
        self._interrupt()
        super().redo()

    def _interrupt(self) -> None:
        if self._stream is not None or self._ghost_anchor is not None:
            self.dismiss_ghost()
            with self._model_writing():
                self.end_stream()
            self.post_message(self.Interrupted())


class GhostLines(Static):
    """The ghost suggestion's further lines, laid over the editor just below the cursor."""

    DEFAULT_CSS = """
    GhostLines {
        display: none;
        overlay: screen;
        position: absolute;
        background: $surface;
        color: $text-muted;
        text-style: italic;
        width: auto;
        height: auto;
        &.-visible { display: block; }
    }
    """


class EditorPane(Vertical):
    """The editor with its ghost overlay; the pane places the overlay under the cursor."""

    DEFAULT_CSS = """
    EditorPane { height: 1fr; }
    """

    def __init__(self, text: str = "", *, path: str | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self._text = text
        self._path = path

    def compose(self) -> ComposeResult:
        yield CodeEditor(self._text, path=self._path, id="editor")
        yield GhostLines(id="ghost-lines", markup=False)

    def on_code_editor_ghost_changed(self, event: CodeEditor.GhostChanged) -> None:
        self.place_ghost()

    def on_resize(self) -> None:
        self.place_ghost()

    def on_descendant_focus(self) -> None:
        self.place_ghost()

    def on_descendant_blur(self) -> None:
        self.place_ghost()

    def place_ghost(self) -> None:
        """Draw the ghost's further lines from the line below the cursor, at the text's left edge."""
        editor = self.query_one(CodeEditor)
        overlay = self.query_one(GhostLines)
        tail = editor.ghost_tail()
        cursor = editor.cursor_screen_offset
        room = editor.content_region.bottom - cursor.y - 1
        if not tail or room <= 0 or not editor.has_focus:
            overlay.set_class(False, "-visible")
            return
        left = editor.content_region.x + editor.gutter_width - editor.scroll_offset.x
        width = max(1, editor.content_region.right - left)
        lines = [line[:width].ljust(width) for line in tail[:room]]
        overlay.update("\n".join(lines))
        overlay.styles.offset = Offset(left, cursor.y + 1) - self.content_region.offset
        overlay.set_class(True, "-visible")
