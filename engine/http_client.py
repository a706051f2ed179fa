"""The client contract (`engine.client`) over HTTP: the engine of a `codellama-tui serve` elsewhere, or any
OpenAI-compatible server (vLLM, llama.cpp's server, a hosted API) with what it offers.

One thread runs an asyncio loop with one `httpx.AsyncClient`; every request is a task on it that streams its answer
(server-sent events, `engine.http_wire`) and delivers the events from that thread. Cancelling a request cancels its
task, which closes the stream: the server sees the disconnect and frees the request's slot.

At `start()` the client reads `/v1/models` (our server's card holds the whole `ModelInfo`; a foreign server is asked
once, with a one-token request, whether it takes `suffix`) and delivers `Ready`. Until the server answers it keeps
trying with backoff, saying so in `Loading` events (`retry=False`: a server that cannot be reached is a `LoadFailed`
at once, though one still loading its model is waited for). A refused key or a model the server does not have is a
`LoadFailed`. Once ready it pings `/health` every few seconds: `Link` events carry the round-trip time, or that the
server is gone and when the next try is; when it is back the client goes on by itself (and delivers a new `Ready`
if the model changed). A request meanwhile fails at once with one line; an answer cut off mid-way fails with what
arrived delivered, and a server that sends nothing for `read_timeout` seconds fails the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import replace

import httpx

from engine.client import BaseClient, EventSink
from engine.errors import EngineError
from engine.events import Event, Failed, Finished, Link, LoadFailed, Loading, ModelInfo, Ready, Stats
from engine.http_wire import (
    COMPLETIONS,
    AnswerReader,
    Served,
    error_message,
    error_text,
    request_body,
    served,
    sse_lines,
)
from engine.requests import Request

CONNECT_TIMEOUT_S = 5.0  # to open a connection: a server that is up answers at once
READ_TIMEOUT_S = 120.0  # between two pieces of an answer: a busy server queues requests before their first token
PING_S = 5.0
BACKOFF_S = (0.5, 15.0)  # the first wait before trying a server again, and the longest
LOADING_POLL_S = 1.0  # how often to ask a server that is loading its model


class _Unreachable(Exception):
    """The server cannot answer now (down, restarting, loading its model): try again later."""

    def __init__(self, message: str, loading: bool = False) -> None:
        super().__init__(message)
        self.loading = loading


def describe(err: httpx.HTTPError) -> str:
    """A transport error in a few words."""
    if isinstance(err, httpx.ConnectTimeout):
        return "no answer to the connection"
    if isinstance(err, httpx.ConnectError):
        text = str(err)
        refused = "refused" in text.lower() or text == "All connection attempts failed"  # httpx's, for every address
        return "nothing listens there (connection refused)" if refused else text or "cannot connect"
    if isinstance(err, httpx.ReadTimeout):
        return "no answer in time"
    if isinstance(err, httpx.RemoteProtocolError):
        return "the server closed the connection"
    return str(err) or type(err).__name__


class HttpClient(BaseClient):
    """A server at `url`; `api_key` goes as a bearer token, `model` picks one of the server's models (default: its
    first)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        on_event: EventSink | None = None,
        retry: bool = True,
        read_timeout: float = READ_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        ping_s: float = PING_S,
    ) -> None:
        super().__init__(on_event)
        self.url = self.server = url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.retry, self.read_timeout, self.connect_timeout, self.ping_s = retry, read_timeout, connect_timeout, ping_s
        self.served: Served | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="http-client", daemon=True)
        self._http: httpx.AsyncClient | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._stop = asyncio.Event()
        self._known = asyncio.Event()  # Ready or LoadFailed was delivered
        self._look_now = asyncio.Event()  # a request could not reach the server: ping at once
        self._ping_path = "/health"

    # ---- the transport's hooks, called on the caller's thread

    def _open(self) -> None:
        self._thread.start()

    def _send(self, request: Request) -> None:
        if not self._soon(self._begin, request):  # closed: `stopped` fails whatever comes later
            self.deliver(Failed(request.id, "the connection to the server is closed"))

    def _send_cancel(self, request_id: str) -> None:
        self._soon(self._cancel_task, request_id)

    def _tokenize(self, request: Request) -> list[int]:
        future = asyncio.run_coroutine_threadsafe(self._tokenize_remote(request), self._loop)
        return future.result(self.connect_timeout + self.read_timeout)

    def _shut(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._soon(self._stop.set)
            self._thread.join(timeout)
        elif not self._loop.is_closed() and self._thread.ident is None:
            self._loop.close()

    def _soon(self, fn: object, *args: object) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed
            return False
        return True

    # ---- on the client's thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()
            self.stopped("the connection to the server is closed")  # no request waits for a closed client

    async def _main(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.read_timeout, connect=self.connect_timeout)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout) as http:
            self._http = http
            watch = asyncio.create_task(self._watch())
            await self._stop.wait()
            tasks = [watch, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def deliver(self, event: Event) -> None:
        if isinstance(event, (Ready, LoadFailed)):  # on the loop's thread, as every event but a closed client's
            self._known.set()
        super().deliver(event)

    async def _watch(self) -> None:
        """Connect, then ping until the client closes; a fault of its own is said, never silent."""
        try:
            if await self._connect():
                await self._ping()
        except Exception as err:
            reason = f"the connection's watch failed: {type(err).__name__}: {err}"
            self.deliver(LoadFailed(reason) if self.served is None else Link(self.url, False, None, reason))

    async def _connect(self) -> bool:
        """Learn what the server serves, trying again with backoff (every second while it loads its model);
        delivers `Ready` or `LoadFailed`."""
        start = time.perf_counter()
        delay = BACKOFF_S[0]
        while True:
            try:
                self.served = await self._learn()
                break
            except EngineError as err:
                self.deliver(LoadFailed(str(err), err.fields))
                return False
            except _Unreachable as err:
                if not self.retry and not err.loading:
                    self.deliver(LoadFailed(f"cannot reach {self.url}: {err}", ("url",)))
                    return False
                wait = LOADING_POLL_S if err.loading else delay
                self.deliver(Loading(0.0, f"{self.url}: {err}; trying again in {_seconds(wait)}"))
                await asyncio.sleep(wait)
                delay = min(2 * delay, BACKOFF_S[1])
        self.deliver(Ready(self.served.info, time.perf_counter() - start))
        return True

    async def _ping(self) -> None:
        assert self._http is not None and self.served is not None
        up, delay, wait = True, BACKOFF_S[0], 0.0  # the first ping at once: its time for the status line
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._look_now.wait(), wait)
            self._look_now.clear()
            sent = time.perf_counter()
            try:
                response = await self._http.get(self._ping_path, timeout=self.connect_timeout)
                if response.status_code != 200:
                    raise _Unreachable(error_text(response.status_code, response.content))
                rtt = time.perf_counter() - sent
                if not up:
                    again = await self._learn()
                    if again.info != self.served.info or again.model != self.served.model:
                        self.served = again
                        self.deliver(Ready(again.info, rtt))
            except (httpx.HTTPError, _Unreachable, EngineError) as err:
                reason = describe(err) if isinstance(err, httpx.HTTPError) else str(err)
                if not up:
                    delay = min(2 * delay, BACKOFF_S[1])
                up, wait = False, delay
                self.deliver(Link(self.url, False, None, f"{reason}; trying again in {_seconds(delay)}"))
                continue
            up, delay, wait = True, BACKOFF_S[0], self.ping_s
            self.deliver(Link(self.url, True, rtt))

    async def _learn(self) -> Served:
        """What the server serves; raises EngineError for what retrying cannot fix, _Unreachable otherwise."""
        assert self._http is not None
        try:
            response = await self._http.get("/v1/models")
        except httpx.HTTPError as err:
            raise _Unreachable(describe(err)) from None
        status = response.status_code
        if status == 404 and self.model is not None:  # a server without a model list: the name given is the one
            found = Served(self.model, False, ModelInfo(self.model, can_infill=False, can_tokenize=False))
        elif status == 200:
            try:
                found = served(response.json(), self.model)
            except ValueError:
                raise EngineError(f"{self.url}/v1/models is not JSON: is this an OpenAI-compatible server?") from None
        elif status in (401, 403):
            raise EngineError(f"{self.url}: {error_text(status, response.content)}", fields=("api_key",))
        elif status == 503 and _code(response) == "model_not_loaded":
            raise EngineError(f"{self.url}: {error_text(status, response.content)}")
        elif status == 503:  # our server while its model loads (code "loading"), or one stopping
            raise _Unreachable(error_text(status, response.content), loading=True)
        elif status >= 500 or status == 429:
            raise _Unreachable(error_text(status, response.content))
        else:
            raise EngineError(f"{self.url}: {error_text(status, response.content)}", fields=("url",))
        if found.ours:
            self._ping_path = "/health"
            return found
        self._ping_path = "/health" if await self._answers("/health") else "/v1/models"
        return replace(found, info=replace(found.info, can_infill=await self._takes_suffix(found.model)))

    async def _answers(self, path: str) -> bool:
        assert self._http is not None
        try:
            return (await self._http.get(path)).status_code == 200
        except httpx.HTTPError as err:
            raise _Unreachable(describe(err)) from None

    async def _takes_suffix(self, model: str) -> bool:
        """Whether a foreign server infills: it answers a one-token request with a `suffix` (servers that do not
        refuse the field)."""
        assert self._http is not None
        body = {"model": model, "prompt": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 1}
        try:
            response = await self._http.post(COMPLETIONS, json={**body, "temperature": 0})
        except httpx.HTTPError as err:
            raise _Unreachable(describe(err)) from None
        return response.status_code == 200

    # ---- requests

    def _begin(self, request: Request) -> None:
        if request.id in self._tasks:
            self.deliver(Failed(request.id, f"request id {request.id!r} is already in use"))
            return
        task = self._loop.create_task(self._answer(request))
        self._tasks[request.id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(request.id) is done:
                del self._tasks[request.id]

        task.add_done_callback(forget)

    def _cancel_task(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            self._cancelled.add(request_id)
            task.cancel()

    async def _answer(self, request: Request) -> None:
        """Stream one request's answer; delivers its events and, last, its one terminal event."""
        rid = request.id
        reader: AnswerReader | None = None
        try:
            await self._known.wait()
            if self.served is None or self.info is None:
                self.deliver(Failed(rid, self.load_error or "the server is not connected"))
                return
            sent, replaced = request.cleaned()  # as the engine would: JSON cannot carry lone surrogates
            path, body = request_body(sent, self.served)
            reader = AnswerReader(request, self.served, replaced)
            terminal = await self._stream(path, body, reader)
        except EngineError as err:
            terminal = Failed(rid, str(err))
        except Exception as err:  # an unforeseen fault fails its request, never silently
            terminal = Failed(rid, f"the request failed: {type(err).__name__}: {err}")
        except asyncio.CancelledError:
            if rid not in self._cancelled:
                raise  # the client is closing: the request ends without a word
            terminal = reader.cancelled() if reader is not None else _nothing_cancelled(request)
        finally:
            self._cancelled.discard(rid)
        self.deliver(terminal)

    async def _stream(self, path: str, body: dict[str, object], reader: AnswerReader) -> Event:
        assert self._http is not None
        rid = reader.request.id
        answered = False
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    return Failed(rid, error_text(response.status_code, await response.aread()))
                answered = True
                async with contextlib.aclosing(sse_lines(response.aiter_text())) as lines:
                    async for line in lines:
                        for event in reader.feed(line):
                            self.deliver(event)
                        if reader.done:
                            break
        except httpx.ReadTimeout:
            return Failed(rid, f"the server sent nothing for {_seconds(self.read_timeout)}; the request was given up")
        except httpx.HTTPError as err:
            self._look_now.set()
            if not answered:
                return Failed(rid, f"cannot reach {self.url}: {describe(err)}")
            return reader.end(f"lost the connection to {self.url} mid-answer ({describe(err)})")
        return reader.end(f"lost the connection to {self.url} mid-answer (the answer stopped short)")

    async def _tokenize_remote(self, request: Request) -> list[int]:
        assert self._http is not None
        request, _ = request.cleaned()
        body: dict[str, object] = {"cap": request.cap, "spm": request.suffix_first}
        if request.cap == "chat":
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        elif request.prefix is not None and request.suffix is not None:
            body.update(prefix=request.prefix, suffix=request.suffix)
        else:
            body["text"] = request.text
        try:
            response = await self._http.post("/tokenize", json=body)
        except httpx.HTTPError as err:
            raise EngineError(f"cannot reach {self.url}: {describe(err)}") from None
        if response.status_code == 400:
            raise EngineError(error_message(response.json()) or error_text(400, response.content))
        if response.status_code != 200:
            raise EngineError(error_text(response.status_code, response.content))
        return list(response.json()["tokens"])


def _code(response: httpx.Response) -> str | None:
    """An OpenAI error body's `code`."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _nothing_cancelled(request: Request) -> Event:
    """A request cancelled before anything was sent."""
    return Finished(request.id, "cancelled", "", Stats(0, 0, 0.0, 0.0))


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 1 else f"{s:.0f} s"
