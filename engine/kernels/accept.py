"""Speculative decoding's accept rule on the device, in plain torch ops, without host syncs (it runs in the captured
verify step).

A verify step feeds each sequence its last token and the tokens proposed after it; position t's logits predict the
token after position t's input. Position t is processed as the plain decode step would process it there: the
repetition penalty sees the proposals before t (all accepted, or t's choice is never used), then temperature,
top-k and top-p. Greedy rows accept a proposal where it is the argmax. Sampled rows accept a proposed token x with
probability p(x) and otherwise draw from p with x left out, renormalised: the speculative-sampling rule for a
draft distribution that is one-hot (prompt lookup proposes without probabilities), so every token is distributed
exactly as the plain step would draw it. After the accepted run the row takes one more token: the replacement at
the first rejection, or the token after the last proposal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import apply_repetition_penalty, filtered, gumbel, uniform_noise

ACCEPT_KEY = 0x2545F491  # xored into the seed: the acceptance draws' stream, apart from the tokens' noise


def accept(
    logits: Tensor,
    tokens: Tensor,
    counts: Tensor,
    seen: Tensor,
    slots: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    penalty: Tensor | None,
    seeds: Tensor,
    offsets: Tensor,
    greedy: bool,
) -> tuple[Tensor, Tensor]:
    """The verify step's new tokens: `(new [B, T], n [B])`, the first `n[b]` (>= 1) of row b's `new` taken.

    logits [B, T, V] (float32) of the step's inputs tokens [B, T]: row b's last token, then `counts[b] - 1`
    proposals (its other columns are padding). Per-row sampling parameters as `sample` takes them (`penalty` None:
    none); position t draws with noise offset `offsets[b] + t`, as the plain step making that token would. `greedy`:
    every row has temperature 0. The new tokens are marked in the seen mask [n_slots, V] at the row's slot."""
    batch, queries, vocab = logits.shape
    steps = torch.arange(queries, device=logits.device)
    proposed = torch.cat((tokens[:, 1:], tokens[:, :1]), dim=1)  # column t: the proposal for t's token (last: none)
    is_proposal = steps[None, :] < (counts - 1)[:, None]
    flat = logits.reshape(batch * queries, vocab)
    per_position = lambda x: x[:, None].expand(batch, queries).reshape(-1)  # noqa: E731 (a row's value, per position)
    if penalty is not None:
        # Position t has seen the proposals for the positions before it.
        before = (steps[None, :, None] > steps[None, None, :]) & is_proposal[:, None, :]  # [B, t, proposal's position]
        index = proposed[:, None, :].expand(batch, queries, queries)
        hits = torch.zeros(batch, queries, vocab, device=logits.device).scatter_add_(2, index, before.float())
        seen_at = seen[slots][:, None, :] | (hits > 0)
        flat = apply_repetition_penalty(flat, seen_at.view(-1, vocab), per_position(penalty))
    if greedy:
        choice = flat.argmax(dim=-1).view(batch, queries)
        taken = choice == proposed
    else:
        best, scaled, keep = filtered(flat, per_position(temperature), per_position(top_k), per_position(top_p))
        kept = torch.where(keep, scaled, float("-inf"))
        p_proposed = kept.softmax(dim=-1).gather(1, proposed.view(-1, 1)).view(batch, queries)
        seeds_at, offsets_at = per_position(seeds), (offsets[:, None] + steps).view(-1)
        u = uniform_noise(seeds_at ^ ACCEPT_KEY, offsets_at, 1).view(batch, queries)
        sampled = temperature.float()[:, None] > 0
        best = best.view(batch, queries)
        taken = torch.where(sampled, u < p_proposed, best == proposed)
        # Drawn from p with the rejected proposal left out (where there is one).
        left_out = torch.zeros_like(keep).scatter_(1, proposed.view(-1, 1), is_proposal.view(-1, 1))
        kept = kept.masked_fill(left_out, float("-inf")).add_(gumbel(seeds_at, offsets_at, vocab))
        choice = torch.where(sampled, kept.argmax(dim=-1).view(batch, queries), best)
    accepted = (taken & is_proposal).int().cumprod(dim=1).sum(dim=1)
    new = torch.where(steps[None, :] < accepted[:, None], proposed, choice)
    n = accepted + 1
    marked = torch.where(steps[None, :] < n[:, None], new, new.gather(1, accepted[:, None].long()))
    seen.index_put_((slots[:, None].expand(batch, queries), marked), torch.ones_like(marked, dtype=torch.bool))
    return new, n
