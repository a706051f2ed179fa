"""Building an engine's parts from an `EngineSpec`: the device and dtype, the context each sequence gets, the
model with its weights and KV cache, and what front ends are told about it (`ModelInfo`).

Error messages name the spec's settings in words, never command-line options: a server's caller reads them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import Progress, load_weights
from engine.config import DEMO_DIR, ModelConfig, model_dir
from engine.errors import CheckpointError, EngineError, OutOfMemoryError
from engine.events import ModelInfo
from engine.kernels.compile_ahead import Compiling
from engine.model import KVCache, Llama
from engine.parallel import Parallel, Shard
from engine.prequant import model_quant
from engine.requests import KV, MAX_SPECULATE, EngineSpec
from engine.runner import compile_ahead
from engine.tokenizer import Tokenizer
from engine.weights import Dense

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRY = "try fewer concurrent sequences, a shorter context, bfloat16 weights or more GPUs (tensor parallelism)"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device cuda: no CUDA device is available here (use the CPU)", fields=("device",))
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise EngineError(f"unknown device '{name}'; choose cpu, cuda or auto", fields=("device",))
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EngineError(f"unknown dtype '{name}'; choose {', '.join(DTYPES)} or auto", fields=("dtype",))
    return DTYPES[name]


def column_major(model: Llama) -> None:
    """Every dense projection in the layout MKL reads fastest (`Dense.column_major`); prefill and batches run as
    fast as before."""
    for w in model.weights():
        if isinstance(w, Dense):
            w.column_major()


def flavour(path: Path, is_demo: bool) -> str:
    name = path.name.lower()
    if is_demo:
        return "demo"
    return "instruct" if "instruct" in name else "python" if "python" in name else "base"


@dataclass
class Loaded:
    """A model on its device with its weights and a KV cache of `spec.max_batch + 1` slots (the last one is the
    decode step's scratch slot), and what goes with it."""

    model: Llama
    tok: Tokenizer
    info: ModelInfo
    context: int
    device: torch.device
    compiled_ahead: Compiling | None


def load(spec: EngineSpec, progress: Progress | None, par: Parallel) -> Loaded:
    """Check the checkpoint, build the model on the device and load its weights shard by shard."""
    path = model_dir(spec.model)
    cfg = ModelConfig.from_dir(path)
    quant, scheme = model_quant(path, spec.quant, spec.quant_head)
    tok = Tokenizer.from_dir(path)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} pieces, the model only {cfg.vocab_size}")
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    if device.type == "cpu" and os.cpu_count():  # leave a core to the UI thread: spinning threads make typing lag
        torch.set_num_threads(max(1, (os.cpu_count() - 1) // par.world))
    if spec.max_batch < 1:
        raise EngineError(f"the batch (concurrent sequences) must be >= 1, got {spec.max_batch}", fields=("max_batch",))
    if spec.kv not in KV:
        raise EngineError(f"unknown KV cache '{spec.kv}'; choose {' or '.join(KV)}", fields=("kv",))
    if not 0 <= spec.speculate <= MAX_SPECULATE:
        raise EngineError(
            f"speculation proposes 0 (off) to {MAX_SPECULATE} tokens per step, not {spec.speculate}",
            fields=("speculate",),
        )
    shard = Shard.of(cfg, par.world)
    quant.check(cfg, shard, par.world)
    weight_bytes = Llama.empty(cfg, 1, par, torch.device("meta"), dtype, quant).nbytes()
    context = par.smallest(context_for(spec, cfg, shard, device, dtype, weight_bytes))
    try:
        with compile_ahead(
            cfg, context, spec.max_batch, device, dtype, spec.cuda_graphs, par.world, quant, spec.speculate, spec.kv
        ) as ahead:
            model = Llama.empty(cfg, context, par, device, dtype, quant)
            load_weights(model, path, progress)
            model.setup_cache(spec.max_batch + 1, context, dtype, spec.kv)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            f"out of GPU memory loading {path.name} ({weight_bytes / 2**30:.1f} GiB of weights per GPU plus the KV "
            f"cache); {TRY}" + (", or int4 weights" if quant.layers != "int4" else ""),
            fields=OutOfMemoryError.FIELDS,
        ) from None
    is_demo = path == DEMO_DIR
    info = ModelInfo(
        name="CodeLlama demo" if is_demo else path.name,
        flavour=flavour(path, is_demo),
        can_infill=tok.can_infill,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        quant=scheme.name if scheme else spec.quant,
        kv=spec.kv if spec.kv != "bf16" else None,
        tp=par.world,
        context=context,
        vocab_size=cfg.vocab_size,
        is_demo=is_demo,
    )
    return Loaded(model, tok, info, context, device, ahead)


def context_for(
    spec: EngineSpec, cfg: ModelConfig, shard: Shard, device: torch.device, dtype: torch.dtype, weights: int
) -> int:
    """Tokens per sequence: what was asked, else the model's maximum, limited by memory on a GPU next to the
    `weights` bytes this rank holds (an int8 KV cache fits about twice the tokens of a bf16 one)."""
    if spec.max_seq_len is not None:
        if spec.max_seq_len < 2:
            raise EngineError(f"the context must be >= 2 tokens, got {spec.max_seq_len}", fields=("max_seq_len",))
        return min(spec.max_seq_len, cfg.max_position)
    if device.type != "cuda":
        return min(cfg.max_position, 4096)
    free, _ = torch.cuda.mem_get_info(device)
    per_token = KVCache.bytes_per_token(cfg, shard, dtype, spec.kv) * spec.max_batch
    fit = int((free * 0.9 - weights - 2**30) // per_token)
    return max(min(cfg.max_position, fit // 256 * 256), 256)
