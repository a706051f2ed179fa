"""Plain PyTorch versions of the decode-path kernels: the ground truth for tests and the CPU path.

Each function has the same signature and semantics as its Triton twin. They avoid host syncs so
they also work (slowly) inside a CUDA graph, except where a comment says the CPU takes a shortcut.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face `LlamaRMSNorm`: normalise in float32, cast back to x's dtype, then scale."""
    if _cpu_fp32(x, weight):  # the same float32 arithmetic (bit-identical) in 3/4 of F.rms_norm's time
        variance = torch.addcdiv(_scalar(eps), (x * x).sum(-1, keepdim=True), _scalar(x.shape[-1]))
        return x * variance.rsqrt_() * weight
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(x + residual), x + residual)`; the sum is rounded to x's dtype first, as in HF."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF "rotate half" rotary embedding `x * cos + rotate_half(x) * sin`, computed in float32.

    cos/sin broadcast against x. HF rounds cos/sin and each product to x's dtype; this rounds once
    at the end, so in bf16 it may differ from HF by one unit in the last place.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos.float() + rotated * sin.float()).to(x.dtype)


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of `x [..., D]` (one token's key or value in one kv head): the int8 values and the
    float32 scales `[...]` (the row's largest magnitude / 127), rounded half away from zero as the Triton kernels
    round (a float-to-int conversion truncates)."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scaled = xf * torch.where(amax > 0, 127 / amax, 0.0)
    return (scaled + 0.5 * scaled.sign()).trunc().to(torch.int8), (amax / 127)[..., 0]


def dequantize_kv(values: Tensor, scales: Tensor) -> Tensor:
    """`quantize_kv`'s int8 `values [..., D]` and `scales [...]` back to float32."""
    return values.float() * scales[..., None]


def store_kv(cache: Tensor, scales: Tensor | None, index: tuple, x: Tensor) -> None:
    """`cache[index] = x`: in the cache's dtype, or quantized (`quantize_kv`) with the scales at `scales[index]`."""
    if scales is None:
        cache[index] = x.to(cache.dtype)
    else:
        cache[index], scales[index] = quantize_kv(x)


def gather_kv(cache: Tensor, scales: Tensor | None, slots: Tensor, length: int) -> Tensor:
    """Positions `0 .. length-1` of the caches' `slots` `[..., Hkv, length, D]` in float32: dequantized where the
    cache is int8 (`scales`); gathered first, so only those slots are converted."""
    kept = cache[:, :, :length][slots]
    return kept.float() if scales is None else dequantize_kv(kept, scales[:, :, :length][slots])


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
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Rotate q and k of one new token per sequence, write k and v into the caches, return rotated q.

    q: [B, Hq, D], k/v: [B, Hkv, D], cos/sin: [max_pos, D], positions/slots: int64 [B],
    caches: [n_slots, Hkv, max_seq, D]; the token of row b goes to `cache[slots[b], :, positions[b]]`. With
    `kv_scales` (`[n_slots, Hkv, max_seq]` each) the caches are int8 (`quantize_kv`).
    """
    cos_b = cos[positions][:, None, :]
    sin_b = sin[positions][:, None, :]
    k_scale, v_scale = kv_scales or (None, None)
    store_kv(k_cache, k_scale, (slots, slice(None), positions), rotate(k, cos_b, sin_b))
    store_kv(v_cache, v_scale, (slots, slice(None), positions), v)
    return rotate(q, cos_b, sin_b)


def rotate_in_dtype(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rotate` as prefill computes it, in x's dtype: cos and sin cast to it, each product and the sum rounded (HF's
    order of operations)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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
    """Rotate the q [T, Hq, D] and k [T, Hkv, D] of T tokens (cos/sin [T, D]: the rows of their positions), write k
    and v [T, Hkv, D] into the caches [n_slots, Hkv, max_seq, D], token t at `[slots[t], :, positions[t]]` (the
    tokens of a prefill may belong to several sequences; int8 with the scales [n_slots, Hkv, max_seq] of
    `kv_scales`, `quantize_kv`), and return the rotated q [T, Hq, D] (here a view of [Hq, T, D], the layout
    attention reads)."""
    k_scale, v_scale = kv_scales or (None, None)
    at = (slots, slice(None), positions)
    store_kv(k_cache, k_scale, at, rotate_in_dtype(k, cos[:, None], sin[:, None]))
    store_kv(v_cache, v_scale, at, v)
    return rotate_in_dtype(q.transpose(0, 1), cos, sin).transpose(0, 1)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One query per sequence against keys `0 .. lengths[b]-1` of its cache slot, float32 softmax.

    q: [B, Hq, D]; query head h reads kv head `h // (Hq // Hkv)`. A row with length 0 gives zeros. With
    `kv_scales` the caches are int8, dequantized here.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    # On the CPU nothing is captured, so reading the longest length costs nothing and saves gathering and attending
    # over the whole (mostly empty) cache.
    longest = k_cache.shape[2] if q.is_cuda else max(int(lengths.max()), 1)
    k_scale, v_scale = kv_scales or (None, None)
    keys, values = gather_kv(k_cache, k_scale, slots, longest), gather_kv(v_cache, v_scale, slots, longest)
    qg = q.float().view(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys) * scale
    visible = torch.arange(keys.shape[2], device=q.device) < lengths.view(batch, 1, 1, 1)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0)  # all-masked rows (length 0)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values)
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)


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
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A decode step's attention: `rotary_kv_write` of the new token at `positions`, then `decode_attention` of its
    rotated q over the keys up to and including it (`positions + 1`); [B, Hq, D]. With `kv_scales` the caches are
    int8 and the new token's key and value are read back quantized, as every later step reads them."""
    if kv_scales is None and _cpu_fp32(q, k, v, cos, sin, k_cache, v_cache):
        return _cpu_rotary_attention(q, k, v, cos, sin, positions, slots, k_cache, v_cache, scale)
    q = rotary_kv_write(q, k, v, cos, sin, positions, slots, k_cache, v_cache, kv_scales)
    return decode_attention(q, k_cache, v_cache, slots, positions + 1, scale, kv_scales)


