"""The engine's one door: a worker thread that owns the engine, and a thread-safe client for it.

The UI, the console chat and the one-shot commands all talk to the engine through `EngineClient`.
Commands go in through a queue; events come back through `on_event` (called on the worker thread,
so a UI posts them as messages) and, for `stream()`, through a per-request queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from engine.errors import EngineError
from engine.events import Event, Failed, Finished, LoadFailed, Loading, ModelInfo, Ready, TextDelta
from engine.requests import EngineSpec, Request

_TERMINAL = (Finished, Failed)


@dataclass(frozen=True)
class _Submit:
    request: Request


@dataclass(frozen=True)
class _Cancel:
    request_id: int


@dataclass(frozen=True)
class _EndSession:
    session: str


class _Close:
    pass


class EngineClient:
    """Starts the engine in a background thread and relays commands to it; every method is non-blocking
    except `wait_ready`, `stream` and `close`."""

    def __init__(self, spec: EngineSpec, on_event: Callable[[Event], None] | None = None) -> None:
        self.spec = spec
        self._on_event = on_event
        self._commands: queue.Queue[object] = queue.Queue()
        self._streams: dict[int, queue.Queue[Event]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self.info: ModelInfo | None = None
        self.load_error: str | None = None

    def start(self) -> EngineClient:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """Block until the model is loaded; raise EngineError with the load failure otherwise."""
        if not self._ready.wait(timeout):
            raise EngineError("the engine did not become ready in time")
        if self.info is None:
            raise EngineError(self.load_error or "the engine failed to load")
        return self.info

    def submit(self, request: Request) -> int:
        self._commands.put(_Submit(request))
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request; it ends (reason "cancelled") within one decode step and frees its slot."""
        self._commands.put(_Cancel(request_id))

    def end_session(self, session: str) -> None:
        """Forget a chat session's history and free its cache slot."""
        self._commands.put(_EndSession(session))

    def stream(self, request: Request) -> Iterator[Event]:
        """Submit `request` and yield its events up to and including Finished or Failed.

        Ctrl+C while waiting for the next event cancels the request; the stream then ends with
        Finished(reason="cancelled"), so a console keeps its session and its partial answer. Text the engine made
        before the cancel reached it but not yet yielded is dropped: the output stops when the user asks, and the
        Finished text is what was yielded.
        """
        q: queue.Queue[Event] = queue.Queue()
        with self._lock:
            self._streams[request.id] = q
        self.submit(request)
        shown: list[str] = []
        interrupted = False
        try:
            while True:
                try:
                    event = q.get()
                except KeyboardInterrupt:
                    self.cancel(request.id)
                    interrupted = True
                    continue
                if interrupted and isinstance(event, TextDelta):
                    continue
                if interrupted and isinstance(event, Finished):
                    event = replace(event, reason="cancelled", text="".join(shown))
                if isinstance(event, TextDelta):
                    shown.append(event.text)
                yield event
                if isinstance(event, _TERMINAL):
                    return
        finally:
            with self._lock:
                self._streams.pop(request.id, None)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (and with tensor parallelism, every rank)."""
        if self._thread.is_alive():
            self._commands.put(_Close())
            self._thread.join(timeout)

    def _emit(self, event: Event) -> None:
        request_id = getattr(event, "request_id", None)
        if request_id is not None:
            with self._lock:
                q = self._streams.get(request_id)
            if q is not None:
                q.put(event)
        if self._on_event is not None:
            self._on_event(event)

    def _run(self) -> None:
        engine = self._load()
        self._ready.set()
        closed = False
        while not closed:
            busy = engine is not None and engine.busy
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if isinstance(command, _Close):
                    closed = True
                    break
                self._handle(engine, command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not closed and engine is not None and engine.busy:
                for event in engine.step():
                    self._emit(event)
        if engine is not None:
            engine.close()

    def _load(self):  # -> engine.engine.Engine | None
        start = time.perf_counter()
        try:
            from engine.engine import Engine  # imports torch: only ever on this thread

            engine = Engine.load(self.spec, progress=lambda f, s: self._emit(Loading(f, s)))
        except EngineError as err:
            self.load_error = str(err)
        except Exception as err:  # an unexpected failure must still reach the user as one line
            self.load_error = f"could not load the model: {type(err).__name__}: {err}"
        else:
            self.info = engine.info
            self._emit(Ready(engine.info, time.perf_counter() - start))
            return engine
        self._emit(LoadFailed(self.load_error))
        return None

    def _handle(self, engine, command: object) -> None:
        if isinstance(command, _Submit):
            if engine is None:
                self._emit(Failed(command.request.id, self.load_error or "no model is loaded"))
                return
            for event in engine.add(command.request):
                self._emit(event)
        elif isinstance(command, _Cancel) and engine is not None:
            for event in engine.cancel(command.request_id):
                self._emit(event)
        elif isinstance(command, _EndSession) and engine is not None:
            engine.end_session(command.session)
