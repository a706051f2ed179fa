"""What a caller asks the engine for: caps, sampling parameters, chat messages, requests and the engine spec.

Plain dataclasses without torch, shared by every front end and by both sides of the client contract
(`engine.client`): the in-process engine and, over HTTP, the server and its clients.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

Cap = Literal["completion", "infilling", "chat", "python"]
CAPS: tuple[str, ...] = get_args(Cap)
Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)
FILL = "<FILL>"
QUANT = ("int8", "int4", "nf4")  # what `--quant` quantizes to at load (engine.weights)
KV = ("bf16", "int8")  # what `--kv` stores the KV cache as: the model's dtype, or int8 (engine.model.KVCache)
SEED_RANGE = range(-(2**63), 2**63)  # seeds travel as int64
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, int]:
    """`text` with every lone surrogate replaced by U+FFFD, and how many there were.

    Invalid UTF-8 reaches the engine as lone surrogates (front ends decode input with `surrogateescape`, as
    Python decodes argv), and JSON can spell them (`"\\ud800"`); the tokenizer cannot encode either.
    """
    return _LONE_SURROGATE.subn("\ufffd", text)


def replacement_warning(count: int) -> str:
    """What every front end says when `clean_text` replaced characters of a request."""
    s = "" if count == 1 else "s"
    return f"{count} invalid character{s} (bad UTF-8 or a lone surrogate) replaced with U+FFFD"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs; `temperature == 0` means greedy."""

    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def for_cap(cls, cap: str, **overrides: object) -> SamplingParams:
        """Defaults per cap (CODELLAMA.md's table, after lmdeploy); `None` overrides are ignored."""
        base = {
            "completion": cls(temperature=0.2, top_p=0.9),
            "infilling": cls(temperature=0.0, top_p=0.9),
            "chat": cls(temperature=0.2, top_p=0.95),
            "python": cls(temperature=0.2, top_p=0.9),
        }[cap]
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def check(self) -> None:
        """Raise ValueError with a one-line message for values out of range (NaN and infinities included)."""
        for name, value in (
            ("temperature", self.temperature),
            ("top-p", self.top_p),
            ("repetition penalty", self.repetition_penalty),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 2**31:  # sampled as int32
            raise ValueError(f"top-k must be >= 0 and < 2**31 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and self.seed not in SEED_RANGE:
            raise ValueError(f"seed must fit in 64 bits ({SEED_RANGE.start} .. {SEED_RANGE.stop - 1}), got {self.seed}")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, as an OpenAI client sends it."""

    role: Role
    content: str


def new_request_id() -> str:
    """A fresh opaque request id (callers may give their own: any string unique among their open requests)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Request:
    """One generation; the engine keeps nothing of it once it has ended, except a prefix cache that only
    makes a later request faster.

    - completion / python: `text` is the prompt, continued as is.
    - infilling: either `text` with exactly one `<FILL>`, or `prefix` and `suffix` given directly
      (the TUI fills several markers one by one this way); `suffix_first` picks SPM over PSM.
    - chat: `messages` is the whole conversation: an optional system message first, then user and assistant
      messages alternating, ending with the user's; the prompt is built from it in the checkpoint's own dialog
      format (`engine.prompts.chat_ids`). A front end keeps the history and sends all of it every turn.
    - `stop_at_block_end`: a code suggestion (completion, python, infilling) ends where the block it started ends,
      judged by indentation from the cursor's line (the last line of the text or prefix; `engine.detok.BlockEnd`),
      with the finish reason "block".
    - `fit`: a prompt longer than the context is shortened instead of failing: completion and infilling lose
      whole lines far from the cursor (`TextClipped` says how many; an editor sends whole files this way), chat
      loses its oldest exchanges (`TurnsDropped` says how many; the front end then forgets them too).
    - `speculate`: where the engine allows it (`EngineSpec.speculate`), propose the tokens that followed the
      answer's latest words where they occurred before (prompt-lookup speculation) and verify them in one step:
      faster where the answer repeats the prompt (an edited file, code pasted into a chat), the same tokens.
    - `id` is opaque: a new uuid unless the caller gives one.
    """

    cap: Cap
    text: str = ""
    prefix: str | None = None
    suffix: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    suffix_first: bool = False
    fit: bool = False
    speculate: bool = False
    stop_at_block_end: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=new_request_id)

    def check(self) -> None:
        """Raise ValueError with a one-line message for values out of range or options the cap does not take."""
        self.sampling.check()
        if self.stop_at_block_end and self.cap == "chat":
            raise ValueError("stopping at the end of a block is for code suggestions, not chat")

    def cleaned(self) -> tuple[Request, int]:
        """This request with its texts made encodable (`clean_text`), and how many characters that replaced."""
        texts = {name: getattr(self, name) for name in ("text", "prefix", "suffix")}
        cleaned = {name: clean_text(value) for name, value in texts.items() if value is not None}
        messages = [(m, clean_text(m.content)) for m in self.messages]
        replaced = sum(n for _, n in cleaned.values()) + sum(n for _, (_, n) in messages)
        if not replaced:
            return self, 0
        fixed = tuple(replace(m, content=text) for m, (text, _) in messages)
        return replace(self, **{name: text for name, (text, _) in cleaned.items()}, messages=fixed), replaced


MAX_SPECULATE = 15  # the most tokens a request may propose per step (the runner's largest verify step holds 16)


@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine: which model, where, how big. `model=None` means the demo model, or with `shape`
    (a CodeLlama size such as "7b") random weights at that shape, for timing (`tokenizer` is a directory whose
    tokenizer they use, default the demo model's): as fast as real weights, their text meaningless."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    tp: int = 1
    max_batch: int = 8
    max_seq_len: int | None = None
    cuda_graphs: bool = True
    quant: str | None = None  # quantize the projections at load: "int8" or "int4" (engine.weights)
    quant_head: bool = False  # the LM head too (it stays in the model's dtype otherwise)
    kv: str = "bf16"  # the KV cache: "bf16" (the model's dtype) or "int8", about half the bytes (`KV`)
    speculate: int = 0  # prompt-lookup speculation: the most tokens a request proposes per step (0: off)
    shape: str | None = None
    tokenizer: str | None = None
