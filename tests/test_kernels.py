"""The decode-path kernels (engine/kernels) against their plain PyTorch references.

The Triton kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET must be set
before any kernel is defined and it would make every kernel in the process interpreted, so all
interpreted cases run in one child process (`python -m tests.test_kernels`), which reports one
result per case; each case is then its own pytest test. On a machine with CUDA the same cases
(plus real CodeLlama shapes and a CUDA-graph capture) run compiled, in this process.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.kernels import reference, sampling
from engine.weights import Dense, Int4, Int8
from tests import compiled, interpreted

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), **TOLERANCE[dtype])


def _rng(name: str, device: str) -> torch.Generator:
    """Fresh random data per case, reproducible from the case's name."""
    return torch.Generator(device).manual_seed(zlib.crc32(name.encode()))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def rope_tables(max_pos: int, head_dim: int, theta: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables as HF's LlamaRotaryEmbedding builds them: cat(freqs, freqs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


# --- checks shared by the interpreted and the CUDA runs -------------------------------------------

QUANTIZED = {"int8": Int8, "int4": Int4}


def _weight(
    gen: torch.Generator, n: int, k: int, dtype: torch.dtype, device: str, fmt: str
) -> tuple[Any, torch.Tensor]:
    """What the kernel takes for a random `[n, k]` weight in `fmt` (the tensor itself, or its quantized Weight), and
    the float64 values it stands for (a quantized weight's dequantized ones: what its kernel multiplies by)."""
    w = _randn(gen, n, k, dtype=dtype, device=device)
    if fmt == "dense":
        return w, w.double()
    weight = QUANTIZED[fmt].from_dense(w)
    return weight, weight.dense(torch.float64)


def _poison(device: str) -> None:
    """Leave NaN in the memory the caching allocator hands out next (both its pools), so that an output the kernel
    fails to write shows."""
    if device == "cuda":
        for numel in (1 << 18, 1 << 26):
            torch.full((numel,), float("nan"), device=device)


def check_rms_norm(name: str, device: str, dtype: str, rows: int, dim: int) -> None:
    from engine.kernels import triton_norm

    dt, gen = DTYPES[dtype], _rng(name, device)
    x, res = _randn(gen, rows, dim, dtype=dt, device=device), _randn(gen, rows, dim, dtype=dt, device=device)
    weight = 1 + 0.1 * _randn(gen, dim, dtype=dt, device=device)
    _close(triton_norm.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dt)
    out, total = triton_norm.add_rms_norm(x, res, weight, 1e-5)
    ref_out, ref_total = reference.add_rms_norm(x, res, weight, 1e-5)
    _close(total, ref_total, dt)
    _close(out, ref_out, dt)


def check_linear(
    name: str, device: str, dtype: str, m: int, n: int, k: int, config: tuple[int, int, int] | None, fmt: str = "dense"
) -> None:
    from engine.kernels import triton_gemv

    dt, gen = DTYPES[dtype], _rng(name, device)
    x = _randn(gen, m, k, dtype=dt, device=device)
    w, exact = _weight(gen, n, k, dt, device, fmt)
    cfg = triton_gemv.GemvConfig(*config) if config else None
    expected = reference.linear(x.double(), exact).to(dt)
    _poison(device)
    actual = triton_gemv.linear(x, w, cfg)
    assert torch.equal(triton_gemv.linear(x, w, cfg), actual)  # deterministic, and K splits leave counters ready
    if dt == torch.float32:  # a float32 sum of k products carries rounding of about eps * sqrt(k) * |terms|
        atol = 4 * torch.finfo(dt).eps * k**0.5 * float(x.abs().max() * exact.abs().max())
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=1e-5, atol=max(atol, 1e-5))
    else:
        _close(actual, expected, dt)


def check_norm_linear(
    name: str,
    device: str,
    dtype: str,
    m: int,
    n: int,
    k: int,
    residual: bool,
    silu_mul: bool,
    config: tuple[int, int, int] | None,
    weights: str | None = None,
    partials: int = 0,
    fmt: str = "dense",
) -> None:
    """The fused kernel against `reference.norm_linear(_silu_mul)`, with the matmul itself done in float64 (as in
    check_linear) and rounded where the reference rounds. n is the output width: w13 has 2n rows with silu_mul.
    `partials`: x's sums of squares come in that many pieces, as `linear_residual` leaves them."""
    from engine.kernels import triton_gemv

    dt, wt, gen = DTYPES[dtype], DTYPES[weights or dtype], _rng(name, device)
    x = _randn(gen, m, k, dtype=dt, device=device)
    res = _randn(gen, m, k, dtype=dt, device=device) if residual else None
    norm_weight = 1 + 0.1 * _randn(gen, k, dtype=wt, device=device)
    w, exact = _weight(gen, 2 * n if silu_mul else n, k, wt, device, fmt)
    cfg = triton_gemv.GemvConfig(*config) if config else None
    _poison(device)
    squares = None
    if partials:
        squares = torch.stack([(c.float() ** 2).sum(-1) for c in x.tensor_split(partials, dim=-1)])
        assert squares.shape == (partials, m) and res is None
    out, h = triton_gemv.norm_linear(x, res, norm_weight, 1e-5, w, cfg, silu_mul=silu_mul, squares=squares)
    if squares is not None and not silu_mul:  # the kernel reads them: four times the squares halve the output
        quarter = triton_gemv.norm_linear(x, None, norm_weight, 0.0, w, cfg, squares=4 * squares)[0]
        assert torch.equal(quarter, triton_gemv.norm_linear(x, None, norm_weight, 0.0, w, cfg, squares=squares)[0] / 2)

    ref_fn = reference.norm_linear_silu_mul if silu_mul else reference.norm_linear
    ref_out, ref_h = ref_fn(x, res, norm_weight, 1e-5, exact.to(wt))
    if res is None:
        assert h.data_ptr() == x.data_ptr()
        normed = reference.rms_norm(x, norm_weight, 1e-5)
    else:
        assert torch.equal(h, ref_h) and h.data_ptr() not in (x.data_ptr(), res.data_ptr())
        normed = reference.add_rms_norm(x, res, norm_weight, 1e-5)[0]
    product = reference.linear(normed.double(), exact)
    expected = product.to(normed.dtype)
    if silu_mul:
        expected = reference.silu_mul(expected)
    assert out.dtype == ref_out.dtype == expected.dtype and out.shape == ref_out.shape == expected.shape
    if expected.dtype == torch.float32:  # as check_linear: float32 rounding of a k-term sum grows with sqrt(k)
        atol = 4 * torch.finfo(torch.float32).eps * k**0.5 * float(normed.abs().max() * exact.abs().max())
        if silu_mul:  # silu(gate) * up passes errors on scaled by at most 1.1 |up| + |gate|
            atol *= 2.1 * float(product.abs().max())
        torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=1e-5, atol=max(atol, 1e-5))
    elif silu_mul:
        # gate and up may differ by the error of a dot product whose inputs are one ulp off here and there (the
        # normed input rounds after a differently ordered sum of squares): independent errors add in quadrature,
        # so 4 eps * sqrt(sum (x w)^2), plus their own rounding. silu(gate) * up carries them on, scaled by |up|
        # (|silu'| <= 1.1) and |silu(gate)|.
        eps = torch.finfo(dt).eps
        gate, up = product.chunk(2, dim=-1)
        spread = reference.linear(normed.double() ** 2, exact**2).sqrt()
        gate_err, up_err = (eps * (product.abs() + 4 * spread)).chunk(2, dim=-1)
        propagated = 1.1 * gate_err * up.abs() + F.silu(gate).abs() * up_err
        tol = TOLERANCE[dt]
        allowed = propagated + tol["atol"] + tol["rtol"] * expected.double().abs()
        assert bool(((out.double() - expected.double()).abs() <= allowed).all())
    else:
        _close(out, expected, dt)


