"""The one client contract: how every front end (the app, the console chat, the one-shot commands, the HTTP
server) talks to an engine, wherever that engine runs.

`Client` is the interface. `BaseClient` implements it all except the transport and owns the subtle parts once
for everyone: routing events to `on_event` and to per-request streams, the readiness handshake, and the rules of
`stream()` for cancelling and for Ctrl+C. A transport subclasses `BaseClient`, supplies five hooks and hands every
event it receives to `deliver()`: `engine.local_client.LocalClient` runs the engine in this process on a worker
thread; an HTTP client supplies a connection instead; the tests' fake supplies a script.

The rules every client keeps (events are `engine.events`, requests `engine.requests`):

- Every method returns at once, except `wait_ready`, `tokenize`, `close`, and iterating `stream()`.
- Each submitted request gets its events in order: any `TurnsDropped` / `TextClipped`, `Started`, `TextDelta`s,
  and last exactly one terminal event, `Finished` or `Failed`. A request that cannot run (bad input, no model,
  a lost connection) gets `Failed` alone. Nothing is delivered for a request after its terminal event (the base
  class drops whatever a transport sends later, or for ids it never submitted).
- Events are delivered on the transport's own thread, never the caller's: a UI posts them on as messages. (Once
  a transport has stopped for good, nothing is left to wait for: a request submitted after that fails at once, on
  the caller's thread.)
- No request is left waiting: when a transport stops or fails (the engine's worker ends, the connection is lost),
  every open request gets `Failed` with the reason.
- A client whose engine is behind a server (`server` is its URL) also delivers `Link` events, about the connection
  rather than any request: whether the server answers, and the round-trip time to it.
- `cancel(id)` may be called at any time, any number of times, for any id: unknown and finished ids are
  ignored. A running request then ends with `Finished(reason="cancelled")` within one decode step and frees its
  slot (or with `Failed`, if it failed first).
- Request ids are the caller's opaque strings (`Request.id`, a uuid by default); they must be unique among the
  client's open requests.
"""

from __future__ import annotations

import queue
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from engine.errors import CapabilityError, EngineError
from engine.events import Event, Failed, Finished, LoadFailed, ModelInfo, Ready, TextDelta
from engine.requests import Request

EventSink = Callable[[Event], None]
_POLL_S = 0.05  # how often a waiting stream looks for a Ctrl+C that its signal handler noted


class ForceQuit(BaseException):
    """A second Ctrl+C while a stream waits for its cancelled request to end: the caller should quit now, even
    if the engine does not stop. Not a KeyboardInterrupt, so that nothing on the way swallows it."""


