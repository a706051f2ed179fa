"""Tensor parallelism across processes: start the other ranks, feed them each step's plan, take them down.

Rank 0 is the caller's engine (the app's worker thread). Ranks 1..N-1 are `python -m engine.tp_worker`
processes this module starts (or, under `torchrun`, the other processes torchrun started). Every rank
builds the same engine from the same recipe, holding only its shard of the weights; the model's
collectives go through the default process group (NCCL on CUDA, gloo on the CPU).

Before every call that touches shared state, rank 0 broadcasts a small plan on a separate gloo group
(CPU tensors, no timeout while idle) and then makes the call itself; the other ranks make the identical
call: a prefill (its chunks and their tokens), a decode step (its `Row`s), the next pipelined step of the same
batch (no rows: each rank feeds its own sampled tokens back on its device), a speculative verify step (its rows and
their proposals), the sample after a prefill (of its first logits rows), a slot's fresh repetition mask, and stop.
Logits after the vocabulary all-gather are bitwise the same on every rank (the all-reduce gives every rank the same
sum), so device sampling picks the same tokens everywhere. Workers hold no scheduler state.

Faults: a monitor thread on rank 0 watches the children, their heartbeats and the length of every step; a child
that dies or falls silent (stopped, hung), or a step that outlives the timeout, stops the engine with a one-line
error (the other children are killed, an NCCL group is aborted so that rank 0's kernels return; our one-shot
all-reduce gives up on a peer by itself after a few seconds and raises a flag that rank 0 checks after every call).
Children exit when rank 0's process goes away (their stdin pipe closes) and on the stop plan that `Engine.close()`
sends.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import itertools
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.config import ModelConfig, model_dir
from engine.errors import EngineError
from engine.model import Chunk, Llama
from engine.parallel import Parallel, Shard
from engine.prequant import model_quant
from engine.requests import EngineSpec
from engine.runner import FLOATS, INTS, Row
from engine.weights import Quant

if TYPE_CHECKING:
    from engine.checkpoint import Progress
    from engine.engine import Engine

# NVLink multicast stays off on these hosts (KINDS.md), in every rank.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Longest wait for another rank: start-up, one collective, one step. Deaths are seen much sooner.
TIMEOUT_S = float(os.environ.get("CODELLAMA_TP_TIMEOUT", "300"))
IDLE = timedelta(days=365)  # workers wait for the next plan as long as the app stays open
BEAT_S, SILENT_S = 0.5, 5.0  # a serving worker writes a byte to its stdout this often; silent this long, it hangs

PREFILL, SAMPLE, SEEN, DECODE, AGAIN, STOP, VERIFY = 1, 2, 3, 4, 5, 6, 7
_HEADER, _INLINE = 8, 504  # a plan is one 512-value int64 broadcast unless its payload is longer


@dataclass(frozen=True)
class Recipe:
    """How every rank builds its engine: `module:qualname(spec, progress, par, **kwargs) -> Engine`."""

    func: str = "engine.engine:Engine.load"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, spec: EngineSpec, progress: Progress | None, par: Parallel) -> Engine:
        module, _, name = self.func.partition(":")
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target(spec, progress, par, **self.kwargs)


@dataclass(frozen=True)
class Job:
    """What a spawned rank reads from its stdin."""

    spec: EngineSpec
    recipe: Recipe
    rank: int
    world: int
    port: int
    backend: str


# ---- plans ----


class Plans:
    """Step plans from rank 0 to the others, as int64 broadcasts on their own gloo group (CPU tensors, so
    a worker reads a plan without touching its GPU, and waits for it without a timeout)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.buf = torch.zeros(_HEADER + _INLINE, dtype=torch.int64)

    def send(self, kind: int, args: Sequence[int] = (), payload: torch.Tensor | None = None) -> None:
        n = 0 if payload is None else payload.numel()
        self.buf[:_HEADER] = torch.tensor([kind, n, *args, *[0] * (_HEADER - 2 - len(args))])
        if 0 < n <= _INLINE:
            self.buf[_HEADER : _HEADER + n] = payload
        dist.broadcast(self.buf, 0, group=self.group)
        if n > _INLINE:
            dist.broadcast(payload.contiguous(), 0, group=self.group)

    def receive(self) -> tuple[int, list[int], torch.Tensor]:
        dist.broadcast(self.buf, 0, group=self.group)
        kind, n, *args = self.buf[:_HEADER].tolist()
        if n <= _INLINE:
            return kind, args, self.buf[_HEADER : _HEADER + n].clone()
        payload = torch.empty(n, dtype=torch.int64)
        dist.broadcast(payload, 0, group=self.group)
        return kind, args, payload


