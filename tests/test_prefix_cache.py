"""The prefix cache's choice of slot (engine.prefix_cache): continue a cached sequence, else an empty slot,
else the least recently used one; never a busy slot."""

from __future__ import annotations

from engine.prefix_cache import PrefixCache

SYSTEM = list(range(100, 120))  # a shared system instruction's ids
CHAT_A = [1, *SYSTEM, 7, 7, 7]  # two conversations that share it
CHAT_B = [1, *SYSTEM, 8, 8, 8]


def test_a_continuing_request_takes_its_slot_and_skips_what_it_holds() -> None:
    cache = PrefixCache(3)
    slot, held = cache.take(CHAT_A)
    assert held == 0
    cache.release(slot, CHAT_A + [50, 51], prompt=len(CHAT_A))
    turn = CHAT_A + [50, 52, 9, 9]  # the answer re-encoded differently from its second token on
    assert cache.take(turn) == (slot, len(CHAT_A) + 1)
    cache.release(slot, turn, prompt=len(turn))
    assert cache.take(turn) == (slot, len(turn) - 1)  # the same prompt again: all but the last id, for its logits


def test_a_request_sharing_little_takes_an_empty_slot_while_there_is_one() -> None:
    """Sharing a quarter or less of a slot's last prompt (here the bos) is no reason to overwrite that slot; sharing
    more is (B shares 21 of A's 24 prompt ids: all A would lose is its short message)."""
    cache = PrefixCache(2)
    a, _ = cache.take(CHAT_A)
    cache.release(a, CHAT_A, prompt=len(CHAT_A))
    other, held = cache.take([1, 200, 201, 202, 203])
    assert other != a and held == 0
    cache.release(other, [1, 200, 201, 202, 203], prompt=5)
    assert cache.take(CHAT_B) == (a, 21)


def test_without_an_empty_slot_the_least_recently_used_goes() -> None:
    cache = PrefixCache(2)
    first = [1, 10, 11, 12, 13]
    second = [1, 20, 21, 22, 23]
    for ids in (first, second):
        slot, _ = cache.take(ids)
        cache.release(slot, ids, prompt=len(ids))
    lru = cache.take(first)[0]  # refresh the first: the second is now the older
    cache.release(lru, first, prompt=len(first))
    taken, held = cache.take([1, 30, 31])
    assert taken != lru and held == 1  # the second's slot, keeping the bos they share


def test_busy_slots_are_never_taken_and_forget_clears_idle_ones() -> None:
    cache = PrefixCache(1)
    slot, _ = cache.take(CHAT_A)
    assert cache.take(CHAT_A) is None and cache.in_use() == 1
    cache.release(slot, CHAT_A, prompt=len(CHAT_A))
    cache.forget()
    assert cache.take(CHAT_A) == (slot, 0) and cache.in_use() == 1
