"""Find, check and load a Hugging Face Llama checkpoint straight into the model's final dtype and device.

Tensors are read one at a time from each shard file (safetensors through `get_slice`, so a tensor-parallel
rank reads only its own part; `.bin` files memory-mapped as a fallback) and copied into the preallocated,
fused parameters: no second copy of the model is ever materialised.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.errors import CheckpointError
from engine.model import Llama

Progress = Callable[[float, str], None]

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HARMLESS = ("rotary_emb.inv_freq",)  # buffers older transformers saved: recomputed, never loaded


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: sharded or single safetensors first, `.bin` as a fallback."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(f"{index}: broken index ({err})") from None
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{path}: missing weight file(s) {', '.join(missing)} listed in {index_name}")
            return [path / n for n in names]
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not found:
        raise CheckpointError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    return found


def _check_safetensors(file: Path) -> dict:
    """Read the header and check the file holds every byte it promises (catches truncated downloads)."""
    try:
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    size = file.stat().st_size
    if size < 8 + n + end:
        raise CheckpointError(f"{file}: truncated ({size} bytes, needs {8 + n + end}); download it again")
    return header


class _Placement:
    """Where one Hugging Face tensor goes: a parameter, the rows/columns of it, and the slice of the source."""

    def __init__(self, model: Llama) -> None:
        self.model, cfg, s, r = model, model.cfg, model.shard, model.par.rank
        hd = cfg.head_dim
        q_rows, kv_rows = s.n_heads * hd, s.n_kv_heads * hd
        self.layer_rules: dict[str, tuple[str, int, int, int, int]] = {
            # name: (param, dim along which this rank's part lies, dest offset, size, source offset)
            "self_attn.q_proj.weight": ("attention.wqkv", 0, 0, q_rows, r * q_rows),
            "self_attn.k_proj.weight": ("attention.wqkv", 0, q_rows, kv_rows, r * kv_rows),
            "self_attn.v_proj.weight": ("attention.wqkv", 0, q_rows + kv_rows, kv_rows, r * kv_rows),
            "self_attn.o_proj.weight": ("attention.wo", 1, 0, q_rows, r * q_rows),
            "mlp.gate_proj.weight": ("feed_forward.w13", 0, 0, s.intermediate, r * s.intermediate),
            "mlp.up_proj.weight": ("feed_forward.w13", 0, s.intermediate, s.intermediate, r * s.intermediate),
            "mlp.down_proj.weight": ("feed_forward.w2", 1, 0, s.intermediate, r * s.intermediate),
            "input_layernorm.weight": ("attention_norm", -1, 0, cfg.dim, 0),
            "post_attention_layernorm.weight": ("ffn_norm", -1, 0, cfg.dim, 0),
        }
        vocab_rows = min(s.vocab, max(cfg.vocab_size - r * s.vocab, 0))
        self.top_rules = {
            "model.embed_tokens.weight": ("tok_embeddings", 0, 0, vocab_rows, r * s.vocab),
            "lm_head.weight": ("output", 0, 0, vocab_rows, r * s.vocab),
            "model.norm.weight": ("norm", -1, 0, cfg.dim, 0),
        }
        q, kv, ff, d = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.intermediate, cfg.dim
        self.shapes = {  # the whole tensor, as config.json implies it (each rank reads a slice of it)
            "self_attn.q_proj.weight": (q, d),
            **dict.fromkeys(("self_attn.k_proj.weight", "self_attn.v_proj.weight"), (kv, d)),
            "self_attn.o_proj.weight": (d, q),
            **dict.fromkeys(("mlp.gate_proj.weight", "mlp.up_proj.weight"), (ff, d)),
            "mlp.down_proj.weight": (d, ff),
            **dict.fromkeys(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight"), (d,)),
            **dict.fromkeys(("model.embed_tokens.weight", "lm_head.weight"), (cfg.vocab_size, d)),
        }

    def expected(self) -> set[str]:
        names = set(self.top_rules)
        if self.model.cfg.tie_embeddings:
            names.discard("lm_head.weight")
        for i in range(self.model.cfg.n_layers):
            names |= {f"model.layers.{i}.{k}" for k in self.layer_rules}
        return names

    def check(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why tensor `name` of `shape` does not belong in the model config.json describes; None when it does."""
        m = _LAYER.fullmatch(name)
        if self.find(name) is None:
            if name.endswith(_HARMLESS):
                return None
            if m and int(m.group(1)) >= self.model.cfg.n_layers:
                return f"{name}: config.json declares only {self.model.cfg.n_layers} layers (num_hidden_layers)"
            return f"unexpected tensor {name}: not a weight of the Llama model config.json describes"
        want = self.shapes[m.group(2) if m else name]
        if shape != want:
            return f"{name} has shape {shape}, config.json implies {want}"
        return None

    def find(self, name: str) -> tuple[torch.Tensor, int, int, int, int] | None:
        if name in self.top_rules:
            param, *rest = self.top_rules[name]
            return (getattr(self.model, param), *rest)
        m = _LAYER.fullmatch(name)
        if m and m.group(2) in self.layer_rules and int(m.group(1)) < self.model.cfg.n_layers:
            param, *rest = self.layer_rules[m.group(2)]
            return (self.model.layers[int(m.group(1))].get_parameter(param), *rest)
        return None


def _tensors(file: Path) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """Yield (name, whole shape, read(dim, start, size)) for the tensors of one file; read returns only the slice."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        _check_safetensors(file)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)

                def read(dim: int, start: int, size: int, sl=sl) -> torch.Tensor:
                    if dim == 0:
                        return sl[start : start + size]
                    if dim == 1:
                        return sl[:, start : start + size]
                    return sl[:]

                yield name, tuple(sl.get_shape()), read
    else:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from None
        for name, tensor in state.items():
            read = lambda dim, start, size, t=tensor: t.narrow(dim, start, size) if dim >= 0 else t
            yield name, tuple(tensor.shape), read


def load_weights(model: Llama, path: Path, progress: Progress | None = None) -> None:
    """Fill every parameter of `model` (already on its device and dtype) from the checkpoint at `path`."""
    files = weight_files(path)
    place = _Placement(model)
    expected = place.expected()
    loaded: set[str] = set()
    total = sum(f.stat().st_size for f in files)
    done = 0
    for file in files:
        try:
            for name, shape, read in _tensors(file):
                if (wrong := place.check(name, shape)) is not None:
                    raise CheckpointError(f"{file.name}: {wrong}")
                if (found := place.find(name)) is None:  # a harmless extra
                    continue
                param, dim, dest, size, src = found
                part = read(dim, src, size)
                (param if dim < 0 else param.narrow(dim, dest, size)).copy_(part)
                loaded.add(name)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from None
        done += file.stat().st_size
        if progress:
            progress(done / total, f"loaded {file.name}")
    missing = sorted(expected - loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing weights {', '.join(missing[:3])}{more}")
    if model.shard.vocab * model.par.world > model.cfg.vocab_size:  # padding rows of the last vocabulary shard
        pad_from = max(model.cfg.vocab_size - model.par.rank * model.shard.vocab, 0)
        model.tok_embeddings[pad_from:].zero_()
        model.output[pad_from:].zero_()
