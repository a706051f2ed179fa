"""What a caller asks the engine for: caps, sampling parameters, requests and the engine spec.

Plain dataclasses without torch, shared by the UI, the console chat and the one-shot commands.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

Cap = Literal["completion", "infilling", "chat", "python"]
CAPS: tuple[str, ...] = get_args(Cap)
FILL = "<FILL>"
QUANT = ("int8", "int4", "nf4")  # what `--quant` quantizes to at load (engine.weights)
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


_ids = itertools.count(1)


@dataclass
class Request:
    """One generation.

    - completion / python: `text` is the prompt, continued as is.
    - infilling: either `text` with exactly one `<FILL>`, or `prefix` and `suffix` given directly
      (the TUI fills several markers one by one this way); `suffix_first` picks SPM over PSM.
    - completion and infilling with `fit`: a text longer than the context loses whole lines far from the
      cursor (the engine reports how many) instead of failing; an editor sends whole files this way.
    - chat: `text` is the new user message; `session` names a conversation whose KV cache and
      history the engine keeps between turns; `system` is the system instruction (first turn).
    """

    cap: Cap
    text: str = ""
    prefix: str | None = None
    suffix: str | None = None
    system: str | None = None
    session: str | None = None
    suffix_first: bool = False
    fit: bool = False  # completion/infilling from an editor: leave out the lines farthest from the cursor
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_ids))

    def cleaned(self) -> tuple[Request, int]:
        """This request with its texts made encodable (`clean_text`), and how many characters that replaced."""
        texts = {name: getattr(self, name) for name in ("text", "prefix", "suffix", "system")}
        cleaned = {name: clean_text(value) for name, value in texts.items() if value is not None}
        replaced = sum(n for _, n in cleaned.values())
        return (replace(self, **{name: text for name, (text, _) in cleaned.items()}) if replaced else self), replaced


@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine: which model, where, how big. `model=None` means the demo model."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    tp: int = 1
    max_batch: int = 8
    max_seq_len: int | None = None
    cuda_graphs: bool = True
    quant: str | None = None  # quantize the projections at load: "int8" or "int4" (engine.weights)
    quant_head: bool = False  # the LM head too (it stays in the model's dtype otherwise)
