"""A quantized weight dequantized into a dense `[n, k]` buffer in its dtype, for the path outside the GEMV (prefill
and batches over 64 rows: the dense weight then goes to cuBLAS). One pass over the weight; the same values as
engine.quant's `dequantize_int8` and `dequantize_int4`, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_gemv import _int4_plane

if TYPE_CHECKING:
    from engine.weights import Weight

BLOCK_N = 32


@triton.jit
def _int4_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_sg, stride_on, BLOCK_N: tl.constexpr):
    """One program per strip of BLOCK_N rows and group of 128 inputs."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_mask = n < N
    c = tl.arange(0, 16)
    rows = n.to(tl.int64)[:, None]
    words = tl.load(w_ptr + rows * stride_wn + 16 * g + c[None, :], mask=n_mask[:, None], other=0)
    scale = tl.load(s_ptr + g * stride_sg + n, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g * stride_sg + n, mask=n_mask, other=0).to(tl.float32) + 8388608.0
    for j in tl.static_range(8):
        value = _int4_plane(words, j, zero) * scale[:, None]
        k = 128 * g + 16 * j + c
        tl.store(out_ptr + rows * stride_on + k[None, :], value.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _int8_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    rows = n.to(tl.int64)[:, None]
    q = tl.load(q_ptr + rows * stride_qn + k[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + n, mask=n < N, other=0.0)
    tl.store(out_ptr + rows * stride_on + k[None, :], (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w: Weight) -> Tensor:
    """`w.dense()` in one kernel: `[n, k]` in w's dtype."""
    data, scales, zeros = w.tensors()
    out = torch.empty(w.shape, dtype=w.dtype, device=data.device)
    if w.format == "int4":
        grid = (triton.cdiv(w.n, BLOCK_N), w.k // 128)
        _int4_kernel[grid](data, scales, zeros, out, w.n, data.stride(0), scales.stride(0), out.stride(0), BLOCK_N)
    else:
        grid = (triton.cdiv(w.n, BLOCK_N), triton.cdiv(w.k, 128))
        _int8_kernel[grid](data, scales, out, w.n, w.k, data.stride(0), out.stride(0), BLOCK_N, 128)
    return out
