"""Pre-quantized checkpoints: GPTQ (4 bits, group 128 or -1, act-order or not, `sym` or not) and AWQ (GEMM, group
128, zero points) as the Hub holds them, and `convert`'s workspace (engine.weights' own layouts, `WORKSPACE`).

`scheme_of` reads and checks a checkpoint's quantization config (one line for what we do not take); `Repacker`
turns each projection's tensors into this rank's part of its weight object at load (engine.checkpoint drives it).

Act-order GPTQ (`desc_act`) stores the inputs in their own order and gives each its group in `g_idx`; our int4
needs groups of 128 consecutive inputs, so the columns are sorted by group:
- the down projection's order is folded into the gate and up rows (the order of the intermediate is free: SwiGLU is
  elementwise), so it costs nothing and tensor parallelism splits it in whole groups;
- QKV, gate/up (one order for each fused weight: its projections share their input, so GPTQ sorts them alike) and
  the attention output keep theirs (`Weight.perm`: x is gathered into it); the attention output under `--tp` only
  where each GPU's columns stay its own.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine import quant
from engine.errors import CheckpointError, EngineError
from engine.weights import FORMATS, Quant, Weight

if TYPE_CHECKING:
    from engine.checkpoint import Placement
    from engine.model import Llama

WORKSPACE = "codellama-tui"  # `quant_method` of `convert`'s workspaces
TAKEN = "4-bit GPTQ (group 128 or -1) and AWQ GEMM (group 128, zero points)"

_PROJECTION = re.compile(r"model\.layers\.(\d+)\.((?:self_attn\.[qkvo]|mlp\.(?:gate|up|down))_proj)\.(\w+)")
_HUB_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx", "bias"), "awq": ("qweight", "qzeros", "scales", "bias")}


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's projections are quantized: `method` "gptq", "awq" or WORKSPACE (then `layers` is our
    format), `group` inputs per group (-1: one per row), and GPTQ's `zero_offset` and `desc_act`."""

    method: str
    group: int = quant.GROUP
    zero_offset: int = 0
    desc_act: bool = False
    layers: str = "int4"

    @property
    def quant(self) -> Quant:
        return Quant(self.layers)

    @property
    def name(self) -> str:
        """How messages and reports name it: "gptq", "awq", "int4 (converted)"."""
        return f"{self.layers} (converted)" if self.method == WORKSPACE else self.method

    def parts(self) -> tuple[str, ...]:
        """The tensor names (after the projection's) this scheme stores."""
        if self.method == WORKSPACE:
            return tuple(FORMATS[self.layers].LAYOUT)
        return _HUB_PARTS[self.method]


def _config(path: Path) -> dict | None:
    """The checkpoint's quantization config: config.json's `quantization_config`, else AutoGPTQ's
    quantize_config.json, else AutoAWQ's quant_config.json."""
    try:
        raw = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        raw = None
    if isinstance(raw, dict):
        return raw
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        file = path / name
        if file.is_file():
            try:
                raw = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{file}: not valid JSON ({err})") from None
            return {"quant_method": method, **raw} if isinstance(raw, dict) else None
    return None


def scheme_of(path: Path) -> Scheme | None:
    """The checkpoint's quantization (None: not quantized); a CheckpointError naming what it has and what we take
    where we cannot run it."""
    raw = _config(path)
    if raw is None:
        return None
    method = str(raw.get("quant_method") or "unknown").lower()

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; we take {TAKEN}")

    if method == WORKSPACE:
        layers = raw.get("format")
        if layers not in ("int8", "int4"):
            raise CheckpointError(f"{path}: a converted workspace of format '{layers}'; we take int8 or int4")
        return Scheme(WORKSPACE, layers=layers)
    if method not in ("gptq", "awq"):
        raise refuse(f"quantized as '{method}'")
    bits = raw.get("bits", raw.get("w_bit"))
    group = raw.get("group_size", raw.get("q_group_size"))
    if bits != 4:
        raise refuse(f"{method.upper()} with {bits} bits")
    if method == "awq":
        version = str(raw.get("version") or "gemm").lower()
        if version != "gemm":
            raise refuse(f"AWQ version '{version}'")
        if group != quant.GROUP:
            raise refuse(f"AWQ with group size {group}")
        if not raw.get("zero_point", True):
            raise refuse("AWQ without zero points")
        return Scheme("awq")
    layout = "marlin" if raw.get("is_marlin_format") else str(raw.get("checkpoint_format") or "gptq").lower()
    if layout not in ("gptq", "gptq_v2"):
        raise refuse(f"GPTQ in the '{layout}' layout")
    if group not in (quant.GROUP, -1):
        raise refuse(f"GPTQ with group size {group}")
    if raw.get("lm_head"):
        raise refuse("GPTQ with a quantized LM head")
    return Scheme("gptq", group, 1 if layout == "gptq" else 0, bool(raw.get("desc_act")))


