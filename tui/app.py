"""The full-screen app: the editor and the chat beside it, driven by keys, fed by the engine thread.

Threads: the engine client (`engine.client`) calls `_relay_engine_event` on its own thread, which never touches a
widget. Text deltas go into a locked buffer that a 30 Hz timer on the UI thread drains (so 200+ tokens/s cost at
most 30 widget updates a second and a keystroke always echoes within a frame); every other event is posted as its
own message (`tui.engine_messages`) with its own `@on` handler. Before a terminal event (Finished, Failed) is
handled the buffer is drained, so no text is lost or reordered.

The keys live on the main screen (`tui.main_screen`); their actions are here, where the client and the jobs are.

Typing during a generation: an edit or cursor move in the editor while model text streams into it
(infill) or is shown as ghost text (completion) cancels that generation first — the text that
arrived stays as one undo step (infill) or is dropped (ghost) — and only then applies the key.
Typing in the chat input never disturbs an answer that is streaming into the log.

An answer that fails after some of its text arrived (a server's connection dropped mid-answer) keeps that text,
marked interrupted: a fill stays in the editor as one undo step, a ghost suggestion stays for Tab, a chat answer
stays in the log with a notice. Nothing else in the editor is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, TypeVar

from rich.console import RenderableType
from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.driver import Driver
from textual.screen import Screen
from textual.theme import Theme
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import HelpPanel, TabbedContent
from textual.widgets.text_area import Selection

from engine.client import Client, EventSink
from engine.events import Event, Failed, Finished, ModelInfo, TextDelta
from engine.requests import CAPS, FILL, EngineSpec, Request, SamplingParams, replacement_warning
from themes import APP_TCSS, register_themes, short_name, theme_name
from tui.apply_screen import ApplyScreen
from tui.buffers import Buffer
from tui.cli import ClientFactory, with_flags
from tui.code_target import Target, target_around
from tui.config import ConfigError, config_path, load_config, save_theme
from tui.conversation import Conversation
from tui.engine_messages import (
    EngineLink,
    EngineLoadFailed,
    EngineLoading,
    EngineMessage,
    EngineReady,
    RequestClipped,
    RequestFailed,
    RequestFinished,
    RequestStarted,
    RequestTurnsDropped,
    engine_message,
)
from tui.files import AlreadyExists, ChangedOnDisk, FileError, MissingFolder, OpenFile
from tui.help_screen import HelpScreen, key_rows
from tui.history import ChatRecord, HistoryError, HistoryStore, Turn, TurnEnd
from tui.history_screen import HistoryScreen, when
from tui.jobs import Job, JobKind
from tui.main_screen import MainScreen
from tui.path_picker import PathPicker
from tui.recover_screen import RecoverScreen
from tui.recovery import RecoveryCopy, RecoveryStore
from tui.screens import CloseScreen, ConfirmScreen, ConflictScreen, PromptScreen, QuitScreen
from tui.suggestions import FillTally, SuggestSettings, suggestion_request
from tui.terminal import TITLE_POP, TITLE_PUSH, ExitSignals, title_sequence, tolerate_invalid_input
from widgets.chat_input import ChatInput
from widgets.chat_log import ChatLog
from widgets.editor import CodeEditor, fill_markers, size_problem, utf8_size
from widgets.file_tabs import FileTabs
from widgets.file_tree import FileTree
from widgets.find_bar import FindBar, find, parse_location, pattern_for, replace_all
from widgets.status_bar import StatusBar

FLUSH_HZ = 30
RECOVERY_DELAY_S = 1.5  # the recovery copy is written this long after the last edit


def suffix_stop(suffix: str) -> tuple[str, ...]:
    """A fill ends where it would write the next non-blank line below it again.

    Small models (the demo's) often miss `▁<EOT>` and run on into the code that follows the hole; editors
    (Tabby, Continue) cut a fill where it starts repeating the suffix.
    """
    below = next((line for line in suffix.split("\n")[1:] if line.strip()), None)
    return ("\n" + below,) if below is not None else ()


def _local_client(spec: EngineSpec, on_event: EventSink) -> Client:
    from engine.local_client import LocalClient  # no torch here: the worker thread imports the engine

    return LocalClient(spec, on_event=on_event)


M = TypeVar("M", bound=EngineMessage)


def _while_open(handler: Callable[[CodeLlamaApp, M], None]) -> Callable[[CodeLlamaApp, M], None]:
    """An engine message that arrives while the app closes finds no widgets: it is dropped."""

    @functools.wraps(handler)
    def guarded(app: CodeLlamaApp, message: M) -> None:
        if app.is_open:
            handler(app, message)

    return guarded


class CodeLlamaApp(App[int]):
    """Editor + chat + status line around one engine client."""

    CSS_PATH = APP_TCSS
    TITLE = "codellama-tui"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", id="quit", tooltip="Quit (asks about unsaved changes)", priority=True),
    ]  # every other key is the main screen's

    def __init__(
        self,
        file: OpenFile | str | None = None,
        spec: EngineSpec | None = None,
        cap: str = "completion",
        system: str | None = None,
        overrides: dict[str, object] | None = None,
        theme: str | None = None,
        *,
        text: str | None = None,
        keys: dict[str, str] | None = None,
        suggest: SuggestSettings | None = None,
        client_factory: ClientFactory = _local_client,
        config_file: Path | None = None,
        history: bool = True,
    ) -> None:
        """`file` is an opened file, or a path to open; `text`, when given, is the buffer's text and taken to be
        what the file at that path holds (tests and embedders), so the file is not read. A theme picked in the
        command palette is written to `config_file` (the user's config file when run as the command); `history`
        False keeps no conversation on disk."""
        super().__init__()
        register_themes(self)
        self.theme = theme_name(theme or "dark")
        self._keymap_given = dict(keys or {})
        if keys:
            self.set_keymap(keys)
        if isinstance(file, OpenFile):
            first = file
        elif text is not None:
            on_disk = text.encode() if file is not None and os.path.exists(file) else None
            first = OpenFile(file, text, on_disk=on_disk)
        else:
            first = OpenFile.open(file) if file is not None else OpenFile(None)
        self.buffers: dict[str, Buffer] = {"file-1": Buffer(first, "file-1")}  # by tab, in tab order
        self._active = "file-1"
        self._opened = 1  # tabs opened so far: the next tab's id
        self.spec = spec or EngineSpec()
        self.cap = cap
        self.system = system
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self._client_factory = client_factory
        self.client: Client | None = None
        self.info: ModelInfo | None = None
        self.load_error: str | None = None
        self._jobs: dict[str, Job] = {}
        self._pending: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._flush_timer: Timer | None = None
        self.conversation = Conversation(system)
        self.history = HistoryStore() if history else None
        self.chat_record = ChatRecord(system)
        self._keys_shown: tuple[tuple[str, str, bool], ...] = ()
        self.recovery = RecoveryStore()
        self._recovery_timer: Timer | None = None
        self._exit_signals: ExitSignals | None = None
        self._config_file = config_file
        self._saved_note = ""
        self._title_pushed = False
        self.suggest = suggest or SuggestSettings()
        self._suggest_timer: Timer | None = None
        self._suggest_at: tuple[int, int] | None = None  # the cursor when the keys paused

    # ----- layout

    def get_default_screen(self) -> MainScreen:
        return MainScreen(FileTabs.pane(self._active, self.buffer.name, self.file.text, self.file.path))

    @property
    def is_open(self) -> bool:
        """False from the moment the app starts to close: Textual then removes the widgets (children before their
        parents) while timers and queued messages still run, so late work must not reach for them."""
        return self.is_running and bool(self.screen_stack)

    # The widgets live on the main screen, the first on the stack: an engine event or a timer that reaches them
    # while a dialog is on top must not look for them on the dialog.

    @property
    def tabs(self) -> FileTabs:
        return self.screen_stack[0].query_one("#file-tabs", FileTabs)

    @property
    def find_bar(self) -> FindBar:
        return self.screen_stack[0].query_one("#find-bar", FindBar)

    @property
    def editor(self) -> CodeEditor:
        """The editor of the file in front (the one every key and request goes to)."""
        return self.tabs.editor(self._active)

    @property
    def buffer(self) -> Buffer:
        return self.buffers[self._active]

    @property
    def file(self) -> OpenFile:
        return self.buffer.file

    @file.setter
    def file(self, file: OpenFile) -> None:
        self.buffer.file = file

    @property
    def recovery_file(self) -> Path | None:
        """The recovery copy of the file in front, once written."""
        return self.buffer.recovery_file

    @recovery_file.setter
    def recovery_file(self, file: Path | None) -> None:
        self.buffer.recovery_file = file

    @property
    def chat_log(self) -> ChatLog:
        return self.screen_stack[0].query_one("#chat-log", ChatLog)

    @property
    def chat_input(self) -> ChatInput:
        return self.screen_stack[0].query_one("#chat-input", ChatInput)

    @property
    def status(self) -> StatusBar:
        return self.screen_stack[0].query_one("#status", StatusBar)

    @on(MainScreen.Composed)
    def _main_screen_composed(self) -> None:
        self._set_cap(self.cap)
        self.editor.focus()
        self._update_title()
        plain = "a big file: no syntax highlighting (it would slow every keystroke)"
        self.status.note = self.file.note or (plain if self.editor.plain_for_size else "")
        self._flush_timer = self.set_interval(1 / FLUSH_HZ, self._flush_stream, pause=True)
        if self._config_file is not None:
            self.theme_changed_signal.subscribe(self, self._remember_theme)
        self.call_after_refresh(self._start_engine)
        self.call_after_refresh(self._offer_recovery, self.recovery.copies_of(self.file.path))
        if not self.is_headless:
            self._exit_signals = ExitSignals(asyncio.get_running_loop(), self.keep_recovery_copy, self._exit_on_signal)
            self._exit_signals.install()

    def _remember_theme(self, theme: Theme) -> None:
        """The theme picked (in the command palette) is the next session's too."""
        assert self._config_file is not None
        try:
            save_theme(short_name(theme.name), self._config_file)
        except ConfigError as err:
            self.status.note = f"theme not remembered: {err}"

    def _start_engine(self) -> None:
        """Start the engine thread after the first frame has painted (it imports torch)."""
        self.client = self._client_factory(self.spec, self._relay_engine_event)
        if self.client.server is not None:
            self.status.server = self.client.server.split("://", 1)[-1]
            self.status.link = "connecting"
        self.client.start()

    def on_unmount(self) -> None:
        if self._exit_signals is not None:
            self._exit_signals.restore()
        for request_id, job in list(self._jobs.items()):
            if job.kind is JobKind.CHAT:  # an answer cut short by quitting is kept as far as it came
                job.text += "".join(self._pending.get(request_id, []))
                self._keep_turn(job, TurnEnd.STOPPED, job.opening + job.text + job.closing)
        if self.history is not None:
            self.history.close()
        if self._title_pushed:
            self._write_terminal(TITLE_POP)
        if self.client is not None:
            for request_id in list(self._jobs):
                self.client.cancel(request_id)
            self.client.close(timeout=2.0)

    # ----- engine events (worker thread -> UI thread)

    def _relay_engine_event(self, event: Event) -> None:
        """Called on the worker thread: buffer deltas, post everything else."""
        if isinstance(event, TextDelta):
            with self._lock:
                self._pending.setdefault(event.request_id, []).append(event.text)
            return
        self.post_message(engine_message(event))

    def _flush_stream(self) -> None:
        """Move buffered text into the widgets (at most FLUSH_HZ times a second); while the app closes the text
        stays buffered (an answer cut short by quitting keeps it)."""
        if not self.is_open:
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        for request_id, parts in pending.items():
            job = self._jobs.get(request_id)
            if job is None:
                continue  # cancelled or stale: its text must not reach the widgets
            job.deltas += len(parts)
            text = "".join(parts)
            job.text += text
            if job.kind is JobKind.GHOST:
                self.editor.extend_ghost(text)
            elif job.kind is JobKind.FILL:
                self.editor.extend_stream(text)
            else:
                self.chat_log.append(text)
        if pending:
            self._show_speed()

    def _show_speed(self) -> None:
        jobs = [job for job in self._jobs.values() if job.started]
        if not jobs:
            return
        elapsed = max(1e-3, time.perf_counter() - min(job.started for job in jobs))
        rate = sum(job.deltas for job in jobs) / elapsed
        self.status.set_state("generating", f"{rate:.0f} tok/s")

    @on(EngineLoading)
    @_while_open
    def _show_loading(self, message: EngineLoading) -> None:
        self.status.show_loading(message.event.fraction, message.event.stage)

    @on(EngineLink)
    @_while_open
    def _show_link(self, message: EngineLink) -> None:
        event = message.event
        self.status.link_down = not event.up
        if event.up:
            self.status.link = f"rtt {event.rtt_s * 1e3:.0f} ms" if event.rtt_s is not None else ""
        else:
            self.status.link = f"unreachable: {event.message}"

    @on(EngineReady)
    @_while_open
    def _model_ready(self, message: EngineReady) -> None:
        event = message.event
        self.info = event.info
        self.status.info = event.info
        remote = self.client is not None and self.client.server is not None
        self.status.set_state("ready", f"{'connected' if remote else 'loaded'} in {event.startup_s:.1f}s")
        self.status.link = "" if remote else self.status.link
        if event.info.flavour == "python" and self.cap == "completion":
            self._set_cap("python")
        self._refresh_keys()

    @on(EngineLoadFailed)
    @_while_open
    def _model_failed(self, message: EngineLoadFailed) -> None:
        self.load_error = with_flags(message.event.message, message.event.fields)
        self.status.set_state("error", self.load_error)
        what = "The server cannot be used" if self.client and self.client.server else "The model could not be loaded"
        self.chat_log.add_notice(f"{what}: {self.load_error}", "error")
        self._refresh_keys()

    @on(RequestStarted)
    @_while_open
    def _request_started(self, message: RequestStarted) -> None:
        event = message.event
        job = self._jobs.get(event.request_id)
        if job is not None:
            job.started = time.perf_counter()
            self.status.context_used = event.prompt_tokens
            if event.replaced:
                self.notify(replacement_warning(event.replaced), severity="warning")

    @on(RequestClipped)
    @_while_open
    def _request_clipped(self, message: RequestClipped) -> None:
        event = message.event
        job = self._jobs.get(event.request_id)
        if job is not None:
            job.clipped = f"file longer than the context: {event.before} lines above and {event.after} below left out"
            self.status.note = job.clipped

    @on(RequestTurnsDropped)
    @_while_open
    def _turns_dropped(self, message: RequestTurnsDropped) -> None:
        event = message.event
        if event.request_id in self._jobs:
            self.conversation.drop(event.count)
            turns = "turn was" if event.count == 1 else "turns were"
            self.chat_log.add_notice(
                f"The conversation outgrew the context: its {event.count} oldest {turns} dropped.",
                "warning",
            )

    @on(RequestFinished)
    @on(RequestFailed)
    @_while_open
    def _request_ended(self, message: RequestFinished | RequestFailed) -> None:
        self._flush_stream()
        job = self._jobs.pop(message.event.request_id, None)
        if job is not None:
            self._end_job(job, message.event)
        self._after_jobs_change()

    def _end_job(self, job: Job, event: Finished | Failed) -> None:
        editor = self.editor
        if isinstance(event, Failed):
            self.status.set_state("error", event.message)
            interrupted = job.deltas > 0  # what arrived stays, marked
            if job.kind is JobKind.FILL:
                editor.end_stream(keep=interrupted)
                if interrupted:
                    self.status.note = "interrupted: the fill keeps what arrived (ctrl+z takes it back)"
            elif job.kind is JobKind.GHOST:
                if interrupted:
                    self.status.note = "interrupted: Tab takes what arrived"
                else:
                    editor.dismiss_ghost()
            else:
                self.chat_log.end_answer(job.closing, failed=True)
                self.chat_log.add_notice(f"{'Interrupted' if interrupted else 'Error'}: {event.message}", "error")
                self._keep_turn(job, TurnEnd.INTERRUPTED if interrupted else TurnEnd.FAILED)
            return
        stats = event.stats
        self.status.context_used = stats.prompt_tokens + stats.new_tokens
        detail = f"{event.reason}, {stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tok/s"
        if job.tally is not None:
            job.tally.add(stats)
            detail = job.tally.summary()
        if stats.proposed:  # speculation: tokens per decode step, the accepted proposals and one more each
            detail += f", {stats.tokens_per_step:.1f} tok/step"
        self.status.set_state("ready", detail)
        if job.kind is JobKind.FILL:
            end = editor.end_stream(keep=True)
            if job.next_marker and event.reason != "cancelled" and end is not None:
                self._fill_next_marker(after=end, clipped=job.clipped, tally=job.tally)
        elif job.kind is JobKind.CHAT:
            self.chat_log.end_answer(job.closing)
            if event.reason == "cancelled":
                self.chat_log.add_notice("(stopped)")
            elif job.request.cap == "chat":
                self.conversation.answered(job.request, event.text)
            self._keep_turn(job, TurnEnd.STOPPED if event.reason == "cancelled" else TurnEnd.FINISHED)

    def _after_jobs_change(self) -> None:
        if self._flush_timer is not None:
            if self._jobs:
                self._flush_timer.resume()
            else:
                self._flush_timer.pause()
        self._refresh_keys()

    # ----- submitting

    def _engine_ready(self) -> bool:
        """True when requests can go out; otherwise says why in the status line."""
        if self.info is not None:
            return True
        if self.load_error is not None:
            self.status.note = f"no model: {self.load_error}"
        else:
            self.status.note = "the model is still loading"
        return False

    def _sampling(self, cap: str) -> SamplingParams:
        return SamplingParams.for_cap(cap, **self.overrides)

    def _submit(self, job: Job) -> None:
        assert self.client is not None
        self._jobs[job.request.id] = job
        self.client.submit(job.request)
        self.status.set_state("generating", job.request.cap)
        self.status.note = ""
        self._after_jobs_change()

    def _cancel_editor_jobs(self) -> None:
        for request_id, job in list(self._jobs.items()):
            if job.in_editor:
                self._cancel(request_id)

    def _cancel(self, request_id: str) -> None:
        """Stop a request now: its late text is dropped; the engine frees the slot within a step."""
        job = self._jobs.pop(request_id, None)
        if job is None:
            return
        if self.client is not None:
            self.client.cancel(request_id)
        with self._lock:
            self._pending.pop(request_id, None)
        if job.kind is JobKind.FILL:
            self.editor.end_stream(keep=True)
        elif job.kind is JobKind.CHAT:
            self.chat_log.end_answer(job.closing)
            self.chat_log.add_notice("(stopped)")
            self._keep_turn(job, TurnEnd.STOPPED)
        self.status.set_state("ready", "stopped")
        self._after_jobs_change()

    def _completion_cap(self) -> str:
        python = self.cap == "python" or (self.info is not None and self.info.flavour == "python")
        return "python" if python else "completion"

    # ----- actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Which keys work now (the footer greys or hides the rest). On a dialog only quit does: the App's own
        keys (the command palette) must not open over it."""
        if action == "quit":
            return True
        if not isinstance(self.screen, MainScreen):
            return False
        if action == "stop":
            return bool(self._jobs) or self.editor.ghost_active or self._keys_panel_open()
        if action in ("complete", "infill"):
            return True if self.info is not None else None
        if action == "send":
            return bool(self.chat_input.text.strip())
        if action == "new_chat":
            return bool(self.chat_log.children)
        if action == "ask":
            return None if self.editor.selection.is_empty else True
        return True

    def action_complete(self) -> None:
        """F2: stream a suggestion at the cursor as ghost text, to the end of the block it starts."""
        if self._engine_ready():
            self._suggest()

    def _suggest(self) -> None:
        editor = self.editor
        self._cancel_editor_jobs()
        editor.dismiss_ghost()
        row, column = editor.cursor_location
        prefix = editor.get_text_range((0, 0), (row, column))
        cap = self._completion_cap()
        editor.begin_ghost()
        # The editor's requests (and the chat's, whose code F7 inserts) are grounded in the file: they speculate.
        request = replace(suggestion_request(cap, prefix, self._sampling(cap), self.suggest), speculate=True)
        self._submit(Job(request, JobKind.GHOST))
        editor.focus()

    @on(CodeEditor.Typed)
    def _suggest_later(self) -> None:
        """As you type (`suggest = "auto"`): a suggestion once the keys pause; each key restarts the wait (and the
        edit itself already cancelled the suggestion on screen)."""
        if self._suggest_timer is not None:
            self._suggest_timer.stop()
            self._suggest_timer = None
        if self.suggest.as_you_type(self.info):
            self._suggest_at = self.editor.cursor_location
            self._suggest_timer = self.set_timer(self.suggest.delay_s, self._suggest_after_pause)

    def _suggest_after_pause(self) -> None:
        self._suggest_timer = None
        if not self.is_open:
            return
        editor = self.editor
        quiet = not any(job.in_editor for job in self._jobs.values()) and not editor.ghost_active
        here = editor.cursor_location == self._suggest_at and editor.selection.is_empty and editor.has_focus
        if self.info is not None and quiet and here and isinstance(self.screen, MainScreen):
            self._suggest()

    def action_infill(self) -> None:
        """F3: fill every <FILL> marker left to right, or fill at the cursor when there is none."""
        if not self._engine_ready():
            return
        if not self.info or not self.info.can_infill:
            why = "no FIM pieces" if self.info and self.info.device else "the server takes no suffix"
            self.status.note = f"this model cannot infill ({why}): F2 completes at the cursor"
            return
        self._cancel_editor_jobs()
        self.editor.dismiss_ghost()
        self.editor.focus()
        if not fill_markers(self.editor.text):
            location = self.editor.cursor_location
            self._start_fill(location, location, next_marker=False)
        else:
            self._fill_next_marker(after=(0, 0), tally=FillTally())

    def _fill_next_marker(self, after: tuple[int, int], clipped: str = "", tally: FillTally | None = None) -> None:
        """Start the fill of the next marker after `after`; past the last, say so (and keep the last fill's
        `clipped` note in view). `tally` adds up the fills for the status line."""
        editor = self.editor
        for row, column in fill_markers(editor.text):
            if (row, column) >= after:
                self._start_fill((row, column), (row, column + len(FILL)), next_marker=True, tally=tally)
                return
        self.status.note = f"all markers filled; {clipped}" if clipped else "all markers filled"

    def _start_fill(
        self, start: tuple[int, int], end: tuple[int, int], *, next_marker: bool, tally: FillTally | None = None
    ) -> None:
        """Fill start..end; the fill ends where the block it starts ends, as a suggestion does."""
        editor = self.editor
        prefix = editor.get_text_range((0, 0), start)
        suffix = editor.get_text_range(end, editor.document.end).replace(FILL, "")
        sampling = self._sampling("infilling")
        sampling = replace(sampling, stop=sampling.stop + suffix_stop(suffix))
        request = Request(
            cap="infilling",
            prefix=prefix,
            suffix=suffix,
            fit=True,
            stop_at_block_end=True,
            sampling=sampling,
            speculate=True,
        )
        editor.begin_stream(start, end)
        self._submit(Job(request, JobKind.FILL, next_marker=next_marker, tally=tally))

    def action_switch_pane(self) -> None:
        """F4: focus the other pane."""
        if self.editor.has_focus:
            self.chat_input.focus()
        else:
            self.editor.focus()

    def action_send(self) -> None:
        """F5: send the chat input."""
        self.chat_input.send()

    @on(ChatInput.Submitted)
    def _chat_submitted(self, message: ChatInput.Submitted) -> None:
        text = message.text
        if text.startswith("/system"):
            self._set_system(text[len("/system") :].strip() or None)
            return
        if text.strip() == "/new":
            self.action_new_chat()
            return
        if not self._engine_ready():
            self.chat_input.load_text(text)
            return
        if any(job.kind is JobKind.CHAT for job in self._jobs.values()):
            self.chat_input.load_text(text)
            self.status.note = "an answer is still streaming: Esc stops it"
            return
        self.chat_log.add_user(text)
        cap = self.cap
        if cap == "chat":
            request = self.conversation.request(text, self._sampling("chat"), speculate=True)
            self.chat_log.begin_answer()
            self._submit(Job(request, JobKind.CHAT))
            return
        if cap == "infilling":
            if text.count(FILL) != 1:
                self.chat_log.add_notice("Infilling needs exactly one <FILL> marker in the input.", "error")
                return
            request = Request(cap="infilling", text=text, sampling=self._sampling("infilling"), speculate=True)
        else:
            request = Request(cap=cap, text=text, sampling=self._sampling(cap), speculate=True)
        self.chat_log.begin_answer("```python\n")
        self._submit(Job(request, JobKind.CHAT, opening="```python\n", closing="\n```"))

    def action_ask(self) -> None:
        """F6: put the selected code into the chat input, fenced, and focus it."""
        selected = self.editor.selected_text
        if not selected:
            self.status.note = "select some code first"
            return
        language = self.editor.language or ""
        self.chat_input.load_text(f"```{language}\n{selected.rstrip()}\n```\n")
        self.chat_input.move_cursor(self.chat_input.document.end)
        self.chat_input.focus()
        if self.cap != "chat":
            self._set_cap("chat")

    def action_apply_code(self) -> None:
        """F7: show the chat's code block (the last; ←/→ picks another) as a diff against the selection, or the code
        around the cursor (tui/code_target.py), and put it there on a yes, as one undo step."""
        blocks = self.chat_log.code_blocks()
        if not blocks:
            self.status.note = "no code block in the chat"
            return
        editor = self.editor
        self._cancel_editor_jobs()  # a fill streaming on would move the text under the diff
        editor.dismiss_ghost()
        start, end = sorted(editor.selection)
        if start != end:
            head = editor.get_text_range((start[0], 0), start)
            tail = editor.get_text_range(end, (end[0], len(editor.document[end[0]])))
            target = Target(start, end, editor.selected_text, "the selection", head, tail)
        else:
            python = editor.language == "python"
            target = target_around(editor.document.lines, editor.cursor_location, python, blocks[-1])

        def decided(code: str | None) -> None:
            if code is None:
                self.status.note = "not applied"
                return
            editor.history.checkpoint()
            editor.replace(code, target.start, target.end, maintain_selection_offset=False)
            editor.history.checkpoint()
            editor.scroll_cursor_visible()
            editor.focus()
            self.status.note = f"applied to {target.what} (ctrl+z takes it back)"

        self.push_screen(ApplyScreen(target, blocks), decided)

    def action_switch_cap(self) -> None:
        """F8: cycle the cap the chat input is sent with."""
        self._set_cap(CAPS[(CAPS.index(self.cap) + 1) % len(CAPS)])

    def _set_cap(self, cap: str) -> None:
        self.cap = cap
        self.status.cap = cap
        if cap == "infilling" and self.info is not None and not self.info.can_infill:
            self.status.note = "this model cannot infill"
        self.chat_input.border_title = f"chat input · {cap}"

    def action_new_chat(self) -> None:
        """ctrl+n: forget the conversation and clear the log."""
        for request_id, job in list(self._jobs.items()):
            if job.kind is JobKind.CHAT:
                self._cancel(request_id)
        self.conversation = Conversation(self.system)
        self.chat_record = ChatRecord(self.system)
        self.chat_log.clear_log()
        self.status.context_used = 0
        self.chat_log.add_notice("New chat" + (f" — system: {self.system}" if self.system else ""))

    # ----- chat history (tui/history.py)

    def _keep_turn(self, job: Job, ended: TurnEnd, answer: str | None = None) -> None:
        """A chat-log turn ended: add it to the conversation's record and save that (a note says when it cannot be)."""
        request = job.request
        user = request.messages[-1].content if request.messages else request.text
        shown = self.chat_log.last_answer if answer is None else answer
        model = self.info.name if self.info is not None else ""
        self.chat_record.add(Turn(request.cap, user, shown, ended), self.conversation.exchanges, model)
        if self.history is None:
            return
        try:
            self.history.save(self.chat_record)
        except HistoryError as err:
            if self.is_open:
                self.status.note = f"chat not saved: {err}; it is kept here and saved with its next turn"

    def action_history(self) -> None:
        """ctrl+r: list the kept conversations to resume (or delete) one."""
        if self.history is None:
            self.status.note = "no chat history: the config file says history = false"
            return
        screen = HistoryScreen(self.history)

        def chosen(conversation_id: str | None) -> None:
            if self.chat_record.id in screen.deleted:
                self.action_new_chat()
            if conversation_id is not None:
                self._resume(conversation_id)

        self.push_screen(screen, chosen)

    def _resume(self, conversation_id: str) -> None:
        """Show a kept conversation in the log and continue it: the next turn sends what its last turn left."""
        assert self.history is not None
        try:
            record = self.history.load(conversation_id)
        except HistoryError as err:
            self.status.note = str(err)
            return
        for request_id, job in list(self._jobs.items()):
            if job.kind is JobKind.CHAT:
                self._cancel(request_id)
        self.system = record.system
        self.conversation = Conversation(record.system)
        self.conversation.exchanges = list(record.exchanges)
        self.chat_record = record
        log = self.chat_log
        log.clear_log()
        for turn in record.turns:
            log.add_user(turn.user)
            log.begin_answer()
            log.append(turn.answer)
            log.end_answer(failed=turn.ended in (TurnEnd.INTERRUPTED, TurnEnd.FAILED))
            if turn.ended is not TurnEnd.FINISHED:
                log.add_notice(f"({turn.ended.value})")
        self.status.context_used = 0
        model = f", {record.model}" if record.model else ""
        log.add_notice(f"Resumed: {record.title} ({when(record.updated)}{model})")
        if any(turn.cap == "chat" for turn in record.turns) and self.cap != "chat":
            self._set_cap("chat")

    def _set_system(self, system: str | None) -> None:
        """A new system instruction applies from the first turn, so it starts a new chat."""
        self.system = system
        self.action_new_chat()

    def action_set_system(self) -> None:
        """Ask for the system instruction (command palette)."""

        def done(answer: str | None) -> None:
            if answer is not None:
                self._set_system(answer.strip() or None)

        self.push_screen(PromptScreen("System instruction (empty for none):", self.system or ""), done)

    def action_stop(self) -> None:
        """Esc: stop what is generating; with nothing running, close the keys panel or dismiss the ghost."""
        if self._jobs:
            for request_id in list(self._jobs):
                self._cancel(request_id)
        elif self._keys_panel_open():
            self.action_hide_help_panel()
        else:
            self.editor.dismiss_ghost()
        self._refresh_keys()

    def _keys_panel_open(self) -> bool:
        return bool(self.screen.query(HelpPanel))

    def action_help(self) -> None:
        """F1: every key (from the bindings, with the user's keymap) and every command."""
        bindings = [
            *Binding.make_bindings(MainScreen.BINDINGS),
            *Binding.make_bindings(CodeEditor.BINDINGS),
            *Binding.make_bindings(ChatLog.BINDINGS),
            *Binding.make_bindings(self.BINDINGS),
            Binding(self.COMMAND_PALETTE_BINDING, "command_palette", "Command palette"),
        ]
        keys = key_rows(bindings, self._keymap_given, self.get_key_display)
        commands = [(command.title, command.help) for command in self.get_system_commands(self.screen)]
        self.push_screen(HelpScreen(keys, commands))

    def action_focus_log(self) -> None:
        """ctrl+l: focus the chat log (it scrolls, copies and fills the screen from there)."""
        self.chat_log.focus()

    @on(ChatLog.Copy)
    def _copy(self, message: ChatLog.Copy) -> None:
        self.copy_to_clipboard(message.text)
        lines = message.text.count("\n") + 1
        self.status.note = f"copied {message.what} ({lines} line{'s' * (lines != 1)}) to the clipboard"

    @on(CodeEditor.PasteRefused)
    def _paste_refused(self, message: CodeEditor.PasteRefused) -> None:
        self.status.note = f"paste refused: the text would be too big to edit here ({message.reason})"

    @on(CodeEditor.Interrupted)
    def _editor_interrupted(self) -> None:
        self._cancel_editor_jobs()

    @on(CodeEditor.GhostChanged)
    @on(CodeEditor.SelectionChanged)
    def _keys_may_change(self) -> None:
        if self.is_open:
            self._refresh_keys()  # Tab accepts a ghost, Esc dismisses it, F6 asks about a selection

    @on(CodeEditor.Changed, "#editor")
    def _edited(self, message: CodeEditor.Changed) -> None:
        if not self.is_open:  # a change that bubbled up while the app closed
            return
        buffer = self._buffer_of(message.text_area)
        if buffer is not None:
            buffer.dirty = True
            self._update_title(buffer)
            if self.status.note == self._saved_note:  # "saved X" no longer says what the buffer holds
                self.status.note = ""
            self._write_recovery_later()

    @on(ChatInput.Changed, "#chat-input")
    def _chat_input_changed(self) -> None:
        self._refresh_keys()  # the footer's Send key comes and goes with the input

    def _refresh_keys(self) -> None:
        """Rebuild the footer only when the keys it offers change.

        Each rebuild makes new key widgets (Textual's Footer keeps the old ones alive), so refreshing on every
        streamed delta or cursor move would grow memory without bound.
        """
        if not self.is_open:
            return
        keys = tuple(
            (key, active.binding.action, active.enabled)
            for key, active in self.screen.active_bindings.items()
            if active.binding.show
        )
        if keys != self._keys_shown:
            self._keys_shown = keys
            self.refresh_bindings()

    # ----- files

    @property
    def modified(self) -> bool:
        """True when the file in front has unsaved changes."""
        return self.is_modified(self.buffer)

    def is_modified(self, buffer: Buffer) -> bool:
        return self.tabs.editor(buffer.pane_id).text != buffer.file.text

    def _buffer_of(self, widget: Widget) -> Buffer | None:
        """The buffer whose tab holds `widget` (None for the chat's widgets)."""
        return next((self.buffers[node.id] for node in widget.ancestors if node.id in self.buffers), None)

    def _update_title(self, buffer: Buffer | None = None) -> None:
        """The file's name and unsaved-changes marker on its tab; for the file in front also in the editor's border
        title and the sub-title (which goes to the terminal's title)."""
        buffer = buffer or self.buffer
        namesakes = any(other.name == buffer.name for other in self.buffers.values() if other is not buffer)
        label = buffer.label(self.is_modified(buffer), folder=namesakes)
        tabs = self.tabs
        tabs.set_label(buffer.pane_id, label)
        if buffer is self.buffer:
            self.screen_stack[0].query_one("#editor-pane").border_title = label
            self.sub_title = label

    def watch_sub_title(self, sub_title: str) -> None:
        """Textual shows the sub-title only in its Header: the terminal's window (and tmux's pane) title shows it."""
        if self.is_headless:
            return
        if not self._title_pushed:  # the title before ours comes back on exit
            self._title_pushed = True
            self._write_terminal(TITLE_PUSH)
        self._write_terminal(title_sequence(f"{sub_title} — {self.title}"))

    def _write_terminal(self, sequence: str) -> None:
        with contextlib.suppress(OSError):  # a terminal that is gone (SIGHUP) takes no title
            if self._driver is not None:
                self._driver.write(sequence)

    def action_save(self) -> None:
        """ctrl+s: save; a new buffer asks for a file name first."""
        self.save()

    def action_save_as(self) -> None:
        """F12: save under another name (`~` is expanded; asks before replacing a file or creating a folder)."""
        self._ask_path(self.file.path or "")

    def _ask_path(self, value: str = "", problem: str = "", then: Callable[[], None] | None = None) -> None:
        """The save-as dialog; after a failure it comes back with the same name and the reason."""

        def chosen(answer: str | None) -> None:
            if answer and answer.strip():
                self.save(answer.strip(), then=then)
            else:
                self.status.note = "not saved"

        self.push_screen(PromptScreen("Save as:", value, problem), chosen)

    def save(
        self,
        path: str | None = None,
        *,
        overwrite: bool = False,
        make_folder: bool = False,
        then: Callable[[], None] | None = None,
    ) -> bool:
        """Save the buffer (to `path`: save-as), then call `then`; True when saved now.

        Whatever stands in the way is asked about (a change on disk, a file that exists, a missing folder)
        or explained in the save-as dialog; until a save succeeds the buffer keeps its name and stays modified.
        """
        if path is None and self.file.path is None:
            self._ask_path(then=then)
            return False
        if path is not None and any(
            b is not self.buffer and b.is_file(os.path.expanduser(path)) for b in self.buffers.values()
        ):
            self._ask_path(path, "Not saved: that file is open in another tab (close it first)", then)
            return False
        text = self.editor.text
        try:
            self.file.save(text, path, overwrite=overwrite, make_folder=make_folder)
        except ChangedOnDisk as err:
            self._on_conflict(err, path, then)
        except AlreadyExists as err:
            self._ask_replace(str(err), path, make_folder, then)
        except MissingFolder as err:
            self._ask_create(err.folder, path, overwrite, then)
        except (FileError, OSError) as err:
            reason = str(err) if isinstance(err, FileError) else (err.strerror or str(err))
            self._not_saved(reason)
            self._ask_path(path or self.file.path or "", f"Not saved: {reason}", then)
        else:
            self.drop_recovery_copy()
            self.status.note = self._saved_note = f"saved {self.file.path}"
            self._update_title()
            if then is not None:
                then()
            return True
        return False

    def _ask_replace(self, reason: str, path: str | None, make_folder: bool, then: Callable[[], None] | None) -> None:
        def decided(yes: bool | None) -> None:
            if yes:
                self.save(path, overwrite=True, make_folder=make_folder, then=then)
            else:
                self._ask_path(path or "", f"{reason}: not replaced", then)

        self.push_screen(ConfirmScreen(f"{reason}. Replace it?"), decided)

    def _ask_create(self, folder: str, path: str | None, overwrite: bool, then: Callable[[], None] | None) -> None:
        def decided(yes: bool | None) -> None:
            if yes:
                self.save(path, overwrite=overwrite, make_folder=True, then=then)
            else:
                self._not_saved(f"the folder {folder} does not exist")

        self.push_screen(ConfirmScreen(f"The folder {folder} does not exist. Create it?"), decided)

    def _not_saved(self, reason: str) -> None:
        self.status.note = f"NOT saved: {reason}"
        self.notify(f"Not saved: {reason}", severity="error", timeout=8)

    def _on_conflict(self, err: ChangedOnDisk, path: str | None, then: Callable[[], None] | None) -> None:
        def decided(choice: str | None) -> None:
            if choice == "overwrite":
                self.save(path, overwrite=True, then=then)
            elif choice == "reload":
                self._reload()
            elif choice == "save_as":
                self._ask_path(self.file.path or "", then=then)
            else:
                self.status.note = f"NOT saved: {err}"

        self.push_screen(ConflictScreen(str(err), self.file.text, err.on_disk), decided)

    def _reload(self) -> None:
        """Replace the buffer with the file on disk, as one edit (ctrl+z brings the buffer back)."""
        assert self.file.path is not None
        try:
            fresh = OpenFile.open(self.file.path)
        except FileError as err:
            self.status.note = f"not reloaded: {err}"
            return
        self._cancel_editor_jobs()
        self.file = fresh
        editor = self.editor
        editor.dismiss_ghost()
        editor.history.checkpoint()
        editor.replace(fresh.text, (0, 0), editor.document.end, maintain_selection_offset=False)
        editor.history.checkpoint()
        self.status.note = f"reloaded {fresh.path} from disk"
        self._update_title()

    async def action_quit(self) -> None:
        """ctrl+q: quit, asking first about each file with unsaved changes."""
        if not isinstance(self.screen, QuitScreen):
            self._quit_asking(frozenset())

    def _quit_asking(self, answered: frozenset[str]) -> None:
        """Show each unsaved file not yet `answered` in turn and ask (save, discard, or keep editing); then quit."""
        unsaved = [b for b in self.buffers.values() if b.pane_id not in answered and self.is_modified(b)]
        if not unsaved:
            for buffer in self.buffers.values():
                self.drop_recovery_copy(buffer)
            self.exit(0)
            return
        buffer = unsaved[0]
        self._activate(buffer.pane_id)

        def decided(choice: str | None) -> None:
            if choice == "discard":
                self.drop_recovery_copy(buffer)
                self._quit_asking(answered | {buffer.pane_id})
            elif choice == "save":
                self.save(then=lambda: self._quit_asking(answered | {buffer.pane_id}))

        name = buffer.name if buffer.file.path else "The new buffer"
        self.push_screen(QuitScreen(name, more=len(unsaved) - 1), decided)

    # ----- open files and their tabs

    async def open_path(self, path: str) -> None:
        """Open `path` in a new tab (or bring its tab to the front); why it cannot be opened goes to the status
        line in one line. An empty new buffer the app started with gives its place to the file."""
        for buffer in self.buffers.values():
            if buffer.is_file(path):
                self._activate(buffer.pane_id)
                return
        try:
            with contextlib.suppress(OSError):  # OpenFile.open says what is wrong with a file it cannot read
                if stat.S_ISREG((info := os.stat(path)).st_mode) and (problem := size_problem(info.st_size, 0)):
                    raise FileError(f"{path}: too big to edit here ({problem})")
            opened = OpenFile.open(path)
        except FileError as err:
            self.status.note = f"not opened: {err}"
            return
        if problem := size_problem(utf8_size(opened.text), opened.text.count("\n") + 1):
            self.status.note = f"not opened: {path}: too big to edit here ({problem})"
            return
        blank = [b for b in self.buffers.values() if b.file.path is None and not b.file.text]
        blank = [b for b in blank if not self.is_modified(b)]
        await self._add_buffer(opened)
        if len(self.buffers) == 2 and blank:
            await self._close(blank[0])
        plain = "a big file: no syntax highlighting (it would slow every keystroke)"
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        self.status.note = opened.note or (plain if self.editor.plain_for_size else f"opened {shown}")
        self._offer_recovery(self.recovery.copies_of(opened.path))

    def action_open_file(self) -> None:
        """ctrl+o: pick a file below the working directory by part of its path."""

        def chosen(path: str | None) -> None:
            if path:
                self.call_later(self.open_path, path)

        self.push_screen(PathPicker(os.getcwd()), chosen)

    async def action_toggle_tree(self) -> None:
        """ctrl+t: show the file tree of the working directory (focused), or hide it and go back to the editor."""
        trees = self.screen_stack[0].query(FileTree)
        if not trees:
            tree = FileTree(os.getcwd(), id="file-tree")
            await self.screen_stack[0].query_one("#main").mount(tree, before=0)
            tree.focus()
            return
        tree = trees.first()
        if tree.display and tree.has_focus:
            tree.display = False
            self.editor.focus()
        else:
            tree.display = True
            tree.focus()

    @on(FileTree.FileSelected, "#file-tree")
    async def _tree_chose(self, event: FileTree.FileSelected) -> None:
        await self.open_path(str(event.path))

    async def _add_buffer(self, file: OpenFile) -> Buffer:
        self._opened += 1
        buffer = Buffer(file, f"file-{self._opened}")
        self.buffers[buffer.pane_id] = buffer
        await self.tabs.add(FileTabs.pane(buffer.pane_id, buffer.name, file.text, file.path))
        self._activate(buffer.pane_id)
        self._update_titles()
        return buffer

    def _update_titles(self) -> None:
        """Every tab's title (a file opened or closed may give two tabs the same name, or no longer)."""
        for buffer in self.buffers.values():
            self._update_title(buffer)

    def _activate(self, pane_id: str) -> None:
        """Bring a tab to the front. What streams into the editor that leaves the front stops first (a fill keeps
        what arrived, as on any key); each editor keeps its text, cursor and undo history."""
        if pane_id != self._active:
            self._cancel_editor_jobs()
            self.editor.dismiss_ghost()
            self._suggest_at = None  # a pause in the tab left behind asks for no suggestion in this one
            self._active = pane_id
            self.tabs.active = pane_id
        self._update_title()
        self.editor.focus()
        self._refresh_keys()

    @on(TabbedContent.TabActivated, "#file-tabs")
    def _tab_chosen(self, event: TabbedContent.TabActivated) -> None:
        """A tab clicked with the mouse (keys go through `_activate`)."""
        if event.pane.id in self.buffers:
            self._activate(event.pane.id)

    def action_next_file(self, step: int = 1) -> None:
        """ctrl+pagedown / ctrl+pageup: the next (previous) tab, round the end."""
        ids = list(self.buffers)
        self._activate(ids[(ids.index(self._active) + step) % len(ids)])

    def action_close_file(self) -> None:
        """ctrl+w: close the file in front, asking first when it has unsaved changes."""
        buffer = self.buffer
        if not self.is_modified(buffer):
            self.call_later(self._close, buffer)
            return

        def decided(choice: str | None) -> None:
            if choice == "discard":
                self.call_later(self._close, buffer)
            elif choice == "save":
                self.save(then=lambda: self.call_later(self._close, buffer))

        self.push_screen(CloseScreen(buffer.name if buffer.file.path else "The new buffer"), decided)

    async def _close(self, buffer: Buffer) -> None:
        """Close a tab; its recovery copy goes (saved or discarded). The last tab gives way to a new buffer."""
        if buffer.pane_id not in self.buffers:
            return
        self.drop_recovery_copy(buffer)
        ids = list(self.buffers)
        if len(ids) == 1:
            await self._add_buffer(OpenFile(None))
        elif buffer is self.buffer:
            index = ids.index(buffer.pane_id)
            self._activate(ids[index - 1] if index else ids[1])
        del self.buffers[buffer.pane_id]
        await self.tabs.close(buffer.pane_id)
        self._update_titles()
        self._refresh_keys()

    # ----- moving about the file in front: go to line, find and replace (widgets/find_bar.py)

    def action_goto_line(self) -> None:
        """ctrl+g: ask for line[:column] (1-based) and put the cursor there."""
        editor = self.editor

        def chosen(answer: str | None) -> None:
            editor.focus()
            if not answer or not answer.strip():
                return
            try:
                location, note = parse_location(answer, editor.document.line_count)
            except ValueError as err:
                self.status.note = str(err)
                return
            editor.move_cursor(location, center=True)
            self.status.note = note

        self.push_screen(PromptScreen("Go to line[:column]:"), chosen)

    def action_find(self, replace: bool = False) -> None:
        """ctrl+f: the find bar under the editor, holding the selected text when it is one line."""
        selected = self.editor.selected_text
        self.find_bar.open(selected if "\n" not in selected else "", replace=replace)

    def action_replace(self) -> None:
        """ctrl+h (ctrl+\\): the find bar with its replace field."""
        self.action_find(replace=True)

    @on(FindBar.Find)
    def _find(self, message: FindBar.Find) -> None:
        self._select_match(message.query, message.forward)

    def _select_match(self, query: str, forward: bool) -> None:
        editor = self.editor
        found = find(editor, query, forward)
        if found is None:
            self.find_bar.say(f"no {query!r} in {self.buffer.name}" if query else "")
            return
        start, end, wrapped = found
        editor.selection = Selection(start, end)
        editor.scroll_cursor_visible(center=True)
        self.find_bar.say(("wrapped round the start" if not forward else "wrapped round the end") if wrapped else "")

    @on(FindBar.Replace)
    def _replace(self, message: FindBar.Replace) -> None:
        editor = self.editor
        if message.every:
            count = replace_all(editor, message.query, message.replacement)
            self.find_bar.say(f"replaced {count} (one ctrl+z undoes it)" if count else f"no {message.query!r}")
            return
        selected = editor.selected_text
        if message.query and selected and pattern_for(message.query).fullmatch(selected):
            start, end = sorted(editor.selection)
            editor.history.checkpoint()
            editor.replace(message.replacement, start, end, maintain_selection_offset=False)
            editor.history.checkpoint()
        self._select_match(message.query, True)

    @on(FindBar.Closed)
    def _find_closed(self) -> None:
        self.editor.focus()

    # ----- recovery copies (tui/recovery.py) and the ways the app can end without a quit

    def _write_recovery_later(self) -> None:
        """After an edit: the copies are written a moment after the last one, so typing never waits for the disk."""
        if self._recovery_timer is not None:
            self._recovery_timer.stop()
        self._recovery_timer = self.set_timer(RECOVERY_DELAY_S, self._write_recovery_now)

    def _write_recovery_now(self) -> None:
        if not self.is_open:  # the timer outlived the app's widgets while it closed: nothing left to copy
            return
        if not self.keep_recovery_copy(edited_only=True):
            self.status.note = "NO recovery copy: the recovery folder cannot be written"

    def keep_recovery_copy(self, *, edited_only: bool = False) -> bool:
        """Write the recovery copy of every buffer with unsaved changes (`edited_only`: of those edited since their
        last copy) and drop those of buffers with none; False when one could not be written. Safe to call from a
        signal handler or while the app is failing."""
        kept = True
        for buffer in list(self.buffers.values()):
            if edited_only and not buffer.dirty:
                continue
            try:
                if not self.is_modified(buffer):
                    self.drop_recovery_copy(buffer)
                else:
                    text = self.tabs.editor(buffer.pane_id).text
                    buffer.recovery_file = self.recovery.write(buffer.file.path, text, buffer.recovery_file)
                    buffer.dirty = False
            except Exception:  # a crash path must not fail in its turn; the caller says what it means
                kept = False
        return kept

    def drop_recovery_copy(self, buffer: Buffer | None = None) -> None:
        """The buffer (the one in front by default) was saved or its changes discarded: its recovery copy goes."""
        buffer = buffer or self.buffer
        buffer.dirty = False
        if buffer.recovery_file is not None:
            self.recovery.remove(buffer.recovery_file)
            buffer.recovery_file = None

    def _offer_recovery(self, copies: list[RecoveryCopy]) -> None:
        """Offer each copy of this file (newest first) until one is recovered; copies of what the file already
        holds are removed without asking."""
        while copies and copies[0].text == self.file.text:
            self.recovery.remove(copies.pop(0).file)
        if not copies:
            return
        copy, rest = copies[0], copies[1:]

        def done(choice: str | None) -> None:
            if choice == "recover":
                editor = self.editor
                editor.history.checkpoint()
                # one undo step back to the file
                editor.replace(copy.text, (0, 0), editor.document.end, maintain_selection_offset=False)
                editor.history.checkpoint()
                self.recovery_file = copy.file  # this session's copy from now on
                self.status.note = "recovered the unsaved changes: ctrl+s saves them"
                return
            if choice == "discard":
                self.recovery.remove(copy.file)
            self._offer_recovery(rest)

        name = os.path.basename(self.file.path) if self.file.path else "the new buffer"
        self.push_screen(RecoverScreen(copy, self.file.text, name), done)

    def _exit_on_signal(self, code: int) -> None:
        self.exit(code, return_code=code)

    def get_driver_class(self) -> type[Driver]:
        tolerate_invalid_input()  # before the driver's input thread makes its decoder
        return super().get_driver_class()

    def _handle_exception(self, error: Exception) -> None:
        """Every unhandled exception in a handler, timer or worker ends here: keep the edits, then fail."""
        self.keep_recovery_copy()
        super()._handle_exception(error)

    def panic(self, *renderables: RenderableType) -> None:
        """Textual panics when its input thread dies: keep the edits, and exit non-zero (Textual would exit 0)."""
        self.keep_recovery_copy()
        super().panic(*renderables)
        self._return_code = self._return_code or 1

    # ----- command palette

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("System instruction", "Set the chat's system instruction", self.action_set_system)
        yield SystemCommand("New chat", "Forget the conversation", self.action_new_chat)
        yield SystemCommand("Conversations", "Resume or delete a kept conversation (ctrl+r)", self.action_history)
        yield SystemCommand("Save as", "Save the file under another name (F12)", self.action_save_as)
        yield SystemCommand("Switch cap", "Cycle completion / infilling / chat / python", self.action_switch_cap)
        yield SystemCommand("Open file", "Pick a file below the working directory (ctrl+o)", self.action_open_file)
        yield SystemCommand("File tree", "Show or hide the working directory's tree (ctrl+t)", self.action_toggle_tree)
        yield SystemCommand("Close file", "Close the file in front (ctrl+w)", self.action_close_file)
        yield SystemCommand("Go to line", "Move the cursor to line[:column] (ctrl+g)", self.action_goto_line)
        yield SystemCommand("Find", "Find in the file, round the end (ctrl+f)", self.action_find)
        yield SystemCommand("Replace", "Replace one match or all of them (ctrl+h)", self.action_replace)


def run_app(
    file: str | None,
    spec: EngineSpec,
    cap: str,
    system: str | None,
    overrides: dict[str, object],
    theme: str | None,
    client_factory: ClientFactory | None = None,
) -> int:
    """Run the app (the default `codellama-tui` command) on the engine here, or on a server through
    `client_factory`'s client (`--url`); returns the exit code."""
    import sys

    def too_big(problem: str) -> int:
        print(
            f"codellama-tui: error: {file}: too big to edit here ({problem}); open it in another editor",
            file=sys.stderr,
        )
        return 2

    with contextlib.suppress(OSError):  # before reading it; a missing file is a new one, other errors come next
        if file and stat.S_ISREG((info := os.stat(file)).st_mode) and (problem := size_problem(info.st_size, 0)):
            return too_big(problem)
    try:
        config = load_config()
        theme = theme_name(theme or config.theme or "dark")
        merged = {**config.sampling, **{k: v for k, v in overrides.items() if v is not None}}
        SamplingParams.for_cap(cap, **merged).check()  # a bad value is refused now, not at the first request
        opened = OpenFile.open(file) if file else OpenFile(None)
    except (ConfigError, FileError, ValueError, OSError) as err:
        print(f"codellama-tui: error: {err}", file=sys.stderr)
        return 2
    if problem := size_problem(utf8_size(opened.text), opened.text.count("\n") + 1):
        return too_big(problem)
    app = CodeLlamaApp(
        opened,
        spec,
        cap,
        system or config.system,
        merged,
        theme,
        keys=config.keys,
        suggest=config.suggest,
        client_factory=client_factory or _local_client,
        config_file=config_path(),
        history=config.history,
    )
    result = app.run()
    code = result if isinstance(result, int) else (app.return_code or 0)
    for buffer in app.buffers.values():
        if buffer.recovery_file is not None and buffer.recovery_file.exists():
            with contextlib.suppress(OSError):  # stderr may be a terminal that is gone
                print(f"codellama-tui: the unsaved changes are kept in {buffer.recovery_file}", file=sys.stderr)
    if any(thread.is_alive() for thread in threading.enumerate() if thread is not threading.main_thread()):
        # the engine is still loading: finalizing the interpreter under its C++ threads aborts (SIGABRT), and
        # everything that must last (the file, the recovery copy) is on disk by now
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code