class Client(ABC):
    """What a front end may ask of an engine. `info` is set once the model is ready (`load_error` if it never
    will be); its flags (`can_infill`, `can_tokenize`) say which requests make sense. `server` is the URL of the
    server the engine runs behind, None for an engine in this process."""

    info: ModelInfo | None = None
    load_error: str | None = None
    server: str | None = None

    @abstractmethod
    def start(self) -> Client:
        """Start loading the model (or connecting) in the background; returns the client. Progress arrives as
        `Loading` events, then `Ready` or `LoadFailed`, through `on_event`."""

    @abstractmethod
    def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """Block until the model is ready; raise EngineError with the one-line reason if it cannot be, or if
        `timeout` seconds pass first."""

    @abstractmethod
    def submit(self, request: Request) -> str:
        """Queue a request and return its id; its events arrive through `on_event`. Requests submitted before
        the model is ready wait for it (and fail with the load error if it never is)."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request (the rules are in this module's docstring)."""

    @abstractmethod
    def stream(self, request: Request) -> Iterator[Event]:
        """Submit `request` and yield its events, up to and including the terminal one (see `BaseClient.stream`
        for the Ctrl+C rules). Its events still reach `on_event` too."""

    @abstractmethod
    def tokenize(self, request: Request) -> list[int]:
        """Exactly the prompt ids the engine would feed the model for `request` (no fitting); raises EngineError
        for a prompt that cannot be built, CapabilityError when `info.can_tokenize` is false."""

    @abstractmethod
    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine or the connection (requests still open end with `Failed` or not at all). Safe to call
        twice, and before `start`."""


class BaseClient(Client):
    """The contract, less the transport. A subclass supplies:

    - `_open()`: start loading or connecting in the background (from `start()`);
    - `_send(request)` and `_send_cancel(request_id)`: pass them on, without blocking;
    - `_tokenize(request)`: the prompt ids (called only once the model is ready and `info.can_tokenize`);
    - `_shut(timeout)`: stop, waiting at most `timeout` seconds;

    and calls `deliver(event)` for every event, from its own thread, `Ready` or `LoadFailed` among them; when it
    can no longer answer the requests it holds it calls `fail_open(reason)`, and when it has ended for good,
    `stopped(reason)`.
    """

    def __init__(self, on_event: EventSink | None = None) -> None:
        self.on_event = on_event
        self.info: ModelInfo | None = None
        self.load_error: str | None = None
        self._load_fields: tuple[str, ...] = ()
        self._ready = threading.Event()
        self._streams: dict[str, queue.Queue[Event]] = {}
        self._open_ids: set[str] = set()  # submitted requests without their terminal event yet
        self._stopped: str | None = None  # why the transport ended for good
        self._lock = threading.Lock()

    # ---- what a transport supplies

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _send(self, request: Request) -> None: ...

    @abstractmethod
    def _send_cancel(self, request_id: str) -> None: ...

    @abstractmethod
    def _tokenize(self, request: Request) -> list[int]: ...

    @abstractmethod
    def _shut(self, timeout: float) -> None: ...

    # ---- the contract

    def start(self) -> BaseClient:
        self._open()
        return self

    def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        if not self._ready.wait(timeout):
            raise EngineError("the engine did not become ready in time")
        if self.info is None:
            raise EngineError(self.load_error or "the engine failed to load", fields=self._load_fields)
        return self.info

    def submit(self, request: Request) -> str:
        with self._lock:
            stopped = self._stopped
            self._open_ids.add(request.id)
        if stopped is not None:
            self.deliver(Failed(request.id, stopped))
        else:
            self._send(request)
        return request.id

    def cancel(self, request_id: str) -> None:
        self._send_cancel(request_id)

    def tokenize(self, request: Request) -> list[int]:
        info = self.wait_ready()
        if not info.can_tokenize:
            raise CapabilityError(f"{info.name} does not tell the prompt's token ids")
        return self._tokenize(request)

    def close(self, timeout: float = 10.0) -> None:
        self._shut(timeout)

    def stream(self, request: Request) -> Iterator[Event]:
        """Submit `request` and yield its events up to and including `Finished` or `Failed`.

        Ctrl+C, while the stream is open on the main thread (waiting for an event, or while the caller handles
        one), cancels the request instead of raising KeyboardInterrupt anywhere: the stream goes on to the
        request's end, drops the text that arrives after the Ctrl+C, and ends with
        `Finished(reason="cancelled", text=<the text it yielded>)`, even if the engine had already finished
        the request. The output stops when the user asks, and the final text is what was shown. A second Ctrl+C
        raises `ForceQuit` (from wherever the main thread is). A process that ignores SIGINT keeps ignoring it.

        Close the iterator (or exhaust it) to leave the stream early; the request itself runs on unless cancelled.
        """
        q: queue.Queue[Event] = queue.Queue()
        with self._lock:
            self._streams[request.id] = q
        shown: list[str] = []
        try:
            with _interrupts() as pressed:
                self.submit(request)
                cancelled = False
                while True:
                    try:  # with a Ctrl+C handler, wake up now and then: a signal may have gone to another thread
                        event = q.get(timeout=None if pressed is None else _POLL_S)
                    except queue.Empty:
                        event = None
                    if pressed is not None and pressed.is_set() and not cancelled:
                        self.cancel(request.id)
                        cancelled = True
                    if event is None or (cancelled and isinstance(event, TextDelta)):
                        continue
                    if cancelled and isinstance(event, Finished):
                        event = replace(event, reason="cancelled", text="".join(shown))
                    if isinstance(event, TextDelta):
                        shown.append(event.text)
                    yield event
                    if isinstance(event, (Finished, Failed)):
                        return
        finally:
            with self._lock:
                self._streams.pop(request.id, None)

    # ---- for the transport

    def deliver(self, event: Event) -> None:
        """Hand one event to the caller: to its request's stream if one is open, then to `on_event`. Called by the
        transport, on its thread, in order; an event for a request that has ended is dropped."""
        if isinstance(event, Ready):
            self.info = event.info
            self._ready.set()
        elif isinstance(event, LoadFailed):
            self.load_error, self._load_fields = event.message, event.fields
            self._ready.set()
        request_id = getattr(event, "request_id", None)
        if request_id is not None:
            with self._lock:
                if request_id not in self._open_ids:
                    return  # it has ended (or was never submitted): nothing more goes out for it
                if isinstance(event, (Finished, Failed)):
                    self._open_ids.discard(request_id)
                q = self._streams.get(request_id)
            if q is not None:
                q.put(event)
        if self.on_event is not None:
            self.on_event(event)

    def fail_open(self, reason: str) -> None:
        """End every open request with `Failed(reason)`: the transport cannot answer them any more."""
        with self._lock:
            open_ids = sorted(self._open_ids)
        for request_id in open_ids:
            self.deliver(Failed(request_id, reason))

    def stopped(self, reason: str) -> None:
        """The transport has ended for good: fail the open requests, and every later one at once."""
        with self._lock:
            self._stopped = reason
        self.fail_open(reason)


@contextmanager
def _interrupts() -> Iterator[threading.Event | None]:
    """Note Ctrl+C instead of raising KeyboardInterrupt: the first press sets the yielded event, the second raises
    ForceQuit. The handler only sets a flag and the stream sends the cancel itself, since a handler that took a
    queue's lock could deadlock with the code it interrupted. Yields None where no handler goes in: off the main
    thread (signal handlers exist only there), or when SIGINT is ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield None
        return
    pressed = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if pressed.is_set():
            raise ForceQuit
        pressed.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
