"""Batched prefill (issue 18): several sequences' new tokens in one model pass (`Llama.prefill_many`), and the
scheduler that fills each pass with the prompts in line (engine/scheduler.py).

In float32 on the CPU, a pass over prompts of different lengths, some continuing a cached prefix (other start
offsets), gives each prompt transformers' logits and the logits it gets alone, and leaves each slot's keys and
values where the decode step reads them; through the engine, prompts that arrive together take one pass, a prompt
longer than a pass goes in chunks next to the others, and every greedy text stays transformers'.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import scheduler
from engine.events import Finished, TextDelta
from engine.model import Chunk
from engine.requests import Request, SamplingParams
from tests.test_engine import hf_greedy, hf_model, load, run

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# sort a list of numbers in place\ndef sort(xs):",
]


@pytest.fixture(params=["tiny_model_dir", "tiny_gqa_dir"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)


@torch.no_grad()
def test_one_pass_over_several_prompts_matches_transformers_and_each_alone(checkpoint: Path) -> None:
    """Four prompts in one pass: two from position 0, one continuing a cached prefix of 10 tokens, one whose cache
    holds all but its last token; each chunk's logits are transformers' at its positions and those of the same chunk
    prefilled alone, and a decode step after it reads every slot's keys right."""
    engine, ref = load(checkpoint, max_batch=4), hf_model(checkpoint)
    model = engine.model
    ids = [engine.prompt_ids(Request("completion", text=p)) for p in PROMPTS]
    starts = [0, 0, 10, len(ids[3]) - 1]
    slots = [1, 3, 0, 2]  # not in the chunks' order
    for i in (2, 3):  # the cached prefixes
        model.prefill(torch.tensor(ids[i][: starts[i]]), slots[i], 0)
    chunks = [Chunk(slot, start, len(p) - start) for slot, start, p in zip(slots, starts, ids, strict=True)]
    tokens = torch.tensor([t for p, start in zip(ids, starts, strict=True) for t in p[start:]])
    together = model.prefill_many(tokens, chunks, all_logits=True)
    rows = torch.tensor([c.length for c in chunks]).cumsum(0)
    assert together.shape == (len(tokens), model.cfg.vocab_size)

    for i, chunk in enumerate(chunks):
        mine = together[rows[i] - chunk.length : rows[i]]
        expected = ref(torch.tensor([ids[i]])).logits[0, chunk.start :]
        assert (mine - expected).abs().max().item() < 1e-4
    last = model.prefill_many(tokens, chunks)  # the same pass again (it rewrites the same keys): the last rows
    assert last.shape == (4, model.cfg.vocab_size)
    torch.testing.assert_close(last, together[rows - 1], rtol=0, atol=1e-5)

    follow = [int(row.argmax()) for row in last]
    positions = torch.tensor([len(p) for p in ids])
    decoded = model.decode(torch.tensor(follow), positions, torch.tensor(slots))
    for i in range(4):
        expected = ref(torch.tensor([ids[i] + [follow[i]]])).logits[0, -1]
        assert (decoded[i] - expected).abs().max().item() < 1e-4

    alone = load(checkpoint, max_batch=4).model
    for i, (chunk, p) in enumerate(zip(chunks, ids, strict=True)):
        if chunk.start:
            alone.prefill(torch.tensor(p[: chunk.start]), chunk.slot, 0)
        one = alone.prefill(torch.tensor(p[chunk.start :]), chunk.slot, chunk.start, all_logits=True)
        torch.testing.assert_close(together[rows[i] - chunk.length : rows[i]], one, rtol=0, atol=1e-5)


def counted(engine, monkeypatch) -> list[list[tuple[Chunk, int]]]:
    """Record every prefill pass the engine's scheduler makes: each chunk, with its prompt's length."""
    passes: list[list[tuple[Chunk, int]]] = []
    original = engine.model.prefill_many

    def counting(tokens, chunks, all_logits=False):
        prompts = {s.slot: len(s.ids) for s in engine.scheduler.prefilling}
        passes.append([(c, prompts[c.slot]) for c in chunks])
        assert len(tokens) == sum(c.length for c in chunks)
        return original(tokens, chunks, all_logits)

    monkeypatch.setattr(engine.model, "prefill_many", counting)
    return passes


def test_waiting_short_prompts_take_one_pass_in_one_step(tiny_gqa_dir: Path, monkeypatch) -> None:
    """Four requests added together: the first step prefills all four in one pass and gives each its first token,
    in the order they came; nothing is prefilled after that."""
    engine = load(tiny_gqa_dir, max_batch=4)
    passes = counted(engine, monkeypatch)
    sampling = SamplingParams(temperature=0, max_new_tokens=6)
    requests = [Request("completion", text=p, sampling=sampling) for p in PROMPTS]
    for r in requests:
        engine.add(r)
    engine.step()
    assert len(passes) == 1 and [(c.start, c.length) for c, n in passes[0]] == [(0, n) for _, n in passes[0]]
    assert len(passes[0]) == 4
    assert [s.request.id for s in engine.scheduler.running] == [r.id for r in requests]
    assert all(len(s.generated) >= 1 for s in engine.scheduler.running)
    while engine.busy:
        engine.step()
    assert len(passes) == 1