def model_quant(path: Path, name: str | None, head: bool) -> tuple[Quant, Scheme | None]:
    """The weight types for the checkpoint at `path` quantized at load to `name` (`head`: the LM head too), and its
    scheme when it is already quantized (then quantizing at load is one line)."""
    scheme = scheme_of(path)
    if scheme is None:
        return Quant.of(name, head), None
    if name or head:
        again = f"quantized again to {name}" if name else "its LM head quantized"
        raise CheckpointError(
            f"{path}: already quantized ({scheme.name}); it loads as it is, not {again}",
            fields=("quant",) if name else ("quant_head",),
        )
    return scheme.quant, scheme


def part_of(t: Tensor, layout: tuple[int, int | None, int], dim: int, src: int, size: int) -> Tensor:
    """This rank's part of a stored tensor in one of our layouts: rows `src ..` (dim 0) or inputs `src ..` (dim 1)."""
    rows, inputs, per = layout
    if dim == 0:
        return t.narrow(rows, src, size)
    if dim == 1 and inputs is not None:
        return t.narrow(inputs, src // per, size // per)
    return t


class Repacker:
    """Collects each quantized projection's tensors as they are read and, once they are all there, fills this rank's
    part of its weight (`add`, then `flush` after every file)."""

    def __init__(self, model: Llama, place: Placement, scheme: Scheme) -> None:
        """`place`: engine.checkpoint's Placement of `model` (where each projection goes, and its whole shape)."""
        self.model, self.rules, self.shapes, self.scheme = model, place.layer_rules, place.shapes, scheme
        self.pending: dict[tuple[int, str], dict[str, Tensor]] = {}
        self.down_order: dict[int, Tensor | None] = {}  # a layer's down projection's input order, once loaded
        self.perms: dict[int, Tensor | None] = {}  # id(weight): the input order its first projection set

    def wants(self, name: str) -> bool:
        m = _PROJECTION.fullmatch(name)
        return bool(m) and m.group(3) in self.scheme.parts() and int(m.group(1)) < self.model.cfg.n_layers

    def add(self, name: str, tensor: Tensor) -> None:
        m = _PROJECTION.fullmatch(name)
        self.pending.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor

    def flush(self, final: bool) -> set[str]:
        """Load every projection whose tensors are complete (the gate and up ones once their layer's down projection
        is loaded: its order picks their rows); the `.weight` names they stand for. `final`: the last file was read,
        so what is still incomplete is missing."""
        needed = set(self.scheme.parts()) - {"g_idx", "bias"}
        loaded = set()
        for key in sorted(self.pending, key=lambda key: (key[1] != "mlp.down_proj", key)):
            layer, proj = key
            parts = self.pending[key]
            name = f"model.layers.{layer}.{proj}"
            missing = sorted(needed - set(parts))
            waits = proj in ("mlp.gate_proj", "mlp.up_proj") and layer not in self.down_order
            if waits and final and (layer, "mlp.down_proj") not in self.pending:  # a down projection stored dense
                self.down_order[layer], waits = None, False
            if missing or waits:
                if final:
                    what = ", ".join(f"{name}.{part}" for part in missing) or f"model.layers.{layer}.mlp.down_proj"
                    raise CheckpointError(f"missing weights {what}")
                continue
            self._load(layer, proj, parts, name)
            del self.pending[key]
            loaded.add(f"{name}.weight")
        return loaded

    def _load(self, layer: int, proj: str, parts: dict[str, Tensor], name: str) -> None:
        target, dim, dest, size, src = self.rules[f"{proj}.weight"]
        weight: Weight = functools.reduce(getattr, target.split("."), self.model.layers[layer])
        device = weight.tensors()[0].device
        parts = {k: v.to(device) for k, v in parts.items()}
        if self.scheme.method == WORKSPACE:
            stored = {k: part_of(parts[k], layout, dim, src, size) for k, layout in weight.LAYOUT.items()}
            try:
                weight.load_stored(stored, dest if dim == 0 else None)
            except EngineError as err:
                raise CheckpointError(f"{name}: {err}; config.json implies {self.shapes[proj + '.weight']}") from None
            return
        bias = parts.get("bias")
        if bias is not None and bias.any():
            raise CheckpointError(f"{name}.bias: biases are not supported (Llama has none)")
        if self.scheme.method == "awq":
            q, zeros = quant.unpack_awq(parts["qweight"], parts["qzeros"])
        else:
            q, zeros = quant.unpack_gptq(parts["qweight"], parts["qzeros"], self.scheme.zero_offset)
        scales = parts["scales"].half()
        n, k = q.shape
        if (n, k) != (want := self.shapes[f"{proj}.weight"]):
            raise CheckpointError(f"{name}: holds a {n}x{k} weight, config.json implies {want}")
        group = k if self.scheme.group == -1 else self.scheme.group
        if k % group or scales.shape != (k // group, n) or zeros.shape != scales.shape:
            raise CheckpointError(
                f"{name}: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} do not hold groups of {group} "
                f"for a weight of {n}x{k}"
            )
        if k % quant.GROUP:
            raise CheckpointError(f"{name}: {k} inputs are not whole int4 groups of {quant.GROUP}")
        if group != quant.GROUP:  # one group per row: the same scale and zero for each group of 128
            scales, zeros = (t.repeat_interleave(group // quant.GROUP, dim=0) for t in (scales, zeros))
        order = self._order(parts.get("g_idx"), k, group, name)
        if dim == 0:
            rows = torch.arange(src, src + size, device=device)
            if proj in ("mlp.gate_proj", "mlp.up_proj") and self.down_order[layer] is not None:
                rows = self.down_order[layer][src : src + size]
            cols, groups, perm = order, slice(None), order
        else:
            rows = slice(None)
            cols = torch.arange(k, device=device) if order is None else order
            cols, groups, perm = cols[src : src + size], slice(src // quant.GROUP, (src + size) // quant.GROUP), None
            if proj == "mlp.down_proj":
                self.down_order[layer] = order
            elif order is not None:
                perm = cols - src
                if ((perm < 0) | (perm >= size)).any():
                    raise CheckpointError(
                        f"{name}: its act order (g_idx) mixes the inputs of GPUs under tensor parallelism over "
                        f"{self.model.par.world}; run it on one GPU",
                        fields=("tp",),
                    )
        q = q[rows] if cols is None else q[rows][:, cols]
        stored = {"qweight": quant.pack_int4(q), "scales": scales[groups][:, rows], "zeros": zeros[groups][:, rows]}
        weight.load_stored(stored, dest if dim == 0 else None)
        self._set_perm(weight, perm, name)

    def _order(self, g_idx: Tensor | None, k: int, group: int, name: str) -> Tensor | None:
        """The input order that makes the groups contiguous (None: they are)."""
        if g_idx is None:
            if self.scheme.desc_act:
                raise CheckpointError(f"{name}: no g_idx, which an act-order (desc_act) GPTQ checkpoint needs")
            return None
        g_idx = g_idx.long()
        plain = torch.arange(k, device=g_idx.device) // group
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= k // group:
            raise CheckpointError(f"{name}.g_idx: shape {tuple(g_idx.shape)} does not give {k} inputs groups")
        if torch.equal(g_idx, plain):
            return None
        if not torch.equal(torch.bincount(g_idx, minlength=k // group), torch.full_like(plain[: k // group], group)):
            raise CheckpointError(f"{name}.g_idx: its groups are not of {group} inputs each")
        return torch.argsort(g_idx, stable=True)

    def _set_perm(self, weight: Weight, perm: Tensor | None, name: str) -> None:
        """One input order per weight: the projections fused into it must agree."""
        if id(weight) in self.perms:
            first = self.perms[id(weight)]
            if (first is None) != (perm is None) or (perm is not None and not torch.equal(first, perm)):
                raise CheckpointError(f"{name}: an act order (g_idx) unlike that of the projection fused with it")
            return
        self.perms[id(weight)] = perm
        if perm is not None:
            weight.set_perm(perm)
