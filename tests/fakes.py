"""The one fake engine client of the front ends' tests: a `BaseClient` whose transport answers from a script.

The base class is the real one, so routing, `stream()` and its Ctrl+C rules are what the app, the console and the
one-shot commands get in use. Requests are answered in order on a worker thread of the fake's own, in small
deltas, with the engine's accounting: a token per `chars_per_token` characters of the request's text, and a chat
with `fit` loses its oldest exchanges while its prompt and the room for an answer outgrow `info.context`.
A test can hold a request open (`hold`) to cancel it mid-stream, run code before each delta (`on_delta`), script
failures, or make loading fail.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from engine.client import BaseClient, EventSink
from engine.events import (
    Failed,
    Finished,
    FinishReason,
    LoadFailed,
    Loading,
    ModelInfo,
    Ready,
    Started,
    Stats,
    TextDelta,
    TurnsDropped,
)
from engine.prompts import answer_room
from engine.requests import FILL, EngineSpec, Request

INFO = ModelInfo(
    name="CodeLlama-7b-Instruct-hf", flavour="instruct", can_infill=True, device="cpu",
    dtype="float32", tp=1, context=16384, vocab_size=32016,
)  # fmt: skip

ANSWERS = {
    "completion": "return a + b\n",
    "python": "return a + b\n",
    "infilling": "FILLED",
    "chat": "Here you go:\n\n```python\ndef add(a, b):\n    return a + b\n```\n",
}


class FakeClient(BaseClient):
    """Answers each request with `answers[cap]` (a list: one answer per request of that cap, in order) or with
    `answers(request)`.

    Records what the front end did: `submitted` requests, `cancelled` ids (and sets `cancel_seen`), `started`,
    `closed`.
    `hold`: after the first delta, wait until the request is cancelled or `release` is set.
    `ignore_cancel`: an engine that does not stop (cancels are recorded, nothing more).
    `on_delta(client, request, index)`: runs on the fake's thread before delta `index` is sent.
    `fail`: a message (or `fail(request)` giving one, or None) to fail requests with.
    `speculation`: requests that speculate report two tokens per decode step (one proposal accepted each).
    `reason`: the finish reason of every answer (default: the model's own end, eot for infilling, else eos).
    """

    def __init__(
        self,
        spec: EngineSpec | None = None,
        on_event: EventSink | None = None,
        *,
        info: ModelInfo = INFO,
        answers: dict[str, str | list[str]] | Callable[[Request], str] | None = None,
        chunk: int = 3,
        delay: float = 0.0005,
        chars_per_token: int = 3,
        load_error: str | None = None,
        fail: str | Callable[[Request], str | None] | None = None,
        hold: bool = False,
        ignore_cancel: bool = False,
        on_delta: Callable[[FakeClient, Request, int], None] | None = None,
        speculation: bool = False,
    ) -> None:
        super().__init__(on_event)
        self.spec = spec
        self.fake_info = info
        self.answers = answers if callable(answers) else {**ANSWERS, **(answers or {})}
        self.chunk, self.delay, self.chars_per_token = chunk, delay, chars_per_token
        self.fake_load_error, self.fail, self.hold, self.on_delta = load_error, fail, hold, on_delta
        self.ignore_cancel, self.speculation = ignore_cancel, speculation
        self.reason: FinishReason | None = None  # how every answer ends (default: the model's own end)
        self.submitted: list[Request] = []
        self.cancelled: list[str] = []
        self.started = self.closed = False
        self.release = threading.Event()
        self.cancel_seen = threading.Event()
        self._cancel_flags: dict[str, threading.Event] = {}
        self._served: dict[str, int] = {}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)

    def factory(self, spec: EngineSpec, on_event: EventSink) -> FakeClient:
        """For front ends that build their own client (`client_factory=fake.factory`): binds and returns this one."""
        self.spec, self.on_event = spec, on_event
        return self

    # ---- the transport

    def _open(self) -> None:
        self.started = True
        self._thread.start()

    def _send(self, request: Request) -> None:
        self.submitted.append(request)
        self._cancel_flags[request.id] = threading.Event()
        self._queue.put(request)

    def _send_cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.cancel_seen.set()
        if request_id in self._cancel_flags and not self.ignore_cancel:
            self._cancel_flags[request_id].set()

    def _tokenize(self, request: Request) -> list[int]:
        return [ord(c) for c in _prompt_text(request)]

    def _shut(self, timeout: float) -> None:
        self.closed = True
        self.release.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    # ---- the script

    def tokens(self, text: str) -> int:
        return len(text) // self.chars_per_token

    def _answer(self, request: Request) -> str:
        if callable(self.answers):
            return self.answers(request)
        answer = self.answers[request.cap]
        if isinstance(answer, list):
            index = self._served.get(request.cap, 0)
            self._served[request.cap] = index + 1
            return answer[min(index, len(answer) - 1)]
        return answer

    def _run(self) -> None:
        for fraction, stage in ((0.0, "reading config"), (0.5, "loading weights"), (1.0, "ready")):
            self.deliver(Loading(fraction, stage))
        if self.fake_load_error is not None:
            self.deliver(LoadFailed(self.fake_load_error))
        else:
            self.deliver(Ready(self.fake_info, 0.01))
        while (request := self._queue.get()) is not None:
            self._serve(request)

    def _serve(self, request: Request) -> None:
        failure = self.fake_load_error or (self.fail(request) if callable(self.fail) else self.fail)
        if request.cap == "infilling" and request.prefix is None and request.text.count(FILL) != 1:
            failure = f"infilling needs exactly one {FILL} marker, found {request.text.count(FILL)}"
        if failure is not None:
            self.deliver(Failed(request.id, failure))
            return
        request, replaced = request.cleaned()  # as the engine does
        request = self._fit(request)
        prompt = self.tokens(_prompt_text(request))
        self.deliver(Started(request.id, prompt, self.fake_info.context, replaced))
        text = self._answer(request)
        sent = ""
        cancelled = self._cancel_flags[request.id]
        for index, start in enumerate(range(0, len(text), self.chunk)):
            if self.on_delta is not None:
                self.on_delta(self, request, index)
            if cancelled.is_set():
                break
            piece = text[start : start + self.chunk]
            sent += piece
            self.deliver(TextDelta(request.id, piece))
            if self.hold and index == 0:
                while not (cancelled.is_set() or self.release.wait(0.01)):
                    pass
            time.sleep(self.delay)
        reason = self.reason or ("eot" if request.cap == "infilling" else "eos")
        reason = "cancelled" if cancelled.is_set() else reason
        new_tokens = max(1, self.tokens(sent))  # fixed timings, so that screens are deterministic
        stats = Stats(prompt_tokens=prompt, new_tokens=new_tokens, ttft_s=0.05, total_s=0.05 + 0.02 * new_tokens)
        if self.speculation and request.speculate:
            steps = max(1, (new_tokens - 1) // 2)
            stats = replace(stats, steps=steps, proposed=2 * steps, accepted=new_tokens - 1 - steps)
        self.deliver(Finished(request.id, reason, sent, stats))

    def _fit(self, request: Request) -> Request:
        """Drop a `fit` chat's oldest exchanges (after the system message) as the engine does."""
        if request.cap != "chat" or not request.fit or self.fake_info.context is None:
            return request
        budget = self.fake_info.context - answer_room(request.sampling.max_new_tokens, self.fake_info.context)
        messages, dropped = list(request.messages), 0
        first = 1 if messages[0].role == "system" else 0
        while len(messages) - first > 1 and self.tokens("".join(m.content for m in messages)) > budget:
            del messages[first : first + 2]
            dropped += 1
        if dropped:
            self.deliver(TurnsDropped(request.id, dropped))
        return replace(request, messages=tuple(messages))


def _prompt_text(request: Request) -> str:
    if request.cap == "chat":
        return "".join(m.content for m in request.messages)
    return request.text or (request.prefix or "") + (request.suffix or "")
