"""The greedy verify step's accept rule (`accept.accept(..., greedy=True)`) in one Triton kernel.

As plain ops it is 16 launches without the repetition penalty and 29 with it (the proposals' marks as a [B, T, V]
scatter, the seen rows gathered, the penalty, the argmax, the accepted run as a cumprod, the marks written back),
each costing more than its arithmetic at decode sizes. Here one program per (row, position) takes the penalised
argmax, the proposals before its position counted as seen; the last program to finish (an atomic count, `counters`)
then finds every row's accepted run and marks the new tokens, after every program has read the seen mask, as the
plain ops do (padding rows share a slot with others).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import counters, pdl
from .triton_pick import penalised_argmax

BLOCK = 4096


@triton.jit
def _accept_kernel(
    logits_ptr, tokens_ptr, counts_ptr, seen_ptr, slots_ptr, penalty_ptr, new_ptr, n_ptr, count_ptr,
    batch, queries, vocab, stride_s,
    PENALTY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    """Program `row * queries + t`: position t's choice, the first index of the largest penalised logit (ties as
    torch.argmax picks them); the last program: the rows' counts and seen marks."""
    if USE_GDC:  # launched early (pdl.py): wait for the logits (and the previous kernel's count) before reading
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    row = pid // queries
    t = pid % queries
    seen_row = seen_ptr + tl.load(slots_ptr + row).to(tl.int64) * stride_s
    # Position t has seen the proposals for the positions before it: tokens[row, 1 .. before].
    before = tl.minimum(t, tl.load(counts_ptr + row).to(tl.int32) - 1)
    p = tl.load(penalty_ptr + row) if PENALTY else 1.0
    logits_row = logits_ptr + pid.to(tl.int64) * vocab
    best_at = penalised_argmax(logits_row, seen_row, vocab, p, tokens_ptr + row * queries + 1, before, PENALTY, BLOCK)
    tl.store(new_ptr + pid, best_at.to(tl.int64))
    if USE_GDC:  # the next kernel waits for this one's writes before it reads them
        tl.extra.cuda.gdc_launch_dependents()
    # Every thread's reads and store before the (one-thread) release; the acquire makes the others' visible to the last.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == batch * queries - 1:
        rows = tl.arange(0, BLOCK_B)[:, None]
        steps = tl.arange(0, BLOCK_T)[None, :]
        valid = (rows < batch) & (steps < queries)
        choice = tl.load(new_ptr + rows * queries + steps, mask=valid, other=-1, cache_modifier=".cg")
        proposed = tl.load(tokens_ptr + rows * queries + steps + 1, mask=valid & (steps + 1 < queries), other=-2)
        counts = tl.load(counts_ptr + rows, mask=rows < batch, other=1)
        taken = (choice == proposed) & (steps < counts - 1)
        # The accepted run ends at the first position not taken; position counts - 1 never is (no proposal).
        accepted = tl.min(tl.where(taken, BLOCK_T, steps), axis=1)
        n = accepted + 1
        tl.store(n_ptr + rows, n[:, None].to(tl.int64), mask=rows < batch)
        # The plain ops also mark the padding columns, with the last token taken: already marked, so left out here.
        slots = tl.load(slots_ptr + rows, mask=rows < batch, other=0).to(tl.int64)
        tl.store(seen_ptr + slots * stride_s + choice, 1, mask=valid & (steps < n[:, None]))
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next call


def accept_greedy(
    logits: Tensor, tokens: Tensor, counts: Tensor, seen: Tensor, slots: Tensor, penalty: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`accept.accept(..., greedy=True)` in one launch: float32 logits [B, T, V], int64 tokens [B, T], counts and
    slots [B], the bool seen mask [n_slots, V]; returns int64 `(new [B, T], n [B])`."""
    batch, queries, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.is_contiguous() and tokens.is_contiguous()
    assert seen.stride(1) == 1 and counts.stride(0) == 1 and slots.stride(0) == 1
    new = torch.empty(batch, queries, dtype=torch.int64, device=logits.device)
    n = torch.empty(batch, dtype=torch.int64, device=logits.device)
    gdc = pdl.enabled(logits)
    _accept_kernel[(batch * queries,)](
        logits, tokens, counts, seen, slots, penalty if penalty is not None else logits, new, n,
        counters.zeroed(logits.device, 1), batch, queries, vocab, seen.stride(0),
        PENALTY=penalty is not None, BLOCK=BLOCK, BLOCK_B=triton.next_power_of_2(batch),
        BLOCK_T=triton.next_power_of_2(queries), USE_GDC=gdc, num_warps=8, launch_pdl=gdc,
    )  # fmt: skip
    return new, n