def encode_rows(rows: Sequence[Row]) -> torch.Tensor:
    """Rows as int64, each its int fields and then its float fields as float64 bits (Row's order)."""
    ints = torch.tensor([r.ints() for r in rows], dtype=torch.int64).view(-1, len(INTS))
    floats = torch.tensor([r.floats() for r in rows], dtype=torch.float64).view(-1, len(FLOATS))
    return torch.cat([ints, floats.view(torch.int64)], dim=1).flatten()


def decode_rows(payload: torch.Tensor) -> list[Row]:
    table = payload.view(-1, len(INTS) + len(FLOATS))
    ints = table[:, : len(INTS)].tolist()
    floats = table[:, len(INTS) :].contiguous().view(torch.float64).tolist()
    return [Row(*i, *f) for i, f in zip(ints, floats, strict=True)]


def encode_proposals(rows: Sequence[Row], proposals: Sequence[Sequence[int]]) -> torch.Tensor:
    """A verify step as int64: the rows (`encode_rows`), each row's proposal count, then the proposals."""
    lengths = torch.tensor([len(p) for p in proposals], dtype=torch.int64)
    flat = torch.tensor([t for p in proposals for t in p], dtype=torch.int64)
    return torch.cat([encode_rows(rows), lengths, flat])


def encode_chunks(tokens: torch.Tensor, chunks: Sequence[Chunk]) -> torch.Tensor:
    """A prefill as int64: each chunk's slot, start and length, then the tokens."""
    table = torch.tensor([(c.slot, c.start, c.length) for c in chunks], dtype=torch.int64).flatten()
    return torch.cat([table, tokens.to("cpu", torch.int64)])


def decode_chunks(payload: torch.Tensor, n: int) -> tuple[torch.Tensor, list[Chunk]]:
    return payload[3 * n :], [Chunk(*c) for c in payload[: 3 * n].view(n, 3).tolist()]


def decode_proposals(payload: torch.Tensor, n: int) -> tuple[list[Row], list[list[int]]]:
    width = (len(INTS) + len(FLOATS)) * n
    lengths, flat = payload[width : width + n].tolist(), payload[width + n :].tolist()
    ends = itertools.accumulate(lengths)
    return decode_rows(payload[:width]), [flat[end - length : end] for end, length in zip(ends, lengths, strict=True)]


# ---- rank 0 ----


class _Proxy:
    """Stands in for rank 0's model or runner: every attribute is the real one's, except the broadcasting call."""

    def __init__(self, inner: Any, leader: Leader) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_leader", leader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class _Model(_Proxy):
    prefill = Llama.prefill  # the one-sequence form, through the relayed `prefill_many` below

    def prefill_many(self, tokens: torch.Tensor, chunks: Sequence[Chunk], all_logits: bool = False) -> torch.Tensor:
        plan = (PREFILL, (len(chunks), int(all_logits)), encode_chunks(tokens, chunks))
        return self._leader.run(plan, lambda: self._inner.prefill_many(tokens, chunks, all_logits))


class _Runner(_Proxy):
    """The decode runner's calls that change state every rank must share: the steps, and the seen masks
    and samples behind repetition penalties (pipelined steps feed each rank its own sampled tokens)."""

    def mark_seen(self, slot: int, ids: Sequence[int]) -> None:
        plan = (SEEN, (slot,), torch.tensor(ids, dtype=torch.int64))
        self._leader.run(plan, lambda: self._inner.mark_seen(slot, ids))

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        return self._leader.run((SAMPLE, (), encode_rows(rows)), lambda: self._inner.sample(logits, rows))

    def launch(self, rows: Sequence[Row] | None = None) -> None:
        plan = (AGAIN, (), None) if rows is None else (DECODE, (), encode_rows(rows))
        self._leader.run(plan, lambda: self._inner.launch(rows))

    def collect(self) -> list[int]:
        return self._leader.run(None, self._inner.collect)

    def launch_verify(self, rows: Sequence[Row], proposals: Sequence[Sequence[int]]) -> None:
        plan = (VERIFY, (len(rows),), encode_proposals(rows, proposals))
        self._leader.run(plan, lambda: self._inner.launch_verify(rows, proposals))

    def collect_verify(self) -> list[list[int]]:
        return self._leader.run(None, self._inner.collect_verify)

    def verify(self, rows: Sequence[Row], proposals: Sequence[Sequence[int]]) -> list[list[int]]:
        self.launch_verify(rows, proposals)
        return self.collect_verify()

    def __call__(self, rows: Sequence[Row]) -> list[int]:
        self.launch(rows)
        return self.collect()


