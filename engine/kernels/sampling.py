"""Device-side token sampling and repetition penalty in plain torch ops, without host syncs.

Every shape is fixed by the batch and vocabulary sizes and no value is read back to the host, so
these run inside a captured CUDA graph. Randomness comes from a counter-based hash of
(seed, offset, token id) instead of a generator: a seeded request draws the same tokens whatever
else shares its batch, and replaying a graph needs no generator state.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# The hash's constants (shared with triton_sample). Multipliers below 2**31 keep every product of two 32-bit
# values inside int64.
MUL1 = 0x7FEB352D
MUL2 = 0x046CA68B
GOLDEN = 0x1E3779B9


def _mix32(x: Tensor) -> Tensor:
    """An avalanche hash of 32-bit values held in int64 (after Wellons' lowbias32)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, offsets: Tensor, vocab_size: int) -> Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seeds[b], offsets[b], token id)."""
    seeds, offsets = seeds.long(), offsets.long()
    key = _mix32(seeds ^ GOLDEN)
    key = _mix32(key ^ (seeds >> 32))
    key = _mix32(key ^ offsets)
    key = _mix32(key ^ (offsets >> 32))
    tokens = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) + GOLDEN)
    bits = _mix32(key[:, None] ^ tokens[None, :]) >> 8  # 24 bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def scale_and_sort(logits: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sampling's start: the greedy choice (argmax of logits [B, V]), float32 logits / temperature (1 where it is
    0), and those sorted in descending order with their token ids."""
    logits = logits.float()
    temperature = temperature.float()
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    return logits.argmax(dim=-1), scaled, *scaled.sort(dim=-1, descending=True)


def filtered(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`sample`'s filters: (the greedy choice [B], the scaled logits [B, V] and the mask [B, V] of the tokens that
    top-k and top-p keep, in token order)."""
    vocab = logits.shape[1]
    greedy, scaled, sorted_logits, order = scale_and_sort(logits, temperature)
    rank = torch.arange(vocab, device=logits.device)
    k = top_k.long()
    in_top_k = rank[None, :] < torch.where(k > 0, k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(~in_top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = top_p.float()[:, None]
    keep_sorted = (mass_before < top_p) | (top_p >= 1.0)
    keep_sorted[:, 0] = True
    keep_sorted &= in_top_k
    return greedy, scaled, torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)


def gumbel(seeds: Tensor, offsets: Tensor, vocab_size: int) -> Tensor:
    """Gumbel noise [B, V] from `uniform_noise`: the scaled logits plus it, maximised, are a draw."""
    return -torch.log(-torch.log(uniform_noise(seeds, offsets, vocab_size)))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, offsets: Tensor) -> Tensor:
    """One token per row of logits [B, V]; int64 [B].

    Rows with temperature 0 take the argmax. Others divide by the temperature, keep the top_k
    most likely tokens (0: all), then the smallest prefix of those whose probability reaches
    top_p (the most likely token always stays), and draw with the Gumbel-max trick using
    noise from (seeds[b], offsets[b]); bump the offset each step for a fresh draw.
    """
    greedy, scaled, keep = filtered(logits, temperature, top_k, top_p)
    drawn = torch.where(keep, scaled, float("-inf")).add_(gumbel(seeds, offsets, logits.shape[1])).argmax(dim=-1)
    return torch.where(temperature.float() > 0, drawn, greedy)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF `RepetitionPenaltyLogitsProcessor`: seen tokens' positive logits / penalty, negative * penalty.

    seen: a bool [B, V] mask (kept on the device, see `mark_seen`) or int64 token ids [B, L].
    A penalty of 1.0 leaves a row unchanged.
    """
    if seen.dtype != torch.bool:
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, seen.long(), True)
    p = penalty.to(logits.dtype)[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def mark_seen(seen: Tensor, slots: Tensor, tokens: Tensor) -> Tensor:
    """Set `seen[slots[b], tokens[b]]` in place: the tokens just picked, in their sequences' rows of the mask
    [n_slots, V]; returns seen. No host scalar is involved, so it runs inside a captured graph."""
    return seen.index_put_((slots, tokens.long()), torch.ones_like(tokens, dtype=torch.bool))


def greedy_pick(logits: Tensor, seen: Tensor, slots: Tensor, penalty: Tensor | None) -> Tensor:
    """The greedy step's choice: the argmax of float32 logits [B, V] after the repetition penalty (None: none),
    marked in the seen mask [n_slots, V] at each row's slot; int64 [B]."""
    if penalty is not None:
        logits = apply_repetition_penalty(logits, seen[slots], penalty)
    nxt = logits.argmax(dim=-1)
    mark_seen(seen, slots, nxt)
    return nxt
