"""What the HTTP client (`engine.http_client`) sends to an OpenAI-compatible server and how it reads the answers:
request bodies, server-sent events back into the engine's events, error bodies as one line, model cards as
`ModelInfo`. Plain functions and one small reader, without I/O, so that each rule of the wire is tested alone.

Our own server (`codellama-tui serve`, known by the `codellama_tui` object on its model card) gets every cap with
its extensions (`tui.server.schemas`): `top_k`, `repetition_penalty`, `fit`, `spm`, `speculate`,
`stop_at_block_end` and `engine_events`, whose `engine` objects give back the engine's own events (`Started`,
`TurnsDropped`, `TextClipped`, the finish reason, speculation's figures in `Stats`). A
foreign server gets OpenAI's fields only (a hosted API refuses others), and its answers' events are rebuilt from
what OpenAI's form says; there the client ends a suggestion at its block itself (`Request.stop_at_block_end`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields

from engine.detok import BlockEnd
from engine.errors import CapabilityError, EngineError
from engine.events import (
    Event,
    Failed,
    Finished,
    FinishReason,
    ModelInfo,
    Started,
    Stats,
    TextClipped,
    TextDelta,
    TurnsDropped,
)
from engine.prompts import cursor_line, split_fill
from engine.requests import Request

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
_INFO_FIELDS = {f.name for f in fields(ModelInfo)}


@dataclass(frozen=True)
class Served:
    """What a server said at connect: the model name to send, whether it is ours, and the model's info."""

    model: str
    ours: bool
    info: ModelInfo


def served(cards: object, wanted: str | None) -> Served:
    """The model to use from a `/v1/models` answer (`wanted`, or the first listed); raises EngineError when the body
    is not a model list or does not hold `wanted`."""
    data = cards.get("data") if isinstance(cards, dict) else None
    if not isinstance(data, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in data):
        raise EngineError("the server's /v1/models is not an OpenAI model list (is this an OpenAI-compatible server?)")
    names = [card["id"] for card in data]
    if wanted is not None and wanted not in names:
        listed = ", ".join(names) or "none"
        raise EngineError(f"the server does not serve {wanted!r}; it serves: {listed}", fields=("served_model",))
    if not data:
        raise EngineError("the server lists no models")
    card = data[names.index(wanted)] if wanted is not None else data[0]
    ours = card.get("codellama_tui")
    if isinstance(ours, dict) and ours.get("name") == card["id"]:
        info = ModelInfo(**{k: v for k, v in ours.items() if k in _INFO_FIELDS})
        return Served(card["id"], True, info)
    context = card.get("max_model_len")  # vLLM's
    info = ModelInfo(
        card["id"], can_infill=False, can_tokenize=False, context=context if isinstance(context, int) else None
    )
    return Served(card["id"], False, info)


