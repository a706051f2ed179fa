"""Split-KV decode attention ("flash-decoding") in Triton.

Decode has one query per sequence, so one program per (sequence, kv head) would leave most of
the GPU idle on long contexts. Instead each (sequence, kv head) is split into `num_splits` chunks
processed in parallel; a second kernel merges the partial softmaxes. The lengths are read from
device memory and each program sizes its chunk from the actual length, so one captured graph
serves every length up to the cache size and the work is spread evenly whatever the length.
All query heads of a GQA group share a program, so each K/V row is read once per group.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # keys per inner step


@triton.jit
def _split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    lengths_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_cp,
    n_kv_heads: tl.constexpr,
    n_splits: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    split = tl.program_id(1)

    length = tl.load(lengths_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=g[:, None] < GROUP, other=0.0).to(tl.float32)
    slot = tl.load(slots_ptr + b)
    kv_base = slot * stride_cs + kv_head * stride_ch

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        visible = n < end
        offsets = kv_base + n[:, None] * stride_cp + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
        # qk_scale includes log2(e) so that exp2 gives the softmax's exponentials.
        s = tl.where(visible[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    out = (b * n_kv_heads * GROUP + heads) * n_splits + split
    tl.store(acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc, mask=g[:, None] < GROUP)
    tl.store(max_ptr + out, m_i, mask=g < GROUP)
    tl.store(sum_ptr + out, l_i, mask=g < GROUP)


@triton.jit
def _merge_kernel(
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    n_splits: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Combine the splits of one (sequence, query head); empty splits have max -inf and sum 0."""
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    in_range = s < n_splits
    m = tl.load(max_ptr + row * n_splits + s, mask=in_range, other=float("-inf"))
    sums = tl.load(sum_ptr + row * n_splits + s, mask=in_range, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # all splits empty (length 0)
    weight = tl.exp2(m - m_max)
    acc = tl.load(acc_ptr + (row * n_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=in_range[:, None], other=0.0)
    numerator = tl.sum(acc * weight[:, None], axis=0)
    denominator = tl.sum(sums * weight, axis=0)
    # The split holding the overall max contributes >= 1 to the denominator; with length 0
    # there is none and the numerator is 0, so clamping gives zeros.
    out = numerator / tl.maximum(denominator, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def dot_precision(dtype: torch.dtype) -> str:
    """Dots run on float32 copies of the tiles: TF32 holds 16-bit floats exactly (and rounds
    the float32 probabilities less than a bf16 cast would); float32 inputs need full IEEE."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(batch: int, n_kv_heads: int, max_seq: int, sm_count: int) -> int:
    """Enough (sequence, kv head, split) programs for about four per SM, each with >= 1 key block."""
    wanted = math.ceil(4 * sm_count / (batch * n_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_seq, BLOCK_N), 64))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """See `reference.decode_attention`. `num_splits` overrides the heuristic (for tests)."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    assert group * n_kv_heads == n_heads, "q heads must be a multiple of kv heads"
    assert head_dim >= 16 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of 2 >= 16"
    assert q.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    if num_splits is None:
        sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 132
        num_splits = choose_splits(batch, n_kv_heads, max_seq, sm_count)

    partial = torch.empty((batch * n_heads * num_splits, head_dim), dtype=torch.float32, device=q.device)
    maxes = torch.empty((batch * n_heads * num_splits,), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    _split_kernel[(batch * n_kv_heads, num_splits)](
        q, k_cache, v_cache, slots, lengths, partial, maxes, sums,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        n_kv_heads=n_kv_heads, n_splits=num_splits, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    _merge_kernel[(batch * n_heads,)](
        partial, maxes, sums, out, n_splits=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, num_warps=4,
    )  # fmt: skip
    return out
