"""The status line: model and flavour, cap, device and TP size, engine state, context use, a note; with the engine
behind a server, the server and the round-trip time to it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import ProgressBar, Static

from engine.events import ModelInfo

STATES = ("loading", "capturing", "ready", "generating", "error")


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

    def render_text(self) -> str:
        """The line as plain text, most changeable first (tests read it; the bar shows it)."""
        info = self.info
        parts = [self.state if not self.detail else f"{self.state}: {self.detail}"]
        if self.note:
            parts.append(self.note)
        parts += [self._model_text(), self.cap]
        if info is not None and info.device is not None:  # a foreign server tells neither device nor context
            parts.append(f"{info.device} tp{info.tp or 1}")
        if info is not None and info.context is not None:
            parts.append(f"ctx {self.context_used}/{info.context}")
        if self.server:
            parts.append(f"{self.server} {self.link}" if self.link else self.server)
        return " │ ".join(parts)

    def _refresh_text(self) -> None:
        if self.is_mounted:
            self.query_one("#status-text", Static).update(self.render_text())

    def on_mount(self) -> None:
        self._refresh_text()

    def watch_link_down(self, down: bool) -> None:
        self.set_class(down, "-link-down")

    watch_detail = watch_cap = watch_note = watch_context_used = watch_info = watch_server = watch_link = _refresh_text