def check_linear_residual(
    name: str, device: str, dtype: str, m: int, n: int, k: int, config: tuple[int, int] | None, fmt: str = "dense"
) -> None:
    """The residual epilogue: the sum rounded where the unfused linear and add round, and per-program squares."""
    from engine.kernels import triton_gemv

    dt, gen = DTYPES[dtype], _rng(name, device)
    x = _randn(gen, m, k, dtype=dt, device=device)
    w, exact = _weight(gen, n, k, dt, device, fmt)
    res = _randn(gen, m, n, dtype=dt, device=device)
    sm = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 132
    cfg = triton_gemv.GemvConfig(*config) if config else triton_gemv.choose_config(m, n, k, sm, fmt)
    _poison(device)
    h, squares = triton_gemv.linear_residual(x, w, res, cfg)
    again = triton_gemv.linear_residual(x, w, res, cfg)
    assert torch.equal(again[0], h) and torch.equal(again[1], squares)
    product = reference.linear(x.double(), exact)
    expected = product.to(dt) + res
    # The product rounds to dt before the add (one ulp of |product| where the float32 sums differ in order), then
    # the sum rounds: where the two nearly cancel, that ulp of the product is all the sum has.
    eps = torch.finfo(dt).eps
    float32_sums = 4 * 2**-23 * k**0.5 * float(x.abs().max() * exact.abs().max())
    allowed = eps * (product.abs() + expected.double().abs()) + float32_sums
    assert bool(((h.double() - expected.double()).abs() <= allowed).all())
    assert squares.shape == (-(-n // cfg.block_n), m) and squares.dtype == torch.float32
    strips = torch.stack([(s.float() ** 2).sum(-1) for s in h.split(cfg.block_n, dim=-1)])
    torch.testing.assert_close(squares, strips, rtol=1e-5, atol=1e-6)


def check_greedy(name: str, device: str, batch: int, vocab: int, penalty: bool) -> None:
    """The fused greedy tail against the plain ops: same tokens (ties to the first index, also across blocks), same
    seen mask after marking; rows share a slot as padding rows do."""
    from engine.kernels import sampling, triton_pick

    gen = _rng(name, device)
    logits = _randn(gen, batch, vocab, dtype=torch.float32, device=device)
    logits[0, 7] = logits[0, vocab - 3] = logits[0].max() + 1  # a tie, in different blocks when vocab > BLOCK
    n_slots = batch + 2
    seen = torch.rand(n_slots, vocab, generator=gen, device=device) < 0.3
    slots = torch.randperm(n_slots, generator=_rng(name + "s", "cpu"))[:batch].to(device)
    slots[-1] = slots[0] if batch > 2 else slots[-1]
    factor = torch.linspace(1.0, 3.0, batch, device=device) if penalty else None
    ref_seen = seen.clone()
    expected = sampling.greedy_pick(logits, ref_seen, slots, factor)
    assert torch.equal(triton_pick.greedy_pick(logits, seen, slots, factor), expected)
    assert torch.equal(seen, ref_seen)
    if not penalty:
        assert expected[0] == 7


def check_sample(name: str, device: str, batch: int, vocab: int) -> None:
    """The sampling kernel draws what `sampling.sample` draws, row by row, across temperatures (0 included), top-k
    (0, 1, beyond the vocabulary) and top-p (1, tiny, cutting inside and past the first block)."""
    from engine.kernels import triton_sample

    gen = _rng(name, device)
    logits = 3 * _randn(gen, batch, vocab, dtype=torch.float32, device=device)
    rows = torch.arange(batch, device=device)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.5, 0.2, 2.0], device=device)[rows % 6]
    top_k = torch.tensor([0, 40, 1, vocab + 7, 0, 3], dtype=torch.int32, device=device)[rows % 6]
    top_p = torch.tensor([1.0, 0.9, 0.95, 0.5, 1e-6, 0.999, 1.0], device=device)[rows % 7]
    seeds = rows * 7919 - 3
    offsets = rows + 2**33
    expected = sampling.sample(logits, temperature, top_k, top_p, seeds, offsets)
    assert torch.equal(triton_sample.sample(logits, temperature, top_k, top_p, seeds, offsets), expected)


def check_silu_mul(name: str, device: str, dtype: str, rows: int, dim: int) -> None:
    from engine.kernels import triton_act

    dt, gen = DTYPES[dtype], _rng(name, device)
    gu = _randn(gen, rows, 2 * dim, dtype=dt, device=device)
    _close(triton_act.silu_mul(gu), reference.silu_mul(gu), dt)


def check_dequantize(name: str, device: str, fmt: str, dtype: str, n: int, k: int) -> None:
    """The fallback path's dequantizing kernel gives engine.quant's reference values, bit for bit."""
    from engine.kernels import triton_dequant

    weight = QUANTIZED[fmt].from_dense(_randn(_rng(name, device), n, k, dtype=DTYPES[dtype], device=device))
    _poison(device)
    out = triton_dequant.dequantize(weight)
    assert out.dtype == DTYPES[dtype] and torch.equal(out, weight.dense())


CHECKS = {
    "dequantize": check_dequantize,
    "silu_mul": check_silu_mul,
    "rms_norm": check_rms_norm,
    "linear": check_linear,
    "norm_linear": check_norm_linear,
    "linear_residual": check_linear_residual,
    "greedy": check_greedy,
    "sample": check_sample,
}

