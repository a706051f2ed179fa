"""Code suggestions in the editor: when they are asked for (F2, or as you type), the request that asks (it ends
where its block ends, within a small budget), and what the F3 fills of several markers add up to."""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.events import ModelInfo, Stats
from engine.requests import Request, SamplingParams

SUGGEST_MODES = ("auto", "off")


@dataclass(frozen=True)
class SuggestSettings:
    """The config's `suggest`, `suggest_max_tokens` and `suggest_delay_ms`.

    `mode` "auto" suggests as you type (after `delay_s` without a key), "off" only on F2; unset, it is "auto" where
    the model runs on CUDA (here or on the server) and "off" elsewhere: a CPU takes seconds per suggestion.
    `max_tokens` is a suggestion's budget (Tabby's 64: a suggestion is a few lines); the block's end usually comes
    first.
    """

    mode: str | None = None
    max_tokens: int = 64
    delay_s: float = 0.3

    def as_you_type(self, info: ModelInfo | None) -> bool:
        if self.mode is not None:
            return self.mode == "auto"
        return info is not None and (info.device or "").startswith("cuda")


def suggestion_request(cap: str, prefix: str, sampling: SamplingParams, settings: SuggestSettings) -> Request:
    """A suggestion at the cursor: the text before it, continued to the end of the block it starts."""
    budget = replace(sampling, max_new_tokens=settings.max_tokens)
    return Request(cap=cap, text=prefix, fit=True, stop_at_block_end=True, sampling=budget)  # type: ignore[arg-type]


@dataclass
class FillTally:
    """The fills of one F3 (one per marker): their tokens and time together, for the status line."""

    fills: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, stats: Stats) -> None:
        self.fills += 1
        self.tokens += stats.new_tokens
        self.seconds += stats.total_s

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        fills = "1 fill" if self.fills == 1 else f"{self.fills} fills"
        return f"{fills}, {self.tokens} tokens in {self.seconds:.1f}s, {rate:.1f} tok/s"
