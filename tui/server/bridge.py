"""The bridge between the event loop and the engine's client: requests go in, events come back into the loop.

The client delivers events on its own thread; `call_soon_threadsafe` moves each into the loop, where it goes to
its generation's asyncio queue. The bridge also owns admission: at most `slots` sequences are in the engine at a
time (the engine's batch, `--instance-num`), the rest wait here in arrival order, at most `max_queue` of them;
a request that would overflow the queue is refused (429). Keeping the queue here means the bridge knows exactly
what runs and what waits, and a request cancelled while it waits never reaches the engine.

Everything but `_from_worker` runs on the event loop's thread, so nothing here takes a lock (the inbox between the
two is a deque, whose appends and pops are atomic).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from engine.client import Client, EventSink
from engine.events import Event, Failed, Finished, LoadFailed, Loading, ModelInfo, Ready, TextDelta
from engine.requests import Request
from tui.server.errors import ApiError
from tui.server.metrics import Metrics

log = logging.getLogger("codellama_tui.server")
RETRY_AFTER_S = 1


class ShuttingDown(Exception):
    """The server is stopping: the generation ends now, with an error for its caller."""


@dataclass(eq=False)
class Generation:
    """One HTTP request's sequences (its `n` choices) and the events that come back for them, as
    `(choice index, event)`. `batches()` gives them as they came, all that arrived since the last batch at once,
    up to the last choice's terminal event; iterating it gives them one by one."""

    requests: tuple[Request, ...]
    arrived: float
    events: deque[tuple[int, Event] | None] = field(default_factory=deque)  # None: the server is stopping
    open: set[str] = field(default_factory=set)  # ids without a terminal event yet
    closed: bool = False  # the caller stopped listening
    last_text: dict[str, float] = field(default_factory=dict)  # when each choice's latest text came
    _waiter: asyncio.Future[None] | None = None

    def put(self, item: tuple[int, Event] | None) -> None:
        self.events.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Each wake-up's events together: a stream that fell behind catches up in one write, not one per token."""
        while self.open or self.events:
            if not self.events:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            batch = list(self.events)
            self.events.clear()
            if None in batch:
                if batch.index(None):
                    yield batch[: batch.index(None)]  # type: ignore[misc]
                raise ShuttingDown
            yield batch  # type: ignore[misc]

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        async for batch in self.batches():
            for item in batch:
                yield item