# Small shapes: the interpreter runs every program in Python.
INTERPRETED_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "silu_mul-fp32-odd": ("silu_mul", {"dtype": "fp32", "rows": 3, "dim": 1100}),
    "silu_mul-bf16": ("silu_mul", {"dtype": "bf16", "rows": 2, "dim": 64}),
    "rms_norm-fp32-pow2": ("rms_norm", {"dtype": "fp32", "rows": 3, "dim": 64}),
    "rms_norm-bf16-odd": ("rms_norm", {"dtype": "bf16", "rows": 2, "dim": 80}),
    "rms_norm-fp16": ("rms_norm", {"dtype": "fp16", "rows": 1, "dim": 128}),
    "linear-fp32-m1": ("linear", {"dtype": "fp32", "m": 1, "n": 100, "k": 300, "config": None}),
    "linear-bf16-m1-n32016": ("linear", {"dtype": "bf16", "m": 1, "n": 32016, "k": 24, "config": (256, 32)}),
    "linear-bf16-m1-splitk": ("linear", {"dtype": "bf16", "m": 1, "n": 40, "k": 200, "config": (16, 32, 3)}),
    "linear-fp32-m5": ("linear", {"dtype": "fp32", "m": 5, "n": 72, "k": 96, "config": None}),
    "linear-bf16-m16-splitk": ("linear", {"dtype": "bf16", "m": 16, "n": 48, "k": 160, "config": (16, 32, 2)}),
    "linear-fp16-m3": ("linear", {"dtype": "fp16", "m": 3, "n": 50, "k": 64, "config": None}),
    # Fused norm/SwiGLU cases in fp16, not bf16: the interpreter truncates float32 -> bfloat16 where compiled
    # Triton rounds to nearest, which biases every rounded input of the product; bf16 runs in CUDA_CASES.
    "norm_linear-fp32-m1-odd-k": (
        "norm_linear",
        {"dtype": "fp32", "m": 1, "n": 40, "k": 300, "residual": True, "silu_mul": False, "config": (8, 64)},
    ),
    "norm_linear-fp16-m1-first-layer": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 24, "k": 96, "residual": False, "silu_mul": False, "config": None},
    ),
    "norm_linear-fp16-m1-splitk": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 40, "k": 200, "residual": True, "silu_mul": False, "config": (16, 32, 3)},
    ),
    "norm_linear-fp32-m5": (
        "norm_linear",
        {"dtype": "fp32", "m": 5, "n": 40, "k": 100, "residual": True, "silu_mul": False, "config": (16, 32)},
    ),
    "norm_linear-fp16-m16-first-layer-splitk": (
        "norm_linear",
        {"dtype": "fp16", "m": 16, "n": 48, "k": 160, "residual": False, "silu_mul": False, "config": (16, 32, 2)},
    ),
    "norm_linear-fp32-m3": (
        "norm_linear",
        {"dtype": "fp32", "m": 3, "n": 20, "k": 64, "residual": True, "silu_mul": False, "config": None},
    ),
    "norm_linear-fp16-fp32-weights": (
        "norm_linear",
        {"dtype": "fp16", "m": 2, "n": 24, "k": 48, "residual": True, "silu_mul": False, "config": None,
         "weights": "fp32"},
    ),
    "norm_silu-fp16-m1": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 40, "k": 200, "residual": True, "silu_mul": True, "config": (16, 64)},
    ),
    "norm_silu-fp32-m1-first-layer": (
        "norm_linear",
        {"dtype": "fp32", "m": 1, "n": 24, "k": 96, "residual": False, "silu_mul": True, "config": None},
    ),
    "norm_silu-fp16-m7": (
        "norm_linear",
        {"dtype": "fp16", "m": 7, "n": 24, "k": 96, "residual": True, "silu_mul": True, "config": (32, 32)},
    ),
    "norm_silu-fp32-m16-splitk": (
        "norm_linear",
        {"dtype": "fp32", "m": 16, "n": 16, "k": 128, "residual": True, "silu_mul": True, "config": (32, 32, 2)},
    ),
    "norm_linear-fp16-m1-partials": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 40, "k": 200, "residual": False, "silu_mul": False, "config": (8, 64),
         "partials": 5},
    ),
    "norm_linear-fp32-m3-partials-splitk": (
        "norm_linear",
        {"dtype": "fp32", "m": 3, "n": 20, "k": 128, "residual": False, "silu_mul": False, "config": (16, 32, 2),
         "partials": 3},
    ),
    "norm_silu-fp16-m1-partials": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 24, "k": 96, "residual": False, "silu_mul": True, "config": (16, 32),
         "partials": 12},
    ),
    "greedy-penalty": ("greedy", {"batch": 3, "vocab": 5000, "penalty": True}),
    "greedy-ties": ("greedy", {"batch": 2, "vocab": 9000, "penalty": False}),
    "sample": ("sample", {"batch": 14, "vocab": 5000}),
    "linear_residual-fp16-m1": ("linear_residual", {"dtype": "fp16", "m": 1, "n": 40, "k": 96, "config": (16, 32)}),
    "linear_residual-fp32-m3-odd-n": (
        "linear_residual", {"dtype": "fp32", "m": 3, "n": 37, "k": 64, "config": (16, 32)},
    ),
    "linear_residual-fp16-m1-splitk": (
        "linear_residual", {"dtype": "fp16", "m": 1, "n": 24, "k": 200, "config": (8, 32, 3)},
    ),
    "linear_residual-fp16-m5-splitk": (
        "linear_residual", {"dtype": "fp16", "m": 5, "n": 40, "k": 128, "config": (16, 32, 2)},
    ),
    "linear-bf16-m32-splitk": ("linear", {"dtype": "bf16", "m": 32, "n": 64, "k": 160, "config": (32, 32, 3)}),
    "norm_silu-fp16-m24-partials-splitk": (
        "norm_linear",
        {"dtype": "fp16", "m": 24, "n": 24, "k": 128, "residual": False, "silu_mul": True, "config": (32, 32, 2),
         "partials": 4},
    ),
    # Quantized weights (int8 per row, int4 in groups of 128: K a multiple of 128, steps past a split's end).
    "int8-linear-fp32-m1": ("linear", {"fmt": "int8", "dtype": "fp32", "m": 1, "n": 40, "k": 200, "config": None}),
    "int8-linear-bf16-m1-splitk": (
        "linear", {"fmt": "int8", "dtype": "bf16", "m": 1, "n": 40, "k": 300, "config": (16, 64, 3)},
    ),
    "int8-linear-fp16-m5": ("linear", {"fmt": "int8", "dtype": "fp16", "m": 5, "n": 48, "k": 96, "config": (16, 32)}),
    "int8-norm_silu-fp16-m1": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp16", "m": 1, "n": 40, "k": 200, "residual": True, "silu_mul": True,
         "config": (16, 64)},
    ),
    "int8-norm_linear-fp16-m16-partials-splitk": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp16", "m": 16, "n": 48, "k": 160, "residual": False, "silu_mul": False,
         "config": (16, 32, 2), "partials": 4},
    ),
    "int8-norm_silu-fp32-m7-splitk": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp32", "m": 7, "n": 24, "k": 128, "residual": True, "silu_mul": True,
         "config": (32, 32, 2)},
    ),
    "int8-linear_residual-fp16-m3-splitk": (
        "linear_residual", {"fmt": "int8", "dtype": "fp16", "m": 3, "n": 40, "k": 200, "config": (16, 32, 3)},
    ),
    "int4-linear-fp32-m1-partial-step": (
        "linear", {"fmt": "int4", "dtype": "fp32", "m": 1, "n": 40, "k": 384, "config": (16, 256)},
    ),
    "int4-linear-fp32-m1-splitk": (
        "linear", {"fmt": "int4", "dtype": "fp32", "m": 1, "n": 37, "k": 384, "config": (16, 128, 3)},
    ),
    "int4-linear-bf16-m1": ("linear", {"fmt": "int4", "dtype": "bf16", "m": 1, "n": 40, "k": 256, "config": None}),
    "int4-linear-fp16-m5": ("linear", {"fmt": "int4", "dtype": "fp16", "m": 5, "n": 48, "k": 256, "config": (16, 256)}),
    "int4-linear-fp32-m16-splitk": (
        "linear", {"fmt": "int4", "dtype": "fp32", "m": 16, "n": 40, "k": 384, "config": (32, 128, 2)},
    ),
    "int4-norm_linear-fp16-m1": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 40, "k": 256, "residual": True, "silu_mul": False,
         "config": (16, 128)},
    ),
    "int4-norm_silu-fp16-m1-partials": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 384, "residual": False, "silu_mul": True,
         "config": (32, 256), "partials": 6},
    ),
    "int4-norm_silu-fp32-m7-splitk": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp32", "m": 7, "n": 24, "k": 256, "residual": True, "silu_mul": True,
         "config": (32, 128, 2)},
    ),
    "int4-linear_residual-fp16-m1-splitk": (
        "linear_residual", {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 40, "k": 384, "config": (16, 128, 3)},
    ),
    "int4-linear_residual-fp32-m3": (
        "linear_residual", {"fmt": "int4", "dtype": "fp32", "m": 3, "n": 37, "k": 256, "config": (16, 256)},
    ),
    "int4-norm_silu-fp16-m1-tensor-cores": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 256, "residual": True, "silu_mul": True,
         "config": (32, 128, 2, 4, 3, True)},
    ),
    "int8-linear_residual-fp32-m1-tensor-cores": (
        "linear_residual",
        {"fmt": "int8", "dtype": "fp32", "m": 1, "n": 40, "k": 96, "config": (16, 32, 1, 4, 3, True)},
    ),
    # The int4 planes unpacked the other way (UNPACKS: shift, extract, or, subtract), one row and several.
    "int4-linear-bf16-m1-shift": (
        "linear",
        {"fmt": "int4", "dtype": "bf16", "m": 1, "n": 40, "k": 256, "config": (16, 128, 1, 4, 3, False, "shift")},
    ),
    "int4-linear-fp16-m3-shift-splitk": (
        "linear",
        {"fmt": "int4", "dtype": "fp16", "m": 3, "n": 24, "k": 384, "config": (16, 128, 2, 4, 3, False, "shift")},
    ),
    # The next group's words loaded while one is unpacked (GemvConfig.prefetch): past a split's end, with the norm.
    "int4-linear-fp32-m1-prefetch-splitk": (
        "linear",
        {"fmt": "int4", "dtype": "fp32", "m": 1, "n": 37, "k": 640, "config": (16, 256, 2, 4, 3, False, "mask", True)},
    ),
    "int4-norm_silu-fp16-m1-prefetch": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 256, "residual": True, "silu_mul": True,
         "config": (32, 128, 1, 4, 3, False, "mask", True)},
    ),
    "int4-linear-fp16-m5-prefetch": (
        "linear",
        {"fmt": "int4", "dtype": "fp16", "m": 5, "n": 48, "k": 384, "config": (16, 128, 1, 4, 3, False, "mask", True)},
    ),
    # One row of int8 from its bytes (the plain form, also where K is no multiple of 4), not from int32 words.
    "int8-norm_silu-fp16-m1-bytes": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp16", "m": 1, "n": 24, "k": 160, "residual": True, "silu_mul": True,
         "config": (16, 64, 1, 4, 3, False, "shift")},
    ),
    "int8-linear-fp32-m1-k-odd": (
        "linear", {"fmt": "int8", "dtype": "fp32", "m": 1, "n": 20, "k": 202, "config": None},
    ),
    # int4 in nibble pairs on the tensor cores (unpack="pairs", one row padded to 16): a step past a split's end, rows
    # past 16 (padded to 64), K splits, the norm, SwiGLU and residual epilogues, the next group prefetched.
    "int4-linear-bf16-m1-pairs": (
        "linear", {"fmt": "int4", "dtype": "bf16", "m": 1, "n": 40, "k": 384,
                   "config": (128, 256, 1, 4, 2, False, "pairs")},
    ),
    "int4-linear-fp32-m16-pairs-splitk": (
        "linear", {"fmt": "int4", "dtype": "fp32", "m": 16, "n": 37, "k": 640,
                   "config": (32, 256, 2, 4, 2, False, "pairs")},
    ),
    "int4-linear-fp16-m33-pairs": (
        "linear", {"fmt": "int4", "dtype": "fp16", "m": 33, "n": 24, "k": 256,
                   "config": (16, 128, 1, 4, 2, False, "pairs")},
    ),
    "int4-norm_silu-fp16-m1-pairs-partials": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 384, "residual": False, "silu_mul": True,
         "config": (64, 256, 1, 4, 2, False, "pairs"), "partials": 6},
    ),
    "int4-norm_linear-fp16-m5-pairs-splitk": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 5, "n": 40, "k": 384, "residual": True, "silu_mul": False,
         "config": (32, 128, 3, 4, 2, False, "pairs")},
    ),
    "int4-linear_residual-fp16-m1-pairs-splitk": (
        "linear_residual",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 40, "k": 384, "config": (32, 256, 2, 4, 2, False, "pairs")},
    ),
    "int4-norm_silu-fp32-m7-pairs-prefetch": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp32", "m": 7, "n": 24, "k": 256, "residual": True, "silu_mul": True,
         "config": (32, 128, 1, 4, 2, False, "pairs", True)},
    ),
    # One row of the fused forms (gate and up rows in one loop, each x tile normalised once for both: _x_planes, the
    # int8 words' planes, the pairs' row broadcast to the padded rows), with K split and steps past a split's end.
    "int4-norm_silu-fp16-m1-splitk": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 640, "residual": True, "silu_mul": True,
         "config": (32, 256, 2)},
    ),
    "int4-norm_silu-fp32-m1-prefetch-splitk-partials": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp32", "m": 1, "n": 20, "k": 640, "residual": False, "silu_mul": True,
         "config": (16, 128, 2, 4, 3, False, "mask", True), "partials": 5},
    ),
    "int4-norm_linear-fp16-m1-splitk-partials": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 40, "k": 640, "residual": False, "silu_mul": False,
         "config": (16, 256, 2), "partials": 3},
    ),
    "int4-norm_silu-fp16-m1-pairs-splitk": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 24, "k": 640, "residual": True, "silu_mul": True,
         "config": (32, 256, 2, 4, 2, False, "pairs")},
    ),
    "int4-norm_linear-fp16-m1-pairs-splitk": (
        "norm_linear",
        {"fmt": "int4", "dtype": "fp16", "m": 1, "n": 40, "k": 384, "residual": True, "silu_mul": False,
         "config": (32, 128, 3, 4, 2, False, "pairs")},
    ),
    "int8-norm_silu-fp16-m1-splitk": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp16", "m": 1, "n": 40, "k": 200, "residual": True, "silu_mul": True,
         "config": (16, 64, 3)},
    ),
    "int8-norm_linear-fp32-m1-splitk-partials": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp32", "m": 1, "n": 40, "k": 256, "residual": False, "silu_mul": False,
         "config": (16, 64, 2), "partials": 4},
    ),
    "int8-norm_silu-fp16-m1-tensor-cores-partials": (
        "norm_linear",
        {"fmt": "int8", "dtype": "fp16", "m": 1, "n": 24, "k": 96, "residual": False, "silu_mul": True,
         "config": (32, 32, 2, 4, 3, True), "partials": 3},
    ),
    "norm_linear-fp16-m1-tensor-cores": (
        "norm_linear",
        {"dtype": "fp16", "m": 1, "n": 40, "k": 96, "residual": True, "silu_mul": False,
         "config": (16, 32, 2, 4, 3, True)},
    ),
    "int4-dequantize-fp16": ("dequantize", {"fmt": "int4", "dtype": "fp16", "n": 37, "k": 384}),  # bf16: CUDA_CASES
    "int8-dequantize-fp16": ("dequantize", {"fmt": "int8", "dtype": "fp16", "n": 37, "k": 200}),
}  # fmt: skip


