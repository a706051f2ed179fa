"""Responses from a generation's events: whole bodies, or server-sent events as the text comes.

Streams follow OpenAI's (and vLLM's) form: one `data: {json}` event per piece of text, a last chunk per choice
with its `finish_reason`, a usage chunk with no choices when `stream_options.include_usage` asks, then
`data: [DONE]`. A failure mid-stream, or the server stopping, sends `data: {"error": {...}}` before `[DONE]`.
llama.cpp's streams (`/infill`, `/completion`) send `{"content", "stop"}` events and end with `stop: true`.
Leaving a stream early (the client went away) cancels what still runs.

With `engine_events` (this server's own field, `tui.server.schemas`) a choice's first chunk carries an `engine`
object, `{"prompt_tokens", "context", "turns_dropped", "clipped"}` (`clipped`: lines left out above and below the
cursor, or null), and its finishing chunk `{"reason"}` (the engine's finish reason; where the request speculated,
also `steps`, `proposed` and `accepted` of its `Stats`): what `engine.http_client` turns back into the engine's
own events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # json.dumps(text, ensure_ascii=False) for a str, without its layers

from pydantic import BaseModel

from engine.events import Event, Failed, Finished, Started, Stats, TextClipped, TextDelta, TurnsDropped
from tui.server.bridge import Bridge, Generation, ShuttingDown
from tui.server.errors import ApiError, error_body
from tui.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChoice,
    Delta,
    FinishReason,
    Usage,
)

REASONS: dict[str, FinishReason] = {
    "eos": "stop",
    "eot": "stop",
    "stop": "stop",
    "block": "stop",
    "cancelled": "stop",
    "length": "length",
    "context": "length",
}
LLAMA_STOP_TYPES = {"eos": "eos", "eot": "eos", "stop": "word", "block": "word", "length": "limit", "context": "limit"}
DONE = "data: [DONE]\n\n"


# Characters JSON may hold raw in a string that line readers built on `str.splitlines` (httpx's `aiter_lines`) take
# for line ends: escaped, so a client of any make reads each event whole.
_LINE_ENDS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data.translate(_LINE_ENDS)}\n\n"


_HOLE = "\x00"  # no id or model name holds a NUL


class TextChunks:
    """A stream's text chunks, each choice's rendered once from its model with the text left as a hole: a chunk per
    token per stream is the server's hot path, and filling the hole costs a tenth of building and dumping a model."""

    def __init__(self, render: Callable[[int, str], BaseModel]) -> None:
        self.render = render
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            head, hole, tail = sse(self.render(index, _HOLE)).partition(json.dumps(_HOLE))
            assert hole, "the chunk's text hole is rendered as json.dumps renders it"
            parts = self._parts[index] = (head, tail)
        return parts[0] + encode_basestring(text).translate(_LINE_ENDS) + parts[1]


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    finished: Finished | None = None
    turns_dropped: int = 0
    clipped: tuple[int, int] | None = None

    @property
    def reason(self) -> FinishReason | None:
        return None if self.finished is None else REASONS[self.finished.reason]


class Tally:
    """What a generation's events added up to, per choice."""

    def __init__(self, n: int) -> None:
        self.choices = [Choice() for _ in range(n)]

    def add(self, index: int, event: Event) -> None:
        """Take one event; a `Failed` raises the ApiError its caller gets (400 if it never started)."""
        choice = self.choices[index]
        if isinstance(event, TextDelta):
            choice.text.append(event.text)
        elif isinstance(event, Started):
            choice.prompt_tokens = event.prompt_tokens
        elif isinstance(event, TurnsDropped):
            choice.turns_dropped = event.count
        elif isinstance(event, TextClipped):
            choice.clipped = (event.before, event.after)
        elif isinstance(event, Finished):
            choice.finished = event
        elif isinstance(event, Failed):
            started = choice.prompt_tokens > 0
            raise ApiError(500 if started else 400, event.message, code=None if started else "invalid_prompt")

    def usage(self) -> Usage:
        prompt = max(c.prompt_tokens for c in self.choices)
        stats = [c.finished.stats for c in self.choices if c.finished is not None]
        completion = sum(s.new_tokens for s in stats)
        cached = min((s.cached_tokens for s in stats), default=0)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details={"cached_tokens": cached},
        )


async def collect(generation: Generation) -> Tally:
    tally = Tally(len(generation.requests))
    async for index, event in generation:
        tally.add(index, event)
    return tally


def completion_body(tally: Tally, rid: str, created: int, model: str) -> Completion:
    choices = [
        CompletionChoice(index=i, text="".join(c.text), finish_reason=c.reason) for i, c in enumerate(tally.choices)
    ]
    return Completion(id=rid, created=created, model=model, choices=choices, usage=tally.usage())


def chat_body(tally: Tally, rid: str, created: int, model: str) -> ChatCompletion:
    choices = [
        ChatChoice(index=i, message=ChatMessage(content="".join(c.text)), finish_reason=c.reason)
        for i, c in enumerate(tally.choices)
    ]
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=tally.usage())


def started_fields(choice: Choice, event: Started) -> dict[str, object]:
    """The `engine` object of a choice's first chunk."""
    return {
        "prompt_tokens": event.prompt_tokens,
        "context": event.context,
        "turns_dropped": choice.turns_dropped,
        "clipped": list(choice.clipped) if choice.clipped is not None else None,
    }


def finished_fields(event: Finished) -> dict[str, object]:
    """The `engine` object of a choice's finishing chunk."""
    stats = event.stats
    speculated = {"steps": stats.steps, "proposed": stats.proposed, "accepted": stats.accepted}
    return {"reason": event.reason, **(speculated if stats.proposed else {})}


