"""A fake engine client for the app's tests: same methods and events as `EngineClient`, scripted text.

Requests are answered on a worker thread, like the real engine, in small deltas; a test can hold
a request open (`hold=True`) to cancel it mid-stream, script failures, or make loading fail.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from engine.events import (
    Event,
    Failed,
    Finished,
    LoadFailed,
    Loading,
    ModelInfo,
    Ready,
    Started,
    Stats,
    TextDelta,
    TurnsDropped,
)
from engine.requests import EngineSpec, Request

INFO = ModelInfo(
    name="CodeLlama-7b-Instruct-hf", flavour="instruct", can_infill=True, device="cpu",
    dtype="float32", tp=1, context=16384, vocab_size=32016,
)  # fmt: skip


class FakeClient:
    """Answers each request with `answer(request)` (default: a fixed text per cap)."""

    def __init__(
        self,
        spec: EngineSpec,
        on_event: Callable[[Event], None] | None = None,
        *,
        info: ModelInfo = INFO,
        answers: dict[str, str | list[str]] | None = None,
        chunk: int = 3,
        delay: float = 0.0005,
        load_error: str | None = None,
        fail: str | None = None,
        hold: bool = False,
        drop_turns: int = 0,
    ) -> None:
        self.spec = spec
        self._on_event = on_event
        self.info = info
        self.answers = {
            "completion": "return a + b\n",
            "python": "return a + b\n",
            "infilling": "FILLED",
            "chat": "Here you go:\n\n```python\ndef add(a, b):\n    return a + b\n```\n",
            **(answers or {}),
        }
        self.chunk = chunk
        self.delay = delay
        self.load_error = load_error
        self.fail = fail
        self.hold = hold
        self.drop_turns = drop_turns
        self.submitted: list[Request] = []
        self.cancelled: list[int] = []
        self.ended_sessions: list[str] = []
        self.closed = False
        self.release = threading.Event()
        self._cancel_flags: dict[int, threading.Event] = {}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)

    def start(self) -> FakeClient:
        self._thread.start()
        return self

    def submit(self, request: Request) -> int:
        self.submitted.append(request)
        self._cancel_flags[request.id] = threading.Event()
        self._queue.put(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)
        if request_id in self._cancel_flags:
            self._cancel_flags[request_id].set()

    def end_session(self, session: str) -> None:
        self.ended_sessions.append(session)

    def close(self, timeout: float = 10.0) -> None:
        self.closed = True
        self.release.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _answer(self, request: Request) -> str:
        answer = self.answers[request.cap]
        if isinstance(answer, list):  # one answer per request of that cap, in order
            index = sum(1 for r in self.submitted if r.cap == request.cap and r.id < request.id)
            return answer[min(index, len(answer) - 1)]
        return answer

    def _run(self) -> None:
        for fraction, stage in ((0.0, "reading config"), (0.5, "loading weights"), (1.0, "ready")):
            self._emit(Loading(fraction, stage))
        if self.load_error is not None:
            self._emit(LoadFailed(self.load_error))
        else:
            self._emit(Ready(self.info, 0.01))
        while (request := self._queue.get()) is not None:
            self._serve(request)

    def _serve(self, request: Request) -> None:
        if self.load_error is not None or self.fail is not None:
            self._emit(Failed(request.id, self.load_error or self.fail or ""))
            return
        request, replaced = request.cleaned()  # as the engine does
        prompt_tokens = len(request.text or request.prefix or "") // 4 + 1
        self._emit(Started(request.id, prompt_tokens, self.info.context, replaced))
        if request.cap == "chat" and self.drop_turns:
            self._emit(TurnsDropped(request.id, self.drop_turns))
        text = self._answer(request)
        sent = ""
        cancelled = self._cancel_flags[request.id]
        for i in range(0, len(text), self.chunk):
            if cancelled.is_set():
                break
            piece = text[i : i + self.chunk]
            sent += piece
            self._emit(TextDelta(request.id, piece))
            if self.hold and i == 0:
                while not (cancelled.is_set() or self.release.wait(0.01)):
                    pass
            time.sleep(self.delay)
        reason = "cancelled" if cancelled.is_set() else ("eot" if request.cap == "infilling" else "eos")
        new_tokens = max(1, len(sent) // 3)  # fixed timings, so that screens are deterministic
        stats = Stats(prompt_tokens=10, new_tokens=new_tokens, ttft_s=0.05, total_s=0.05 + 0.02 * new_tokens)
        self._emit(Finished(request.id, reason, sent, stats))