class Bridge:
    """Admission, routing and state of one server's engine. `make_client(sink)` builds the client that delivers
    its events to `sink`; it is started by `start()`, inside the running loop."""

    def __init__(
        self, make_client: Callable[[EventSink], Client], slots: int, max_queue: int, metrics: Metrics
    ) -> None:
        self.make_client, self.slots, self.max_queue, self.metrics = make_client, slots, max_queue, metrics
        self.client: Client | None = None
        self.info: ModelInfo | None = None
        self.load_error: str | None = None
        self.stopping = False
        self.on_load_failed: Callable[[str], None] | None = None  # the server stops when the model cannot load
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owner: dict[str, tuple[Generation, int]] = {}  # request id -> its generation and choice index
        self._waiting: deque[Request] = deque()
        self._in_engine: set[str] = set()
        self._last_stage = ""
        self._inbox: deque[Event] = deque()  # appended on the client's thread, drained on the loop's
        self._woken = False
        metrics.watch(self.running_requests, self.waiting_requests, self.slots_in_use, slots)

    # ---- state, for /health and /metrics

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.stopping

    def slots_in_use(self) -> int:
        return len(self._in_engine)

    def running_requests(self) -> int:
        return len({id(self._owner[i][0]) for i in self._in_engine if i in self._owner})

    def waiting_requests(self) -> int:
        running = {id(self._owner[i][0]) for i in self._in_engine if i in self._owner}
        return len({id(self._owner[r.id][0]) for r in self._waiting} - running)

    # ---- lifecycle

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the server runs on, once started."""
        return self._loop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.client = self.make_client(self._from_worker)
        self.client.start()

    def shutdown(self) -> None:
        """End every open generation with `ShuttingDown` and cancel what runs; new requests get 503."""
        if self.stopping:
            return
        self.stopping = True
        for generation in {g for g, _ in self._owner.values()}:
            self.close(generation)
            generation.put(None)

    def shutdown_threadsafe(self) -> None:
        """`shutdown` from any thread, or from a signal handler."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.shutdown)

    async def aclose(self) -> None:
        """Stop the engine (and its tensor-parallel ranks), off the loop's thread."""
        self.shutdown()
        if self.client is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.client.close)

    # ---- requests

    def check_ready(self) -> ModelInfo:
        """The model's info, or the 503 that a request gets while there is none."""
        if self.stopping:
            raise ApiError(503, "the server is shutting down")
        if self.load_error is not None:
            raise ApiError(503, self.load_error, code="model_not_loaded")
        if self.info is None:
            raise ApiError(503, "the model is still loading; try again shortly", code="loading")
        return self.info

    def open(self, requests: Sequence[Request]) -> Generation:
        """Queue a request's sequences: into the engine while it has free slots, else in arrival order here."""
        self.check_ready()
        free = self.slots - len(self._in_engine) + self.max_queue - len(self._waiting)
        if len(requests) > self.slots + self.max_queue:
            raise ApiError(
                400, f"n is {len(requests)}, more than the server holds ({self.slots + self.max_queue})", param="n"
            )
        if len(requests) > free:
            raise ApiError(
                429,
                f"the server is busy: {len(self._in_engine)} sequences running and {len(self._waiting)} queued; "
                f"try again shortly",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        generation = Generation(tuple(requests), time.perf_counter())
        for index, request in enumerate(requests):
            self._owner[request.id] = (generation, index)
            generation.open.add(request.id)
            self._waiting.append(request)
        self._pump()
        return generation

    def close(self, generation: Generation) -> None:
        """The caller is gone (or done): cancel whatever of it still runs or waits; its slots free within a step."""
        if generation.closed:
            return
        generation.closed = True
        queued = {i for i in generation.open if i not in self._in_engine}
        for request_id in generation.open - queued:
            assert self.client is not None
            self.client.cancel(request_id)  # its terminal event frees the slot and the routing entry
        for request_id in queued:
            self._drop(request_id)
        if queued:
            self._waiting = deque(r for r in self._waiting if r.id not in queued)

    def _drop(self, request_id: str) -> None:
        owner = self._owner.pop(request_id, None)
        if owner is not None:
            owner[0].open.discard(request_id)

    def _pump(self) -> None:
        """Move waiting sequences into free engine slots, oldest first."""
        assert self.client is not None
        while self._waiting and len(self._in_engine) < self.slots:
            request = self._waiting.popleft()
            self._in_engine.add(request.id)
            self.client.submit(request)

    # ---- events, from the client's thread into the loop

    def _from_worker(self, event: Event) -> None:
        """The client's sink: runs on its thread. Events wait in the inbox, and the loop is woken once for all that
        arrive before it drains them (a decode step's events for every sequence at once)."""
        self._inbox.append(event)
        loop = self._loop
        if not self._woken and loop is not None and not loop.is_closed():
            self._woken = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._woken = False  # before draining: an event that comes meanwhile wakes the loop again
        while self._inbox:
            self._on_event(self._inbox.popleft())

    def _on_event(self, event: Event) -> None:
        if type(event) is TextDelta:  # most events: one per token per stream
            owner = self._owner.get(event.request_id)
            if owner is not None:
                self._time_text(owner[0], event.request_id)
                if not owner[0].closed:
                    owner[0].put((owner[1], event))
            return
        if isinstance(event, Loading):
            if event.stage != self._last_stage:
                log.info("loading %3.0f%% %s", 100 * event.fraction, event.stage)
                self._last_stage = event.stage
            return
        if isinstance(event, Ready):
            self.info = event.info
            log.info(
                "ready: %s on %s (%s, tp %s), context %s tokens, %.1fs",
                event.info.name,
                event.info.device,
                event.info.dtype,
                event.info.tp,
                event.info.context,
                event.startup_s,
            )
            return
        if isinstance(event, LoadFailed):
            self.load_error = f"the model could not be loaded: {event.message}"
            log.error("%s", self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed(event.message)
            return
        request_id = getattr(event, "request_id", None)
        owner = self._owner.get(request_id) if request_id is not None else None
        terminal = isinstance(event, (Finished, Failed))
        if terminal:
            self._in_engine.discard(request_id)
            self._drop(request_id)
            self._count(event)
            self._pump()
        if owner is None:
            return
        generation, index = owner
        if not generation.closed:
            generation.put((index, event))

    def _time_text(self, generation: Generation, request_id: str) -> None:
        now = time.perf_counter()
        last = generation.last_text.get(request_id)
        if last is None:
            self.metrics.ttft.observe(now - generation.arrived)
        else:
            self.metrics.itl.observe(now - last)
        generation.last_text[request_id] = now

    def _count(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.metrics.sequence_done(event.reason, event.stats)
        else:
            self.metrics.sequence_done("failed", None)
