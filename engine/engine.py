"""The engine: owns the model and the KV-cache slots, and runs the scheduler loop.

Every method runs on the worker thread (engine.local_client). `step()` admits waiting requests into free slots,
prefills one chunk of one prompt, then decodes one token for every running sequence as one batch,
and returns the events that produced.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.checkpoint import Progress, load_weights
from engine.config import DEMO_DIR, ModelConfig, model_dir
from engine.detok import IncrementalDecoder, StopStrings
from engine.errors import CheckpointError, EngineError, OutOfMemoryError, PromptError
from engine.events import (
    Event,
    Failed,
    Finished,
    FinishReason,
    ModelInfo,
    Started,
    Stats,
    TextClipped,
    TextDelta,
    TurnsDropped,
)
from engine.kernels.compile_ahead import Compiling
from engine.model import KVCache, Llama
from engine.parallel import SINGLE, Parallel, Shard
from engine.prompts import answer_room, build_prompt, fit_chat, fit_request, stop_ids
from engine.requests import EngineSpec, Request
from engine.runner import DecodeRunner, Row, compile_ahead
from engine.tokenizer import Tokenizer

PREFILL_CHUNK = 2048
_TRY = "try a smaller --max-batch, a shorter --max-seq-len, --dtype bfloat16, or more GPUs with --tp"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("--device cuda: no CUDA device is available here (use --device cpu)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise EngineError(f"unknown device '{name}'; choose cpu, cuda or auto")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EngineError(f"unknown dtype '{name}'; choose {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def column_major(model: Llama) -> None:
    """Hold each float32 projection weight `[N, K]` as the transpose of a row-major `[K, N]` buffer (same values,
    same shape): MKL's float32 matrix-vector product reads it that way about 25% faster, and a decode step at
    batch 1 on the CPU is mostly that read (demo model: ~3.1 -> ~2.4 ms of ~7 a step); prefill and batches run
    as fast as before. Not bfloat16, which MKL multiplies several times slower in this layout."""
    for p in model.parameters():
        if p.dim() == 2 and p.dtype == torch.float32 and p is not model.tok_embeddings:
            p.data = p.data.t().contiguous().t()


def flavour(path: Path, is_demo: bool) -> str:
    name = path.name.lower()
    if is_demo:
        return "demo"
    return "instruct" if "instruct" in name else "python" if "python" in name else "base"


@dataclass
class Sequence:
    request: Request
    ids: list[int]
    stops: set[int]
    decoder: IncrementalDecoder
    stop_strings: StopStrings
    seed: int
    t0: float
    slot: int = -1
    done: int = 0  # prompt tokens whose keys/values are in the slot
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    t_first: float = 0.0
    strip_leading: bool = False


class Engine:
    def __init__(
        self,
        model: Llama,
        tok: Tokenizer,
        info: ModelInfo,
        n_slots: int,
        context: int,
        device: torch.device,
        cuda_graphs: bool = True,
    ) -> None:
        """`model` has a KV cache of `n_slots + 1` slots: the last one is the decode step's scratch slot."""
        self.model, self.tok, self.info = model, tok, info
        self.context, self.device = context, device
        self.free_slots = list(range(n_slots))
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # One-shot all-reduces for decode batches of up to 64 rows (its buffers grow with rows x calls x ranks)
        rows = min(n_slots + 1, 64)
        model.par.enable_one_shot(rows * model.cfg.dim, 2 * model.cfg.n_layers + 1, model.norm.dtype, device)
        if device.type == "cpu":
            column_major(model)
        seen = torch.zeros(n_slots + 1, model.cfg.vocab_size, dtype=torch.bool, device=device)
        self.runner = DecodeRunner(model, seen, n_slots, n_slots, cuda_graphs and device.type == "cuda")
        self.inflight: list[Sequence] | None = None  # the sequences of the launched, not yet collected step
        self.tp = None  # engine.tp.Leader on rank 0 of a tensor-parallel world
        self.compiled_ahead: Compiling | None = None  # what start-up compiled ahead (`bench` reports it)

    @classmethod
    def load(cls, spec: EngineSpec, progress: Progress | None = None, par: Parallel = SINGLE) -> Engine:
        """Check the checkpoint, build the model on the device and load its weights shard by shard."""
        path = model_dir(spec.model)
        cfg = ModelConfig.from_dir(path)
        if spec.tp > 1 and par.world == 1:  # the caller's rank 0: start (or join) the other ranks first
            from engine import tp

            return tp.launch(spec, progress, cfg)
        tok = Tokenizer.from_dir(path)
        if tok.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} pieces, the model only {cfg.vocab_size}")
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        if device.type == "cpu" and os.cpu_count():  # leave a core to the UI thread: spinning threads make typing lag
            torch.set_num_threads(max(1, (os.cpu_count() - 1) // par.world))
        if spec.max_batch < 1:
            raise EngineError(f"--max-batch must be >= 1, got {spec.max_batch}")
        shard = Shard.of(cfg, par.world)
        context = par.smallest(cls._context(spec, cfg, shard, device, dtype))
        try:
            with compile_ahead(cfg, context, spec.max_batch, device, dtype, spec.cuda_graphs, par.world) as ahead:
                model = Llama.empty(cfg, context, par, device, dtype)
                load_weights(model, path, progress)
                model.setup_cache(spec.max_batch + 1, context, dtype)
        except torch.OutOfMemoryError:
            need = cfg.n_params * torch.finfo(dtype).bits // 8 / par.world / 2**30
            raise OutOfMemoryError(
                f"out of GPU memory loading {path.name} ({need:.1f} GiB of weights per GPU plus the KV cache); {_TRY}"
            ) from None
        is_demo = path == DEMO_DIR
        info = ModelInfo(
            name="CodeLlama demo" if is_demo else path.name,
            flavour=flavour(path, is_demo),
            can_infill=tok.can_infill,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            tp=par.world,
            context=context,
            vocab_size=cfg.vocab_size,
            is_demo=is_demo,
        )
        try:
            engine = cls(model, tok, info, spec.max_batch, context, device, spec.cuda_graphs)
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(
                f"out of GPU memory capturing the decode graphs for {spec.max_batch} sequences of {context} tokens; "
                + _TRY
            ) from None
        engine.compiled_ahead = ahead
        return engine

    @staticmethod
    def _context(spec: EngineSpec, cfg: ModelConfig, shard: Shard, device: torch.device, dtype: torch.dtype) -> int:
        """Tokens per sequence: what was asked, else the model's maximum, limited by memory on a GPU."""
        if spec.max_seq_len is not None:
            if spec.max_seq_len < 2:
                raise EngineError(f"--max-seq-len must be >= 2, got {spec.max_seq_len}")
            return min(spec.max_seq_len, cfg.max_position)
        if device.type != "cuda":
            return min(cfg.max_position, 4096)
        free, _ = torch.cuda.mem_get_info(device)
        weights = cfg.n_params * torch.finfo(dtype).bits // 8 // max(cfg.n_heads // shard.n_heads, 1)
        per_token = KVCache.bytes_per_token(cfg, shard, dtype) * spec.max_batch
        fit = int((free * 0.9 - weights - 2**30) // per_token)
        return max(min(cfg.max_position, fit // 256 * 256), 256)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.inflight is not None)

    def close(self) -> None:
        """Release device memory (the worker calls this when it stops)."""
        self.model.cache = None
        if self.tp is not None:
            self.tp.close()
        if self.device.type == "cuda" and (self.tp is None or not self.tp.broken):  # a broken world's GPU may hang
            torch.cuda.empty_cache()

    # ---- requests in ----

    def add(self, request: Request) -> list[Event]:
        """Validate and queue a request; bad input comes back as a Failed event, never an exception."""
        events: list[Event] = []
        try:
            request.sampling.check()
            seq = self._sequence(request, events)
        except (EngineError, ValueError) as err:
            return [Failed(request.id, str(err))]
        self.waiting.append(seq)
        events.append(Started(request.id, len(seq.ids), self.context))
        return events

    def prompt_ids(self, request: Request) -> list[int]:
        """Exactly the ids the engine feeds the model for a fresh request (what `tokenize` prints)."""
        return build_prompt(self.tok, request)

    def _sequence(self, request: Request, events: list[Event]) -> Sequence:
        ids = build_prompt(self.tok, request)
        budget = self.context - answer_room(request.sampling.max_new_tokens, self.context)
        if request.fit and len(ids) > budget:
            if request.cap == "chat":
                messages, dropped = fit_chat(self.tok, request.messages, budget)
                request = replace(request, messages=messages)
                if dropped:
                    events.append(TurnsDropped(request.id, dropped))
            else:
                request, before, after = fit_request(self.tok, request, budget)
                events.append(TextClipped(request.id, before, after))
            ids = build_prompt(self.tok, request)
        if len(ids) >= self.context:
            raise PromptError(
                f"the prompt is {len(ids)} tokens but the context holds {self.context}: "
                f"{len(ids) - self.context + 1} tokens too many"
            )
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(62)
        return Sequence(
            request=request,
            ids=ids,
            stops=stop_ids(self.tok, request.cap),
            decoder=IncrementalDecoder(self.tok),
            stop_strings=StopStrings(request.sampling.stop),
            seed=seed,
            t0=time.perf_counter(),
            strip_leading=request.cap == "chat",
        )

    def cancel(self, request_id: str) -> list[Event]:
        """End a request now; its slot is free for the next step."""
        for queue in (self.waiting, self.prefilling, self.running):
            for seq in queue:
                if seq.request.id == request_id:
                    return self._finish(seq, "cancelled")
        return []

    # ---- the scheduler ----

    @torch.inference_mode()  # no autograd bookkeeping: on the CPU that alone is ~15% of a small model's step
    def step(self) -> list[Event]:
        """Admit, prefill one chunk, decode one token per running sequence."""
        events: list[Event] = []
        try:
            self._admit()
            if self.prefilling:
                self._prefill_chunk(self.prefilling[0], events)
            if self.running or self.inflight is not None:
                self._decode(events)
        except Exception as err:  # a failed step must not take the worker down
            events.extend(self._fail_all(err))
        return events

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            if not self.free_slots:
                return
            seq.slot = self.free_slots[-1]
            self.runner.mark_seen(seq.slot, seq.ids)  # may fail (a dead tensor-parallel rank): still queued, it fails
            self.free_slots.pop()
            self.waiting.popleft()
            self.prefilling.append(seq)

    def _prefill_chunk(self, seq: Sequence, events: list[Event]) -> None:
        end = min(seq.done + PREFILL_CHUNK, len(seq.ids))
        tokens = torch.tensor(seq.ids[seq.done : end], device=self.device)
        logits = self.model.prefill(tokens, seq.slot, seq.done)
        seq.done = end
        if end == len(seq.ids):
            self.prefilling.popleft()
            self.running.append(seq)
            (token,) = self._sample(logits[None], [seq])
            seq.t_first = time.perf_counter()
            self._accept(seq, token, events)

    def _decode(self, events: list[Event]) -> None:
        """One decode step, pipelined: while the batch stays the same, the next step is launched from the
        device's own outputs before this step's tokens are read, so the host's work (detokenizing, stops,
        events) overlaps the GPU's. A token computed for a sequence that has meanwhile ended is dropped."""
        batch = list(self.running)
        done = self.inflight
        if done is None:
            self.runner.launch([self._row(s, s.generated[-1]) for s in batch])
            self.inflight = batch
            return
        same = done == batch
        if same:
            self.runner.launch()
        self.inflight = batch if same else None
        for seq, token in zip(done, self.runner.collect(), strict=True):
            if seq in self.running:
                self._accept(seq, token, events)
        if self.inflight is None and self.running:
            self.runner.launch([self._row(s, s.generated[-1]) for s in self.running])
            self.inflight = list(self.running)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        return self.runner.sample(logits, [self._row(s, 0) for s in seqs])

    @staticmethod
    def _row(seq: Sequence, token: int) -> Row:
        p = seq.request.sampling
        position = len(seq.ids) + len(seq.generated) - 1
        return Row(
            token,
            position,
            seq.slot,
            p.temperature,
            p.top_k,
            p.top_p,
            p.repetition_penalty,
            seq.seed,
            len(seq.generated),
        )

    def _accept(self, seq: Sequence, token: int, events: list[Event]) -> None:
        """Take one sampled token: stream its text, and finish the sequence if a stop condition holds."""
        seq.generated.append(token)
        if token in seq.stops:
            events.extend(self._finish(seq, "eot" if token == self.tok.eot_id else "eos"))
            return
        text, hit = seq.stop_strings.feed(seq.decoder.push(token))
        self._emit(seq, text, events)
        if hit:
            events.extend(self._finish(seq, "stop"))
        elif len(seq.generated) >= seq.request.sampling.max_new_tokens:
            events.extend(self._finish(seq, "length"))
        elif len(seq.ids) + len(seq.generated) >= self.context:
            events.extend(self._finish(seq, "context"))

    def _emit(self, seq: Sequence, text: str, events: list[Event]) -> None:
        if seq.strip_leading:
            text = text.lstrip()
            seq.strip_leading = not text
        if text:
            seq.text.append(text)
            events.append(TextDelta(seq.request.id, text))

    def _finish(self, seq: Sequence, reason: FinishReason) -> list[Event]:
        events: list[Event] = []
        if reason not in ("stop", "cancelled"):
            self._emit(seq, seq.stop_strings.feed(seq.decoder.flush())[0] + seq.stop_strings.flush(), events)
        for queue in (self.waiting, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        text = "".join(seq.text)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
        now = time.perf_counter()
        ttft = (seq.t_first or now) - seq.t0
        stats = Stats(len(seq.ids), len(seq.generated), ttft, now - seq.t0)
        events.append(Finished(seq.request.id, reason, text, stats))
        return events

    def _fail_all(self, err: Exception) -> list[Event]:
        """After a failed step nothing in the cache can be trusted: end every request and forget caches."""
        if isinstance(err, torch.OutOfMemoryError):
            message = "out of GPU memory during generation; try a shorter prompt, a smaller --max-batch or --tp"
        elif isinstance(err, EngineError):
            message = str(err)
        else:
            message = f"generation failed: {type(err).__name__}: {err}"
        events: list[Event] = []
        for seq in [*self.waiting, *self.prefilling, *self.running]:
            self._finish(seq, "cancelled")
            events.append(Failed(seq.request.id, message))
        self.inflight = None
        self.runner.inflight.clear()
        return events