def request_body(request: Request, served: Served) -> tuple[str, dict[str, object]]:
    """The route and JSON body that ask for `request`, streamed with usage; raises EngineError for a request the
    server cannot take (a bad infilling text, suffix-first infilling on a foreign server)."""
    p = request.sampling
    body: dict[str, object] = {
        "model": served.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if served.ours:
        body.update(top_k=p.top_k, repetition_penalty=p.repetition_penalty, fit=request.fit, engine_events=True)
        body["speculate"] = request.speculate
    if served.ours and request.stop_at_block_end:
        body["stop_at_block_end"] = True
    if request.cap == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        return CHAT, body
    if request.cap != "infilling":
        body["prompt"] = request.text
        return COMPLETIONS, body
    if not served.ours and not served.info.can_infill:
        raise CapabilityError(f"the server cannot infill ({served.model}: it does not take a suffix); use completion")
    if request.prefix is not None and request.suffix is not None:
        body["prompt"], body["suffix"] = request.prefix, request.suffix
    else:
        body["prompt"], body["suffix"] = split_fill(request.text)
    if request.suffix_first:
        if not served.ours:
            raise CapabilityError("the server cannot infill suffix-first (SPM); infill without it")
        body["spm"] = True
    return COMPLETIONS, body


def error_text(status: int, content: bytes) -> str:
    """An error answer as one line: `the server answered 401: the API key is wrong`."""
    try:
        message = error_message(json.loads(content))
    except ValueError:
        message = ""
    message = _one_line(message or content.decode("utf-8", "replace"))
    return f"the server answered {status}: {message}" if message else f"the server answered {status}"


def error_message(body: object) -> str:
    """The message of an error body: OpenAI's `{"error": {"message"}}`, `{"error": "..."}`, FastAPI's `{"detail"}`."""
    if not isinstance(body, dict):
        return ""
    for error in (body.get("error"), body.get("detail"), body.get("message")):
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error.strip():
            return _one_line(error)
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


class AnswerReader:
    """One streamed answer: `feed` it the stream's lines and it returns the events they hold; `end` gives the
    terminal event (`Finished`, or `Failed` for an error event or a stream that stopped short), `cancelled` the one
    for a request the caller stopped. Timing is the client's own: time to the first text, and the whole answer.
    `replaced` is how many characters the client replaced before sending (`Request.cleaned`), for `Started`. A
    foreign server cannot end a suggestion at its block: the reader does (the answer is then `done`, and the
    client's leaving the stream cancels the rest)."""

    def __init__(
        self, request: Request, served: Served, replaced: int = 0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.request, self.served, self.replaced, self.clock = request, served, replaced, clock
        self.t0 = clock()
        self.t_first = 0.0
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.new_tokens: int | None = None
        self.cached = 0
        self.reason: FinishReason | None = None
        self.speculated: dict[str, int] = {}  # steps, proposed and accepted, where our server's request speculated
        self.exact = False  # the engine's own reason (our server's), not one rebuilt from OpenAI's
        self.started = False
        self.failed: Failed | None = None
        self.done = False  # [DONE] came, or an error, or the end of a suggestion's block
        self._data: list[str] = []
        self._block = BlockEnd(cursor_line(request)) if request.stop_at_block_end and not served.ours else None

    def feed(self, line: str) -> list[Event]:
        """One line of the stream (without its newline)."""
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return []
        if line or not self._data:
            return []  # comments, `event:` and `id:` fields, or a blank line that ends nothing
        data, self._data = "\n".join(self._data), []
        return self._event(data)

    def _event(self, data: str) -> list[Event]:
        if self.done:
            return []
        if data.strip() == "[DONE]":
            self.done = True
            return self._text(self._block.flush()) if self._block is not None else []
        try:
            chunk = json.loads(data)
        except ValueError:
            return self._fail(f"the server sent an event that is not JSON: {data[:80]!r}")
        if not isinstance(chunk, dict):
            return self._fail(f"the server sent an event that is not a JSON object: {data[:80]!r}")
        if "error" in chunk:
            return self._fail(f"the server stopped the answer: {error_message(chunk) or 'no reason given'}")
        events: list[Event] = []
        engine = chunk.get("engine") if isinstance(chunk.get("engine"), dict) else {}
        if not self.started and (engine or not self.served.ours or chunk.get("choices")):
            events += self._started(engine)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if isinstance(text, str) and text:
            if self._block is not None:
                text, hit = self._block.feed(text)
                if hit:
                    self.reason, self.exact, self.done = "block", True, True
                    return events + self._text(text)
            events += self._text(text)
        if choice.get("finish_reason"):
            self.exact = "reason" in engine
            self.speculated = {k: v for k in ("steps", "proposed", "accepted") if isinstance(v := engine.get(k), int)}
            self.reason = engine["reason"] if self.exact else self._reason(choice)
            if self._block is not None:
                events += self._text(self._block.flush())
        return events

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        if not self.text:
            self.t_first = self.clock()
        self.text.append(text)
        return [TextDelta(self.request.id, text)]

    def _started(self, engine: dict) -> list[Event]:
        self.started = True
        rid = self.request.id
        events: list[Event] = []
        if engine.get("turns_dropped"):
            events.append(TurnsDropped(rid, int(engine["turns_dropped"])))
        clipped = engine.get("clipped")
        if isinstance(clipped, list) and len(clipped) == 2:
            events.append(TextClipped(rid, int(clipped[0]), int(clipped[1])))
        self.prompt_tokens = int(engine.get("prompt_tokens") or 0)
        context = engine.get("context", self.served.info.context)
        context = context if isinstance(context, int) else None
        return [*events, Started(rid, self.prompt_tokens, context, self.replaced)]

    def _usage(self, usage: dict) -> None:
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            self.new_tokens = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached = details["cached_tokens"]

    def _reason(self, choice: dict) -> FinishReason:
        """The engine's reason from OpenAI's: "length" is the context's end when the answer filled it; "stop" is a
        stop string where the server says so (vLLM's `stop_reason`), else the model's own end."""
        if choice["finish_reason"] == "length":
            return "length"
        if isinstance(choice.get("stop_reason"), str):
            return "stop"
        return "eot" if self.request.cap == "infilling" else "eos"

    def _fail(self, message: str) -> list[Event]:
        self.failed, self.done = Failed(self.request.id, message), True
        return []

    def stats(self) -> Stats:
        now = self.clock()
        new = self.new_tokens if self.new_tokens is not None else len(self.text)
        ttft = (self.t_first or now) - self.t0
        return Stats(self.prompt_tokens, new, ttft, now - self.t0, self.cached, **self.speculated)

    def end(self, lost: str) -> Event:
        """The terminal event once the stream is over; `lost` is the message for one that stopped short."""
        if self._data:
            self._event("\n".join(self._data))
            self._data = []
        if self.failed is not None:
            return self.failed
        if self.reason is None and not self.done:
            return Failed(self.request.id, lost)
        reason = self.reason or ("eot" if self.request.cap == "infilling" else "eos")
        stats = self.stats()
        context = self.served.info.context
        full = context is not None and stats.prompt_tokens + stats.new_tokens >= context
        if reason == "length" and full and not self.exact:
            reason = "context"
        return Finished(self.request.id, reason, "".join(self.text), stats)

    def cancelled(self) -> Event:
        """The terminal event of a request the caller stopped (an error that came first stays the answer)."""
        if self.failed is not None:
            return self.failed
        return Finished(self.request.id, "cancelled", "".join(self.text), self.stats())


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream's text, split at line feeds alone: a JSON string may hold U+2028, U+2029 or U+0085
    raw, which `str.splitlines` (and so httpx's `aiter_lines`) would take for line ends, cutting an event in two."""
    rest = ""
    async for chunk in chunks:
        *lines, rest = (rest + chunk).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if rest:
        yield rest.removesuffix("\r")