class Leader:
    """Rank 0's side of the world: sends plans, watches the children, ends every rank on close."""

    def __init__(self, world: int, backend: str, children: dict[int, subprocess.Popen]) -> None:
        self.world, self.backend, self.children = world, backend, children
        self.plans: Plans | None = None
        self.runner: Any = None
        self.par: Parallel | None = None
        self.broken: str | None = None
        self.step_since: float | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stderr = {r: collections.deque(maxlen=8) for r in children}
        self._beats: dict[int, float] = {}  # rank -> when its last heartbeat arrived (from when it serves)
        for r, proc in children.items():
            threading.Thread(target=self._drain, args=(r, proc), name=f"tp-rank{r}-stderr", daemon=True).start()
            threading.Thread(target=self._listen, args=(r, proc), name=f"tp-rank{r}-beats", daemon=True).start()
        self._monitor = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self._monitor.start()

    def attach(self, engine: Engine, plans: Plans) -> None:
        """Route the engine's prefill and decode step through the broadcast; `engine.close()` ends the world."""
        self.plans, self.runner, self.par = plans, engine.runner, engine.model.par
        scheduler = engine.scheduler
        scheduler.model, scheduler.runner, engine.tp = _Model(engine.model, self), _Runner(engine.runner, self), self

    def run(self, plan: tuple[int, Sequence[int], torch.Tensor | None] | None, call: Callable[[], Any]) -> Any:
        """Broadcast the plan (if any), then run the same call here; any failure stops every rank.
        A rank that died meanwhile wins over the call's result (an aborted NCCL step returns garbage)."""
        if self.broken:
            raise EngineError(self.broken)
        self.step_since = time.monotonic()
        try:
            if plan is not None:
                self.plans.send(*plan)
            result = call()
        except Exception as err:
            raise EngineError(self.fail_from(err)) from None
        finally:
            self.step_since = None
        if self.par is not None and self.par.stalled() and not self.broken:  # an all-reduce gave up on a peer
            self._await_children()
            self.fault(
                "a tensor-parallel all-reduce waited seconds for another rank and gave up; the engine has stopped"
            )
        if self.broken:
            raise EngineError(self.broken)
        return result

    def _await_children(self) -> None:
        """Give the monitor a moment to see a child that died: its message names the rank."""
        deadline = time.monotonic() + 2.0
        while self.children and not self.broken and time.monotonic() < deadline:
            self._check_children()
            time.sleep(0.05)

    def fail_from(self, err: BaseException) -> str:
        """The one-line reason rank 0's call failed: a dead rank if one died (the monitor gets a moment)."""
        self._await_children()
        if isinstance(err, torch.OutOfMemoryError):
            self.fault("tensor-parallel rank 0 ran out of GPU memory; the engine has stopped")
        else:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
            self.fault(f"tensor-parallel rank 0 failed ({reason}); the engine has stopped")
        return self.broken

    def fault(self, message: str) -> None:
        """Stop the world once: remember why, kill the children, abort NCCL so rank 0's kernels return."""
        with self._lock:
            if self.broken:
                return
            self.broken = message
        for proc in self.children.values():
            if proc.poll() is None:
                proc.kill()
        if self.backend == "nccl" and dist.is_initialized():
            # In a thread of its own: with a peer gone, NCCL's abort can block (seen on two GPUs) and the error
            # must reach the UI now. The thread lets rank 0's stuck NCCL kernels return; the process's exit ends it.
            threading.Thread(target=_abort_nccl, name="tp-nccl-abort", daemon=True).start()

    def _drain(self, rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            if line.strip():
                self._stderr[rank].append(line.decode(errors="replace").strip())

    def _listen(self, rank: int, proc: subprocess.Popen) -> None:
        while proc.stdout.read1(64):
            self._beats[rank] = time.monotonic()

    def _check_children(self) -> None:
        for rank, proc in self.children.items():
            code = proc.poll()
            if code is not None and not self._closing.is_set():
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                time.sleep(0.1)  # let the stderr reader catch the child's last words
                # a rank that failed says why in its last line (worker_main); a killed one's last line is unrelated
                last = f": {self._stderr[rank][-1]}" if code > 0 and self._stderr[rank] else ""
                self.fault(f"tensor-parallel rank {rank} (pid {proc.pid}) {how}{last}; the engine has stopped")
                return

    def _check_beats(self, now: float) -> None:
        for rank, beat in list(self._beats.items()):
            proc = self.children[rank]
            if now - beat > SILENT_S and proc.poll() is None:
                self.fault(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) has not responded for {SILENT_S:.0f} s "
                    "(stopped or hung); the engine has stopped"
                )
                return

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._closing.wait(0.2) and not self.broken:
            now = time.monotonic()
            if now - last > 1.0:  # this process was stopped or starved: the ranks' beats wait unread in their pipes
                self._beats = dict.fromkeys(self._beats, now)
            last = now
            self._check_children()
            self._check_beats(now)
            since = self.step_since
            if since is not None and time.monotonic() - since > TIMEOUT_S:
                self.fault(f"a tensor-parallel step took over {TIMEOUT_S:.0f} s (a rank hangs); the engine has stopped")

    def close(self) -> None:
        """End every rank: the stop plan, a short wait, then kill; no child outlives this call."""
        if self._closing.is_set():
            return
        self._closing.set()
        if not self.broken and self.plans is not None:
            with contextlib.suppress(Exception):  # the children are killed below either way
                self.plans.send(STOP)
        for proc in self.children.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._monitor.join()
        if self.broken and self.backend == "nccl":
            return  # a broken world's group and graphs go with the process: tearing them down can block on the GPU
        if self.runner is not None:
            self.runner.graphs.clear()  # graphs hold the communicator's kernels: drop them before it goes
        _end_group(self.backend)


