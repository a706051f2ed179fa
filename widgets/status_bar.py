"""The status line: model and flavour, cap, device and TP size, engine state, context use, a note; with the engine
behind a server, the server and the round-trip time to it."""

from __future__ import annotations

from rich.cells import cell_len
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import ProgressBar, Static

from engine.events import ModelInfo

STATES = ("loading", "capturing", "ready", "generating", "error")
NOTE_RANK = 2


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` cells at a word boundary, ending with an ellipsis (mid-word only for one long word)."""
    if cell_len(text) <= width:
        return text
    cut = text[: max(0, width - 1)]
    if " " in cut.strip() and not text[len(cut)].isspace():
        cut = cut[: cut.rstrip().rfind(" ")]
    return cut.rstrip(" ,;:") + "…"


class StatusBar(Horizontal):
    """One line at the bottom; the app sets its fields, the bar decides how they look."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $text;
        & > #status-text { width: 1fr; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
        & > ProgressBar { width: 22; height: 1; display: none; }
        &.-loading > ProgressBar { display: block; }
        &.-error { background: $error-muted; }
        &.-link-down { background: $warning-muted; }
    }
    """

    state: reactive[str] = reactive("loading")
    detail: reactive[str] = reactive("starting")
    cap: reactive[str] = reactive("completion")
    note: reactive[str] = reactive("")
    context_used: reactive[int] = reactive(0)
    info: reactive[ModelInfo | None] = reactive(None)
    server: reactive[str] = reactive("")  # host:port of the engine's server, "" for an engine in this process
    link: reactive[str] = reactive("")  # "rtt 3 ms", or why the server cannot be reached
    link_down: reactive[bool] = reactive(False)

    def compose(self) -> ComposeResult:
        yield Static(id="status-text", markup=False)
        yield ProgressBar(total=1.0, show_eta=False, show_percentage=True)

    def show_loading(self, fraction: float, stage: str) -> None:
        """Loading progress; a stage that mentions capturing shows as the capturing state."""
        self.state = "capturing" if "captur" in stage.lower() else "loading"
        self.detail = stage
        self.query_one(ProgressBar).update(progress=max(0.0, min(1.0, fraction)))

    def set_state(self, state: str, detail: str = "") -> None:
        assert state in STATES, state
        self.state = state
        self.detail = detail

    def watch_state(self, state: str) -> None:
        self.set_class(state in ("loading", "capturing"), "-loading")
        self.set_class(state == "error", "-error")
        self._refresh_text()

    def _model_text(self) -> str:
        info = self.info
        if info is None:
            return "no model yet"
        if info.is_demo:
            return "DEMO model (tiny; --model DIR for CodeLlama)"
        return f"{info.name} ({info.flavour})" if info.flavour else info.name

    def _parts(self) -> list[tuple[int, str]]:
        """The line's parts in display order, each with its rank: 0 is always shown, higher ranks go first when the
        line is too long (NOTE_RANK is shortened instead of dropped)."""
        info = self.info
        parts = [(0, self.state)]
        if self.detail:
            parts.append((3, self.detail))
        if self.note:
            parts.append((NOTE_RANK, self.note))
        parts += [(5, self._model_text()), (0, self.cap)]
        if info is not None and info.device is not None:  # a foreign server tells neither device nor context
            parts.append((6, f"{info.device} tp{info.tp or 1}"))
        if info is not None and info.context is not None:
            parts.append((0, f"ctx {self.context_used}/{info.context}"))
        if self.server:
            parts.append((1 if self.link_down else 4, f"{self.server} {self.link}" if self.link else self.server))
        return parts

    @staticmethod
    def _join(parts: list[tuple[int, str]]) -> str:
        text = ""
        for index, (rank, part) in enumerate(parts):
            if index == 0:
                text = part
            elif index == 1 and rank == 3:  # the state's detail
                text += f": {part}"
            else:
                text += f" │ {part}"
        return text

    def render_text(self, width: int | None = None) -> str:
        """The line as plain text, most changeable first (tests read it; the bar shows it).

        Within `width` cells the state, the cap and the context always stay; the state's detail, the server, the
        model's name and the device are left out (in reverse order) before the note is shortened at a word.
        """
        parts = self._parts()
        if width is None:
            return self._join(parts)
        for rank in range(max(r for r, _ in parts), NOTE_RANK, -1):
            if cell_len(self._join(parts)) <= width:
                break
            parts = [(r, part) for r, part in parts if r != rank]
        text = self._join(parts)
        over = cell_len(text) - width
        notes = [i for i, (r, _) in enumerate(parts) if r == NOTE_RANK]
        if over > 0 and notes:
            rank, note = parts[notes[0]]
            room = cell_len(note) - over
            parts[notes[0]] = (rank, shorten(note, room)) if room >= 8 else (rank, "…")
            text = self._join(parts)
        return text

    def _refresh_text(self) -> None:
        if self.is_mounted:
            text = self.query_one("#status-text", Static)
            width = text.size.width or self.size.width
            text.update(self.render_text(width or None))

    def on_mount(self) -> None:
        self._refresh_text()

    def on_resize(self) -> None:
        self.call_after_refresh(self._refresh_text)  # the text's own width is laid out after this

    def watch_link_down(self, down: bool) -> None:
        self.set_class(down, "-link-down")
        self._refresh_text()

    watch_detail = watch_cap = watch_note = watch_context_used = watch_info = watch_server = watch_link = _refresh_text
