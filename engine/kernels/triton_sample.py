"""The sampled decode step's tail in one Triton kernel: top-k, top-p and the Gumbel-max draw over sorted logits.

As plain ops (`sampling.sample`) the tail after the sort is about seventy launches per step: the masks, the
softmax and its running sum, a scatter back to token order, and the counter-based noise, whose 32-bit hash is a
dozen elementwise ops on [B, V] plus two dozen on the row keys. Each costs more than its arithmetic at decode
sizes: 270 µs per step at batch 1 on the H100, against about 5 ms for the whole 7B step. Here each row is one
program walking its sorted logits in blocks, with the noise hashed in registers; it stops at the block where the
kept probability mass reaches top-p, since nothing after it can be drawn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import sampling

BLOCK = 2048
MASK32 = tl.constexpr(sampling.MASK32)
MUL1 = tl.constexpr(sampling.MUL1)
MUL2 = tl.constexpr(sampling.MUL2)
GOLDEN = tl.constexpr(sampling.GOLDEN)


@triton.jit
def _mix32(x):
    """`sampling._mix32` on int64 lanes: the same products, masked to 32 bits, so the same bits."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


@triton.jit
def _draw_kernel(
    sorted_ptr, order_ptr, greedy_ptr, temperature_ptr, top_k_ptr, top_p_ptr, seed_ptr, offset_ptr, out_ptr, vocab,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program, over the row's scaled logits sorted in descending order and their token ids."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * vocab
    k = tl.load(top_k_ptr + row).to(tl.int32)
    limit = tl.where((k > 0) & (k < vocab), k, vocab)  # the top-k cut, as a rank
    top_p = tl.load(top_p_ptr + row)
    top_p = tl.where(top_p >= 1.0, float("inf"), top_p)  # 1 keeps all, even where the sums round below 1
    seed = tl.load(seed_ptr + row).to(tl.int64)
    offset = tl.load(offset_ptr + row).to(tl.int64)
    key = _mix32(seed ^ GOLDEN)  # sampling.uniform_noise's row key
    key = _mix32(key ^ (seed >> 32))
    key = _mix32(key ^ offset)
    key = _mix32(key ^ (offset >> 32))

    top = tl.load(sorted_ptr + base)  # the largest: the softmax's shift
    total = 0.0
    for start in range(0, limit, BLOCK):
        rank = start + tl.arange(0, BLOCK)
        s = tl.load(sorted_ptr + base + rank, mask=rank < limit, other=float("-inf"))
        total += tl.sum(tl.exp(s - top), axis=0)

    before = 0.0  # the probability mass of the ranks before this block
    best = float("-inf")
    best_at = 0
    start = 0
    more = limit > 0  # always: the first block holds the most likely token, which always stays
    while more:
        rank = start + tl.arange(0, BLOCK)
        in_top_k = rank < limit
        s = tl.load(sorted_ptr + base + rank, mask=in_top_k, other=float("-inf"))
        probs = tl.exp(s - top) / total
        mass_before = before + tl.cumsum(probs, axis=0) - probs
        keep = in_top_k & ((mass_before < top_p) | (rank == 0))
        token = tl.load(order_ptr + base + rank, mask=in_top_k, other=0)
        bits = _mix32(key ^ _mix32(token + GOLDEN)) >> 8  # 24 bits: exact in float32
        u = (bits.to(tl.float32) + 0.5) * (1.0 / (1 << 24))
        score = tl.where(keep, s - tl.log(-tl.log(u)), float("-inf"))
        block_best, at = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_at = tl.where(block_best > best, start + at, best_at)  # strictly larger: an earlier block keeps a tie
        best = tl.maximum(best, block_best)
        before += tl.sum(probs, axis=0)
        start += BLOCK
        more = (start < limit) & (before < top_p)  # past the top-p mass nothing is kept

    drawn = tl.load(order_ptr + base + best_at)
    temperature = tl.load(temperature_ptr + row)
    tl.store(out_ptr + row, tl.where(temperature > 0, drawn, tl.load(greedy_ptr + row)))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, offsets: Tensor) -> Tensor:
    """See `sampling.sample` (same draws, but for float rounding at a top-p boundary and exact score ties):
    its sort, then this kernel for the rest."""
    greedy, _, sorted_logits, order = sampling.scale_and_sort(logits, temperature)
    batch, vocab = sorted_logits.shape
    # Zeros, not empty: compiling ahead records the kernel without running it, and the ids go on to index arrays.
    out = torch.zeros(batch, dtype=torch.int64, device=logits.device)
    _draw_kernel[(batch,)](
        sorted_logits, order, greedy, temperature.float().contiguous(), top_k.contiguous(), top_p.float().contiguous(),
        seeds.contiguous(), offsets.contiguous(), out, vocab, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return out
