"""The engine's one door: a worker thread that owns the engine, and a thread-safe client for it.

The UI, the console chat and the one-shot commands all talk to the engine through `EngineClient`.
Commands go in through a queue; events come back through `on_event` (called on the worker thread,
so a UI posts them as messages) and, for `stream()`, through a per-request queue.
"""

from __future__ import annotations

import contextlib
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
        self._stopped: str | None = None  # why the worker stopped serving after a fault of its own loop
        self._exited = False  # the worker thread has ended: stream() must not wait for it

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
            exited = self._exited
        if exited:
            q.put(Failed(request.id, self._stopped or "the engine was closed"))
        else:
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
        try:
            while True:
                try:
                    return self._serve(engine)
                except Exception as err:  # a fault of the loop itself: no thread dies silently
                    self._stop(engine, err)
                    engine = None
        finally:  # whatever ends this thread, no stream() waits for it
            with self._lock:
                self._exited = True
                waiting = list(self._streams.items())
            for request_id, q in waiting:
                q.put(Failed(request_id, self._stopped or "the engine was closed"))

    def _serve(self, engine) -> None:  # engine: engine.engine.Engine | None
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

    def _stop(self, engine, err: Exception) -> None:
        """The loop failed outside any one request: fail every request in flight, then refuse new ones with why."""
        self._stopped = f"the engine stopped: {_reason(err)}"
        with self._lock:
            ids = set(self._streams)
        if engine is not None:
            ids |= {seq.request.id for seq in (*engine.waiting, *engine.prefilling, *engine.running)}
            with contextlib.suppress(Exception):
                engine.close()
        for request_id in sorted(ids):
            with contextlib.suppress(Exception):
                self._emit(Failed(request_id, self._stopped))

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
                self._emit(Failed(command.request.id, self._stopped or self.load_error or "no model is loaded"))
                return
            try:
                events = engine.add(command.request)
            except Exception as err:  # an unforeseen fault of one request fails that request, not the worker
                events = [Failed(command.request.id, f"the request failed: {_reason(err)}")]
            for event in events:
                self._emit(event)
        elif isinstance(command, _Cancel) and engine is not None:
            for event in engine.cancel(command.request_id):
                self._emit(event)
        elif isinstance(command, _EndSession) and engine is not None:
            engine.end_session(command.session)


def _reason(err: Exception) -> str:
    """An unexpected exception as the one line a user sees."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