def run_case(name: str, device: str) -> None:
    check, kwargs = INTERPRETED_CASES.get(name) or CUDA_CASES[name]
    CHECKS[check](name, device, **kwargs)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_kernels")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_triton_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_kernels")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_triton_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


def test_quantized_cases_compile_their_own_kernels_for_sm90(compiled_results: dict[str, str]) -> None:
    """The int8 and int4 cases' launches are in the compile check as the bf16 ones are: each records its format's
    GEMV (the FORMAT constexpr, triton_gemv.FORMATS) or dequantize kernel, and they compile."""
    gemv_format = {"int8": 1, "int4": 2}
    for name, specs in interpreted.launches_of("tests.test_kernels").items():
        check, kwargs = INTERPRETED_CASES[name]
        fmt = kwargs.get("fmt")
        if fmt is None:
            continue
        if check == "dequantize":
            assert {(s.module, s.name) for s in specs} == {("engine.kernels.triton_dequant", f"_{fmt}_kernel")}, name
        else:
            formats = {getattr(v, "value", v) for s in specs for path, v in s.constants.items()
                       if list(s.signature)[path[0]] == "FORMAT"}  # fmt: skip
            assert formats == {gemv_format[fmt]}, name
        assert compiled_results[name] == "ok", name


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_interpreted_greedy_penalty_divides_as_torch_does() -> None:
    """The greedy tail's penalised positive logit is x / p rounded to nearest, as torch (and the verify step's accept
    kernel) divide: Triton's `/` compiles to the approximate div.full.f32 (2 ulp), which would flip near-ties."""
    from engine.kernels.compile_ahead import compile_spec

    (spec,) = interpreted.launches_of("tests.test_kernels")["greedy-penalty"]
    ptx = compile_spec(spec).asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx


# Real CodeLlama shapes, compiled, only where there is a GPU.
def _sass_ops(spec: Any) -> dict[str, int]:
    """How often each SASS opcode occurs in a recorded launch compiled for sm_90 (Triton's own ptxas and cuobjdump)."""
    from triton.tools.disasm import get_sass

    from engine.kernels.compile_ahead import compile_spec

    ops: dict[str, int] = {}
    for line in get_sass(compile_spec(spec).asm["cubin"]).splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[1]:
            op = fields[1].split()[0]
            op = fields[1].split()[1] if op.startswith("@") else op
            ops[op.split(".")[0]] = ops.get(op.split(".")[0], 0) + 1
    return ops


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_interpreted_int4_launch_unpacks_by_mask_in_one_logic_instruction_per_nibble() -> None:
    """The int4 GEMV is bound by instructions: unpacked by mask, a nibble costs one logic instruction and two
    multiply-adds (q - zero, then times x) in the compiled one-row kernel; by shifts it costs a shift, a bit-field
    extract and an or, and a subtraction and one multiply-add. Counted over the whole kernel, compiled on the CPU from
    the interpreted cases' launches (named so: .ci/gpu-check's -k leaves it to the CPU run)."""
    launches = interpreted.launches_of("tests.test_kernels")
    (masked,) = launches["int4-linear-bf16-m1"]
    (shifted,) = launches["int4-linear-bf16-m1-shift"]
    ratio = {}
    for name, spec in (("mask", masked), ("shift", shifted)):
        ops = _sass_ops(spec)
        ratio[name] = sum(ops.get(op, 0) for op in ("LOP3", "SHF", "SGXT", "BMSK", "PRMT")) / ops["FFMA"]
    assert ratio["mask"] < 1.25 < 2 < ratio["shift"], ratio  # the loop's 1 + 1/8 per 2 FFMA, and its x and addresses


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_interpreted_int4_pairs_launch_keeps_the_weight_in_registers_for_the_tensor_cores() -> None:
    """unpack="pairs": every wgmma takes the unpacked weight from registers and the main loop stores no weight tile
    to shared memory (a step's unpacked tile, 128 x 256 16-bit values, would take 32 16-byte stores per thread; x's
    take 8), one logic instruction unpacks two nibbles, and the loop costs under 2.6 instructions per weight where the
    one-row multiply-add loop by mask costs over 4 (BENCHMARKS.md, 2026-12-08). Compiled on the CPU from the
    interpreted case's launch (named so: .ci/gpu-check's -k leaves it to the CPU run)."""
    from triton.tools.disasm import get_sass

    from engine.kernels.compile_ahead import compile_spec
    from tests.sass_count import ALU, loop_ops

    (spec,) = interpreted.launches_of("tests.test_kernels")["int4-linear-bf16-m1-pairs"]
    sass = get_sass(compile_spec(spec).asm["cubin"])
    wgmma = [line for line in sass.splitlines() if "HGMMA" in line]
    assert wgmma and all(re.search(r"HGMMA\.\S+ R\d+, R\d+, gdesc", line) for line in wgmma), wgmma[:2]
    ops = loop_ops(sass)
    weights = 128 * 256 / 128  # BLOCK_N x BLOCK_K over 4 warps' threads
    pairs = len(re.findall(r"LOP3\.LUT R\d+, R\d+, 0xf000f, R\d+(?:\.reuse)?, 0xea", sass))
    assert pairs >= weights / 2, pairs
    assert ops["STS"] <= 8 and ops["HGMMA"] == 32, ops  # 2 groups x 2 warpgroup halves x 8 k-steps of 16
    assert sum(ops.values()) / weights < 2.6 and sum(ops[op] for op in ALU) / weights < 1.0, ops


