"""RMSNorm and fused residual-add + RMSNorm in Triton: one program per row, the row held in registers.

Decode has few rows (one per sequence) of at most 8192 elements, so a whole row fits one program
and every element is read and written exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    if USE_GDC:  # launched early (pdl.py); the next kernel may start now, as it too waits before reading
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offsets = row * n_cols + cols
    # Arithmetic is in float32 with explicit roundings to the input dtype where the unfused
    # model rounds (16-bit ops round each result the same way).
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x2) if residual is not None else x2
    res2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else x2
    block = triton.next_power_of_2(n_cols)
    num_warps = min(max(block // 256, 1), 16)
    gdc = pdl.enabled(x2)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        weight.contiguous(),
        out,
        total,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        USE_GDC=gdc,
        num_warps=num_warps,
        launch_pdl=gdc,
    )
    return out.view(x.shape), total.view(x.shape)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm of the last dimension of x (see `reference.rms_norm`)."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(x + residual), x + residual)` in one pass."""
    return _launch(x, residual, weight, eps)