def _abort_nccl() -> None:
    with contextlib.suppress(Exception):  # already broken: the abort is best effort
        dist.distributed_c10d._abort_process_group()


def _end_group(backend: str) -> None:
    if not dist.is_initialized():
        return
    if backend == "nccl":  # local and non-blocking, unlike a destroy that may wait for dead peers
        _abort_nccl()
    with contextlib.suppress(Exception):  # a group broken by a dead rank still goes away with the process
        dist.destroy_process_group()


def _devices(spec: EngineSpec, world: int) -> tuple[str, list[str]]:
    """The backend and one device per rank (`cuda:base+rank`), checked before anything starts."""
    from engine.loader import pick_device

    device = pick_device(spec.device)
    if device.type == "cpu":
        return "gloo", ["cpu"] * world
    base, count = device.index or 0, torch.cuda.device_count()
    if base + world > count:
        raise EngineError(
            f"a tensor-parallel size of {world} needs {world} GPUs from cuda:{base}; this machine has {count}",
            fields=("tp", "device"),
        )
    return "nccl", [f"cuda:{base + r}" for r in range(world)]


def launch(spec: EngineSpec, progress: Progress | None, cfg: ModelConfig, recipe: Recipe | None = None) -> Engine:
    """Rank 0's engine of a `spec.tp`-way world: the other ranks are started here (or are torchrun's).
    `recipe` builds each rank's engine (default `Engine.load`); `cfg` is the model's, to check the split early."""
    world, recipe = spec.tp, recipe or Recipe()
    shard = Shard.of(cfg, world)  # a size that does not divide the heads fails here, before any process starts
    random = spec.shape and not spec.model
    quant = (
        Quant.of(spec.quant, spec.quant_head)
        if random
        else model_quant(model_dir(spec.model), spec.quant, spec.quant_head)[0]
    )
    quant.check(cfg, shard, world)  # as does one that splits an int4 group
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return _join_torchrun(spec, progress, recipe)
    backend, devices = _devices(spec, world)
    os.environ.update(NCCL_ENV)
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # the monitor aborts; the watchdog must not
        torch.cuda.set_device(devices[0])
    store = dist.TCPStore("127.0.0.1", 0, world, True, timedelta(seconds=TIMEOUT_S), wait_for_workers=False)
    children: dict[int, subprocess.Popen] = {}
    leader: Leader | None = None
    try:
        for rank in range(1, world):
            job = Job(replace(spec, device=devices[rank]), recipe, rank, world, store.port, backend)
            children[rank] = _spawn(job)
        leader = Leader(world, backend, children)
        _wait_joined(store, leader, world)
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        plans = Plans(dist.new_group(backend="gloo", timeout=IDLE))
        engine = recipe.build(replace(spec, device=devices[0]), progress, Parallel(0, world))
    except BaseException as err:
        if leader is None:
            for proc in children.values():
                proc.kill()
            raise
        if isinstance(err, EngineError):  # rank 0's own one-line error (a bad checkpoint, no memory, ...)
            leader.fault(str(err))
            leader.close()
            raise
        message = leader.fail_from(err)
        leader.close()
        raise EngineError(message) from None
    leader.attach(engine, plans)
    return engine


