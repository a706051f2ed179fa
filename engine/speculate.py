"""Prompt-lookup speculation's proposer: guesses at a sequence's next tokens from its own earlier tokens, on the host.

Code edits repeat their context (a function re-emitted with one change, a block moved, a call copied), so the
tokens that followed the last occurrence of the sequence's current ending are a good guess at what follows now.
Each sequence keeps an index from every n-gram of its tokens (n = 1 .. `MAX_NGRAM`) to where that n-gram last
ended; a new token adds the n-grams it completes (a few dictionary writes, never a rescan), and a proposal is what
followed the most recent earlier occurrence of the longest n-gram that ends the sequence.

Adaptive per sequence: it estimates the chance that a proposed token is accepted (`alpha`, from its recent verify
steps: accepted tokens against rejections, older steps counting less) and proposes as many tokens as pay for
themselves: the count k that maximises the tokens a verify step is expected to give, (1 - alpha**(k+1)) / (1 -
alpha), per unit of its cost, 1 + slope * k plain steps (`slope`, from the runner: what one more token per row adds
to a step; nearly nothing on a GPU, a large share of a step on a CPU). Where no count beats a plain step, it
proposes one token now and then (after 1, 3, 7, ... up to `MAX_WAIT` new tokens, and only on a match of
`PROBE_NGRAM` tokens or more) to notice when copying starts; on text with nothing to copy, verify steps become
rare, and the steps between them can be pipelined (`ready`).
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_NGRAM = 3
MAX_WAIT = 32
PROBE_NGRAM = 2  # a probe needs a match this long: one token seen before is too weak a sign that copying starts
DECAY = 0.8  # how much a verify step's evidence counts one verify step later


class Proposer:
    """One sequence's tokens (prompt, then generated), their n-gram index, and its proposal statistics."""

    def __init__(self, ids: Iterable[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position of the token after its last occurrence
        self.max_ngram = max_ngram
        self.hits, self.misses = 1.0, 1.0  # decayed accepted tokens and rejections, from a prior of one each
        self.resume_at = self.backoff = 0  # the length at which proposing resumes, and the wait after a probe
        self.steps = self.proposed = self.accepted = 0  # verify steps, proposals and accepted ones so far
        self.extend(ids)

    @property
    def ready(self) -> bool:
        """Whether `propose` may propose now (it is not waiting for the next probe)."""
        return len(self.tokens) >= self.resume_at

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
        for n in range(1, self.max_ngram + 1):
            first = max(start, n)  # the first new follower with n tokens before it
            if first < end:
                grams = zip(*(tokens[first - n + i : end - n + i] for i in range(n)), strict=True)
                self.index.update(zip(grams, range(first, end), strict=True))

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

    def worth(self, limit: int, slope: float) -> int:
        """The number of proposals (0 .. limit) that maximises expected tokens per unit of step cost."""
        alpha, best, best_rate, expected, power = self.alpha, 0, 1.0, 1.0, 1.0
        for k in range(1, limit + 1):
            power *= alpha
            expected += power
            rate = expected / (1.0 + slope * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def propose(self, limit: int, slope: float = 0.0) -> list[int]:
        """Up to `limit` tokens to verify after the sequence's last one, as many as pay for themselves when one
        more token per row costs `slope` plain steps; a single token as a probe where none would pay (after a
        wait in new tokens that grows with each probe); none without a match."""
        if limit < 1 or not self.ready:
            return []
        n, proposal = self._longest(limit)
        if not proposal:
            return []
        k = self.worth(len(proposal), slope)
        if k:
            self.backoff = 0
            return proposal[:k]
        if n < PROBE_NGRAM:
            return []
        self.backoff = min(2 * self.backoff + 1, MAX_WAIT)
        self.resume_at = len(self.tokens) + 1 + self.backoff  # counted after the probe's own token
        return proposal[:1]

    def feedback(self, proposed: int, accepted: int) -> None:
        """What a verify step made of this sequence's `proposed` tokens: the first `accepted` of them were kept."""
        if proposed < 1:
            return
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.hits = self.hits * DECAY + accepted
        self.misses = self.misses * DECAY + (accepted < proposed)
