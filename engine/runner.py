"""The decode step: one new token for each running sequence, sampled on the device.

The step reads everything from static device buffers (tokens, positions, slots, sampling parameters),
so on a GPU it is captured once per batch-size bucket as a CUDA graph, all graphs sharing one memory
pool, and each step is a buffer update, one replay and one small device-to-host copy of the new tokens.
On the CPU the very same step runs eagerly. Batches are padded up to their bucket with rows that point
at a scratch KV slot, so padding never touches a real sequence.

Speculation adds a verify step: each row's last token and the tokens proposed after it go through the model at
once (`Llama.decode` with counts), and the accept rule (`kernels.accept`) picks the row's new tokens on the device.
It is captured per (batch bucket, tokens per row), the tokens per row in a few buckets (`VERIFY_QUERIES`), and only
where the rows fit one matrix-vector pass (`MAX_VERIFY_ROWS`); rows with fewer proposals are padded (their extra
tokens write nothing). A verify step is launched and collected as a plain one is, but no step continues from its
outputs on the device: the next proposals need its tokens on the host.
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
from engine.requests import MAX_SPECULATE
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


# Tokens per row of a verify step (the last token and up to 1, 3, 7 or 15 proposals): powers of two, as the
# attention kernel's tiles are.
VERIFY_QUERIES = (2, 4, 8, MAX_SPECULATE + 1)
# Rows of a verify step at most (batch times tokens per row): up to here a step still reads each weight about once
# (the matrix-vector kernel's reach); larger batches decode without speculation.
MAX_VERIFY_ROWS = 64
# A verify step's cost in plain steps of its batch, before a step of its shape has been timed: `1 + overhead +
# slope * (tokens per row - 1)`. The slope is little on a GPU, which streams the weights once for every row, and
# some on a CPU (the demo step alone on this project's CPU: 1.26 plain steps at 2 tokens per row, 1.98 at 8, 2.58 at
# 16); the overhead is what a GPU loses when a step cannot be pipelined (the host's work no longer overlaps the
# device's). An untimed shape is priced from the timed one below it plus the slope: optimistic, so that it gets
# tried and timed.
PRIOR_SLOPE = {"cuda": 0.02, "cpu": 0.1}
PRIOR_OVERHEAD = {"cuda": 0.5, "cpu": 0.25}
EMA = 0.2  # the weight of each new timing


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    return [b for b in sizes if b < max_batch] + [max_batch]


def verify_shapes(max_batch: int, speculate: int) -> list[tuple[int, int]]:
    """The (batch bucket, tokens per row) of every verify step for up to `speculate` proposals per row."""
    if speculate < 1:
        return []
    need = next(q for q in VERIFY_QUERIES if q > min(speculate, MAX_SPECULATE))
    return [(b, q) for b in buckets(max_batch) for q in VERIFY_QUERIES if q <= need and b * q <= MAX_VERIFY_ROWS]


class DecodeRunner:
    def __init__(
        self, model: Llama, seen: Tensor, max_batch: int, scratch_slot: int, use_graphs: bool, speculate: int = 0
    ) -> None:
        """`speculate`: the most tokens a row may propose to a verify step (0: no verify steps)."""
        self.model, self.seen, self.max_batch = model, seen, max_batch
        self.scratch_slot = scratch_slot
        dev = seen.device
        # Integer and float inputs live in one buffer each (Row's fields), so an update is two host-to-device copies.
        self.ints = torch.zeros(len(INTS), max_batch, dtype=torch.int64, device=dev)
        self.floats = torch.ones(len(FLOATS), max_batch, dtype=torch.float32, device=dev)
        self.rows: dict[int, StepInputs] = {}  # batch size -> views of its columns
        self.out = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.linear_choice: dict = {}
        self.fusion: dict = {}  # `kernels.tune_fusion`'s timings of the one-row step
        self.fusion_rows: dict = {}  # `kernels.tune_fusion_rows`' timings of small weights' fused forms
        self.logits = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.pinned = dev.type == "cuda"
        self.overlaps = self.pinned  # whether the host's work overlaps a launched step (a GPU's): verify costs count it
        self.max_position = model.cache.k.shape[3] - 1
        # Two pinned landing buffers: step t's tokens are read while step t+1 copies its own.
        self.host = [torch.zeros(max_batch, dtype=torch.int64, pin_memory=self.pinned) for _ in range(2)]
        self.inflight: deque[tuple[Tensor, int, torch.cuda.Event | None, float]] = deque()
        self.flip = 0
        self.n = self.batch = 0
        self.greedy = self.penalize = True
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        # Speculation: a verify step's inputs are one buffer, each row's token count (its last token and proposals)
        # then the tokens [batch, queries], so that an update is one host-to-device copy; its output (each row's new
        # tokens, then their count) another. The views are made once per shape.
        self.verify_shapes = verify_shapes(max_batch, speculate)
        max_queries = max((q for _, q in self.verify_shapes), default=1)
        self.verify_in = torch.ones(max_batch * (1 + max_queries), dtype=torch.int64, device=dev)
        self.verify_stage = torch.ones(self.verify_in.numel(), dtype=torch.int64, pin_memory=self.pinned)
        self.counts = self.verify_in[:max_batch]
        self.verify_out = torch.zeros(max_batch * (max_queries + 1), dtype=torch.int64, device=dev)
        self.verify_host = torch.zeros(max_batch * (max_queries + 1), dtype=torch.int64, pin_memory=self.pinned)
        self.verify_views: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.verifying: tuple[Tensor, int, torch.cuda.Event | None, float] | None = None  # launched, not collected
        # Timings: seconds per plain step, per batch bucket (wall time from one step's tokens to the next's); and a
        # verify step's wall time in plain steps of its bucket, the step after it included where that one starts
        # unpipelined (`pending` holds a verify step's shape and seconds till then), per (bucket, tokens per row).
        self.plain_s: dict[int, float] = {}
        self.verify_cost: dict[tuple[int, int], float] = {}
        self.pending: tuple[tuple[int, int], float] | None = None
        # Seconds of the host's work from a verify step's tokens to its next runner call, per batch bucket
        # (`feeds_verify`); `after_verify` holds the bucket and time of tokens not yet followed by a call.
        self.verify_host_s: dict[int, float] = {}
        self.after_verify: tuple[int, float] | None = None
        self.since = 0.0  # when the host last received a step's tokens (or the first token after a prefill)
        self.sampled = 0.0  # when the last first token after a prefill arrived: steps launched before go untimed
        self.prior_slope = PRIOR_SLOPE.get(dev.type, PRIOR_SLOPE["cpu"])
        self.prior_overhead = PRIOR_OVERHEAD.get(dev.type, PRIOR_OVERHEAD["cpu"])
        self.cost_lists: dict[int, list[float]] = {}  # `costs` per batch bucket, until a timing changes them
        self.verify_graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
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

    def _verify_step(self, batch: int, queries: int, greedy: bool, penalize: bool = True) -> None:
        """The verify step: `queries` tokens per row through the model, the accept rule, its tokens and counts out."""
        x = self._inputs(batch)
        tokens, out = self._verify_views(batch, queries)
        counts = self.counts[:batch]
        logits = self.model.decode(tokens.view(-1), x.position, x.slot, counts)
        new, n = kernels.accept(
            logits.view(batch, queries, -1), tokens, counts, self.seen, x.slot, x.temperature, x.top_k, x.top_p,
            x.penalty if penalize else None, x.seed, x.offset, greedy,
        )  # fmt: skip
        out[:, :queries] = new
        out[:, queries] = n
        # Advance the plain step's inputs past the tokens taken, on the device: a plain step launched right after
        # (no rows) decodes the token after them, while the host reads them. The index is clamped into the row:
        # compiling ahead skips the accept kernel, whose count is then unwritten memory.
        last = (n - 1).long().clamp_(0, queries - 1)
        x.token.copy_(new.gather(1, last.unsqueeze(1)).squeeze(1))
        x.position.add_(n).clamp_(max=self.max_position)
        x.offset.add_(n)

    def _verify_views(self, batch: int, queries: int) -> tuple[Tensor, Tensor]:
        """The verify step's tokens [batch, queries] and output [batch, queries + 1]: views made once per shape."""
        if (batch, queries) not in self.verify_views:
            tokens = self.verify_in[self.max_batch : self.max_batch + batch * queries]
            self.verify_views[(batch, queries)] = (
                tokens.view(batch, queries),
                self.verify_out[: batch * (queries + 1)].view(batch, queries + 1),
            )
        return self.verify_views[(batch, queries)]

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
        tokens = self._pick(logits, len(rows), greedy, penalize).tolist()
        self.n = self.batch = 0  # its rows took the step's inputs: the next launch carries rows
        self._flush_pending()  # a prefill ran since: the step after a verify step no longer shows its bubble
        self.since = self.sampled = time.perf_counter()
        return tokens

    def bucket(self, n: int) -> int:
        return next(b for b in buckets(self.max_batch) if b >= n)

    def capture(self) -> None:
        """Choose the kernels (`kernels.tune_linear`, then `tune_fusion` and `tune_fusion_rows`), warm up (Triton
        compiles here) and capture every bucket, largest first, into one pool."""
        start = time.perf_counter()
        weights, rows = self.model.weights(), step_rows(self.max_batch, self.verify_shapes)
        self.linear_choice = kernels.tune_linear(weights, rows=rows)
        self._fill_padding(0, self.max_batch)
        if self.model.par.world == 1:  # a tensor-parallel step's collectives would time the slowest rank, not this one
            self.fusion = kernels.tune_fusion(lambda: self._step(1, True), weights)
            self.fusion_rows = kernels.tune_fusion_rows(self.model.fused_weights(), rows)
            self._fill_padding(0, self.max_batch)
        self.tune_s = time.perf_counter() - start
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
        for batch, queries in sorted(self.verify_shapes, key=lambda s: -s[0] * s[1]):
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._verify_step(batch, queries, greedy)
                self.verify_graphs[(batch, queries, greedy)] = graph
        torch.cuda.synchronize()
        self.seen[self.scratch_slot].zero_()
        self.capture_s = time.perf_counter() - start

    def every_step(self, reset: bool = False, rows: tuple[int, ...] | None = None) -> None:
        """Run each step `capture` captures (every bucket and verify shape, greedy and sampled), largest first; with
        `rows`, only those of these row counts. `reset` points every row at the scratch slot before each, for
        `compile_ahead`, whose skipped kernels leave outputs unwritten: those must not become token ids."""
        shapes = [(b, 1) for b in reversed(buckets(self.max_batch))]
        shapes += sorted(self.verify_shapes, key=lambda s: -s[0] * s[1])
        steps = [
            lambda b=b, q=q, g=g: self._step(b, g) if q == 1 else self._verify_step(b, q, g)
            for b, q in shapes
            if rows is None or b * q in rows
            for g in (True, False)
        ]
        for step in steps:
            if reset:
                self._fill_padding(0, self.max_batch)
                self.verify_in[self.max_batch :].zero_()
            step()

    def _fill_padding(self, start: int, end: int) -> None:
        self.ints[:, start:end] = 0
        self.ints[INTS.index("slot"), start:end] = self.scratch_slot
        self.floats[:, start:end] = 1.0
        self.counts[start:end] = 1

    def launch(self, rows: Sequence[Row] | None = None) -> None:
        """Start one decode step. With `rows`, for that batch; with None, for the same batch as the last
        step, fed from the device with that step's own outputs (no host-to-device copy, no sync)."""
        start = time.perf_counter()
        self._host_after_verify(start)
        assert rows is not None or self.batch, "a verify step or a sample ran since the last launch: launch with rows"
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
        self.inflight.append((buf, self.n, event, start))

    def collect(self) -> list[int]:
        """The tokens of the oldest launched step (waits for it: the step's only host sync)."""
        self._host_after_verify(time.perf_counter())
        buf, n, event, launched = self.inflight.popleft()
        if event is not None:
            event.synchronize()
        now = time.perf_counter()
        bucket = self.bucket(n)
        if self.pending is not None:
            # The first step after a verify step starts with nothing in flight: the device idles from the verify
            # step's tokens to this launch (the host's work on them), which pipelined steps would have overlapped.
            shape, spent = self.pending
            self.pending = None
            self._cost(shape, spent + max(0.0, launched - self.since))
        else:
            self._flush_pending()
            # A step takes from its launch, or from the tokens of the step before it, to its own tokens; one
            # launched before a prefill's first tokens ran beside that prefill, which took its time.
            if launched > self.sampled:
                self._timed(self.plain_s, bucket, now - max(launched, self.since))
        self.since = now
        return buf[:n].tolist()

    @staticmethod
    def _timed(table: dict, key: object, value: float) -> None:
        table[key] = value if key not in table else (1 - EMA) * table[key] + EMA * value

    def _cost(self, shape: tuple[int, int], seconds: float) -> None:
        """Time a verify step of `shape` (bucket, tokens per row) that took `seconds` of wall time."""
        if shape[0] in self.plain_s:
            cost = seconds / self.plain_s[shape[0]]
            # A first timing counts half against the estimate it replaces: one outlier must not price a shape out.
            before = self.verify_cost.get(shape, self._shape_cost(*shape))
            weight = EMA if shape in self.verify_cost else 0.5
            self.verify_cost[shape] = (1 - weight) * before + weight * cost
            self.cost_lists.clear()

    def _flush_pending(self) -> None:
        """Time the pending verify step on its own seconds (the step after it was another verify step, or none)."""
        if self.pending is not None:
            self._cost(*self.pending)
            self.pending = None

    def costs(self, batch: int) -> list[float]:
        """What a verify step of `batch` rows costs, in plain steps, with k = 0, 1, ... proposed tokens in its
        longest row, up to the most its shapes hold (k = 0: a plain step, 1.0): timed, or estimated
        (`_shape_cost`), and never more than for a longer proposal."""
        bucket = self.bucket(batch)
        if bucket not in self.cost_lists:
            longest = max((q for b, q in self.verify_shapes if b == bucket), default=1) - 1
            costs = [1.0] + [self._shape_cost(bucket, self.verify_queries(batch, k)) for k in range(1, longest + 1)]
            for k in range(longest - 1, 0, -1):  # no more than a longer step's: one slow timing is retried
                costs[k] = min(costs[k], costs[k + 1])
            self.cost_lists[bucket] = costs
        return self.cost_lists[bucket]

    def _shape_cost(self, bucket: int, queries: int) -> float:
        """A verify step's cost for `queries` tokens per row: timed; else the nearest timed shape's below plus the
        prior slope per token; else the prior, at most the nearest timed shape's above."""
        if (bucket, queries) in self.verify_cost:
            return self.verify_cost[(bucket, queries)]
        timed = sorted((q, c) for (b, q), c in self.verify_cost.items() if b == bucket)
        below = [(q, c) for q, c in timed if q < queries]
        if below:
            q, c = below[-1]
            return c + self.prior_slope * (queries - q)
        prior = 1.0 + self.prior_overhead + self.prior_slope * (queries - 1)
        return min([prior] + [c for _, c in timed[:1]])

    def __call__(self, rows: Sequence[Row]) -> list[int]:
        """Decode one token for each row and wait for it."""
        self.launch(rows)
        return self.collect()

    def verify_queries(self, batch: int, longest: int) -> int:
        """Tokens per row of a verify step for `batch` rows whose longest proposal is `longest` tokens: the
        smallest captured shape that holds it, else the largest one for that batch (proposals are cut to fit);
        on the CPU exactly `longest + 1`. 0 where no verify step runs that batch."""
        bucket = self.bucket(batch)
        fits = [q for b, q in self.verify_shapes if b == bucket]
        if not fits or longest < 1:
            return 0
        if not self.graphs:
            return min(longest, fits[-1] - 1) + 1
        return next((q for q in fits if q > longest), fits[-1])

    def launch_verify(self, rows: Sequence[Row], proposals: Sequence[Sequence[int]]) -> None:
        """Start one verify step: each row's token then its proposals (cut to what `verify_queries` allows), at the
        row's position on. The runner's inputs then hold these rows, advanced past the tokens each takes: a `launch`
        with no rows is the plain step after them, fed from the verify step's outputs on the device. Every row's
        position plus its proposals must stay inside the cache; the step before must have been collected."""
        assert self.verifying is None, "the last verify step was not collected"
        start = time.perf_counter()
        self._host_after_verify(start)
        n = len(rows)
        queries = self.verify_queries(n, max(len(p) for p in proposals))
        assert queries > 0, "no verify step for this batch"
        batch = self.bucket(n) if self.graphs else n
        greedy, penalize = self._load(rows)
        if batch > n:
            self._fill_padding(n, batch)
        counts, table = [1] * self.max_batch, [0] * (batch * queries)
        for i, (row, proposed) in enumerate(zip(rows, proposals, strict=True)):
            taken = [row.token, *proposed[: queries - 1]]
            counts[i] = len(taken)
            table[i * queries : i * queries + len(taken)] = taken
        staged = self.verify_stage[: self.max_batch + batch * queries]
        staged.copy_(torch.tensor(counts + table))  # the last step's copies are done: it was collected
        self.verify_in[: staged.numel()].copy_(staged, non_blocking=self.pinned)
        _, out = self._verify_views(batch, queries)
        if self.graphs:
            self.verify_graphs[(batch, queries, greedy)].replay()
        else:
            self._verify_step(batch, queries, greedy, penalize)
        host = self.verify_host[: n * (queries + 1)].view(n, queries + 1)
        host.copy_(out[:n], non_blocking=self.pinned)
        event = None
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
        self.n, self.batch = n, batch  # the inputs continue these rows (`_verify_step` advanced them)
        self.greedy, self.penalize = greedy, penalize
        self.verifying = (host, queries, event, start)

    def collect_verify(self) -> list[list[int]]:
        """The launched verify step's new tokens for each row (its accepted proposals and one more); waits for it."""
        host, queries, event, start = self.verifying
        self.verifying = None
        if event is not None:
            event.synchronize()
        new = [r[: r[-1]] for r in host.tolist()]
        now = time.perf_counter()
        self._flush_pending()
        shape = (self.bucket(len(new)), queries)
        if self.overlaps:
            # From the step before's tokens: the device idled while the host worked on them (pipelined steps
            # overlap that work), and it idles again after this step until the next launch (`collect`).
            self.pending = (shape, now - self.since)
        else:  # the CPU runs every step in full, and its host work never overlapped anything
            self._cost(shape, now - start)
        self.since = now
        self.after_verify = (shape[0], now)
        return new

    def _host_after_verify(self, now: float) -> None:
        """Time the host's work since a verify step's tokens, at the runner call that ends it."""
        if self.after_verify is not None:
            bucket, since = self.after_verify
            self.after_verify = None
            self._timed(self.verify_host_s, bucket, now - since)

    def feeds_verify(self, batch: int) -> bool:
        """Whether to launch a plain step right after a verify step of `batch` rows, fed from its outputs on the
        device: where the host's work overlaps the device's and its measured work on a verify step's tokens takes at
        least a plain step, which then runs in time the device would spend waiting (a small model's launch-bound
        step on a GPU). Else a verify step may follow the last at once, and a large model's verify step, which
        costs about a plain step, makes several tokens where the plain one would make one."""
        bucket = self.bucket(batch)
        host, plain = self.verify_host_s.get(bucket), self.plain_s.get(bucket)
        return self.overlaps and host is not None and plain is not None and host >= plain

    def verify(self, rows: Sequence[Row], proposals: Sequence[Sequence[int]]) -> list[list[int]]:
        """One verify step (`launch_verify`), waited for (`collect_verify`)."""
        self.launch_verify(rows, proposals)
        return self.collect_verify()


