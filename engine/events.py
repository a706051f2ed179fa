"""What the engine reports back, through the client contract (`engine.client`): plain data, without torch.

Every event about one request carries its opaque `request_id`. For each submitted request a client delivers, in
order: any `TurnsDropped` or `TextClipped`, then `Started`, then `TextDelta`s, and last exactly one terminal event,
`Finished` or `Failed`; a request refused before it starts gets `Failed` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "block": the end of a suggestion's block (`Request.stop_at_block_end`)
FinishReason = Literal["eos", "eot", "stop", "block", "length", "context", "cancelled"]


@dataclass(frozen=True)
class ModelInfo:
    """What a client knows about the model behind it, for the status line and for front ends to adapt to.

    The capability flags say what may be asked: `can_infill` (the infilling cap), `can_tokenize`
    (`Client.tokenize`). Fields a foreign (OpenAI-compatible) server cannot supply are optional: None means
    unknown, and a front end then shows nothing for them (with no `context` it gives no warnings of its own and
    leaves the limit to the server's errors).
    """

    name: str
    can_infill: bool
    can_tokenize: bool = True
    context: int | None = None  # tokens one sequence may hold (prompt + generation)
    flavour: str | None = None  # "base", "python", "instruct" or "demo"
    device: str | None = None
    dtype: str | None = None
    tp: int | None = None
    vocab_size: int | None = None
    is_demo: bool = False
    quant: str | None = None  # how the weights were quantized at load ("int8", "int4"), None: as in the checkpoint
    kv: str | None = None  # the KV cache's format where it is not the model's dtype ("int8", `--kv`)


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
    """The engine could not be built (or the server reached); the client then fails every request with this
    message. `fields` names the `EngineSpec` settings that would fix it (`EngineError.fields`)."""

    message: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Link:
    """The connection to a server (only HTTP clients send these, after `Ready`): `up` with the latest round-trip
    time of a ping, or down with a one-line reason (the client keeps trying and says so again when it is back)."""

    server: str
    up: bool
    rtt_s: float | None = None
    message: str = ""


@dataclass(frozen=True)
class Started:
    """A request was accepted: its prompt is `prompt_tokens` long (after any dropped turns or clipped lines), of a
    context of `context` tokens (None when a foreign server does not say); `replaced` characters of its text could
    not be encoded and were replaced with U+FFFD (`requests.clean_text`)."""

    request_id: str
    prompt_tokens: int
    context: int | None
    replaced: int = 0


@dataclass(frozen=True)
class TurnsDropped:
    """A `fit` chat outgrew the context: its `count` oldest exchanges (user message and answer) were left out of
    the prompt; the front end forgets them too, so that its next turn starts where this prompt did."""

    request_id: str
    count: int


@dataclass(frozen=True)
class TextClipped:
    """A `fit` request's text outgrew the context: `before` lines above the cursor and `after` below were
    left out of the prompt."""

    request_id: str
    before: int
    after: int


@dataclass(frozen=True)
class TextDelta:
    """New text of a request, in order; never splits a UTF-8 character."""

    request_id: str
    text: str


@dataclass(frozen=True)
class Stats:
    """What a request cost. `cached_tokens` of its `prompt_tokens` came from the prefix cache (the keys and values
    an earlier request left in its slot); only the rest were prefilled. Its tokens after the first took `steps`
    decode steps; with speculation, `accepted` of the `proposed` tokens were right (each verify step gives its
    accepted proposals and one more token)."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    cached_tokens: int = 0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per decode step (the first token, from the prefill, not counted): 1 without speculation."""
        return (self.new_tokens - 1) / self.steps if self.steps else 0.0

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class Finished:
    """A request ended; `text` is its whole output (what the TextDeltas added up to)."""

    request_id: str
    reason: FinishReason
    text: str
    stats: Stats


@dataclass(frozen=True)
class Failed:
    """A request failed with a one-line message meant for whoever sent it (it names no command-line options:
    an HTTP caller gets it too); the engine keeps serving."""

    request_id: str
    message: str


Event = Loading | Ready | LoadFailed | Link | Started | TurnsDropped | TextClipped | TextDelta | Finished | Failed