def test_a_long_prompt_goes_in_chunks_next_to_the_others_and_every_text_stays_transformers(
    checkpoint: Path, monkeypatch
) -> None:
    """With passes of 12 tokens: a continuing chat-like request (its prefix cached), a prompt of several passes and
    two short ones, added together. The long prompt's last chunk shares its pass with the next prompt's first part
    (the only chunk of a pass that may stop short of its prompt's end); every greedy text is transformers'."""
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 12)
    engine, ref = load(checkpoint, max_batch=4), hf_model(checkpoint)
    sampling = SamplingParams(temperature=0, max_new_tokens=12)
    first = Request("completion", text=PROMPTS[0], sampling=sampling)
    answer = run(engine, first)[first.id][-1]
    passes = counted(engine, monkeypatch)
    requests = [
        Request("completion", text=PROMPTS[0] + answer.text + "\n\nprint(", sampling=sampling),
        Request("completion", text=PROMPTS[2], sampling=sampling),
        Request("completion", text=PROMPTS[1], sampling=sampling),
        Request("completion", text=PROMPTS[3], sampling=sampling),
    ]
    events = run(engine, *requests)
    assert len(engine.prompt_ids(requests[1])) > 2 * 12
    sizes = [sum(c.length for c, _ in p) for p in passes]
    assert sizes[:-1] == [12] * (len(passes) - 1) and 0 < sizes[-1] <= 12  # full passes while prompts wait
    assert all(c.start + c.length == n for p in passes for c, n in p[:-1])  # only a pass's last chunk stops short
    assert any(len(p) > 1 and p[-1][0].start + p[-1][0].length < p[-1][1] for p in passes)  # and then shares
    for r in requests:
        finished = events[r.id][-1]
        assert isinstance(finished, Finished)
        assert "".join(e.text for e in events[r.id] if isinstance(e, TextDelta)) == finished.text
        expected = hf_greedy(ref, engine.prompt_ids(r), 12, stop=2)
        assert finished.text == engine.tok.decode(expected)
    assert events[requests[0].id][-1].stats.cached_tokens > 0


def step_until(engine, events: dict[str, list], done) -> None:
    """Step the engine, filing each event under its request, until `done()` holds or the engine is idle."""
    while engine.busy and not done():
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)


def test_prompts_that_end_at_their_first_token_leave_the_decoding_batch_and_the_cache_intact(
    checkpoint: Path,
) -> None:
    """Two prompts that end at their first token (one at max_new_tokens=1, one at a stop string it writes) share a
    pass while another request decodes in pipelined steps. Their first tokens' sample loads its rows into the
    decode step's inputs, so the next step must be launched with rows: fed from the device instead, the decoding
    request's step would read the finished prompt's slot and position (another text) and overwrite its last prompt
    token's keys, which a later request continuing that prompt would take from the prefix cache."""
    engine, ref = load(checkpoint, max_batch=4), hf_model(checkpoint)
    decoding = Request("completion", text=PROMPTS[0], sampling=SamplingParams(temperature=0, max_new_tokens=12))
    events: dict[str, list] = {}
    engine.add(decoding)
    step_until(engine, events, lambda: engine.scheduler.inflight is not None and len(events[decoding.id]) > 2)
    ids = [engine.prompt_ids(Request("completion", text=p)) for p in PROMPTS[1:3]]
    first = [hf_greedy(ref, p, 1)[0] for p in ids]
    one = Request("completion", text=PROMPTS[1], sampling=SamplingParams(temperature=0, max_new_tokens=1))
    stop = SamplingParams(temperature=0, max_new_tokens=8, stop=(engine.tok.decode([first[1]]).strip(),))
    stopped = Request("completion", text=PROMPTS[2], sampling=stop)
    engine.add(one)
    engine.add(stopped)
    step_until(engine, events, lambda: False)

    for request, reason in ((one, "length"), (stopped, "stop")):
        assert [e.reason for e in events[request.id] if isinstance(e, Finished)] == [reason]
        assert isinstance(events[request.id][-1], Finished)
    assert events[one.id][-1].text.strip() == engine.tok.decode([first[0]]).strip()
    expected = hf_greedy(ref, engine.prompt_ids(decoding), 12, stop=2)
    assert events[decoding.id][-1].text == engine.tok.decode(expected)

    sampling = SamplingParams(temperature=0, max_new_tokens=8)
    longer = Request("completion", text=PROMPTS[1] + "\nimport sys", sampling=sampling)
    more = engine.prompt_ids(longer)
    assert more[: len(ids[0])] == ids[0]
    again = run(engine, longer)[longer.id][-1]
    assert again.stats.cached_tokens == len(ids[0])  # the finished prompt's slot, whole
    assert again.text == engine.tok.decode(hf_greedy(ref, more, 8, stop=2))


