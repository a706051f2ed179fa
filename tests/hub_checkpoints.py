"""Tiny GPTQ and AWQ checkpoints as the Hub holds them, packed by AutoAWQ's own code (`WQLinear_GEMM.from_linear`
packs AWQ; its `unpack_reorder_pack`, AWQ's way onto the GPTQ kernels, makes the GPTQ layout with its zero offset),
and the dense weights those libraries' own unpacking gives back (the reference a conformance test runs).

Each projection of a random tiny Llama is rounded to its 4-bit grid first (per group: scale from the range, zero
from the minimum), so packing is exact. Act order (GPTQ `desc_act`): the groups are formed in a permuted input
order, as GPTQ's sorted Hessian diagonal forms them; `g_idx` gives each input its group and the packed rows stay in
the inputs' own order.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def awq_modules():
    """AutoAWQ's GEMM linear and packing helpers (it warns that it is deprecated on import)."""
    with warnings.catch_warnings(record=True):
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils import packing_utils

    return WQLinear_GEMM, packing_utils


def _grid(w: Tensor, group: int, min_zero: int) -> tuple[Tensor, Tensor]:
    """`(scales [G, n], zeros [G, n])` of round-to-nearest 4-bit groups of `w [n, k]`; scales float16-exact, zeros in
    [min_zero, 15] (the classic GPTQ layout cannot store a zero of 0)."""
    n, k = w.shape
    groups = w.view(n, k // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low).clamp(min=1e-5) / 15).half().float()
    zeros = (-low / scales).round().clamp(min_zero, 15)
    return scales.T.contiguous(), zeros.T.contiguous()


def _order(k: int, kind: str, blocks: int, generator: torch.Generator) -> Tensor:
    """The order GPTQ quantized the inputs in: "none", "any" permutation, or "blocks": each of `blocks` equal runs
    permuted within itself (what a row-parallel shard under --tp needs)."""
    if kind == "none":
        return torch.arange(k)
    if kind == "any":
        return torch.randperm(k, generator=generator)
    size = k // blocks
    return torch.cat([b * size + torch.randperm(size, generator=generator) for b in range(blocks)])


def quantize_projection(
    w: Tensor, method: str, group: int, order: Tensor, sym: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """The checkpoint tensors of one projection `w [n, k]` and the dense weight AutoAWQ's unpacking gives back."""
    WQLinear_GEMM, packing = awq_modules()
    n, k = w.shape
    inverse = torch.argsort(order)  # input i was quantized at position inverse[i]
    w_sorted = w[:, order]
    scales, zeros = _grid(w_sorted, group, 1 if method == "gptq" else 0)
    if sym:
        zeros = torch.full_like(zeros, 8)
    q = (w_sorted / scales.repeat_interleave(group, 0).T).round() + zeros.repeat_interleave(group, 0).T
    q = q.clamp(0, 15)
    exact = (q - zeros.repeat_interleave(group, 0).T) * scales.repeat_interleave(group, 0).T
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = exact
    packed = WQLinear_GEMM.from_linear(linear, 4, group, scales=scales, zeros=zeros)
    qweight = packed.qweight[inverse]  # rows are inputs: back to the inputs' own order
    iweight, izeros = packing.reverse_awq_order(*packing.unpack_awq(qweight, packed.qzeros, 4), 4)
    iweight, izeros = iweight & 15, izeros & 15
    g_idx = (inverse // group).to(torch.int32)
    dense = ((iweight - izeros[g_idx.long()]) * packed.scales[g_idx.long()].float()).T.contiguous()
    if method == "awq":
        return {"qweight": qweight, "qzeros": packed.qzeros, "scales": packed.scales}, dense
    gptq_qweight, gptq_qzeros = packing.unpack_reorder_pack(qweight, packed.qzeros, 4)
    return {"qweight": gptq_qweight, "qzeros": gptq_qzeros, "scales": packed.scales, "g_idx": g_idx}, dense


def make_hub_checkpoint(
    dense_dir: Path,
    out: Path,
    method: str,
    group: int = 128,
    desc_act: bool = False,
    sym: bool = False,
    o_order: str = "any",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Write `dense_dir`'s model into `out` as a `method` ("gptq" or "awq") checkpoint (tokenizer and config too, the
    quantization config in config.json as transformers writes it); returns the dense weights (name -> `[n, k]`) the
    libraries' unpacking gives back, for the reference model. `o_order`: the attention output's act order ("any" or
    "blocks", which keeps each half of its inputs in its half)."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for file in sorted(dense_dir.glob("*.safetensors")):
        state.update(load_file(file))
    config = json.loads((dense_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    tensors, dense = {}, {}
    for name, t in state.items():
        if not any(f".{proj}." in name for proj in PROJECTIONS):
            tensors[name] = t.contiguous()
    for i in range(layers):
        inputs = {}  # one order per input: q/k/v share theirs, gate/up theirs
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}"
            w = state[f"{name}.weight"].float()
            k = w.shape[1]
            kind = "none" if not desc_act else (o_order if proj.endswith("o_proj") else "any")
            source = "attn_in" if proj[-6] in "qkv" else "mlp_in" if proj.endswith(("gate_proj", "up_proj")) else proj
            if source not in inputs:
                inputs[source] = _order(k, kind, 2, generator)
            parts, dense[f"{name}.weight"] = quantize_projection(w, method, group if group > 0 else k,
                                                                  inputs[source], sym)  # fmt: skip
            tensors.update({f"{name}.{part}": t.contiguous() for part, t in parts.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in dense_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                         "version": "gemm"}  # fmt: skip
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
                                         "sym": sym, "damp_percent": 0.1, "true_sequential": True,
                                         "static_groups": False}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return dense
