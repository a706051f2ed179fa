"""Speculative decoding's accept rule on the device, in plain torch ops, without host syncs (it runs in the captured
verify step).

A verify step feeds each sequence its last token and the tokens proposed after it; position t's logits predict the
token after position t's input. Position t is processed as the plain decode step would process it there: the
repetition penalty sees the proposals before t (all accepted, or t's choice is never used), then temperature,
top-k and top-p. Each position's token is the one the plain step would pick there: the argmax for greedy rows,
and for sampled rows the Gumbel-max draw with the plain step's own noise (the row's seed, the token's offset). A
proposal is accepted where it is that token. For a sampled row a proposed x is so kept with probability p(x), and
where it is not, the draw is distributed as p with x left out, renormalised: the speculative-sampling rule for a
draft distribution that is one-hot (prompt lookup proposes without probabilities), coupled to the plain step's
noise, so that a seeded request draws the very tokens it draws without speculation, whatever was proposed. After
the accepted run the row takes one more token: the draw at the first rejection, or the one after the last
proposal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import apply_repetition_penalty, filtered, gumbel


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
    else:  # `sample`'s draw at each position, with the noise of the plain step that would make that token
        best, scaled, keep = filtered(flat, per_position(temperature), per_position(top_k), per_position(top_p))
        noise = gumbel(per_position(seeds), (offsets[:, None] + steps).view(-1), vocab)
        drawn = torch.where(keep, scaled, float("-inf")).add_(noise).argmax(dim=-1)
        choice = torch.where(per_position(temperature).float() > 0, drawn, best).view(batch, queries)
    taken = choice == proposed
    accepted = (taken & is_proposal).int().cumprod(dim=1).sum(dim=1)
    new, n = choice, accepted + 1  # the accepted proposals are the choices there
    marked = torch.where(steps[None, :] < n[:, None], new, new.gather(1, accepted[:, None].long()))
    seen.index_put_((slots[:, None].expand(batch, queries), marked), torch.ones_like(marked, dtype=torch.bool))
    return new, n
