"""A stand-in engine whose "device" takes a fixed time per decode step and runs no model: the real scheduler (and
so the real host work per token: detokenizing, stop checks, events) over a runner that only keeps time, as a GPU
would, pipelined. `bench-serve --step-ms` serves it, to time what the server costs per token at a GPU's step rate
on a machine without one.

Its prefill is priced as a GPU's is, per pass rather than per prompt: a fixed `prefill_s` for each `prefill_many`
call plus `token_s` for each token it runs, whatever the number of sequences (a short prefill is launch-bound: on
one H200, 7B's first token takes 29.5 ms after a 128-token prompt and 55.8 ms after 2048, 14 µs a token more).

Its text is the demo tokenizer's, from a fixed passage of words cycled per slot (no special or stop ids).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from engine.checkpoint import Progress
from engine.config import DEMO_DIR
from engine.engine import Engine
from engine.events import ModelInfo
from engine.model import Chunk
from engine.requests import EngineSpec
from engine.runner import Row
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer

PASSAGE = (
    "def read_file(path, mode='r'):\n    with open(path, mode) as handle:\n        return handle.read()\n\n"
    "class Cache:\n    def __init__(self, size):\n        self.size = size\n        self.items = {}\n\n"
)
CONTEXT = 4096


class Device:
    """A device's clock: work given to it runs in order, from the later of when it is given and when the device is
    free; `spans` are when it ran what (on `time.perf_counter`'s clock, which every process here shares)."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.spans: list[tuple[float, float]] = []

    def run(self, seconds: float) -> float:
        """Queue work of `seconds`; returns when it ends."""
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + seconds
        self.spans.append((start, self.free_at))
        return self.free_at

    def busy_between(self, start: float, end: float) -> float:
        """Seconds of work the device ran between `start` and `end`."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.spans)


def wait_until(t: float) -> None:
    """Sleep (the GIL free, as in a CUDA sync) until `t`."""
    wait = t - time.perf_counter()
    if wait > 0:
        time.sleep(wait)


class PacedModel:
    """The model's side of the scheduler: a prefill pass takes `prefill_s` of the device plus `token_s` per token
    (over all its sequences), and is waited for."""

    def __init__(self, device: Device, prefill_s: float, token_s: float) -> None:
        self.device, self.prefill_s, self.token_s = device, prefill_s, token_s
        self.cache: object = None

    def prefill_many(self, tokens: torch.Tensor, chunks: Sequence[Chunk], all_logits: bool = False) -> torch.Tensor:
        wait_until(self.device.run(self.prefill_s + self.token_s * tokens.numel()))
        return torch.zeros(len(chunks), 1)


class PacedRunner:
    """The decode runner's interface over the `Device`: `launch` queues a step of `step_s` and returns, `collect`
    waits for the oldest one, as a CUDA stream's work is waited for."""

    def __init__(self, device: Device, step_s: float, tok: Tokenizer) -> None:
        self.device, self.step_s = device, step_s
        self.text = [i for i in tok.encode(PASSAGE) if i not in (tok.bos_id, tok.eos_id)]
        self.inflight: deque[tuple[float, list[int]]] = deque()
        self.verifying = None
        self.slots: list[int] = []
        self.made: dict[int, int] = {}  # tokens made per slot, to cycle through the passage

    def mark_seen(self, slot: int, ids: Sequence[int]) -> None:
        pass

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        return [self._token(r.slot) for r in rows]

    def launch(self, rows: Sequence[Row] | None = None) -> None:
        if rows is not None:
            self.slots = [r.slot for r in rows]
        self.inflight.append((self.device.run(self.step_s), list(self.slots)))

    def collect(self) -> list[int]:
        done_at, slots = self.inflight.popleft()
        wait_until(done_at)
        return [self._token(s) for s in slots]

    def __call__(self, rows: Sequence[Row]) -> list[int]:
        self.launch(rows)
        return self.collect()

    def verify_queries(self, batch: int, longest: int) -> int:
        return 0  # no verify steps: requests decode plainly

    def _token(self, slot: int) -> int:
        made = self.made.get(slot, 0)
        self.made[slot] = made + 1
        return self.text[(made + 7 * slot) % len(self.text)]


class PacedEngine(Engine):
    """`Engine` over `PacedModel` and `PacedRunner`: the scheduler, prompts and events are the real ones."""

    def __init__(self, step_s: float, prefill_s: float, token_s: float, n_slots: int, tok: Tokenizer) -> None:
        self.tok, self.context, self.device = tok, CONTEXT, torch.device("cpu")
        name = f"paced stand-in, {step_s * 1e3:g} ms a step, {prefill_s * 1e3:g} ms a prefill"
        name += f" + {token_s * 1e6:g} us a token"
        self.info = ModelInfo(
            name, can_infill=tok.can_infill, context=CONTEXT, device="cpu", dtype="none", tp=1,
            vocab_size=tok.vocab_size, is_demo=True,
        )  # fmt: skip
        self.paced = Device()
        runner = PacedRunner(self.paced, step_s, tok)
        model = PacedModel(self.paced, prefill_s, token_s)
        self.scheduler = Scheduler(model, runner, tok, n_slots, CONTEXT, self.device)
        self.tp = None
        self.compiled_ahead = None

    def close(self) -> None:
        pass


def paced_loader(step_s: float, prefill_s: float, token_s: float) -> Callable[[EngineSpec, Progress | None], Engine]:
    """What `LocalClient(load=...)` takes: builds the paced engine of `spec.max_batch` slots."""

    def load(spec: EngineSpec, progress: Progress | None = None) -> Engine:
        tok = Tokenizer.from_dir(spec.tokenizer or DEMO_DIR)
        return PacedEngine(step_s, prefill_s, token_s, spec.max_batch, tok)

    return load