def test_each_first_token_of_a_pass_is_sampled_with_its_own_rows_settings(tiny_model_dir: Path, monkeypatch) -> None:
    """Greedy, seeded sampling (top-p, top-k) and repetition penalties in one pass: each request's text is the one it
    gets prefilled and sampled alone (a first token sampled with another row's settings, seed or seen mask would
    differ)."""
    settings = [
        SamplingParams(temperature=0, max_new_tokens=8),
        SamplingParams(temperature=0.9, top_p=0.95, top_k=0, seed=5, max_new_tokens=8),
        SamplingParams(temperature=0, repetition_penalty=1.5, max_new_tokens=8),
        SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3, seed=7, max_new_tokens=8),
    ]
    requests = [Request("completion", text=p, sampling=s) for p, s in zip(PROMPTS, settings, strict=True)]
    engine = load(tiny_model_dir, max_batch=4)
    passes = counted(engine, monkeypatch)
    together = run(engine, *requests)
    assert len(passes[0]) == 4
    for r in requests:
        alone = run(load(tiny_model_dir, max_batch=4), r)[r.id][-1]
        assert together[r.id][-1].text == alone.text


def test_prompts_of_a_pass_and_one_past_it_identical_twins_and_their_cached_repeats(
    tiny_model_dir: Path, monkeypatch
) -> None:
    """Passes of exactly one prompt's length: that prompt fills the first pass alone, one a token longer ends in
    the next pass's first chunk (1 token), its identical twin arriving in the same step gets a slot of its own; all
    four texts are transformers'. Sent again, each prompt is all cached but its last token, which is prefilled for
    its logits: the same texts."""
    engine, ref = load(tiny_model_dir, max_batch=4), hf_model(tiny_model_dir)
    sampling = SamplingParams(temperature=0, max_new_tokens=6)
    texts = ["def fibonacci(n):\n    return", "def fibonacci(n):\n    return n", "def fibonacci(n):\n    return n"]
    requests = [Request("completion", text=t, sampling=sampling) for t in [*texts, PROMPTS[1]]]
    ids = [engine.prompt_ids(r) for r in requests]
    assert len(ids[1]) == len(ids[0]) + 1 and ids[1] == ids[2]
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", len(ids[0]))
    passes = counted(engine, monkeypatch)
    first = run(engine, *requests)
    assert [(c.start, c.length) for c, _ in passes[0]] == [(0, len(ids[0]))]
    assert [(c.start, c.length) for c, _ in passes[2]][0] == (len(ids[1]) - 1, 1)
    assert len({c.slot for p in passes for c, _ in p}) == 4
    for r, p in zip(requests, ids, strict=True):
        assert first[r.id][-1].text == engine.tok.decode(hf_greedy(ref, p, 6, stop=2))
    repeats = [Request("completion", text=r.text, sampling=sampling) for r in requests]
    again = run(engine, *repeats)
    for r, repeat, p in zip(requests, repeats, ids, strict=True):
        assert again[repeat.id][-1].stats.cached_tokens == len(p) - 1
        assert again[repeat.id][-1].text == first[r.id][-1].text


def test_a_prompt_cancelled_between_its_chunks_leaves_what_it_prefilled_as_a_cached_prefix(
    checkpoint: Path, monkeypatch
) -> None:
    """Passes of 12 tokens: a long prompt cancelled after two passes (its second shared with a short prompt, and a
    third request cancelled while waiting in line) ends with one Finished("cancelled"), frees its slot, and leaves
    exactly the prompt tokens it prefilled in the prefix cache; the same prompt sent again continues them and
    gets transformers' text."""
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 12)
    engine, ref = load(checkpoint, max_batch=2), hf_model(checkpoint)
    sampling = SamplingParams(temperature=0, max_new_tokens=6)
    short, long = (Request("completion", text=t, sampling=sampling) for t in (PROMPTS[1], PROMPTS[2] * 2))
    waiting = Request("completion", text=PROMPTS[3], sampling=sampling)
    events: dict[str, list] = {}
    for r in (short, long, waiting):
        engine.add(r)
    engine.step()
    engine.step()
    (seq,) = engine.scheduler.prefilling
    prefilled = seq.done
    assert seq.request.id == long.id and 12 < prefilled < len(seq.ids) - 12
    for r in (long, waiting):
        events[r.id] = engine.cancel(r.id)
    step_until(engine, events, lambda: False)
    for r in (long, waiting):
        assert [(type(e), e.reason) for e in events[r.id]] == [(Finished, "cancelled")]
    assert engine.scheduler.cache.in_use() == 0
    again = replace(long, id="again")
    finished = run(engine, again)[again.id][-1]
    assert finished.stats.cached_tokens == prefilled
    assert finished.text == engine.tok.decode(hf_greedy(ref, engine.prompt_ids(long), 6, stop=2))
