"""Rotary embedding of the new token's q and k fused with the KV-cache write, in Triton.

One program per (sequence, head) over q heads then kv heads: it reads the position and cache slot
from device memory, so a captured graph serves every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl


@triton.jit
def _rotary_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_out_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_table,
    stride_cs,
    stride_ch,
    stride_cp,
    n_q_heads,
    HALF: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    if USE_GDC:  # launched early (pdl.py): wait for the previous kernel's writes, then let the next one launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(positions_ptr + b)
    lo = tl.arange(0, HALF)
    hi = lo + HALF
    table = pos * stride_table
    cos_lo = tl.load(cos_ptr + table + lo).to(tl.float32)
    cos_hi = tl.load(cos_ptr + table + hi).to(tl.float32)
    sin_lo = tl.load(sin_ptr + table + lo).to(tl.float32)
    sin_hi = tl.load(sin_ptr + table + hi).to(tl.float32)
    if head < n_q_heads:
        src = q_ptr + b * stride_qb + head * stride_qh
        x_lo = tl.load(src + lo).to(tl.float32)
        x_hi = tl.load(src + hi).to(tl.float32)
        dst = q_out_ptr + (b * n_q_heads + head) * (2 * HALF)
        tl.store(dst + lo, (x_lo * cos_lo - x_hi * sin_lo).to(q_out_ptr.dtype.element_ty))
        tl.store(dst + hi, (x_hi * cos_hi + x_lo * sin_hi).to(q_out_ptr.dtype.element_ty))
    else:
        kv_head = head - n_q_heads
        src = k_ptr + b * stride_kb + kv_head * stride_kh
        x_lo = tl.load(src + lo).to(tl.float32)
        x_hi = tl.load(src + hi).to(tl.float32)
        slot = tl.load(slots_ptr + b)
        offset = slot * stride_cs + kv_head * stride_ch + pos * stride_cp
        dst = k_cache_ptr + offset
        tl.store(dst + lo, (x_lo * cos_lo - x_hi * sin_lo).to(k_cache_ptr.dtype.element_ty))
        tl.store(dst + hi, (x_hi * cos_hi + x_lo * sin_hi).to(k_cache_ptr.dtype.element_ty))
        vs = v_ptr + b * stride_vb + kv_head * stride_vh
        v = tl.load(vs + tl.arange(0, 2 * HALF))
        tl.store(v_cache_ptr + offset + tl.arange(0, 2 * HALF), v.to(v_cache_ptr.dtype.element_ty))


def rotary_kv_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
) -> Tensor:
    """See `reference.rotary_kv_write`. q/k/v may be strided views (e.g. of a fused QKV output)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of 2"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "the head dimension must be contiguous"
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    q_out = torch.empty((batch, n_q_heads, head_dim), dtype=q.dtype, device=q.device)
    gdc = pdl.enabled(q)
    _rotary_kv_kernel[(batch, n_q_heads + n_kv_heads)](
        q, k, v, cos, sin, positions, slots, k_cache, v_cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        n_q_heads, HALF=head_dim // 2, USE_GDC=gdc,
        num_warps=1, launch_pdl=gdc,
    )  # fmt: skip
    return q_out