def _spawn(job: Job) -> subprocess.Popen:
    """One worker process: its own session (a ^C for the app is not for it), the job on stdin, stderr piped."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **NCCL_ENV, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.tp_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,  # heartbeats
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    proc.stdin.write(pickle.dumps(job))
    proc.stdin.flush()
    return proc


def _wait_joined(store: dist.TCPStore, leader: Leader, world: int) -> None:
    """Wait until every child has reached the store, failing fast if one dies on the way."""
    keys = [f"joined/{r}" for r in range(1, world)]
    deadline = time.monotonic() + TIMEOUT_S
    while not store.check(keys):
        if leader.broken:
            raise EngineError(leader.broken)
        if time.monotonic() > deadline:
            raise EngineError(f"tensor-parallel ranks did not start within {TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _join_torchrun(spec: EngineSpec, progress: Progress | None, recipe: Recipe) -> Engine:
    """Under torchrun: rank 0 returns its engine; every other rank serves rank 0 and then ends its process."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.tp:
        raise EngineError(
            f"a tensor-parallel size of {spec.tp}, but torchrun started {world} processes", fields=("tp",)
        )
    local = int(os.environ.get("LOCAL_RANK", rank))
    from engine.loader import pick_device

    cuda = pick_device(spec.device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    os.environ.update(NCCL_ENV)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    plans = Plans(dist.new_group(backend="gloo", timeout=IDLE))
    spec = replace(spec, device=f"cuda:{local}" if cuda else "cpu")
    engine = recipe.build(spec, progress if rank == 0 else None, Parallel(rank, world))
    if rank == 0:
        Leader(world, backend, {}).attach(engine, plans)
        return engine
    serve(engine, plans)
    os._exit(0)


# ---- ranks 1..N-1 ----


def serve(engine: Engine, plans: Plans) -> None:
    """Run every plan rank 0 sends, until the stop plan."""
    model, runner, last = engine.model, engine.runner, None
    while True:
        kind, args, payload = plans.receive()
        if kind == STOP:
            return
        if kind == PREFILL:
            tokens, chunks = decode_chunks(payload, args[0])
            last = model.prefill_many(tokens.to(engine.device), chunks, bool(args[1]))
        elif kind == SAMPLE:  # the first rows of the latest prefill's logits, as in the scheduler
            rows = decode_rows(payload)
            runner.sample(last[: len(rows)], rows)
        elif kind == SEEN:
            runner.mark_seen(args[0], payload.tolist())
        elif kind == VERIFY:  # every rank accepts the same tokens: the logits and the draws agree bitwise
            runner.verify(*decode_proposals(payload, args[0]))
        elif kind in (DECODE, AGAIN):
            runner.launch(decode_rows(payload) if kind == DECODE else None)
            while len(runner.inflight) > 1:  # nobody reads a worker's tokens: keep one step in flight
                runner.collect()
        else:
            raise EngineError(f"unknown plan {kind}")


def worker_main() -> None:
    """Entry of a spawned rank (`python -m engine.tp_worker`): read the job, join, load, serve, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job: Job = pickle.load(sys.stdin.buffer)  # noqa: S301 (written by our own parent over a private pipe)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        if job.backend == "nccl":
            torch.cuda.set_device(job.spec.device)
        store = dist.TCPStore("127.0.0.1", job.port, job.world, False, timedelta(seconds=TIMEOUT_S))
        store.set(f"joined/{job.rank}", str(os.getpid()))  # from here on rank 0 waits in init without polling us
        dist.init_process_group(
            job.backend, store=store, rank=job.rank, world_size=job.world, timeout=timedelta(seconds=TIMEOUT_S)
        )
        plans = Plans(dist.new_group(backend="gloo", timeout=IDLE))
        engine = job.recipe.build(job.spec, None, Parallel(job.rank, job.world))
        threading.Thread(target=_beat, name="heartbeat", daemon=True).start()
        serve(engine, plans)
    except BaseException as err:  # one line for rank 0's error message, then out
        text = str(err).splitlines()[0] if str(err) else ""
        print(f"{type(err).__name__}: {text}"[:300], file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)  # no teardown handshakes: the process's end frees its memory and closes its sockets


def _beat() -> None:
    """Show rank 0 that this process runs: a stopped (SIGSTOP) or frozen one falls silent. From when it serves,
    since a load may hold the interpreter for long stretches."""
    while True:
        try:
            os.write(1, b".")
        except OSError:  # rank 0 is gone: _exit_with_parent ends the process
            return
        time.sleep(BEAT_S)


def _exit_with_parent() -> None:
    """Rank 0's process holds the write end of our stdin: end of file means it is gone."""
    sys.stdin.buffer.read()
    os._exit(1)
