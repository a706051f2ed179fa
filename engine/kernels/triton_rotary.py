"""Prefill's rotary embedding and KV-cache write in one Triton pass over the QKV projection's output.

Unfused, each layer of a prefill rotates q and k with a negation, a concatenation, two products and a sum apiece
and copies k and v into the cache: a dozen kernels, each a full pass over a [tokens, heads, head_dim] tensor. Here
each program reads BLOCK_T tokens of one head once and writes the rotated q (or the rotated k and the v into the
cache) once; every token carries its own slot and position, so one launch serves a prefill of several sequences.
It rounds where the unfused ops round (`reference.prefill_rotary`): cos and sin to the input dtype, each product,
then the sum, so the result is the same to the bit. An int8 cache (`--kv int8`) gets each token's rotated key and
its value quantized in the same pass (`triton_kv.quantize`), with their scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_kv import quantize, to_int8

BLOCK_T = 32  # tokens per program: [32, head_dim] tiles, a few KB per program


@triton.jit
def _rotate_rows(
    src, dst, cos_ptr, sin_ptr, t, rows, src_at, dst_at, stride_table, HALF: tl.constexpr, scale_dst, scale_at,
    INT8_KV: tl.constexpr,
):  # fmt: skip
    """Rotate-half of the rows [BLOCK_T, 2 * HALF] at offsets `src + src_at` into `dst + dst_at` (element offsets
    per row), with the unfused ops' roundings: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to
    the input dtype. INT8_KV: each rotated row quantized into the int8 `dst`, its scale at `scale_dst + scale_at`."""
    dtype = src.dtype.element_ty
    d = tl.arange(0, HALF)
    mask = rows[:, None]
    at = src_at[:, None] + d[None, :]
    x1 = tl.load(src + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + at + HALF, mask=mask, other=0.0).to(tl.float32)
    table = t[:, None] * stride_table + d[None, :]
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)
    out1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    to = dst_at[:, None] + d[None, :]
    if INT8_KV:
        x1, x2 = out1.to(dtype).to(tl.float32), out2.to(dtype).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
        tl.store(dst + to, to_int8(x1, amax), mask=mask)
        tl.store(dst + to + HALF, to_int8(x2, amax), mask=mask)
        tl.store(scale_dst + scale_at, amax / 127.0, mask=rows)
    else:
        tl.store(dst + to, out1.to(dtype).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + to + HALF, out2.to(dtype).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    T,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_table,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_ch,
    stride_cp,
    stride_ss,
    stride_sh,
    n_heads: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    """Program (token block, head): heads 0..n_heads-1 rotate q into q_out [T, n_heads, D]; the others, kv head
    `head - n_heads`, rotate each token's k into the cache at its own slot and position and copy its v there
    (INT8_KV: both quantized, their scales into k_scale/v_scale [n_slots, Hkv, max_seq])."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = t < T
    t = t.to(tl.int64)
    head = tl.program_id(1)
    if head < n_heads:
        src = q_ptr + head * stride_qh
        dst = q_out_ptr + head * stride_oh
        _rotate_rows(src, dst, cos_ptr, sin_ptr, t, rows, t * stride_qt, t * stride_ot, stride_table, HALF, dst, t,
                     False)  # fmt: skip
    else:
        kv = head - n_heads
        slot = tl.load(slots_ptr + t, mask=rows, other=0).to(tl.int64)
        position = tl.load(positions_ptr + t, mask=rows, other=0).to(tl.int64)
        at = slot * stride_cs + position * stride_cp  # each token's row of its slot's cache
        scale_at = slot * stride_ss + kv * stride_sh + position
        k_src, k_dst = k_ptr + kv * stride_kh, k_cache_ptr + kv * stride_ch
        _rotate_rows(k_src, k_dst, cos_ptr, sin_ptr, t, rows, t * stride_kt, at, stride_table, HALF, k_scale_ptr,
                     scale_at, INT8_KV)  # fmt: skip
        d = tl.arange(0, 2 * HALF)
        v = tl.load(v_ptr + kv * stride_vh + t[:, None] * stride_vt + d[None, :], mask=rows[:, None], other=0.0)
        v_dst = v_cache_ptr + kv * stride_ch + at[:, None] + d[None, :]
        if INT8_KV:
            v_int8, v_scale = quantize(v.to(tl.float32))
            tl.store(v_dst, v_int8, mask=rows[:, None])
            tl.store(v_scale_ptr + scale_at, v_scale, mask=rows)
        else:
            tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=rows[:, None])


def prefill_rotary(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    slots: Tensor,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """See `reference.prefill_rotary`: q [T, Hq, D], k and v [T, Hkv, D] (strided views of the QKV output are
    fine), cos/sin [T, D], caches [n_slots, Hkv, max_seq, D] (int8 with `kv_scales` [n_slots, Hkv, max_seq]),
    positions and slots int64 [T] (each inside the cache: not checked here, which would cost a sync); returns the
    rotated q [T, Hq, D]."""
    T, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    assert v.shape == k.shape and k_cache.shape[1] == v_cache.shape[1] == n_kv and k_cache.shape[3] == head_dim
    assert positions.shape == slots.shape == (T,) and positions.stride(0) == slots.stride(0) == 1
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of 2"
    assert q.stride(2) == k.stride(2) == v.stride(2) == cos.stride(1) == sin.stride(1) == 1
    assert cos.stride(0) == sin.stride(0) and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    k_scale, v_scale = kv_scales or (k_cache, v_cache)  # without scales the caches stand in, unread
    if kv_scales is not None:
        assert k_cache.dtype == torch.int8 and k_scale.shape == v_scale.shape == k_cache.shape[:3]
        assert k_scale.dtype == torch.float32 and k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1
    out = torch.empty((T, n_heads, head_dim), dtype=q.dtype, device=q.device)
    _prefill_rotary_kernel[(triton.cdiv(T, BLOCK_T), n_heads + n_kv)](
        q, k, v, cos, sin, positions, slots, out, k_cache, v_cache, k_scale, v_scale, T,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0) if kv_scales else 0, k_scale.stride(1) if kv_scales else 0,
        n_heads=n_heads, HALF=head_dim // 2, BLOCK_T=BLOCK_T, INT8_KV=kv_scales is not None, num_warps=4,
    )  # fmt: skip
    return out
