"""Small kernels for tests/test_compiled.py: one that the interpreter runs correctly and Triton cannot compile (two
returns of different shapes in a static branch), and one launched early as the project's kernels are (`pdl.py`),
which the interpreter cannot run that way and the compile check must compile as a Hopper GPU launches it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.kernels import pdl

PARTIALS = 16  # one row's partial sums per column, as the int4 GEMV's one-row path keeps them


@triton.jit
def _finish(acc, BLOCK_M: tl.constexpr):
    """acc [PARTIALS, BLOCK] of one row's partial sums -> [1, BLOCK]; several rows' [BLOCK_M, BLOCK] as they are.
    The bug: the code generator types every return of a function alike, even one in a static branch not taken."""
    if BLOCK_M == 1:
        return tl.sum(acc, axis=0)[None, :]
    return acc


@triton.jit
def _two_returns_kernel(x_ptr, out_ptr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = 16 if BLOCK_M == 1 else BLOCK_M
    r = tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + r[:, None] * BLOCK + k[None, :])
    m = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + m[:, None] * BLOCK + k[None, :], _finish(acc, BLOCK_M))


def finish(x: Tensor, rows: int) -> Tensor:
    """x [PARTIALS, BLOCK] summed over its rows for one row, else x [rows, BLOCK] itself (powers of two)."""
    out = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=x.device)
    _two_returns_kernel[(1,)](x, out, BLOCK_M=rows, BLOCK=x.shape[1])
    return out


@triton.jit
def _scale_kernel(x_ptr, out_ptr, factor, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + k, tl.load(x_ptr + k) * factor)


def scale(x: Tensor, factor: float) -> Tensor:
    """`x * factor` for a contiguous x of a multiple of 16 elements, launched early where the GPU can (pdl.py)."""
    out = torch.empty_like(x)
    gdc = pdl.enabled(x)
    _scale_kernel[(x.numel() // 16,)](x, out, factor, 16, gdc, launch_pdl=gdc)
    return out