def _cpu_rotary_attention(
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
) -> Tensor:
    """`rotary_attention` for float32 CPU tensors, where each op's host time is the cost. q and k are each rotated
    as `x * cos + roll(x) * signed_sin` (rotate-half's negation moved onto sin: the same products, summed in one
    fused op), and attention is one fused SDPA call (GQA aware, float32 softmax). One sequence reads its position
    and slot once, is written by plain indexing and attends over a view of its cache (no gather, no mask); a batch
    gathers the live part of its slots and masks each row beyond its length."""
    batch, n_heads, head_dim = q.shape
    half, signs = head_dim // 2, _rotate_half_signs(head_dim)
    mask = None
    if batch == 1:
        pos, slot = int(positions.item()), int(slots.item())
        cos_b, sin_b = cos[pos], sin[pos] * signs
        k_cache[slot : slot + 1, :, pos] = torch.addcmul(k * cos_b, k.roll(half, -1), sin_b)
        v_cache[slot : slot + 1, :, pos] = v
        keys, values = k_cache[slot : slot + 1, :, : pos + 1], v_cache[slot : slot + 1, :, : pos + 1]
    else:
        cos_b, sin_b = cos[positions][:, None], (sin[positions] * signs)[:, None]
        k_cache[slots, :, positions] = torch.addcmul(k * cos_b, k.roll(half, -1), sin_b)
        v_cache[slots, :, positions] = v
        lengths = positions + 1
        lens = lengths.tolist()
        keys, values = k_cache[:, :, : max(lens)][slots], v_cache[:, :, : max(lens)][slots]
        if min(lens) < max(lens):
            mask = torch.arange(max(lens)) < lengths.view(batch, 1, 1, 1)
    q = torch.addcmul(q * cos_b, q.roll(half, -1), sin_b)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.view(batch, n_heads, head_dim)


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
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A verify step's attention: T new tokens per sequence, q [B, T, Hq, D] and k/v [B, T, Hkv, D], token t of row
    b at position `positions[b] + t`. Each is rotated there, its key and value stored at `[slots[b], :, position]`,
    and its rotated q attends over the keys up to and including its own (causal within the T); [B, T, Hq, D].

    Only a row's first `counts[b]` (>= 1) tokens are real. The others store the last real token's key and value
    again at its position (the same values, so the repeated index is harmless) and their outputs are unspecified:
    a row may end anywhere, even at the cache's end, without writing past it. With `kv_scales` the caches are int8
    (`rotary_kv_write`)."""
    batch, queries, n_heads, head_dim = q.shape
    if kv_scales is None and batch == 1 and _cpu_fp32(q, k, v, cos, sin, k_cache, v_cache):
        return _cpu_verify_one(q, k, v, cos, sin, positions, slots, counts, k_cache, v_cache, scale)
    real = torch.minimum(torch.arange(queries, device=q.device)[None, :], (counts - 1)[:, None])  # [B, T]
    at = positions[:, None] + real
    cos_b, sin_b = cos[at][:, :, None], sin[at][:, :, None]  # [B, T, 1, D]
    index = real[:, :, None, None].expand_as(k)
    k_scale, v_scale = kv_scales or (None, None)
    store_kv(k_cache, k_scale, (slots[:, None], slice(None), at), rotate(k.gather(1, index), cos_b, sin_b))
    store_kv(v_cache, v_scale, (slots[:, None], slice(None), at), v.gather(1, index))
    q = rotate(q, cos_b, sin_b)
    # On the CPU nothing is captured: reading the furthest position costs nothing and spares attending over the
    # whole (mostly empty) cache.
    length = k_cache.shape[2] if q.is_cuda else int(at.max()) + 1
    keys, values = gather_kv(k_cache, k_scale, slots, length), gather_kv(v_cache, v_scale, slots, length)
    visible = torch.arange(length, device=q.device)[None, None, :] <= at[:, :, None]  # [B, T, S]
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), keys, values, attn_mask=visible[:, None], scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).to(q.dtype)


def _cpu_verify_one(
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
) -> Tensor:
    """`verify_attention` of one float32 CPU sequence, as `_cpu_rotary_attention` runs one: its first position,
    slot and count read once, its real tokens written by plain indexing, attention over a view of its cache (no
    gather); the outputs past the count are zeros."""
    queries, head_dim = q.shape[1], q.shape[3]
    (pos,), (slot,), (n,) = positions.tolist(), slots.tolist(), counts.tolist()
    half, signs = head_dim // 2, _rotate_half_signs(head_dim)
    cos_b, sin_b = cos[pos : pos + n, None], (sin[pos : pos + n] * signs)[:, None]  # [n, 1, D]
    k_new, v_new, q_new = k[0, :n], v[0, :n], q[0, :n]
    k_cache[slot, :, pos : pos + n] = torch.addcmul(k_new * cos_b, k_new.roll(half, -1), sin_b).transpose(0, 1)
    v_cache[slot, :, pos : pos + n] = v_new.transpose(0, 1)
    q_new = torch.addcmul(q_new * cos_b, q_new.roll(half, -1), sin_b)
    end = pos + n
    keys, values = k_cache[slot : slot + 1, :, :end], v_cache[slot : slot + 1, :, :end]
    visible = torch.arange(end)[None, :] <= torch.arange(pos, end)[:, None]
    out = F.scaled_dot_product_attention(
        q_new.transpose(0, 1)[None], keys, values, attn_mask=visible, scale=scale, enable_gqa=True
    )
    out = out[0].transpose(0, 1)  # [n, Hq, D]
    return F.pad(out, (0, 0, 0, 0, 0, queries - n))[None] if n < queries else out[None]


@functools.cache
def _scalar(value: float) -> Tensor:
    """`value` as a float32 CPU tensor, made once: an op given a Python float converts it to a tensor on every
    call, which costs as much as a small op itself on the CPU."""
    with torch.inference_mode(False):  # an ordinary tensor, usable outside inference mode too
        return torch.tensor(value, dtype=torch.float32)


@functools.cache
def _rotate_half_signs(head_dim: int) -> Tensor:
    """-1 over the first half, 1 over the second: `rotate_half(x) == roll(x, head_dim // 2) * signs`."""
    with torch.inference_mode(False):
        return torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2)))


def _cpu_fp32(*tensors: Tensor) -> bool:
    """Whether the CPU shortcuts apply: every tensor float32 on the CPU, where they compute the same values."""
    return all(t.dtype == torch.float32 and t.is_cpu for t in tensors)


def silu_mul(gu: Tensor) -> Tensor:
    """`silu(gate) * up` for `gu = cat(gate, up)` along the last dimension (Llama's SwiGLU)."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: Tensor, w: Tensor) -> Tensor:
    """`x @ w.T`."""
    return F.linear(x, w)


def norm_linear(
    x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w: Tensor
) -> tuple[Tensor, Tensor]:
    """`(linear(rms_norm(h), w), h)` for the residual stream `h = x + residual` (x itself without a residual)."""
    if residual is None:
        return linear(rms_norm(x, norm_weight, eps), w), x
    normed, h = add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, w), h


def norm_linear_silu_mul(
    x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w13: Tensor
) -> tuple[Tensor, Tensor]:
    """`norm_linear` with the fused gate/up weight, followed by `silu_mul`."""
    gu, h = norm_linear(x, residual, norm_weight, eps, w13)
    return silu_mul(gu), h
