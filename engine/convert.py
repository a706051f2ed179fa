"""`codellama-tui convert MODEL --out DIR`: a checkpoint's weights quantized once, into a workspace every command
loads directly (engine.prequant reads it: no quantizing at start-up, and a quarter of the bytes to read for int4).

The workspace is a Hugging Face directory: config.json with a `quantization_config` that says how (`quant_method`
"codellama-tui", `format`, `method` "rtn" or "gptq", the calibration), the tokenizer files, and safetensors shards
holding every projection under its own name in engine.weights' layout (`model.layers.0.self_attn.q_proj.qweight`,
`.scales`, `.zeros` for int4; `.q`, `.scale` for int8), the rest as it was. int4 with calibration files is GPTQ
(engine.gptq: act order, static groups of 128) on their text, layer by layer (each layer's Hessians from the inputs
the layers before it, already quantized, give it); without, round to nearest.

Atomic: everything is written into a hidden folder beside DIR and renamed to DIR at the end, so a half-written
workspace never carries DIR's name; an existing DIR is replaced only with `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from engine import gptq, quant
from engine.checkpoint import Placement, load_weights
from engine.config import ModelConfig, model_dir
from engine.errors import CheckpointError, EngineError
from engine.kernels import rms_norm
from engine.loader import pick_device, pick_dtype
from engine.model import Chunk, Llama
from engine.parallel import SINGLE, Shard
from engine.prequant import WORKSPACE, part_of, scheme_of
from engine.tokenizer import Tokenizer
from engine.weights import FORMATS, Quant, Weight

SHARD_BYTES = 4 * 2**30
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")  # fmt: skip
CALIB_WINDOW = 512  # tokens per calibration window (the model's context, if shorter)
CALIB_WINDOWS = 128  # at most, the first ones of the files' text


def calibration_windows(tok: Tokenizer, files: list[Path], window: int, most: int = CALIB_WINDOWS) -> list[Tensor]:
    """The calibration files' text as token windows of `window` ids (each file's starting with BOS)."""
    ids: list[int] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise EngineError(f"--calib {file}: cannot be read ({err.strerror or err})") from None
        ids += tok.encode(text, bos=True)
        if len(ids) >= window * most:
            break
    windows = [torch.tensor(ids[i : i + window]) for i in range(0, len(ids) - window + 1, window)][:most]
    if not windows:
        raise EngineError(f"--calib: {len(ids)} tokens of text, fewer than one window of {window}; give more files")
    return windows


class _Recorder:
    """Adds each projection's inputs to its Hessian while a layer runs (prefill calls `weight.linear` on the CPU and
    for the dense weights on the GPU)."""

    def __init__(self, weights: list[Weight]) -> None:
        self.weights = weights
        self.hessians = {id(w): gptq.Hessian(w.k, w.dense().device) for w in weights}

    def __enter__(self) -> _Recorder:
        for w in self.weights:
            plain = w.linear

            def linear(x: Tensor, w: Weight = w, plain=plain) -> Tensor:
                self.hessians[id(w)].add(x)
                return plain(x)

            w.linear = linear  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.weights:
            del w.linear


def _run_layer(model: Llama, i: int, states: list[Tensor]) -> list[Tensor]:
    """Layer `i` on each window's hidden states (prefill, as `Llama.prefill` runs it)."""
    block, out = model.layers[i], []
    for h in states:
        batch = model.prefill_batch([Chunk(0, 0, h.shape[0])], h.dtype)
        h = h + block.attention.prefill(rms_norm(h, block.attention_norm, block.eps), i, model.cache, batch)
        out.append(h + block.feed_forward(rms_norm(h, block.ffn_norm, block.eps)))
    return out


def _quantized_layers(model: Llama, fmt: str, windows: list[Tensor] | None) -> Iterator[dict[Weight, dict]]:
    """Per layer, each of its four fused weights' tensors in `fmt`'s layout: by GPTQ on `windows` (then the
    layer's dense weights are replaced by their quantized values, for the layers after it), else round to
    nearest."""
    states = [model.embed(ids.to(model.norm.device)) for ids in windows] if windows else []
    for i, block in enumerate(model.layers):
        weights = [block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2]
        if not windows:
            quantized = {w: FORMATS[fmt].from_dense(w.dense()) for w in weights}
            yield {w: {name: getattr(q, name) for name in q.LAYOUT} for w, q in quantized.items()}
            continue
        with _Recorder(weights) as recorder:
            _run_layer(model, i, states)
        stored = {}
        for w in weights:
            qweight, scales, zeros = gptq.quantize(w.dense(), recorder.hessians[id(w)].sum)
            stored[w] = {"qweight": qweight, "scales": scales, "zeros": zeros}
            w.weight.copy_(quant.dequantize_int4(qweight, scales, zeros, w.dtype))
        states = _run_layer(model, i, states)
        yield stored


