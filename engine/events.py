"""What the engine reports back. Events are posted from the worker thread; they are plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["eos", "eot", "stop", "length", "context", "cancelled"]


@dataclass(frozen=True)
class ModelInfo:
    """What the status line and `--help` show about the loaded model."""

    name: str
    flavour: str  # "base", "python", "instruct" or "demo"
    can_infill: bool
    device: str
    dtype: str
    tp: int
    context: int  # tokens one sequence may hold (prompt + generation)
    vocab_size: int
    is_demo: bool = False
    quant: str | None = None  # how the weights were quantized at load ("int8", "int4"), None: as in the checkpoint


@dataclass(frozen=True)
class Loading:
    """Model loading progress, 0.0 .. 1.0, with a short description of the stage."""

    fraction: float
    stage: str


@dataclass(frozen=True)
class Ready:
    """The engine is loaded and serving."""

    info: ModelInfo
    startup_s: float


@dataclass(frozen=True)
class LoadFailed:
    """The engine could not be built; the worker then refuses requests with this message."""

    message: str


@dataclass(frozen=True)
class Started:
    """A request was admitted: its prompt is `prompt_tokens` long (after any dropped turns); `replaced` characters
    of its text could not be encoded and were replaced with U+FFFD (`requests.clean_text`)."""

    request_id: int
    prompt_tokens: int
    context: int
    replaced: int = 0


@dataclass(frozen=True)
class TurnsDropped:
    """A chat outgrew the context: the `count` oldest exchanges were dropped from the session."""

    request_id: int
    count: int


@dataclass(frozen=True)
class TextClipped:
    """A `fit` request's text outgrew the context: `before` lines above the cursor and `after` below were
    left out of the prompt."""

    request_id: int
    before: int
    after: int


@dataclass(frozen=True)
class TextDelta:
    """New text of a request, in order; never splits a UTF-8 character."""

    request_id: int
    text: str


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class Finished:
    """A request ended; `text` is its whole output (what the TextDeltas added up to)."""

    request_id: int
    reason: FinishReason
    text: str
    stats: Stats


@dataclass(frozen=True)
class Failed:
    """A request failed with a one-line message; the engine keeps serving."""

    request_id: int
    message: str


Event = Loading | Ready | LoadFailed | Started | TurnsDropped | TextClipped | TextDelta | Finished | Failed