@pytest.mark.skipif(not HAVE_TRITON or HAVE_CUDA, reason="needs triton; counted by the CPU run")
@pytest.mark.parametrize(
    ("fmt", "n", "config", "allowed"),
    [
        ("int4", 22016, "64/256/4/4/3/-/mask", 1.02),  # TUNED's one-row gate/up config
        ("int8", 22016, "16/1024/1/4/3/-/mask", 1.02),
        ("int4", 12288, "128/256/1/4/2/tc/pairs", 1.2),
        ("int4", 12288, "128/128/1/4/3/tc/mask", 1.1),  # the row padded to 16 on the tensor cores
    ],
)
def test_fused_forms_cost_about_what_the_plain_gemv_costs(fmt: str, n: int, config: str, allowed: float) -> None:
    """At one row the decode step runs the fused forms, so they must cost what the plain GEMV costs: the main loop's
    SASS for sm_90 per weight of the norm prologue, the SwiGLU epilogue (gate and up rows in one loop, sharing each x
    tile) and the residual epilogue at most `allowed` times the plain loop's (BENCHMARKS.md, 2026-12-08: int4 mask
    norm 5.37 and silu 5.46 against 5.73, before 7.41 and 11.23; pairs 2.47 and 2.69 against 2.34, before 2.85 and
    3.93). Counted by `python -m tests.sass_count`, whose fake H200 driver stays in its own process."""
    command = [sys.executable, "-m", "tests.sass_count", "--form", "plain,norm,silu,residual", "1", fmt, str(n), "4096",
               config]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    per_weight = {form: float(v) for form, v in re.findall(r"^\S+ (\w+)\s+m=1\s+([\d.]+) per weight", out, re.M)}
    assert set(per_weight) == {"plain", "norm", "silu", "residual"}, out
    assert max(per_weight.values()) <= allowed * per_weight["plain"], per_weight


def test_int4_pair_magic_holds_the_bias_plus_each_nibble() -> None:
    """`_int4_pair`'s logic instruction (a & 0x000F000F | magic) on a word shifted by 4 j leaves, as two 16-bit
    floats (low half first), the dtype's power of two plus nibbles j and j + 4, from which the kernel subtracts
    `zero` plus that power."""
    from engine.kernels.triton_gemv import PAIR_MAGIC

    nibbles = torch.randint(0, 16, (64, 8), generator=_rng("pair-magic", "cpu"))
    words = (nibbles << (4 * torch.arange(8))).sum(1).to(torch.int64).to(torch.int32, copy=False)
    for dtype, (magic, bias) in PAIR_MAGIC.items():
        for j in range(4):
            bits = ((words >> (4 * j)) & 0x000F000F) | magic
            pair = bits.view(dtype).view(64, 2).double()
            assert torch.equal(pair, bias + nibbles[:, [j, j + 4]].double()), (dtype, j)


def test_pairs_is_int4_only() -> None:
    from engine.kernels import triton_gemv

    w = Int8.from_dense(torch.randn(32, 128))
    with pytest.raises(AssertionError, match="unpack='pairs' is int4's, not int8's"):
        triton_gemv.linear(torch.randn(1, 128), w, triton_gemv.GemvConfig(32, 128, unpack="pairs"))


CUDA_CASES = {
    "silu_mul-7b": ("silu_mul", {"dtype": "bf16", "rows": 32, "dim": 11008}),
    "rms_norm-7b": ("rms_norm", {"dtype": "bf16", "rows": 8, "dim": 4096}),
    "rms_norm-34b": ("rms_norm", {"dtype": "bf16", "rows": 1, "dim": 8192}),
    "linear-lm-head": ("linear", {"dtype": "bf16", "m": 1, "n": 32016, "k": 4096, "config": None}),
    "linear-down-7b": ("linear", {"dtype": "bf16", "m": 1, "n": 4096, "k": 11008, "config": None}),
    "linear-m8": ("linear", {"dtype": "bf16", "m": 8, "n": 13824, "k": 5120, "config": None}),
    "linear-fp32-m4": ("linear", {"dtype": "fp32", "m": 4, "n": 1000, "k": 4096, "config": None}),
    "norm_linear-qkv-7b": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 12288, "k": 4096, "residual": True, "silu_mul": False, "config": None},
    ),
    "norm_linear-lm-head-first-layer": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 32016, "k": 4096, "residual": False, "silu_mul": False, "config": None},
    ),
    "norm_linear-splitk": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 1024, "k": 8192, "residual": True, "silu_mul": False, "config": None},
    ),
    "norm_linear-fp32-m4": (
        "norm_linear",
        {"dtype": "fp32", "m": 4, "n": 1000, "k": 4096, "residual": True, "silu_mul": False, "config": None},
    ),
    "norm_silu-7b": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 11008, "k": 4096, "residual": True, "silu_mul": True, "config": None},
    ),
    "norm_silu-m8-13b": (
        "norm_linear",
        {"dtype": "bf16", "m": 8, "n": 13824, "k": 5120, "residual": True, "silu_mul": True, "config": None},
    ),
    "norm_silu-splitk": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 512, "k": 4096, "residual": True, "silu_mul": True, "config": None},
    ),
    "norm_linear-qkv-7b-partials": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 12288, "k": 4096, "residual": False, "silu_mul": False, "config": None,
         "partials": 512},
    ),
    "norm_silu-7b-partials": (
        "norm_linear",
        {"dtype": "bf16", "m": 1, "n": 11008, "k": 4096, "residual": False, "silu_mul": True, "config": None,
         "partials": 512},
    ),
    "greedy-7b-b32": ("greedy", {"batch": 32, "vocab": 32016, "penalty": True}),
    "greedy-7b-b1-ties": ("greedy", {"batch": 1, "vocab": 32016, "penalty": False}),
    "sample-7b-b32": ("sample", {"batch": 32, "vocab": 32016}),
    "linear_residual-o-7b": ("linear_residual", {"dtype": "bf16", "m": 1, "n": 4096, "k": 4096, "config": (8, 512)}),
    "linear_residual-down-7b": (
        "linear_residual", {"dtype": "bf16", "m": 1, "n": 4096, "k": 11008, "config": (8, 512)},
    ),
    "linear_residual-down-7b-m32-splitk": (
        "linear_residual", {"dtype": "bf16", "m": 32, "n": 4096, "k": 11008, "config": (64, 128, 4)},
    ),
    "linear-qkv-7b-m32": ("linear", {"dtype": "bf16", "m": 32, "n": 12288, "k": 4096, "config": None}),
    "linear-o-7b-m24": ("linear", {"dtype": "bf16", "m": 24, "n": 4096, "k": 4096, "config": None}),
    "norm_silu-7b-m32-partials-splitk": (
        "norm_linear",
        {"dtype": "bf16", "m": 32, "n": 11008, "k": 4096, "residual": False, "silu_mul": True, "config": (128, 128, 2),
         "partials": 64},
    ),
}  # fmt: skip
# The quantized kernels at CodeLlama-7B's shapes as the decode step calls them, at each row block up to 64 (1, 16 with
# rows masked, 32, 64).
QUANT_7B = {
    "qkv": ("norm_linear", {"n": 12288, "k": 4096, "residual": True, "silu_mul": False}),
    "o": ("linear_residual", {"n": 4096, "k": 4096}),
    "gate_up": ("norm_linear", {"n": 11008, "k": 4096, "residual": True, "silu_mul": True}),
    "down": ("linear_residual", {"n": 4096, "k": 11008}),
    "head": ("norm_linear", {"n": 32016, "k": 4096, "residual": False, "silu_mul": False}),
}
for _fmt in QUANTIZED:
    for _name, (_check, _shape) in QUANT_7B.items():
        for _m in (1, 8, 32, 64):
            CUDA_CASES[f"{_fmt}-{_name}-7b-m{_m}"] = (
                _check,
                {"fmt": _fmt, "dtype": "bf16", "m": _m, "config": None, **_shape},
            )
    CUDA_CASES[f"{_fmt}-linear-qkv-7b-m1"] = ("linear", {"fmt": _fmt, "dtype": "bf16", "m": 1, "n": 12288, "k": 4096,
                                                         "config": None})  # fmt: skip
    CUDA_CASES[f"{_fmt}-dequantize-7b"] = ("dequantize", {"fmt": _fmt, "dtype": "bf16", "n": 22016, "k": 4096})
    # One row as the decode step runs the norm: from the partial squares of the previous residual epilogue.
    for _name in ("qkv", "gate_up", "head"):
        CUDA_CASES[f"{_fmt}-{_name}-7b-m1-partials"] = (
            "norm_linear",
            {"fmt": _fmt, "dtype": "bf16", "m": 1, "config": None, **QUANT_7B[_name][1], "residual": False,
             "partials": 512},
        )  # fmt: skip
