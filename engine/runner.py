"""The decode step: one new token for each running sequence, sampled on the device.

The step reads everything from static device buffers (tokens, positions, slots, sampling parameters),
so on a GPU it is captured once per batch-size bucket as a CUDA graph, all graphs sharing one memory
pool, and each step is a buffer update, one replay and one small device-to-host copy of the new tokens.
On the CPU the very same step runs eagerly. Batches are padded up to their bucket with rows that point
at a scratch KV slot, so padding never touches a real sequence.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from typing import NamedTuple

import torch
from torch import Tensor

from engine import kernels
from engine.config import ModelConfig
from engine.kernels.compile_ahead import Compiling, can_record, recording
from engine.model import Llama
from engine.parallel import SINGLE
from engine.weights import DENSE, Quant


@dataclass(frozen=True)
class Row:
    """What one sequence contributes to a decode step: the one definition of the step's inputs. Its int fields, in
    this order, are the rows of the runner's int64 input buffer and its float fields those of the float32 one;
    `StepInputs` names the same fields as tensors, and tensor parallelism sends rows in the same order."""

    token: int
    position: int
    slot: int
    top_k: int
    seed: int
    offset: int
    temperature: float
    top_p: float
    penalty: float

    def ints(self) -> tuple[int, ...]:
        return _ints_of(self)

    def floats(self) -> tuple[float, ...]:
        return _floats_of(self)


INTS = tuple(f.name for f in fields(Row) if f.type == "int")
FLOATS = tuple(f.name for f in fields(Row) if f.type == "float")
assert (*INTS, *FLOATS) == tuple(f.name for f in fields(Row)), "Row lists its int fields first"
_ints_of, _floats_of = attrgetter(*INTS), attrgetter(*FLOATS)  # host time per row matters: no dataclasses.astuple
StepInputs = NamedTuple("StepInputs", [(f.name, Tensor) for f in fields(Row)])  # a batch's columns, by name


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    return [b for b in sizes if b < max_batch] + [max_batch]


class DecodeRunner:
    def __init__(self, model: Llama, seen: Tensor, max_batch: int, scratch_slot: int, use_graphs: bool) -> None:
        self.model, self.seen, self.max_batch = model, seen, max_batch
        self.scratch_slot = scratch_slot
        dev = seen.device
        # Integer and float inputs live in one buffer each (Row's fields), so an update is two host-to-device copies.
        self.ints = torch.zeros(len(INTS), max_batch, dtype=torch.int64, device=dev)
        self.floats = torch.ones(len(FLOATS), max_batch, dtype=torch.float32, device=dev)
        self.rows: dict[int, StepInputs] = {}  # batch size -> views of its columns
        self.out = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.linear_choice: dict = {}
        self.logits = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.pinned = dev.type == "cuda"
        self.max_position = model.cache.k.shape[3] - 1
        # Two pinned landing buffers: step t's tokens are read while step t+1 copies its own.
        self.host = [torch.zeros(max_batch, dtype=torch.int64, pin_memory=self.pinned) for _ in range(2)]
        self.inflight: deque[tuple[Tensor, int, torch.cuda.Event | None]] = deque()
        self.flip = 0
        self.n = self.batch = 0
        self.greedy = self.penalize = True
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.capture_s = self.tune_s = 0.0
        if use_graphs:
            self.capture()

    def _step(self, batch: int, greedy: bool, penalize: bool = True) -> None:
        x = self._inputs(batch)
        logits = self.model.decode(x.token, x.position, x.slot)
        self.logits[:batch] = logits
        nxt = self._pick(logits, batch, greedy, penalize)
        self.out[:batch] = nxt
        # Advance the inputs on the device, so the next step of the same batch needs nothing from the host.
        x.token.copy_(nxt)
        x.position.add_(1).clamp_(max=self.max_position)
        x.offset.add_(1)

    def _inputs(self, batch: int) -> StepInputs:
        """The step's inputs for `batch` rows: views of the static buffers, made once per batch size, since every
        view costs µs of host time."""
        if batch not in self.rows:
            self.rows[batch] = StepInputs(*self.ints[:, :batch].unbind(), *self.floats[:, :batch].unbind())
        return self.rows[batch]

    def _pick(self, logits: Tensor, batch: int, greedy: bool, penalize: bool) -> Tensor:
        """Repetition penalty, then greedy or sampled choice; marks the choice as seen in its slot."""
        x = self._inputs(batch)
        if greedy:
            return kernels.greedy_pick(logits, self.seen, x.slot, x.penalty if penalize else None)
        logits = kernels.apply_repetition_penalty(logits, self.seen[x.slot], x.penalty) if penalize else logits
        nxt = kernels.sample(logits, x.temperature, x.top_k.int(), x.top_p, x.seed, x.offset)
        kernels.mark_seen(self.seen, x.slot, nxt)
        return nxt

    def _load(self, rows: Sequence[Row]) -> tuple[bool, bool]:
        """Copy the rows into the static buffers; returns (all greedy, any repetition penalty)."""
        ints = torch.tensor([r.ints() for r in rows]).T.contiguous()
        floats = torch.tensor([r.floats() for r in rows], dtype=torch.float32).T.contiguous()
        if self.pinned:
            ints, floats = ints.pin_memory(), floats.pin_memory()
        self.ints[:, : len(rows)].copy_(ints, non_blocking=True)
        self.floats[:, : len(rows)].copy_(floats, non_blocking=True)
        return all(r.temperature == 0 for r in rows), any(r.penalty != 1.0 for r in rows)

    def mark_seen(self, slot: int, ids: Sequence[int]) -> None:
        """Start a slot's repetition-penalty mask from its prompt (a method, so tensor parallelism can relay it)."""
        self.seen[slot].zero_()
        self.seen[slot, torch.tensor(ids, device=self.seen.device)] = True

    def sample(self, logits: Tensor, rows: Sequence[Row]) -> list[int]:
        """Pick tokens for logits computed outside the step (the first token after a prefill)."""
        greedy, penalize = self._load(rows)
        return self._pick(logits, len(rows), greedy, penalize).tolist()

    def bucket(self, n: int) -> int:
        return next(b for b in buckets(self.max_batch) if b >= n)

    def capture(self) -> None:
        """Warm up (Triton compiles here) and capture every bucket, largest first, into one pool."""
        start = time.perf_counter()
        self.linear_choice = kernels.tune_linear(self.model.weights(), rows=tuple(buckets(self.max_batch)))
        self.tune_s = time.perf_counter() - start
        self._fill_padding(0, self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.every_step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for batch in reversed(buckets(self.max_batch)):
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(batch, greedy)
                self.graphs[(batch, greedy)] = graph
        torch.cuda.synchronize()
        self.seen[self.scratch_slot].zero_()
        self.capture_s = time.perf_counter() - start

    def every_step(self, reset: bool = False) -> None:
        """Run each step `capture` captures (every bucket, greedy and sampled), largest first. `reset` points every
        row at the scratch slot before each, for `compile_ahead`, whose skipped kernels leave outputs unwritten:
        those must not become token ids."""
        for batch in reversed(buckets(self.max_batch)):
            for greedy in (True, False):
                if reset:
                    self._fill_padding(0, self.max_batch)
                self._step(batch, greedy)

    def _fill_padding(self, start: int, end: int) -> None:
        self.ints[:, start:end] = 0
        self.ints[INTS.index("slot"), start:end] = self.scratch_slot
        self.floats[:, start:end] = 1.0

    def launch(self, rows: Sequence[Row] | None = None) -> None:
        """Start one decode step. With `rows`, for that batch; with None, for the same batch as the last
        step, fed from the device with that step's own outputs (no host-to-device copy, no sync)."""
        if rows is not None:
            self.n = len(rows)
            self.batch = self.bucket(self.n) if self.graphs else self.n
            self.greedy, self.penalize = self._load(rows)
            if self.batch > self.n:
                self._fill_padding(self.n, self.batch)
        if self.graphs:  # captured with the penalty applied: a penalty of 1.0 is a no-op
            self.graphs[(self.batch, self.greedy)].replay()
        else:
            self._step(self.batch, self.greedy, self.penalize)
        buf = self.host[self.flip]
        self.flip ^= 1
        buf[: self.n].copy_(self.out[: self.n], non_blocking=self.pinned)
        event = None
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
        self.inflight.append((buf, self.n, event))

    def collect(self) -> list[int]:
        """The tokens of the oldest launched step (waits for it: the step's only host sync)."""
        buf, n, event = self.inflight.popleft()
        if event is not None:
            event.synchronize()
        return buf[:n].tolist()

    def __call__(self, rows: Sequence[Row]) -> list[int]:
        """Decode one token for each row and wait for it."""
        self.launch(rows)
        return self.collect()


@contextmanager
def compile_ahead(
    cfg: ModelConfig,
    max_seq: int,
    max_batch: int,
    device: torch.device,
    dtype: torch.dtype,
    graphs: bool = True,
    world: int = 1,
    quant: Quant = DENSE,
) -> Iterator[Compiling | None]:
    """Compile the decode step's Triton kernels in worker processes while the body loads the weights, and wait for
    them at its end (on an error, stop them instead); yields the `Compiling`, None where there is nothing to do: no
    CUDA graphs, no Triton 3.3 or newer, or a tensor-parallel world (its small model would have to join collectives).
    A two-layer model of the same shapes, so the same kernel specialisations (the second layer's norm takes the
    first layer's sums of squares), runs every step `capture` will run, under each choice `tune_linear` can make,
    with each Triton launch recorded instead of compiled."""
    if not graphs or world > 1 or device.type != "cuda" or not kernels.have_triton() or not can_record():
        yield None
        return

    start = time.perf_counter()
    try:
        compiling = Compiling()
    except OSError:  # no helper process can start here: the capture compiles, as it would without this
        compiling = None
    if compiling is None:
        yield None
        return
    try:
        model = Llama.empty(replace(cfg, n_layers=min(2, cfg.n_layers)), max_seq, SINGLE, device, dtype, quant)
        model.setup_cache(max_batch + 1, max_seq, dtype)
        seen = torch.zeros(max_batch + 1, cfg.vocab_size, dtype=torch.bool, device=device)
        runner = DecodeRunner(model, seen, max_batch, max_batch, use_graphs=False)
        with recording() as specs:
            for _ in kernels.linear_choices(model.weights(), tuple(buckets(max_batch))):
                runner.every_step(reset=True)
        del runner, model, seen
        torch.cuda.empty_cache()
        compiling.submit(specs)
        compiling.recorded_s = time.perf_counter() - start
        yield compiling
    except BaseException:
        compiling.cancel()
        raise
    compiling.wait()
