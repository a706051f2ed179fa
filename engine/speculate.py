"""Prompt-lookup speculation's proposer: guesses at a sequence's next tokens from its own earlier tokens, on the host.

Code edits repeat their context (a function re-emitted with one change, a block moved, a call copied), so the
tokens that followed the last occurrence of the sequence's current ending are a good guess at what follows now.
Each sequence keeps an index from every n-gram of its tokens (n = 1 .. `MAX_NGRAM`) to where that n-gram last
ended; a new token adds the n-grams it completes (a few dictionary writes, never a rescan), and a proposal is what
followed the most recent earlier occurrence of the longest n-gram that ends the sequence.

Adaptive per sequence: a verify step whose proposals are all rejected costs more than a plain step and gives the
same one token, so after `misses` such steps in a row the sequence skips proposing for 2**misses - 1 steps (at
most `MAX_WAIT`); any accepted proposal resets that. On text with nothing to copy, verify steps become rare.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_NGRAM = 3
MAX_WAIT = 32


class Proposer:
    """One sequence's tokens (prompt, then generated), their n-gram index, and its proposal statistics."""

    def __init__(self, ids: Iterable[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position of the token after its last occurrence
        self.max_ngram = max_ngram
        self.misses = self.wait = 0
        self.steps = self.proposed = self.accepted = 0  # verify steps, proposals and accepted ones so far
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        """Append tokens: each one is the follower of the n-grams that end just before it."""
        tokens, index, longest = self.tokens, self.index, self.max_ngram
        for token in ids:
            end = len(tokens)
            for n in range(1, min(longest, end) + 1):
                index[tuple(tokens[end - n : end])] = end
            tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens to verify after the sequence's last one; none while backing off or without a match."""
        if k < 1:
            return []
        if self.wait:
            self.wait -= 1
            return []
        tokens, end = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, end), 0, -1):
            at = self.index.get(tuple(tokens[end - n :]))
            if at is not None:
                return tokens[at : at + k]
        return []

    def feedback(self, proposed: int, accepted: int) -> None:
        """What a verify step made of this sequence's `proposed` tokens: the first `accepted` of them were kept."""
        if proposed < 1:
            return
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        if accepted:
            self.misses = 0
        else:
            self.misses += 1
            self.wait = min(2**self.misses - 1, MAX_WAIT)