# int4 in nibble pairs on the tensor cores at the same shapes and row blocks (1 and 16 are the same kernel), K split.
for _name, (_check, _shape) in QUANT_7B.items():
    for _m in (1, 16, 64):
        CUDA_CASES[f"int4-pairs-{_name}-7b-m{_m}"] = (
            _check,
            {"fmt": "int4", "dtype": "bf16", "m": _m, "config": (128, 256, 2, 4, 2, True, "pairs"), **_shape},
        )
CUDA_CASES["int4-pairs-gate_up-7b-m1-partials"] = (
    "norm_linear",
    {"fmt": "int4", "dtype": "bf16", "m": 1, "config": (128, 256, 2, 4, 2, True, "pairs"), **QUANT_7B["gate_up"][1],
     "residual": False, "partials": 512},
)  # fmt: skip
cuda_only = pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", list(INTERPRETED_CASES) + list(CUDA_CASES))
def test_triton_cuda(name: str) -> None:
    run_case(name, "cuda")


@pytest.mark.gpu
@cuda_only
def test_decode_step_in_cuda_graph() -> None:
    """Rotary + cache write + attention + linear + sampling captured once, replayed at new positions."""
    device, dt = "cuda", torch.bfloat16
    gen = _rng("graph", device)
    batch, n_heads, n_kv, head_dim, max_seq, vocab = 2, 8, 2, 128, 512, 1000
    cos, sin = (t.to(device) for t in rope_tables(max_seq, head_dim))
    k_cache = _randn(gen, batch, n_kv, max_seq, head_dim, dtype=dt, device=device)
    v_cache = _randn(gen, batch, n_kv, max_seq, head_dim, dtype=dt, device=device)
    w_out = Dense.from_dense(_randn(gen, vocab, n_heads * head_dim, dtype=dt, device=device))
    q, k, v = (_randn(gen, batch, h, head_dim, dtype=dt, device=device) for h in (n_heads, n_kv, n_kv))
    positions = torch.zeros(batch, dtype=torch.int64, device=device)
    slots = torch.arange(batch, device=device)
    ones = torch.ones(batch, device=device)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        attn = kernels.rotary_attention(q, k, v, cos, sin, positions, slots, k_cache, v_cache, head_dim**-0.5)
        logits = kernels.linear(attn.reshape(batch, -1), w_out).float()
        tokens = kernels.sample(logits, ones, slots.int(), ones, slots, positions)
        return logits, tokens

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile the kernels before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits, static_tokens = step()
    for pos in (3, 130, 511):
        positions.fill_(pos)
        graph.replay()
        expected_logits, expected_tokens = step()
        _close(static_logits, expected_logits, torch.float32)
        assert torch.equal(static_tokens, expected_tokens)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("rows", [1, 24])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
def test_fused_norm_linear_dispatch_in_cuda_graph(
    monkeypatch: pytest.MonkeyPatch, rows: int, fmt: str, separate: bool
) -> None:
    """Where `tune_linear` chose Triton, norm_linear(_silu_mul) and linear_residual run the Triton kernel (fused
    with the norm, the activation and the add for one row, between the separate kernels for several; `separate`:
    the other way round, as `tune_fusion` and `tune_fusion_rows` can choose), captured in a graph, and agree with
    the separate norm, the weight's own linear (cuBLAS; after dequantizing a quantized weight) and activation that
    run where it chose that."""
    from engine.kernels import triton_gemv

    device, dt, dim, inter = "cuda", torch.bfloat16, 512, 1408
    gen = _rng("fused-graph", device)
    x, res, x2 = (_randn(gen, rows, dim, dtype=dt, device=device) for _ in range(3))
    norm_weight = 1 + 0.1 * _randn(gen, dim, dtype=dt, device=device)
    wqkv, w13, w2 = (
        ({"dense": Dense} | QUANTIZED)[fmt].from_dense(_randn(gen, n, k, dtype=dt, device=device))
        for n, k in ((3 * dim, dim), (2 * inter, dim), (dim, inter))
    )

    def step() -> tuple[torch.Tensor, ...]:
        first, same = kernels.norm_linear(x, None, norm_weight, 1e-5, wqkv)
        assert same is x
        qkv, h = kernels.norm_linear(x, res, norm_weight, 1e-5, wqkv)
        act, h2 = kernels.norm_linear_silu_mul(x2, h, norm_weight, 1e-5, w13)
        x3, res3, squares = kernels.linear_residual(act, w2, h2)  # added, with squares where fused
        qkv2, h3 = kernels.norm_linear(x3, res3, norm_weight, 1e-5, wqkv, squares)
        return first, qkv, h, act, h2, qkv2, h3

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = {(rows, *w.key): triton_gemv.choose_config(rows, *w.shape, sm, fmt) for w in (wqkv, w13, w2)}
    monkeypatch.setattr(kernels, "_TRITON_CONFIG", chosen)
    monkeypatch.setattr(kernels, "_SEPARATE", {(form, fmt) for form in kernels.FUSED_FORMS} if separate else set())
    fused_rows = {(form, key) for form in kernels.FUSED_FORMS for key in chosen} if separate else set()
    monkeypatch.setattr(kernels, "_FUSED_ROWS", fused_rows)  # `separate` also fuses them at several rows
    step()  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused = step()
    for t in (x, res, x2):
        t.copy_(_randn(gen, rows, dim, dtype=dt, device=device))
    graph.replay()
    monkeypatch.setattr(kernels, "_TRITON_CONFIG", {})
    for actual, expected in zip(fused, step(), strict=True):
        if rows == 1:  # the fused kernel rounds where the separate ops round: only the sums' order differs
            _close(actual, expected, dt)
        else:  # tensor-core and cuBLAS sums round differently; an ulp flipped before silu or a layer's sum carries
            scale = float(expected.abs().max())  # on to entries that cancel out, so compare against the scale
            torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=2e-2 * scale)