class _Shards:
    """Safetensors files of at most SHARD_BYTES, and the index that maps each tensor to its file."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.pending, self.size, self.where = folder, {}, 0, {}
        self.files: list[str] = []

    def add(self, name: str, t: Tensor) -> None:
        self.pending[name] = t.detach().to("cpu").contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.where.update(dict.fromkeys(self.pending, name))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        index = {"metadata": {}, "weight_map": dict(sorted(self.where.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert(
    model: str,
    out: Path,
    fmt: str = "int4",
    calib: list[Path] | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write the workspace (module docstring) of the checkpoint `model` into `out`; its quantization_config."""
    path = model_dir(model)
    cfg = ModelConfig.from_dir(path)
    if fmt not in ("int8", "int4"):
        raise EngineError(f"convert --quant {fmt}: choose int8 or int4")
    already = scheme_of(path)
    if already:
        raise CheckpointError(f"{path}: already quantized ({already.name}); convert takes an unquantized checkpoint")
    if calib and fmt != "int4":
        raise EngineError("--calib calibrates GPTQ, which convert runs for --quant int4")
    out = out.expanduser()
    if out.exists() and not force:
        raise EngineError(f"{out} exists; pass --force to replace it")
    Quant(fmt).check(cfg, Shard.of(cfg, 1), 1)
    dev = pick_device(device)
    dtype = pick_dtype("auto", dev)
    tok = Tokenizer.from_dir(path)
    window = min(CALIB_WINDOW, cfg.max_position)
    windows = calibration_windows(tok, calib, window) if calib else None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        llama = Llama.empty(cfg, window, SINGLE, dev, dtype)
        load_weights(llama, path)
        llama.setup_cache(1, window, dtype)
        config = _write(llama, path, work, fmt, windows, progress)
        config["quantization_config"]["calibration"] = (
            {"files": [str(f) for f in calib], "windows": len(windows), "window": window} if calib else None
        )
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: a whole workspace has it
        for f in (work, *work.iterdir()):  # a folder as any other (mkdtemp makes it private)
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return config["quantization_config"]


def _write(model: Llama, path: Path, work: Path, fmt: str, windows: list[Tensor] | None, progress: bool) -> dict:
    """Every tensor into `work`'s shards, the tokenizer files beside them; the config to write."""
    from tqdm import tqdm

    config = json.loads((path / "config.json").read_text())
    keep = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), torch.bfloat16)
    keep = keep if isinstance(keep, torch.dtype) and keep.is_floating_point else torch.bfloat16
    shards = _Shards(work)
    rules = Placement(model).layer_rules
    method = "gptq" if windows else "rtn"
    bar = tqdm(total=model.cfg.n_layers, desc=f"convert ({fmt} {method})", unit="layer", disable=not progress)
    for i, stored in enumerate(_quantized_layers(model, fmt, windows)):
        block = model.layers[i]
        for name, (target, dim, dest, size, _) in rules.items():
            prefix = f"model.layers.{i}.{name.removesuffix('.weight')}"
            owner, attr = target.split(".") if "." in target else (None, target)
            if owner is None:
                shards.add(f"model.layers.{i}.{name}", getattr(block, attr).to(keep))
                continue
            weight = getattr(getattr(block, owner), attr)
            for part, t in stored[weight].items():
                layout = FORMATS[fmt].LAYOUT[part]
                shards.add(f"{prefix}.{part}", part_of(t, layout, 0, dest, size) if dim == 0 else t)
        bar.update()
    bar.close()
    shards.add("model.embed_tokens.weight", model.tok_embeddings[: model.cfg.vocab_size].to(keep))
    shards.add("model.norm.weight", model.norm.to(keep))
    if not model.cfg.tie_embeddings:
        shards.add("lm_head.weight", model.output.dense()[: model.cfg.vocab_size].to(keep))
    shards.close()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, work / name)
    config["torch_dtype"] = str(keep).removeprefix("torch.")
    config["quantization_config"] = {"quant_method": WORKSPACE, "format": fmt, "method": method}
    if fmt == "int4":
        config["quantization_config"] |= {"group_size": quant.GROUP, "act_order": bool(windows)}
    return config


def _replace(work: Path, out: Path) -> None:
    """`work` becomes `out` by renames only; an `out` that was there is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