def step_rows(max_batch: int, shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Every row count a captured step hands the projections: the batch buckets and each verify shape's rows."""
    return tuple(sorted({*buckets(max_batch), *(b * q for b, q in shapes)}))


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
    speculate: int = 0,
    kv: str = "bf16",
) -> Iterator[Compiling | None]:
    """Compile the decode step's Triton kernels (and the verify steps', for up to `speculate` proposals) in worker
    processes while the body loads the weights, and wait for them at its end (on an error, stop them instead);
    yields the `Compiling`, None where there is nothing to do: no
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
        model.setup_cache(max_batch + 1, max_seq, dtype, kv)  # an int8 cache has kernel variants of its own
        seen = torch.zeros(max_batch + 1, cfg.vocab_size, dtype=torch.bool, device=device)
        runner = DecodeRunner(model, seen, max_batch, max_batch, use_graphs=False, speculate=speculate)
        rows = step_rows(max_batch, runner.verify_shapes)
        with recording() as specs:
            for changed in kernels.linear_choices(model.weights(), rows, model.fused_weights()):
                runner.every_step(reset=True, rows=changed)
        del runner, model, seen
        torch.cuda.empty_cache()
        compiling.submit(specs)
        compiling.recorded_s = time.perf_counter() - start
        yield compiling
    except BaseException:
        compiling.cancel()
        raise
    compiling.wait()
