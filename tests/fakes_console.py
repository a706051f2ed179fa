"""A stand-in for `EngineClient` that answers like the engine without a model, for the console's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.errors import EngineError
from engine.events import Event, Failed, Finished, ModelInfo, Started, Stats, TextDelta, TurnsDropped
from engine.requests import FILL, EngineSpec, Request

INFO = ModelInfo(
    name="fake-7b",
    flavour="instruct",
    can_infill=True,
    device="cpu",
    dtype="float32",
    tp=1,
    context=64,
    vocab_size=32016,
)


def default_answer(request: Request) -> str:
    """A recognisable answer per cap: a Python continuation, a docstring middle, a chat reply."""
    return {
        "completion": "    return a + b\n",
        "python": "    return a + b\n",
        "infilling": 'Say hello."""\n    print("hello")',
        "chat": "Here:\n```python\ndef f():\n    return 1\n```\nDone.",
    }[request.cap]


@dataclass
class FakeClient:
    """Streams `answer(request)` in pieces of `piece` characters, counting a token per character; chat
    sessions drop their oldest exchanges beyond `info.context`, as the engine does.

    `on_delta(client, request, index)` runs before each TextDelta: a test uses it to press ctrl+c, which
    (as in the real client) cancels the request when it interrupts the wait for an event.
    """

    info: ModelInfo = INFO
    answer: Callable[[Request], str] = default_answer
    load_error: str | None = None
    on_delta: Callable[[FakeClient, Request, int], None] | None = None
    piece: int = 4
    requests: list[Request] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    sessions: dict[str, list[int]] = field(default_factory=dict)
    started: bool = False
    closed: bool = False

    def factory(self, spec: EngineSpec, on_event: Callable[[Event], None]) -> FakeClient:
        """What `run_console(client_factory=...)` calls."""
        self.spec = spec
        return self

    def start(self) -> FakeClient:
        self.started = True
        return self

    def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        if self.load_error:
            raise EngineError(self.load_error)
        return self.info

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)

    def end_session(self, session: str) -> None:
        self.ended.append(session)
        self.sessions.pop(session, None)

    def close(self, timeout: float = 10.0) -> None:
        self.closed = True

    def stream(self, request: Request) -> Iterator[Event]:
        self.requests.append(request)
        if request.cap == "infilling" and request.text.count(FILL) != 1:
            n = request.text.count(FILL)
            yield Failed(request.id, f"infilling needs exactly one {FILL} marker in the input, found {n}")
            return
        request, replaced = request.cleaned()  # as the engine does
        text = self.answer(request)
        prompt = len(request.text)
        if request.session is not None:
            turns = self.sessions.setdefault(request.session, [])
            dropped = 0
            while turns and sum(turns) + prompt + len(text) > self.info.context:
                turns.pop(0)
                dropped += 1
            if dropped:
                yield TurnsDropped(request.id, dropped)
            prompt += sum(turns)
            turns.append(len(request.text) + len(text))
        yield Started(request.id, prompt, self.info.context, replaced)
        out = ""
        for index, start in enumerate(range(0, len(text), self.piece)):
            if self.on_delta is not None:
                try:
                    self.on_delta(self, request, index)
                except KeyboardInterrupt:  # as EngineClient.stream does
                    self.cancel(request.id)
            if request.id in self.cancelled:
                yield Finished(request.id, "cancelled", out, Stats(prompt, len(out), 0.05, 0.1))
                return
            out += text[start : start + self.piece]
            yield TextDelta(request.id, text[start : start + self.piece])
        yield Finished(request.id, "eos", out, Stats(prompt, len(out), 0.05, 0.5))
