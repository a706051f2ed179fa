"""Split-KV decode attention ("flash-decoding") in Triton, with the new token's rotary embedding and KV-cache write.

Each program rotates its query heads and the new token's key itself (a few hundred bytes); the
program whose keys end at the new position reads the keys before it from the cache and adds the new
key and value from registers, then writes them to the cache for the steps after: no separate rotary
kernel to wait for, and no program reads what another writes.

Decode has one query per sequence, so one program per (sequence, kv head) would leave most of
the GPU idle on long contexts. Instead each (sequence, head) is split into `num_splits` chunks
processed in parallel, and the last of a row's splits to finish merges their partial softmaxes
(each split counts itself in with an atomic add): no second kernel to launch and wait for. The
positions are read from device memory and each program sizes its chunk from the actual length, so
one captured graph serves every length up to the cache size and the work is spread evenly whatever
the length. With one split (large batches) the split kernel writes the output itself.

Two inner loops, picked per model by its GQA group size:
- groups of `DOT_MIN_GROUP` or more (34B/70B: 8) share a program per kv head and use tl.dot,
  so each K/V tile is read once per group; tl.dot needs >= 16 rows, so the rows are padded.
- smaller groups (7B/13B MHA: 1) would waste most of those rows, so each query head gets its
  own program and computes its scores and weighted values with plain multiply-and-sum.

An int8 cache (`--kv int8`, INT8_KV) halves the bytes each step reads: both loops load the int8 tiles and one float32
scale per position, multiply each key's scores and each value's probabilities by its scale in registers, and the
new key and value are quantized (`triton_kv.quantize`) before they join the softmax and the cache.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import counters, pdl, switches
from .triton_kv import quantize

# Smaller groups get one program per query head: the group's programs run side by side and read
# their shared K/V again from L2, which stops paying off at about four heads.
DOT_MIN_GROUP = 4
BLOCK_N_DOT = 64  # keys per inner step of the tl.dot loop
# Keys per step of the multiply-and-sum loop, whose [keys, head_dim] accumulator and prefetched
# tile live in registers: at head_dim 128 about 128 per thread, four programs per SM.
BLOCK_N_LANES = 32
MAX_SPLITS = 64  # a power of 2: the merge reads this many (masked) whatever the split count
# Programs of 4 warps per SM that the split kernel's registers allow (its sm_90 compile, head_dim 128: 160 registers
# per thread with the multiply-and-sum loop, 128 with tl.dot), for `fill_splits`.
PER_SM_LANES, PER_SM_DOT = 3, 4


@triton.jit
def _attend_dot(
    q,
    k_ptr,
    v_ptr,
    start,
    end,
    stride_cp,
    qk_scale,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    ks_ptr,
    vs_ptr,
    INT8_KV: tl.constexpr,
):
    """Online softmax of the BLOCK_H query rows of q over keys start..end-1: (acc, max, sum). With INT8_KV the
    cache is int8 with a scale per position at ks_ptr/vs_ptr: each key's scores and each value's probabilities are
    multiplied by its scale (the int8 tiles enter the dot as they are, exact in TF32)."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        visible = n < end
        offsets = n[:, None] * stride_cp + d[None, :]
        k = tl.load(k_ptr + offsets, mask=visible[:, None], other=0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=visible[:, None], other=0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if INT8_KV:
            s = s * tl.load(ks_ptr + n, mask=visible, other=0.0)[None, :]
        s = tl.where(visible[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        weights = p
        if INT8_KV:
            weights = p * tl.load(vs_ptr + n, mask=visible, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_lanes(
    q, k_ptr, v_ptr, start, end, stride_cp, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ks_ptr, vs_ptr,
    INT8_KV: tl.constexpr,
):  # fmt: skip
    """`_attend_dot` for one query row ([1, HEAD_DIM]) without tl.dot (INT8_KV: the scales as there).

    Each of the BLOCK_N key lanes keeps its own running max, sum and weighted values, so a step
    reduces only over head_dim (within a warp) and the lanes are combined once at the end, not
    across warps at every step. Each tile is loaded one step ahead: otherwise ptxas issues the
    loads a few rows at a time, each waiting on memory.
    """
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    n = start + tl.arange(0, BLOCK_N)
    offsets = n[:, None] * stride_cp + d[None, :]
    k_next = tl.load(k_ptr + offsets, mask=(n < end)[:, None], other=0)
    v_next = tl.load(v_ptr + offsets, mask=(n < end)[:, None], other=0)
    ks_next = tl.full([BLOCK_N], 1.0, tl.float32)  # the scales (INT8_KV), a step ahead too
    vs_next = ks_next
    if INT8_KV:
        ks_next = tl.load(ks_ptr + n, mask=n < end, other=0.0)
        vs_next = tl.load(vs_ptr + n, mask=n < end, other=0.0)
    for _ in range(start, end, BLOCK_N):
        visible = n < end
        k = k_next.to(tl.float32)
        v = v_next.to(tl.float32)
        ks, vs = ks_next, vs_next
        n += BLOCK_N
        offsets += BLOCK_N * stride_cp
        k_next = tl.load(k_ptr + offsets, mask=(n < end)[:, None], other=0)
        v_next = tl.load(v_ptr + offsets, mask=(n < end)[:, None], other=0)
        if INT8_KV:
            ks_next = tl.load(ks_ptr + n, mask=n < end, other=0.0)
            vs_next = tl.load(vs_ptr + n, mask=n < end, other=0.0)
        s = tl.sum(k * q, axis=1)
        if INT8_KV:
            s = s * ks
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane without keys yet: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + p
        weights = p
        if INT8_KV:
            weights = p * vs
        acc = acc * alpha[:, None] + weights[:, None] * v
        m_i = m_new
    m = tl.max(m_i[:, None], axis=0)
    w = tl.exp2(m_i[:, None] - tl.where(m > float("-inf"), m, 0.0)[None, :])
    return tl.sum(acc * w, axis=0, keep_dims=True), m, tl.sum(l_i[:, None] * w, axis=0)


@triton.jit
def _merge_row(acc_ptr, max_ptr, sum_ptr, out_ptr, row, n_splits, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Combine the splits of one (sequence, query head); empty splits have max -inf and sum 0. The partials come
    from other programs of this grid: read from L2 (".cg"), never from a stale L1 line.

    All loads are issued at once: skipping the empty splits would first need the length (one
    more memory round trip, which costs more than the few KB it would save).
    """
    _merge_used(acc_ptr, max_ptr, sum_ptr, out_ptr, row, n_splits, n_splits, BLOCK_S, HEAD_DIM)


@triton.jit
def _merge_used(
    acc_ptr, max_ptr, sum_ptr, out_ptr, row, n_splits, n_used, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr
):  # fmt: skip
    """`_merge_row` over the first `n_used` of the row's `n_splits` partials (the splits that had keys)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    in_range = s < n_used
    m = tl.load(max_ptr + row * n_splits + s, mask=in_range, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(sum_ptr + row * n_splits + s, mask=in_range, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=0)  # finite: the split holding the new key has keys
    weight = tl.exp2(m - m_max)
    acc = tl.load(acc_ptr + (row * n_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=in_range[:, None], other=0.0,
                  cache_modifier=".cg")  # fmt: skip
    numerator = tl.sum(acc * weight[:, None], axis=0)
    denominator = tl.sum(sums * weight, axis=0)  # >= 1: the split holding the overall max contributes 1
    out = numerator / denominator
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["n_splits"])  # one compiled kernel for every batch bucket's split count
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    count_ptr,
    qk_scale,
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
    stride_ss,
    stride_sh,
    n_splits,
    n_heads: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    USE_GDC: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    """One (sequence, HEADS query heads, split) per program over keys 0..position; BLOCK_H == 1 selects
    `_attend_lanes`. q, k, v: the new token's, unrotated. count_ptr: one zeroed counter per (sequence, HEADS heads),
    back to zero after each call. INT8_KV: int8 caches with a float32 scale per (slot, kv head, position) at
    k_scale_ptr/v_scale_ptr; the new key and value are quantized, and attended to as the later steps read them."""
    if USE_GDC:  # launched early (pdl.py): wait for the previous kernel's writes before reading anything
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // (n_heads // HEADS)
    head0 = pid % (n_heads // HEADS) * HEADS
    split = tl.program_id(1)

    pos = tl.load(positions_ptr + b).to(tl.int32)
    length = pos + 1
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    # With SKIP_EMPTY only the splits with keys take part (those past the length exit at once, and the merge and
    # the count take the ones left), and a row whose keys all fit one split has it write the output itself.
    active = tl.cdiv(length, chunk) if SKIP_EMPTY else n_splits
    if split < active:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        rows = h < HEADS
        # Rotate-half rotary embedding, rounded once to the input dtype as reference.rotary_kv_write rounds.
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        cos = tl.load(cos_ptr + pos * stride_table + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_table + d).to(tl.float32) * tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
        q_rows = q_ptr + b * stride_qb + (head0 + h)[:, None] * stride_qh
        q = tl.load(q_rows + d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
        q_partner = tl.load(q_rows + partner[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
        q = (q * cos[None, :] + q_partner * sin[None, :]).to(q_ptr.dtype.element_ty).to(tl.float32)
        kv_head = head0 // GROUP
        k_row = k_ptr + b * stride_kb + kv_head * stride_kh
        k_new = (tl.load(k_row + d).to(tl.float32) * cos + tl.load(k_row + partner).to(tl.float32) * sin).to(
            k_ptr.dtype.element_ty
        )
        v_new = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh + d)
        slot = tl.load(slots_ptr + b)
        kv_base = slot * stride_cs + kv_head * stride_ch
        k_cache, v_cache = k_cache_ptr + kv_base, v_cache_ptr + kv_base
        scale_base = slot * stride_ss + kv_head * stride_sh
        k_scales, v_scales = k_scale_ptr + scale_base, v_scale_ptr + scale_base
        if INT8_KV:
            k_new, k_new_scale = quantize(k_new.to(tl.float32))
            v_new, v_new_scale = quantize(v_new.to(tl.float32))
            k_seen = k_new.to(tl.float32) * k_new_scale
            v_seen = v_new.to(tl.float32) * v_new_scale
        else:
            k_new, v_new = k_new.to(k_cache_ptr.dtype.element_ty), v_new.to(v_cache_ptr.dtype.element_ty)
            k_seen, v_seen = k_new.to(tl.float32), v_new.to(tl.float32)
        # qk_scale includes log2(e) so that exp2 gives the softmax's exponentials. The cache holds keys 0..pos-1;
        # the new key and value join from registers below.
        cached_end = tl.minimum(end, pos)
        if BLOCK_H == 1:
            acc, m, total = _attend_lanes(
                q, k_cache, v_cache, start, cached_end, stride_cp, qk_scale, HEAD_DIM, BLOCK_N, k_scales, v_scales,
                INT8_KV,
            )  # fmt: skip
        else:
            acc, m, total = _attend_dot(
                q, k_cache, v_cache, start, cached_end, stride_cp, qk_scale, BLOCK_H, HEAD_DIM, BLOCK_N, PRECISION,
                k_scales, v_scales, INT8_KV,
            )  # fmt: skip
        if (start <= pos) & (pos < end):  # this split's keys end with the new one: one more online-softmax step
            score = tl.sum(q * k_seen[None, :], axis=1) * qk_scale
            m_new = tl.maximum(m, score)
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(score - m_new)
            acc = acc * alpha[:, None] + p[:, None] * v_seen[None, :]
            total = total * alpha + p
            m = m_new
            if head0 % GROUP == 0:  # one program per kv head writes them to the cache, for the steps after
                tl.store(k_cache + pos * stride_cp + d, k_new)
                tl.store(v_cache + pos * stride_cp + d, v_new)
                if INT8_KV:
                    tl.store(k_scales + pos, k_new_scale)
                    tl.store(v_scales + pos, v_new_scale)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        out = b * n_heads + head0 + h
        if ONE_SPLIT:
            result = acc / total[:, None]  # >= 1: the max key contributes 1
            tl.store(out_ptr + out[:, None] * HEAD_DIM + d[None, :], result.to(out_ptr.dtype.element_ty),
                     mask=rows[:, None])  # fmt: skip
        elif active == 1:  # SKIP_EMPTY and every key in this split
            result = acc / total[:, None]
            tl.store(out_ptr + out[:, None] * HEAD_DIM + d[None, :], result.to(out_ptr.dtype.element_ty),
                     mask=rows[:, None])  # fmt: skip
        else:
            part = out * n_splits + split
            tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=rows[:, None])
            tl.store(max_ptr + part, m, mask=rows)
            tl.store(sum_ptr + part, total, mask=rows)
            # Every thread's stores before the (one-thread) release; the acquire makes the others' visible to the
            # last.
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu") == active - 1:
                for i in tl.static_range(HEADS):
                    _merge_used(acc_ptr, max_ptr, sum_ptr, out_ptr, b * n_heads + head0 + i, n_splits, active, BLOCK_S,
                                HEAD_DIM)  # fmt: skip
                tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit(do_not_specialize=["queries", "n_splits"])
def _verify_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    counts_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    out_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    count_ptr,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_table,
    stride_cs,
    stride_ch,
    stride_cp,
    stride_ss,
    stride_sh,
    queries,
    n_splits,
    n_heads: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    """One (sequence, kv head, split) per program: its `queries` new tokens times the GROUP query heads of the kv
    head are the rows of one tl.dot tile (row r: token r // GROUP, head r % GROUP). The splits share the keys cached
    before the row's first new position; split 0 also takes the new keys and values, from registers, causally, and
    writes them to the cache (no program reads what another writes). count_ptr and INT8_KV: as in
    `_split_kernel`."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // (n_heads // GROUP)
    kv_head = pid % (n_heads // GROUP)
    split = tl.program_id(1)

    pos = tl.load(positions_ptr + b).to(tl.int32)
    last = tl.load(counts_ptr + b).to(tl.int32) - 1  # the row's last real token
    chunk = tl.cdiv(tl.cdiv(pos, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, pos)

    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    t = r // GROUP
    head = kv_head * GROUP + r % GROUP
    rows = t < queries
    at = pos + tl.minimum(t, last)  # tokens past the last real one take its position (their output is unused)
    partner = (d + HEAD_DIM // 2) % HEAD_DIM
    signs = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + at[:, None] * stride_table + d[None, :]).to(tl.float32)
    sin = tl.load(sin_ptr + at[:, None] * stride_table + d[None, :]).to(tl.float32) * signs[None, :]
    q_rows = q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    q_partner = tl.load(q_rows + partner[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    q = (q * cos + q_partner * sin).to(q_ptr.dtype.element_ty).to(tl.float32)
    slot = tl.load(slots_ptr + b)
    kv_base = slot * stride_cs + kv_head * stride_ch
    k_cache, v_cache = k_cache_ptr + kv_base, v_cache_ptr + kv_base
    scale_base = slot * stride_ss + kv_head * stride_sh
    k_scales, v_scales = k_scale_ptr + scale_base, v_scale_ptr + scale_base
    acc, m, total = _attend_dot(
        q, k_cache, v_cache, start, end, stride_cp, qk_scale, BLOCK_R, HEAD_DIM, BLOCK_N, PRECISION, k_scales,
        v_scales, INT8_KV,
    )  # fmt: skip
    if split == 0:  # the new keys: token j is seen by the rows of tokens t >= j
        j = tl.arange(0, BLOCK_T)
        real = j <= last
        j_at = pos + tl.minimum(j, last)
        k_cos = tl.load(cos_ptr + j_at[:, None] * stride_table + d[None, :]).to(tl.float32)
        k_sin = tl.load(sin_ptr + j_at[:, None] * stride_table + d[None, :]).to(tl.float32) * signs[None, :]
        k_rows = k_ptr + b * stride_kb + j[:, None] * stride_kt + kv_head * stride_kh
        k_new = tl.load(k_rows + d[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        k_partner = tl.load(k_rows + partner[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        k_new = (k_new * k_cos + k_partner * k_sin).to(k_ptr.dtype.element_ty)
        v_rows = v_ptr + b * stride_vb + j[:, None] * stride_vt + kv_head * stride_vh
        v_new = tl.load(v_rows + d[None, :], mask=real[:, None], other=0.0)
        if INT8_KV:  # quantized, and attended to as the later steps read them
            k_new, k_new_scale = quantize(k_new.to(tl.float32))
            v_new, v_new_scale = quantize(v_new.to(tl.float32))
            k_seen = k_new.to(tl.float32) * k_new_scale[:, None]
            v_seen = v_new.to(tl.float32) * v_new_scale[:, None]
        else:
            k_new, v_new = k_new.to(k_cache_ptr.dtype.element_ty), v_new.to(v_cache_ptr.dtype.element_ty)
            k_seen, v_seen = k_new.to(tl.float32), v_new.to(tl.float32)
        visible = (j[None, :] <= t[:, None]) & real[None, :]
        s = tl.dot(q, tl.trans(k_seen), input_precision=PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every row sees token 0
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v_seen, input_precision=PRECISION)
        m = m_new
        cache_at = (pos + j)[:, None] * stride_cp + d[None, :]
        tl.store(k_cache + cache_at, k_new, mask=real[:, None])
        tl.store(v_cache + cache_at, v_new, mask=real[:, None])
        if INT8_KV:
            tl.store(k_scales + pos + j, k_new_scale, mask=real)
            tl.store(v_scales + pos + j, v_new_scale, mask=real)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    out = (b * queries + t) * n_heads + head  # the row of out [B * T * Hq, D]
    if ONE_SPLIT:
        result = acc / total[:, None]
        tl.store(
            out_ptr + out[:, None] * HEAD_DIM + d[None, :], result.to(out_ptr.dtype.element_ty), mask=rows[:, None]
        )
    else:
        part = out * n_splits + split
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=rows[:, None])
        tl.store(max_ptr + part, m, mask=rows)
        tl.store(sum_ptr + part, total, mask=rows)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
            for i in range(queries * GROUP):
                row = (b * queries + i // GROUP) * n_heads + kv_head * GROUP + i % GROUP
                _merge_row(acc_ptr, max_ptr, sum_ptr, out_ptr, row, n_splits, BLOCK_S, HEAD_DIM)
            tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")


def dot_precision(dtype: torch.dtype) -> str:
    """Dots run on float32 copies of the tiles: TF32 holds 16-bit floats exactly (and rounds
    the float32 probabilities less than a bf16 cast would); float32 inputs need full IEEE."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(programs: int, max_seq: int, block_n: int, sm_count: int) -> int:
    """Splits for at most one wave of four programs per SM (the occupancy of both loops), given
    `programs` per split, each split >= 1 key block. Rounding down rather than up spares a second,
    partial wave, and a batch that fills the wave gets one split, which also drops the merge kernel.
    The chunk of a split follows the actual length, so at short lengths the surplus splits find no
    keys and exit at once.
    """
    return max(1, min(4 * sm_count // programs, triton.cdiv(max_seq, block_n), MAX_SPLITS))


def fill_splits(programs: int, max_seq: int, block_n: int, slots: int) -> int:
    """Splits (`attention_splits`) whose programs fill whole waves of `slots` (programs that fit the GPU at once):
    the fewest within 5% of the best fill, at most two waves, each split >= 1 key block; one where the batch
    alone fills a wave. Rows whose keys fit fewer splits leave the rest at once (SKIP_EMPTY), so a long context
    gets the whole GPU and a short one costs no more. `choose_splits` instead rounds a wave of four programs per SM
    down, which the lanes loop's registers do not fit (three): 7B at batch 1 took 1.3 waves."""
    if programs >= slots:
        return 1
    fills = {}
    for splits in range(1, min(triton.cdiv(max_seq, block_n), MAX_SPLITS) + 1):
        n = programs * splits
        if n > 2 * slots:
            break
        fills[splits] = n / (triton.cdiv(n, slots) * slots)
    best = max(fills.values())
    return min(splits for splits, fill in fills.items() if fill >= best - 0.05)


def _scales(k_cache: Tensor, kv_scales: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The kernels' scale arguments: an int8 cache's key and value scales [n_slots, Hkv, max_seq] and their slot and
    head strides; for a cache in the model's dtype the caches stand in (unread) and the strides are 0."""
    if kv_scales is None:
        return k_cache, k_cache, (0, 0)
    k_scale, v_scale = kv_scales
    assert k_cache.dtype == torch.int8 and k_scale.shape == v_scale.shape == k_cache.shape[:3]
    assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.stride() == v_scale.stride()
    assert k_scale.stride(2) == 1
    return k_scale, v_scale, (k_scale.stride(0), k_scale.stride(1))


def rotary_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    scale: float,
    num_splits: int | None = None,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """See `reference.rotary_attention`. q/k/v may be strided views (of the fused QKV output); `num_splits`
    overrides the heuristic (for tests); `kv_scales`: an int8 cache's scales."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    assert group * n_kv_heads == n_heads and k.shape[1] == v.shape[1] == n_kv_heads, "q heads: a multiple of kv heads"
    assert head_dim >= 16 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of 2 >= 16"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    k_scale, v_scale, scale_strides = _scales(k_cache, kv_scales)
    heads = group if group >= DOT_MIN_GROUP else 1  # query heads per program
    block_h = max(16, triton.next_power_of_2(heads)) if heads > 1 else 1
    block_n = BLOCK_N_DOT if heads > 1 else BLOCK_N_LANES
    programs = batch * n_heads // heads
    skip_empty = switches.on("attention_splits")
    if num_splits is None:
        sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 132
        if skip_empty:
            num_splits = fill_splits(programs, max_seq, block_n, (PER_SM_DOT if heads > 1 else PER_SM_LANES) * sm_count)
        else:
            num_splits = choose_splits(programs, max_seq, block_n, sm_count)

    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    gdc = pdl.enabled(q)
    partial = maxes = sums = counts = out  # unused with one split
    if num_splits > 1:
        partial = torch.empty((batch * n_heads * num_splits, head_dim), dtype=torch.float32, device=q.device)
        maxes = torch.empty((batch * n_heads * num_splits,), dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
        counts = counters.zeroed(q.device, programs)
    _split_kernel[(programs, num_splits)](
        q, k, v, cos, sin, positions, slots, k_cache, v_cache, k_scale, v_scale, out, partial, maxes, sums, counts,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
        num_splits, n_heads=n_heads, ONE_SPLIT=num_splits == 1, GROUP=group, HEADS=heads, BLOCK_H=block_h,
        HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_S=MAX_SPLITS, PRECISION=dot_precision(q.dtype),
        SKIP_EMPTY=skip_empty, USE_GDC=gdc, INT8_KV=kv_scales is not None, num_warps=4, num_stages=2,
        launch_pdl=gdc,
    )  # fmt: skip
    return out


def verify_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    counts: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    scale: float,
    num_splits: int | None = None,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """See `reference.verify_attention`: q [B, T, Hq, D], k/v [B, T, Hkv, D] (strided views of the fused QKV
    output); `num_splits` overrides the heuristic (for tests); `kv_scales`: an int8 cache's scales."""
    batch, queries, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    assert group * n_kv_heads == n_heads and k.shape[2] == v.shape[2] == n_kv_heads, "q heads: a multiple of kv heads"
    assert head_dim >= 16 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of 2 >= 16"
    assert q.stride(3) == k.stride(3) == v.stride(3) == 1 and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    k_scale, v_scale, scale_strides = _scales(k_cache, kv_scales)
    block_r = max(16, triton.next_power_of_2(queries * group))
    programs = batch * n_kv_heads
    if num_splits is None:
        sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 132
        num_splits = choose_splits(programs, max_seq, BLOCK_N_DOT, sm_count)

    out = torch.empty((batch, queries, n_heads, head_dim), dtype=q.dtype, device=q.device)
    gdc = pdl.enabled(q)
    partial = maxes = sums = counters_ = out  # unused with one split
    if num_splits > 1:
        rows = batch * queries * n_heads * num_splits
        partial = torch.empty((rows, head_dim), dtype=torch.float32, device=q.device)
        maxes = torch.empty((rows,), dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
        counters_ = counters.zeroed(q.device, programs)
    _verify_kernel[(programs, num_splits)](
        q, k, v, cos, sin, positions, slots, counts, k_cache, v_cache, k_scale, v_scale, out, partial, maxes, sums,
        counters_, scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
        queries, num_splits, n_heads=n_heads, ONE_SPLIT=num_splits == 1, GROUP=group, BLOCK_R=block_r,
        BLOCK_T=max(16, triton.next_power_of_2(queries)), HEAD_DIM=head_dim, BLOCK_N=BLOCK_N_DOT, BLOCK_S=MAX_SPLITS,
        PRECISION=dot_precision(q.dtype), USE_GDC=gdc, INT8_KV=kv_scales is not None,
        num_warps=4 if block_r <= 32 else 8, num_stages=2, launch_pdl=gdc,
    )  # fmt: skip
    return out
