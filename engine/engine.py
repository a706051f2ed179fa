"""The engine: a model on its device, its KV slots and the scheduler that fills them; everything here runs on the
worker thread (engine.local_client).

Loading is `engine.loader`, one request's state `engine.sequence`, the loop `engine.scheduler`, and which slot a
request takes (so how much of its prompt is already there) `engine.prefix_cache`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine import loader
from engine.checkpoint import Progress
from engine.config import DEMO_DIR, ModelConfig, model_dir, shape_config
from engine.errors import EngineError, OutOfMemoryError
from engine.events import Event, Failed, ModelInfo, Started
from engine.kernels.compile_ahead import Compiling
from engine.model import Llama
from engine.parallel import SINGLE, Parallel
from engine.prompts import build_prompt
from engine.requests import EngineSpec, Request
from engine.runner import DecodeRunner
from engine.scheduler import Scheduler
from engine.sequence import admit
from engine.tokenizer import Tokenizer

RANDOM_CONTEXT = 4096  # tokens per sequence of a random-weight engine that names none


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
        speculate: int = 0,
    ) -> None:
        """`model` has a KV cache of `n_slots + 1` slots: the last one is the decode step's scratch slot.
        `speculate`: the most tokens a request may propose per step (`EngineSpec.speculate`)."""
        self.tok, self.info, self.context, self.device = tok, info, context, device
        # One-shot all-reduces for decode batches of up to 64 rows (its buffers grow with rows x calls x ranks)
        rows = min(n_slots + 1, 64)
        model.par.enable_one_shot(rows * model.cfg.dim, 2 * model.cfg.n_layers + 1, model.norm.dtype, device)
        if device.type == "cpu":
            loader.column_major(model)
        seen = torch.zeros(n_slots + 1, model.cfg.vocab_size, dtype=torch.bool, device=device)
        runner = DecodeRunner(model, seen, n_slots, n_slots, cuda_graphs and device.type == "cuda", speculate)
        self.scheduler = Scheduler(model, runner, tok, n_slots, context, device, speculate)
        self.tp = None  # engine.tp.Leader on rank 0 of a tensor-parallel world
        self.compiled_ahead: Compiling | None = None  # what start-up compiled ahead (`bench` reports it)

    @classmethod
    def load(cls, spec: EngineSpec, progress: Progress | None = None, par: Parallel = SINGLE) -> Engine:
        """The engine of `spec`: with `spec.tp > 1` (called as the caller's rank 0), the other ranks start first."""
        if spec.tp > 1 and par.world == 1:
            from engine import tp

            random = spec.shape and not spec.model
            return tp.launch(
                spec, progress, shape_config(spec.shape) if random else ModelConfig.from_dir(model_dir(spec.model))
            )
        if spec.shape and not spec.model:
            from engine.bench import random_rank

            spec = replace(spec, max_seq_len=spec.max_seq_len or RANDOM_CONTEXT)
            engine = random_rank(spec, progress, par, spec.shape, spec.tokenizer or str(DEMO_DIR))
            engine.info = replace(engine.info, name=f"CodeLlama-{spec.shape} shape, random weights")
            return engine
        parts = loader.load(spec, progress, par)
        try:
            engine = cls(
                parts.model, parts.tok, parts.info, spec.max_batch, parts.context, parts.device, spec.cuda_graphs,
                spec.speculate,
            )  # fmt: skip
        except torch.OutOfMemoryError:
            less = ", or less speculation (its verify steps' graphs)" if spec.speculate else ""
            raise OutOfMemoryError(
                f"out of GPU memory capturing the decode graphs for {spec.max_batch} sequences of {parts.context} "
                f"tokens; {loader.TRY}{less}",
                fields=OutOfMemoryError.FIELDS + (("speculate",) if spec.speculate else ()),
            ) from None
        engine.compiled_ahead = parts.compiled_ahead
        return engine

    @property
    def model(self) -> Llama:
        return self.scheduler.model

    @property
    def runner(self) -> DecodeRunner:
        return self.scheduler.runner

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def add(self, request: Request) -> list[Event]:
        """Validate and queue a request; bad input comes back as a Failed event, never an exception.
        Characters the tokenizer cannot encode are replaced (Started says how many)."""
        events: list[Event] = []
        request, replaced = request.cleaned()
        try:
            seq = admit(self.tok, request, self.context, events)
        except (EngineError, ValueError) as err:
            return [Failed(request.id, str(err))]
        self.scheduler.add(seq)
        events.append(Started(request.id, len(seq.ids), self.context, replaced))
        return events

    def cancel(self, request_id: str) -> list[Event]:
        """End a request now; its slot is free for the next step."""
        return self.scheduler.cancel(request_id)

    @torch.inference_mode()  # no autograd bookkeeping: on the CPU that alone is a good part of a small model's step
    def step(self) -> list[Event]:
        return self.scheduler.step()

    def prompt_ids(self, request: Request) -> list[int]:
        """Exactly the ids the engine feeds the model for a fresh request (what `tokenize` prints)."""
        return build_prompt(self.tok, request)

    def close(self) -> None:
        """Release device memory (the worker calls this when it stops)."""
        self.model.cache = None
        if self.tp is not None:
            self.tp.close()
        if self.device.type == "cuda" and (self.tp is None or not self.tp.broken):  # a broken world's GPU may hang
            torch.cuda.empty_cache()