def test_tune_fusion_keeps_a_form_separate_only_where_the_one_row_step_ran_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each quantized format's fused forms are timed one at a time against the step so far; a form stays separate
    only where the step got faster, and dense weights and formats the Triton kernel does not run are not timed."""
    int4, int8, dense = (cls.from_dense(torch.randn(256, 128)) for cls in (Int4, Int8, Dense))
    cuda_only = Int8.from_dense(torch.randn(64, 128))  # cuBLAS won for it: its format is not timed
    chosen = {(1, *w.key): object() for w in (int4, int8, dense)}
    monkeypatch.setattr(kernels, "_TRITON_CONFIG", chosen)
    gain = {("norm", "int4"): 0.5, ("norm_silu", "int4"): -1.0, ("norm", "int8"): -0.25, ("norm_silu", "int8"): 0.0}
    monkeypatch.setattr(kernels, "graph_time", lambda step, calls: 5.0 + sum(gain[s] for s in kernels._SEPARATE))
    separate: set[tuple[str, str]] = set()
    monkeypatch.setattr(kernels, "_SEPARATE", separate)
    report = kernels.tune_fusion(lambda: None, [int4, int8, dense, cuda_only])
    assert separate == {("norm_silu", "int4"), ("norm", "int8")}
    assert report == {
        "int4 norm": {"fused": 5000.0, "separate": 5500.0},
        "int4 norm_silu": {"fused": 5000.0, "separate": 4000.0},
        "int8 norm": {"fused": 4000.0, "separate": 3750.0},
        "int8 norm_silu": {"fused": 3750.0, "separate": 3750.0},  # a tie stays fused: a launch fewer
    }
    monkeypatch.setattr(kernels, "_TRITON_CONFIG", {(1, *dense.key): object()})
    assert kernels.tune_fusion(lambda: None, [dense]) == {}


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_a_form_kept_separate_runs_the_norm_and_activation_around_the_plain_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `norm_silu` separate for int4, `norm_linear_silu_mul` runs the norm, the plain one-row kernel and
    SwiGLU as three ops with the separate ops' results, while `norm_linear` (the `norm` form) stays fused and an
    int8 weight of the same shape keeps both fused."""
    from engine.kernels import triton_gemv

    calls: list[str] = []

    def plain(x: torch.Tensor, w: Any, config: object) -> torch.Tensor:
        calls.append(f"plain {w.format}")
        return F.linear(x, w.dense())

    def fused(x: torch.Tensor, residual: Any, norm_weight: Any, eps: float, w: Any, config: object, **kw: Any):
        calls.append(f"fused {w.format}" + (" silu" if kw.get("silu_mul") else ""))
        return torch.zeros(1, w.n // 2 if kw.get("silu_mul") else w.n), x

    monkeypatch.setattr(kernels, "_gemv_config", lambda x, w: object())
    monkeypatch.setattr(triton_gemv, "linear", plain)
    monkeypatch.setattr(triton_gemv, "norm_linear", fused)
    monkeypatch.setattr(kernels, "_SEPARATE", {("norm_silu", "int4")})
    w13, w8 = Int4.from_dense(torch.randn(256, 128)), Int8.from_dense(torch.randn(256, 128))
    x, residual, norm_weight = torch.randn(1, 128), torch.randn(1, 128), 1 + 0.1 * torch.randn(128)
    act, h = kernels.norm_linear_silu_mul(x, residual, norm_weight, 1e-5, w13)
    assert calls == ["plain int4"]
    normed, expected_h = reference.add_rms_norm(x, residual, norm_weight, 1e-5)
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(act, reference.silu_mul(F.linear(normed, w13.dense())))
    kernels.norm_linear(x, residual, norm_weight, 1e-5, w13)
    kernels.norm_linear_silu_mul(x, residual, norm_weight, 1e-5, w8)
    assert calls == ["plain int4", "fused int4", "fused int8 silu"]
    kernels.norm_linear_silu_mul(torch.randn(2, 128), torch.randn(2, 128), norm_weight, 1e-5, w8)  # two rows
    assert calls[-1] == "plain int8"
    monkeypatch.setattr(kernels, "_FUSED_ROWS", {("norm_silu", (2, *w8.key))})  # `tune_fusion_rows` kept it fused
    kernels.norm_linear_silu_mul(torch.randn(2, 128), torch.randn(2, 128), norm_weight, 1e-5, w8)
    kernels.norm_linear(torch.randn(2, 128), torch.randn(2, 128), norm_weight, 1e-5, w8)  # the other form: separate
    kernels.norm_linear_silu_mul(torch.randn(3, 128), torch.randn(3, 128), norm_weight, 1e-5, w8)  # not timed at 3
    assert calls[-3:] == ["fused int8 silu", "plain int8", "plain int8"]


def test_tune_fusion_rows_keeps_a_small_weight_s_form_fused_where_it_ran_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At each row count above one with a Triton config, each form of each small weight is timed fused against the
    separate norm, plain kernel (and SwiGLU); it stays fused only where faster. A weight over LAUNCH_BOUND_BYTES,
    one row, and a row count with no Triton config are not timed."""
    from engine.kernels import triton_gemv

    small, large = Int8.from_dense(torch.randn(256, 128)), Int8.from_dense(torch.randn(1024, 128))
    monkeypatch.setattr(kernels, "LAUNCH_BOUND_BYTES", 100_000)  # small: 33 KB, large: 131 KB
    monkeypatch.setattr(kernels, "_use_triton", lambda t: True)
    chosen = {(m, *w.key): object() for w in (small, large) for m in (1, 2, 8)}
    monkeypatch.setattr(kernels, "_TRITON_CONFIG", chosen)
    kept: set[tuple[str, tuple]] = set()
    monkeypatch.setattr(kernels, "_FUSED_ROWS", kept)
    ran: list[str] = []
    monkeypatch.setattr(triton_gemv, "norm_linear", lambda x, *a, silu_mul=False: ran.append(f"fused {len(x)}"))
    monkeypatch.setattr(triton_gemv, "linear", lambda x, w, config: ran.append(f"separate {len(x)}") or x)
    monkeypatch.setattr(kernels, "add_rms_norm", lambda x, residual, weight, eps: (x, x))
    monkeypatch.setattr(kernels, "silu_mul", lambda gu: gu)

    def timed(step, calls: int) -> float:  # fused pays at 2 rows, not at 8
        ran.clear()
        step()
        kind, rows = ran[0].split()
        return {("fused", "2"): 1.0, ("separate", "2"): 2.0, ("fused", "8"): 3.0, ("separate", "8"): 2.0}[kind, rows]

    monkeypatch.setattr(kernels, "graph_time", timed)
    report = kernels.tune_fusion_rows({"norm": [small, large], "norm_silu": [small]}, (1, 2, 4, 8))
    assert kept == {("norm", (2, *small.key)), ("norm_silu", (2, *small.key))}
    assert set(report) == {f"int8 256x128 m={m} {form}" for m in (2, 8) for form in ("norm", "norm_silu")}
    assert report["int8 256x128 m=2 norm"] == {"fused": 1000.0, "separate": 2000.0}


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_tuned_configs_come_first_on_the_swept_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's table (triton_gemv.TUNED) decides where it timed the shape on a GPU of its multiprocessor count:
    one row's entry for one row only, several rows the next larger swept count's (the largest past them); the rule
    elsewhere."""
    from engine.kernels import triton_gemv as g

    tuned = {("int4", 1, 4096, 4096): (128, 256, 1, 8, 3, False, "mask"),
             ("int4", 8, 4096, 4096): (64, 128, 2, 4, 4, False, "shift"),
             ("int4", 32, 4096, 4096): (128, 128, 1, 8, 3, False, "mask")}  # fmt: skip
    monkeypatch.setattr(g, "TUNED", tuned)
    sms = g.TUNED_SMS
    assert g.choose_config(1, 4096, 4096, sms, "int4") == g.GemvConfig(128, 256, 1, 8, 3)
    assert g.choose_config(5, 4096, 4096, sms, "int4") == g.GemvConfig(64, 128, 2, 4, 4, unpack="shift")
    assert g.choose_config(9, 4096, 4096, sms, "int4") == g.choose_config(64, 4096, 4096, sms, "int4")
    assert g.choose_config(9, 4096, 4096, sms, "int4") == g.GemvConfig(128, 128, 1, 8, 3)
    assert g.choose_config(1, 4096, 4096, sms + 2, "int4") == g._int4_config(1, 4096, 4096, sms + 2)
    assert g.choose_config(1, 4096, 4096, sms, "int8") == g._dense_config(1, 4096, 4096, sms)
    monkeypatch.setattr(g, "TUNED", {k: v for k, v in tuned.items() if k[1] == 1})
    assert g.choose_config(8, 4096, 4096, sms, "int4") == g._int4_config(8, 4096, 4096, sms)


def test_dispatch_uses_reference_on_cpu() -> None:
    gen = _rng("dispatch", "cpu")
    x, w = _randn(gen, 2, 64, dtype=torch.float32, device="cpu"), _randn(gen, 64, dtype=torch.float32, device="cpu")
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    assert torch.equal(kernels.add_rms_norm(x, x, w, 1e-5)[0], reference.rms_norm(x + x, w, 1e-5))
    m = _randn(gen, 4, 64, dtype=torch.float32, device="cpu")
    dense, half = Dense.from_dense(m), Dense.from_dense(m[:2])
    assert torch.equal(kernels.linear(x, dense), x @ m.T)
    for res in (None, 2 * x):
        out, h = kernels.norm_linear(x, res, w, 1e-5, dense)
        ref_out, ref_h = reference.norm_linear(x, res, w, 1e-5, m)
        assert torch.equal(out, ref_out) and torch.equal(h, ref_h)
        act, h = kernels.norm_linear_silu_mul(x, res, w, 1e-5, half)
        ref_act, ref_h = reference.norm_linear_silu_mul(x, res, w, 1e-5, m[:2])
        assert torch.equal(act, ref_act) and torch.equal(h, ref_h)
    assert kernels.norm_linear(x, None, w, 1e-5, dense)[1] is x  # the first layer's residual stream is x itself
    out, res, squares = kernels.linear_residual(x, dense, 2 * x[:, :4])  # the add is left to the next norm
    assert torch.equal(out, x @ m.T) and torch.equal(res, 2 * x[:, :4]) and squares is None


def test_import_does_not_import_triton() -> None:
    code = "import sys, engine.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# --- the references against Hugging Face transformers -------------------------------------------


def test_reference_rms_norm_matches_hf() -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = _rng("hf-norm", "cpu")
    for dt in (torch.float32, torch.bfloat16):
        norm = llama.LlamaRMSNorm(96, eps=1e-5).to(dt)
        norm.weight.data = 1 + 0.1 * _randn(gen, 96, dtype=dt, device="cpu")
        x = _randn(gen, 4, 96, dtype=dt, device="cpu")
        assert torch.equal(reference.rms_norm(x, norm.weight, 1e-5), norm(x))


def test_reference_rotary_matches_hf() -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = _rng("hf-rope", "cpu")
    cos, sin = rope_tables(64, 32)
    q = _randn(gen, 3, 4, 32, dtype=torch.float32, device="cpu")
    k = _randn(gen, 3, 2, 32, dtype=torch.float32, device="cpu")
    v = _randn(gen, 3, 2, 32, dtype=torch.float32, device="cpu")
    positions, slots = torch.tensor([5, 0, 63]), torch.tensor([1, 2, 0])
    k_cache, v_cache = torch.randn(3, 2, 64, 32), torch.randn(3, 2, 64, 32)
    q_rot = reference.rotary_kv_write(q, k, v, cos, sin, positions, slots, k_cache, v_cache)
    # HF layout: [B, H, seq=1, D] with cos/sin [B, seq, D].
    hf_q, hf_k = llama.apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[positions, None], sin[positions, None])
    torch.testing.assert_close(q_rot, hf_q[:, :, 0], rtol=1e-6, atol=1e-6)
    for b in range(3):
        torch.testing.assert_close(k_cache[slots[b], :, positions[b]], hf_k[b, :, 0], rtol=1e-6, atol=1e-6)
        assert torch.equal(v_cache[slots[b], :, positions[b]], v[b])


