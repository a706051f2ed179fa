"""The prefix cache: the keys and values a finished sequence leaves in its KV slot, remembered by their token ids.

A new request takes the slot whose remembered ids it continues, and prefills only the rest: a chat front end
sends the whole conversation every turn, and its second turn prefills only the new message. A slot holds one
sequence's cache, so taking a slot overwrites whatever of its cache the new request does not share.

Which slot a request takes: the idle slot it shares the longest prefix with, if that prefix covers at least three
quarters of the prompt the slot's last sequence had (the request continues that sequence: the next turn of a chat
repeats its prompt, all but the format's reply header, while its answer may re-encode differently and another chat
that only shares a system instruction diverges at its first message); else an empty slot; else the least recently
used idle slot, of whose cache it keeps whatever prefix it shares. Pure bookkeeping: the scheduler moves the
tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

CONTINUES = 0.75  # the share of a slot's last prompt a request must repeat to take that slot over an empty one


@dataclass
class _Slot:
    ids: list[int] = field(default_factory=list)  # the tokens whose keys/values the slot holds, from position 0
    prompt: int = 0  # how many of them were its last sequence's prompt
    busy: bool = False
    last_used: int = 0


class PrefixCache:
    """Which KV slots are busy, and what the idle ones hold."""

    def __init__(self, n_slots: int) -> None:
        self._slots = [_Slot() for _ in range(n_slots)]
        self._clock = 0

    def take(self, ids: Sequence[int]) -> tuple[int, int] | None:
        """A slot for a sequence of prompt `ids` and how many of them it already holds (never all: the last one
        is always prefilled, for its logits), or None while every slot is busy. The slot is then busy."""
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        shared = {i: _shared(self._slots[i].ids, ids) for i in idle}
        best = max(idle, key=lambda i: (shared[i], self._slots[i].last_used))
        if not (shared[best] and shared[best] >= CONTINUES * self._slots[best].prompt):
            empty = [i for i in idle if not self._slots[i].ids]
            best = empty[0] if empty else min(idle, key=lambda i: self._slots[i].last_used)
        self._slots[best].busy = True
        return best, min(shared[best], len(ids) - 1)

    def release(self, slot: int, ids: Sequence[int], prompt: int) -> None:
        """A sequence left `slot`, whose keys/values now hold `ids` (from position 0), the first `prompt` of them
        its prompt."""
        self._clock += 1
        self._slots[slot] = _Slot(list(ids), min(prompt, len(ids)), busy=False, last_used=self._clock)

    def forget(self) -> None:
        """Nothing in the idle slots can be trusted any more (a step failed)."""
        for slot in self._slots:
            if not slot.busy:
                slot.ids, slot.prompt = [], 0

    def in_use(self) -> int:
        """Slots held by sequences that have not ended."""
        return sum(slot.busy for slot in self._slots)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