def _with_engine(chunk: BaseModel, fields: dict[str, object]) -> str:
    return sse({**chunk.model_dump(), "engine": fields})


def _openai_failure(body: dict) -> list[str]:
    return [sse(body), DONE]


def _llama_failure(body: dict) -> list[str]:
    """llama.cpp's clients parse every event as `{"content", "stop"}`, so the error rides on a last one."""
    return [sse({"content": "", "stop": True, **body})]


async def _stream(
    bridge: Bridge,
    generation: Generation,
    chunk: Callable[[int, Event, Tally], str | None],
    ending: Callable[[Tally], list[str]],
    failure: Callable[[dict], list[str]] = _openai_failure,
) -> AsyncIterator[str]:
    """The events of a stream: `chunk` makes each event's data (or None), `ending` what follows the last one,
    `failure` what ends a stream that fails."""
    tally = Tally(len(generation.requests))
    try:
        async for batch in generation.batches():
            out: list[str] = []  # a batch's events go out in one write
            try:
                for index, event in batch:
                    tally.add(index, event)
                    data = chunk(index, event, tally)
                    if data is not None:
                        out.append(data)
            except ApiError as err:
                out += failure(err.body())
                yield "".join(out)
                return
            if out:
                yield "".join(out)
        yield "".join(ending(tally))
    except ShuttingDown:
        yield "".join(failure(error_body("the server is shutting down", 503)))
    finally:
        bridge.close(generation)


def completion_stream(
    bridge: Bridge,
    generation: Generation,
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
    engine_events: bool = False,
) -> AsyncIterator[str]:
    text = TextChunks(
        lambda index, hole: Completion(
            id=rid, created=created, model=model, choices=[CompletionChoice(index=index, text=hole)]
        )
    )

    def chunk(index: int, event: Event, tally: Tally) -> str | None:
        if isinstance(event, TextDelta):
            return text(index, event.text)
        if isinstance(event, Finished):
            choice = CompletionChoice(index=index, text="", finish_reason=REASONS[event.reason])
            fields = finished_fields(event)
        elif isinstance(event, Started) and engine_events:
            choice = CompletionChoice(index=index, text="")
            fields = started_fields(tally.choices[index], event)
        else:
            return None
        completion = Completion(id=rid, created=created, model=model, choices=[choice])
        return _with_engine(completion, fields) if engine_events else sse(completion)

    def ending(tally: Tally) -> list[str]:
        usage = [sse(Completion(id=rid, created=created, model=model, choices=[], usage=tally.usage()))]
        return [*(usage if include_usage else []), DONE]

    return _stream(bridge, generation, chunk, ending)


def chat_stream(
    bridge: Bridge,
    generation: Generation,
    rid: str,
    created: int,
    model: str,
    include_usage: bool,
    engine_events: bool = False,
) -> AsyncIterator[str]:
    text = TextChunks(
        lambda index, hole: ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[ChatChunkChoice(index=index, delta=Delta(content=hole))]
        )
    )

    def chunk(index: int, event: Event, tally: Tally) -> str | None:
        if isinstance(event, TextDelta):
            return text(index, event.text)
        if isinstance(event, Started):
            choice = ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))
            fields = started_fields(tally.choices[index], event)
        elif isinstance(event, Finished):
            choice = ChatChunkChoice(index=index, delta=Delta(), finish_reason=REASONS[event.reason])
            fields = finished_fields(event)
        else:
            return None
        chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
        return _with_engine(chunk, fields) if engine_events else sse(chunk)

    def ending(tally: Tally) -> list[str]:
        usage = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=tally.usage())
        return [*([sse(usage)] if include_usage else []), DONE]

    return _stream(bridge, generation, chunk, ending)


def llama_body(tally: Tally, model: str, fields: list[str] | None = None) -> dict:
    """llama.cpp's `/completion` answer; with `fields` (its `response_fields`), only those, each under its path
    as the key (`timings/prompt_n`)."""
    choice = tally.choices[0]
    assert choice.finished is not None
    stats: Stats = choice.finished.stats
    prompt_ms, predicted_ms = stats.ttft_s * 1e3, (stats.total_s - stats.ttft_s) * 1e3
    prefilled, predicted = stats.prefilled_tokens, stats.new_tokens
    body = {
        "content": "".join(choice.text),
        "stop": True,
        "model": model,
        "tokens_predicted": predicted,
        "tokens_evaluated": stats.prompt_tokens,
        "tokens_cached": stats.cached_tokens,
        "truncated": choice.finished.reason == "context",
        "stop_type": LLAMA_STOP_TYPES.get(choice.finished.reason, "none"),
        "stopping_word": "",
        "timings": {
            "prompt_n": prefilled,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(prefilled, 1),
            "prompt_per_second": prefilled / (prompt_ms / 1e3) if prompt_ms > 0 else 0.0,
            "predicted_n": predicted,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(predicted, 1),
            "predicted_per_second": predicted / (predicted_ms / 1e3) if predicted_ms > 0 else 0.0,
        },
    }
    if fields is None:
        return body
    picked = {}
    for path in fields:
        value: object = body
        for key in path.split("/"):
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is not _MISSING:
            picked[path] = value
    return picked


_MISSING = object()


def llama_stream(bridge: Bridge, generation: Generation, model: str) -> AsyncIterator[str]:
    def chunk(index: int, event: Event, tally: Tally) -> str | None:
        if isinstance(event, TextDelta):
            return sse({"content": event.text, "stop": False, "index": 0})
        return None

    def ending(tally: Tally) -> list[str]:
        return [sse({**llama_body(tally, model), "content": "", "index": 0})]

    return _stream(bridge, generation, chunk, ending, _llama_failure)