def test_reference_attention_matches_sdpa() -> None:
    gen = _rng("sdpa", "cpu")
    n_heads, n_kv, head_dim, lengths = 8, 2, 16, [1, 9, 30]
    q = _randn(gen, 3, n_heads, head_dim, dtype=torch.float32, device="cpu")
    k_cache = _randn(gen, 4, n_kv, 30, head_dim, dtype=torch.float32, device="cpu")
    v_cache = _randn(gen, 4, n_kv, 30, head_dim, dtype=torch.float32, device="cpu")
    slots = torch.tensor([3, 0, 2])
    out = reference.decode_attention(q, k_cache, v_cache, slots, torch.tensor(lengths), 0.3)
    for b, length in enumerate(lengths):
        keys = k_cache[slots[b], :, :length].repeat_interleave(n_heads // n_kv, dim=0)
        values = v_cache[slots[b], :, :length].repeat_interleave(n_heads // n_kv, dim=0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b, :, None], keys, values, scale=0.3)
        torch.testing.assert_close(out[b], expected[:, 0], rtol=1e-5, atol=1e-5)


def test_cpu_rotary_attention_matches_the_reference() -> None:
    """The float32 CPU shortcut, for one sequence (plain indexing, no mask) and for a batch (gathered, masked),
    against the reference's own ops, which float64 inputs take: the output and what lands in the caches."""
    gen = _rng("cpu-rotary-attention", "cpu")
    n_heads, n_kv, head_dim, max_seq = 8, 2, 32, 40
    cos, sin = rope_tables(max_seq, head_dim)
    q, k, v = (_randn(gen, 3, h, head_dim, dtype=torch.float32, device="cpu") for h in (n_heads, n_kv, n_kv))
    caches = [_randn(gen, 4, n_kv, max_seq, head_dim, dtype=torch.float32, device="cpu") for _ in range(2)]
    positions, slots = torch.tensor([5, 0, 39]), torch.tensor([1, 3, 0])
    for rows in (slice(0, 3), slice(0, 1), slice(1, 2), slice(2, 3)):
        ours, theirs = [c.clone() for c in caches], [c.double() for c in caches]
        out = reference.rotary_attention(q[rows], k[rows], v[rows], cos, sin, positions[rows], slots[rows], *ours, 0.3)
        qkv = (t[rows].double() for t in (q, k, v))
        expected = reference.rotary_attention(*qkv, cos, sin, positions[rows], slots[rows], *theirs, 0.3)
        torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)
        for got, want in zip(ours, theirs, strict=True):
            torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


# --- sampling -----------------------------------------------------------------------------------

SAMPLING_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda_only])]


def _params(batch: int, device: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 7):
    return {
        "temperature": torch.full((batch,), temperature, device=device),
        "top_k": torch.full((batch,), top_k, dtype=torch.int32, device=device),
        "top_p": torch.full((batch,), top_p, device=device),
        "seeds": torch.full((batch,), seed, dtype=torch.int64, device=device),
        "offsets": torch.arange(batch, dtype=torch.int64, device=device),
    }


@pytest.mark.parametrize("device", SAMPLING_DEVICES)
def test_greedy_and_degenerate_filters_take_the_argmax(device: str) -> None:
    logits = torch.randn(6, 1000, generator=_rng("greedy", device), device=device) * 3
    argmax = logits.argmax(-1)
    assert torch.equal(kernels.sample(logits, **_params(6, device, temperature=0.0)), argmax)
    assert torch.equal(kernels.sample(logits, **_params(6, device, top_k=1)), argmax)
    assert torch.equal(kernels.sample(logits, **_params(6, device, top_p=1e-6)), argmax)


@pytest.mark.parametrize("device", SAMPLING_DEVICES)
def test_seeded_draws_do_not_depend_on_batch_position(device: str) -> None:
    gen = _rng("batch-position", device)
    row = torch.randn(1, 500, generator=gen, device=device)
    others = torch.randn(5, 500, generator=gen, device=device)
    alone, batched, reseeded = [], [], []
    for offset in range(20):
        params = _params(1, device, temperature=1.5, top_k=50, top_p=0.95, seed=1234)
        params["offsets"].fill_(offset)
        alone.append(kernels.sample(row, **params))
        big = _params(6, device, temperature=0.8, top_k=10, top_p=0.5, seed=99)
        for key in big:
            big[key][3] = params[key][0]
        batched.append(kernels.sample(torch.cat([others[:3], row, others[3:]]), **big)[3:4])
        params["seeds"].fill_(4321)
        reseeded.append(kernels.sample(row, **params))
    assert torch.equal(torch.cat(alone), torch.cat(batched))
    assert len(set(torch.cat(alone).tolist())) > 3  # the offset changes the draw
    assert not torch.equal(torch.cat(alone), torch.cat(reseeded))  # and so does the seed


@pytest.mark.parametrize("device", SAMPLING_DEVICES)
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "expected"),
    [
        (1.0, 0, 1.0, [0.1, 0.2, 0.3, 0.4]),
        (1.0, 2, 1.0, [0, 0, 3 / 7, 4 / 7]),
        (1.0, 0, 0.5, [0, 0, 3 / 7, 4 / 7]),  # 0.4 < 0.5, so 0.3 joins
        (1.0, 3, 0.85, [0, 2 / 9, 3 / 9, 4 / 9]),  # top-p on the renormalised top 3
        (2.0, 0, 1.0, [math.sqrt(p) / sum(math.sqrt(q) for q in (0.1, 0.2, 0.3, 0.4)) for p in (0.1, 0.2, 0.3, 0.4)]),
    ],
)
def test_sampled_distribution(device: str, temperature: float, top_k: int, top_p: float, expected: list[float]) -> None:
    draws = 4000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device).log().expand(draws, 4).contiguous()
    tokens = kernels.sample(logits, **_params(draws, device, temperature, top_k, top_p, seed=2024))
    freq = torch.bincount(tokens.cpu(), minlength=4).double() / draws
    for f, p in zip(freq.tolist(), expected, strict=True):
        assert abs(f - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / draws), (freq, expected)


def test_uniform_noise_is_uniform() -> None:
    u = sampling.uniform_noise(torch.tensor([0, 1, -5, 2**40]), torch.tensor([0, 0, 3, 2**35]), 5000)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs((u < 0.1).float().mean().item() - 0.1) < 0.01
    assert len({tuple(r[:8].tolist()) for r in u}) == 4  # every (seed, offset) has its own stream


@pytest.mark.parametrize("device", SAMPLING_DEVICES)
def test_repetition_penalty(device: str) -> None:
    logits = torch.tensor([[2.0, -2.0, 0.5, 3.0], [2.0, -2.0, 0.5, 3.0]], device=device)
    seen = torch.tensor([[True, True, False, False], [True, True, True, True]], device=device)
    penalty = torch.tensor([2.0, 1.0], device=device)
    expected = torch.tensor([[1.0, -4.0, 0.5, 3.0], [2.0, -2.0, 0.5, 3.0]], device=device)
    assert torch.equal(sampling.apply_repetition_penalty(logits, seen, penalty), expected)
    ids = torch.tensor([[1, 0, 1], [3, 3, 3]], device=device)
    by_ids = sampling.apply_repetition_penalty(logits, ids, torch.tensor([2.0, 2.0], device=device))
    assert torch.equal(by_ids, torch.tensor([[1.0, -4.0, 0.5, 3.0], [2.0, -2.0, 0.5, 1.5]], device=device))

    mask = torch.zeros(2, 4, dtype=torch.bool, device=device)
    sampling.mark_seen(mask, torch.tensor([0, 1], device=device), torch.tensor([2, 0], device=device))
    assert mask.nonzero().tolist() == [[0, 2], [1, 0]]


def test_repetition_penalty_matches_hf() -> None:
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    gen = _rng("hf-penalty", "cpu")
    logits = torch.randn(3, 50, generator=gen)
    ids = torch.randint(0, 50, (3, 12), generator=gen)
    expected = logits_process.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(sampling.apply_repetition_penalty(logits, ids, torch.full((3,), 1.3)), expected)


if __name__ == "__main__":
    interpreted.child_main(INTERPRETED_CASES, lambda name: run_case(name, "cpu"))
