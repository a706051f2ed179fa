"""Prompt-lookup speculation's proposer: guesses at a sequence's next tokens from its own earlier tokens, on the host.

Code edits repeat their context (a function re-emitted with one change, a block moved, a call copied), so the
tokens that followed the last occurrence of the sequence's current ending are a good guess at what follows now.
Each sequence keeps an index from every n-gram of its tokens (n = 1 .. `MAX_NGRAM`) to where that n-gram last
ended; a new token adds the n-grams it completes (a few dictionary writes, never a rescan), and a proposal is what
followed the most recent earlier occurrence of the longest n-gram that ends the sequence.

Adaptive per sequence: it estimates the chance that a proposed token is accepted (`alpha`: accepted tokens against
rejections, older evidence counting less), from its verify steps and, for free, from every token a plain step
gives it (`observe`: would the lookup have guessed it?), so a sequence that stops proposing keeps learning and
starts again when copying does. It proposes as many tokens as pay for themselves: the count k that maximises the
tokens a verify step is expected to give, (1 - alpha**(k+1)) / (1 - alpha), per unit of its cost, `costs[k]` plain
steps (the runner's wall-time measurements on this device: nearly one plain step on a GPU at 7B, several on a
launch-bound tiny model whose verify step breaks the pipelining of plain steps, a large share per token on a CPU).
Where no count beats a plain step it proposes nothing, and the scheduler keeps the plain steps pipelined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_NGRAM = 3
DECAY = 0.8  # how much a piece of evidence (a verify step, or a plain step's guess) counts one piece later


class Proposer:
    """One sequence's tokens (prompt, then generated), their n-gram index, and its proposal statistics."""

    def __init__(self, ids: Iterable[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position of the token after its last occurrence
        self.max_ngram = max_ngram
        self.hits, self.misses = 1.0, 1.0  # decayed accepted tokens and rejections, from a prior of one each
        self.steps = self.proposed = self.accepted = 0  # verify steps, proposals and accepted ones so far
        self.extend(ids)

    @property
    def alpha(self) -> float:
        """The estimated chance that a proposed token is accepted (given the ones before it were)."""
        return self.hits / (self.hits + self.misses)

    def extend(self, ids: Iterable[int]) -> None:
        """Append tokens: each one is the follower of the n-grams that end just before it. In bulk (a prompt of
        16k tokens in a few ms): the n-grams are zipped from shifted slices and the index updated in order, so the
        most recent occurrence wins."""
        tokens, start = self.tokens, len(self.tokens)
        tokens.extend(ids)
        end = len(tokens)
        if end == start + 1:  # one token, as every step adds: its n-grams directly (a fifth of the bulk path's time)
            for n in range(1, min(self.max_ngram, start) + 1):
                self.index[tuple(tokens[start - n : start])] = start
            return
        for n in range(1, self.max_ngram + 1):
            first = max(start, n)  # the first new follower with n tokens before it
            if first < end:
                grams = zip(*(tokens[first - n + i : end - n + i] for i in range(n)), strict=True)
                self.index.update(zip(grams, range(first, end), strict=True))

    def observe(self, token: int) -> None:
        """Append a token that no verify step judged (a plain step's): it counts as a one-token proposal, accepted
        where the lookup would have guessed it, where there was a guess."""
        guess = self._longest(1)[1]
        if guess:
            hit = guess[0] == token
            self._evidence(hit, not hit)
        self.extend((token,))

    def match(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the most recent earlier occurrence of the longest n-gram ending the
        sequence; none without one."""
        return self._longest(k)[1]

    def _longest(self, k: int) -> tuple[int, list[int]]:
        """`match` and the length of the n-gram it found (0: none)."""
        tokens, end = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, end), 0, -1):
            at = self.index.get(tuple(tokens[end - n :]))
            if at is not None:
                return n, tokens[at : at + k]
        return 0, []

    def worth(self, limit: int, costs: Sequence[float]) -> int:
        """The number of proposals (0 .. limit, and below `len(costs)`) that maximises expected tokens per plain
        step of cost, a verify step of k proposals costing `costs[k]` plain steps; 0 where none beats a plain
        step's one token per step."""
        alpha, best, best_rate, expected, power = self.alpha, 0, 1.0, 1.0, 1.0
        for k in range(1, min(limit, len(costs) - 1) + 1):
            power *= alpha
            expected += power
            rate = expected / costs[k]
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def propose(self, limit: int, costs: Sequence[float]) -> list[int]:
        """Up to `limit` tokens to verify after the sequence's last one, as many as pay for themselves at `costs`
        (`worth`); none without a match. It changes nothing: the scheduler asks before it decides to verify."""
        # Even endless proposals (1 / (1 - alpha) tokens expected) would not pay: no lookup.
        if limit < 1 or self.hits + self.misses <= self.misses * min(costs[1 : limit + 1], default=float("inf")):
            return []
        proposal = self._longest(limit)[1]
        return proposal[: self.worth(len(proposal), costs)] if proposal else []

    def feedback(self, proposed: int, accepted: int) -> None:
        """What a verify step made of this sequence's `proposed` tokens: the first `accepted` of them were kept."""
        if proposed < 1:
            return
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self._evidence(accepted, accepted < proposed)

    def _evidence(self, accepted: float, rejected: float) -> None:
        self.hits = self.hits * DECAY + accepted
        self.misses = self.misses * DECAY + rejected
