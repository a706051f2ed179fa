"""The greedy decode step's tail in one Triton kernel: repetition penalty, argmax, and the choice marked seen.

As plain ops it is about ten launches per step (gather the seen rows, four elementwise ops for the penalty,
the argmax, the scatter into the seen mask), each of which costs more than its arithmetic at decode sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096


@triton.jit
def penalised_argmax(logits_row, seen_row, vocab, p, tokens, before, PENALTY: tl.constexpr, BLOCK: tl.constexpr):
    """The first index of the largest logit at `logits_row` (ties as torch.argmax picks them), with PENALTY the
    logits of the tokens marked at `seen_row` and of `tokens[0 .. before - 1]` penalised by p as
    `sampling.apply_repetition_penalty` does (dividing rounded to nearest as torch does: Triton's `/` is
    approximate, which could flip near-ties)."""
    best = float("-inf")
    best_at = 0
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits_row + cols, mask=mask, other=float("-inf"))
        if PENALTY:
            seen = tl.load(seen_row + cols, mask=mask, other=0) != 0
            for s in range(0, before):
                seen |= cols == tl.load(tokens + s)
            x = tl.where(seen, tl.where(x < 0, x * p, tl.math.div_rn(x, p)), x)
        top, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_at = tl.where(top > best, c0 + at, best_at)  # strictly larger: an earlier block keeps a tie
        best = tl.maximum(best, top)
    return best_at


@triton.jit
def _greedy_kernel(
    logits_ptr, seen_ptr, slots_ptr, penalty_ptr, out_ptr, vocab, stride_l, stride_s,
    PENALTY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program: the first index of the largest (penalised) logit, as torch.argmax picks ties."""
    row = tl.program_id(0)
    seen_row = seen_ptr + tl.load(slots_ptr + row).to(tl.int64) * stride_s
    p = tl.load(penalty_ptr + row) if PENALTY else 1.0
    best_at = penalised_argmax(logits_ptr + row * stride_l, seen_row, vocab, p, slots_ptr, 0, PENALTY, BLOCK)
    tl.store(out_ptr + row, best_at.to(tl.int64))
    tl.store(seen_row + best_at, 1)


def greedy_pick(logits: Tensor, seen: Tensor, slots: Tensor, penalty: Tensor | None) -> Tensor:
    """See `sampling.greedy_pick`: float32 logits [B, V], the bool seen mask [n_slots, V], int64 [B] out."""
    batch, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and seen.stride(1) == 1
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    _greedy_kernel[(batch,)](
        logits, seen, slots, penalty if penalty is not None else logits, out, vocab, logits.stride(0), seen.stride(0),
        PENALTY=penalty is not None, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return out
