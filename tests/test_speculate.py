"""Prompt-lookup speculation: the proposer (engine/speculate.py), the accept rule (engine/kernels/accept.py) and the
runner's verify step, against the plain decode step.

Greedy: the tokens a verify step takes are exactly the ones one-token steps would pick, the repetition penalty
included, through the accept rule alone and through the runner on a model. Sampled: over many seeds, the sequences
a speculative loop draws are distributed as the plain sampler's (a chi-square test against the exact distribution,
which the plain loop itself passes too).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.kernels import sampling
from engine.model import Llama
from engine.parallel import SINGLE
from engine.requests import MAX_SPECULATE
from engine.runner import DecodeRunner, Row, verify_shapes
from engine.speculate import Proposer

HAVE_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA")])]


def test_proposer_copies_what_followed_the_longest_recent_match() -> None:
    p = Proposer([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 2, 3])
    assert p.match(3) == [7, 8, 4]  # "2 3" last ended before 7 (the 3-gram "4 2 3" never occurred before)
    p.extend([7])
    assert p.match(2) == [8, 4]  # "2 3 7" now
    assert p.match(10) == [8, 4, 2, 3, 7]  # up to the sequence's end
    p.extend([6])
    assert p.match(4) == []  # "6" never occurred before: the sequence's own ending is no match
    assert Proposer([1, 2, 1]).match(2) == [2, 1]
    assert Proposer([]).match(3) == [] and Proposer([4]).match(3) == []


def test_proposer_index_grows_as_a_full_rebuild_would() -> None:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (300,), generator=gen).tolist()
    grown = Proposer(ids[:10])
    for i in range(10, 300, 7):
        grown.extend(ids[i : i + 7])
        rebuilt = Proposer(ids[: i + 7])
        assert grown.index == rebuilt.index and grown.match(5) == rebuilt.match(5)


def line(slope: float, overhead: float = 0.0, longest: int = 15) -> list[float]:
    """Verify costs in plain steps for k = 0 .. longest proposals: 1 + overhead + slope * k (k = 0: a plain step)."""
    return [1.0] + [1.0 + overhead + slope * k for k in range(1, longest + 1)]


def test_proposer_proposes_what_pays_for_itself() -> None:
    """Free extra tokens: everything the match gives. Costly ones: fewer, the fewer the less is accepted, none
    where no count beats a plain step (a verify step that costs 2.5 plain steps wherever it stops the pipelining,
    as on a launch-bound GPU, needs a high acceptance). After rejections it proposes nothing; the tokens plain steps
    then give teach it, with no verify step, when copying starts (and when it stops)."""
    p = Proposer([1, 2, 3, 4, 5, 6, 7, 8, 9, 1])
    assert p.alpha == 0.5 and p.propose(8, line(0.0)) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert p.propose(8, line(0.0, 1.5)) == [] and p.propose(3, line(0.0)) == [2, 3, 4]
    assert p.propose(8, line(0.0)[:3]) == [2, 3]  # no verify step holds more than the costs cover
    for _ in range(6):
        p.feedback(8, 8)
    assert p.alpha > 0.95 and p.worth(8, line(0.5)) == 8 and p.worth(8, line(0.0, 1.5)) == 8
    for _ in range(6):
        p.feedback(8, 2)
    assert 0.75 < p.alpha < 0.85
    assert [p.worth(8, line(slope)) for slope in (0.02, 0.3, 0.7, 1.0)] == [8, 3, 1, 0]
    for _ in range(12):
        p.feedback(2, 0)
    assert p.alpha < 0.2 and p.propose(8, line(0.3)) == [] and p.match(2) == [2, 3]
    alpha = p.alpha
    assert p.propose(8, line(0.3)) == [] and p.alpha == alpha  # asking changes nothing
    for token in [2, 3, 4, 5, 6]:  # the tokens the lookup guesses: copying has started
        p.observe(token)
    assert p.alpha > 0.6 and p.propose(8, line(0.3)) == [7, 8]
    assert p.steps == 24 and p.tokens[-5:] == [2, 3, 4, 5, 6]  # observing is no verify step
    for _ in range(5):  # tokens the lookup guessed wrong: copying has stopped
        guess = p.match(1)[0]
        p.observe(3 if guess != 3 else 4)
    assert p.alpha < 0.5 and p.propose(8, line(0.3)) == []
    p.feedback(0, 0)  # a step it did not propose to changes nothing
    assert p.steps == 24


def _params(batch: int, temperature: float, top_k: int, top_p: float, penalty: float) -> dict[str, torch.Tensor]:
    return {
        "temperature": torch.full((batch,), temperature),
        "top_k": torch.full((batch,), top_k, dtype=torch.int32),
        "top_p": torch.full((batch,), top_p),
        "penalty": torch.full((batch,), penalty),
        "seeds": torch.arange(batch, dtype=torch.int64) * 7919 + 11,
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_accept_takes_what_one_token_steps_pick(penalty: float, device: str) -> None:
    """Rows with every count (nothing proposed up to all T-1), proposals right and wrong at random: a row takes
    the proposals while each is the argmax (after the penalty of the proposals before it), then that argmax; the
    seen mask ends as marking each taken token one by one leaves it. On the GPU too: this is what holds there in
    bf16, where a verify step's logits are not bitwise a one-token step's (other kernels for several rows), so
    near-ties may flip: the tokens taken are exactly the greedy picks of the verify step's own logits."""
    gen = torch.Generator().manual_seed(5)
    batch, queries, vocab = 64, 5, 6
    logits = torch.randn(batch, queries, vocab, generator=gen) * 2
    tokens = torch.randint(0, vocab, (batch, queries), generator=gen)
    counts = torch.randint(1, queries + 1, (batch,), generator=gen)
    seen = torch.rand(batch + 1, vocab, generator=gen) < 0.3
    slots = torch.randperm(batch + 1, generator=gen)[:batch]
    params = _params(batch, 0.0, 0, 1.0, penalty)
    want_seen = seen.clone()
    on = {k: v.to(device) for k, v in params.items()}
    seen_on = seen.to(device)
    new, n = kernels.accept(
        logits.to(device), tokens.to(device), counts.to(device), seen_on, slots.to(device), on["temperature"],
        on["top_k"], on["top_p"], on["penalty"] if penalty != 1.0 else None, on["seeds"],
        torch.zeros(batch, dtype=torch.int64, device=device), greedy=True,
    )  # fmt: skip
    new, n, seen = new.cpu(), n.cpu(), seen_on.cpu()
    accepted_somewhere = False
    for b in range(batch):
        taken = []
        for t in range(queries):
            row = slots[b : b + 1]
            pick = sampling.greedy_pick(logits[b, t][None], want_seen, row, params["penalty"][:1]).item()
            taken.append(pick)
            if t + 1 >= counts[b] or pick != tokens[b, t + 1]:
                break
        accepted_somewhere |= len(taken) > 1
        assert new[b, : n[b]].tolist() == taken, b
    assert accepted_somewhere and torch.equal(seen, want_seen)


VOCAB, LENGTH, QUERIES, DRAWS = 5, 4, 3, 20000
FILTERS = {"plain": (1.0, 0, 1.0, 1.0), "filtered and penalised": (0.8, 4, 0.9, 1.6)}


def _chain(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Markov "model" (logits of the next token given the last, [V, V]) and the proposer's guess of the next."""
    gen = torch.Generator().manual_seed(len(name))
    return torch.randn(VOCAB, VOCAB, generator=gen) * 1.5, torch.randint(0, VOCAB, (VOCAB,), generator=gen)


def _exact(table: torch.Tensor, temperature: float, top_k: int, top_p: float, penalty: float) -> dict[tuple, float]:
    """The plain sampler's probability of every LENGTH-token continuation of the prompt [0]."""
    probs: dict[tuple, float] = {}
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        p, history = 1.0, [0]
        for token in seq:
            logits = sampling.apply_repetition_penalty(
                table[history[-1]][None], torch.tensor([history]), torch.tensor([penalty])
            )
            _, scaled, keep = sampling.filtered(
                logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
            )
            p *= torch.where(keep, scaled, float("-inf")).softmax(-1)[0, token].item()
            history.append(token)
        probs[seq] = p
    return probs


def _plain_draws(table: torch.Tensor, params: dict[str, torch.Tensor]) -> list[tuple]:
    """LENGTH tokens per row drawn one step at a time, as the runner's sampled step draws them."""
    seen = torch.zeros(DRAWS, VOCAB, dtype=torch.bool)
    seen[:, 0] = True
    last = torch.zeros(DRAWS, dtype=torch.int64)
    out = []
    for offset in range(LENGTH):
        logits = sampling.apply_repetition_penalty(table[last], seen, params["penalty"])
        last = sampling.sample(
            logits, params["temperature"], params["top_k"], params["top_p"], params["seeds"],
            torch.full((DRAWS,), offset),
        )  # fmt: skip
        sampling.mark_seen(seen, torch.arange(DRAWS), last)
        out.append(last)
    return [tuple(r) for r in torch.stack(out, 1).tolist()]


def _speculative_draws(
    table: torch.Tensor, guess: torch.Tensor, params: dict[str, torch.Tensor]
) -> tuple[list[tuple], int, int]:
    """LENGTH tokens per row through verify steps: each row proposes a random number (0..QUERIES-1) of the guessed
    chain after its last token, and takes what `accept` gives it. Also the proposals accepted, and the rows' steps
    that rejected one."""
    gen = torch.Generator().manual_seed(99)
    seen = torch.zeros(DRAWS, VOCAB, dtype=torch.bool)
    seen[:, 0] = True
    width = LENGTH + QUERIES
    seq = torch.zeros(DRAWS, 1 + width, dtype=torch.int64)
    length = torch.ones(DRAWS, dtype=torch.int64)  # tokens in seq, the prompt's one included
    rows, steps = torch.arange(DRAWS), torch.arange(QUERIES)
    accepted = rejected = 0
    while bool((length <= LENGTH).any()):
        tokens = [seq[rows, (length - 1).clamp(max=width)]]  # rows already done run on, unread
        for _ in range(QUERIES - 1):
            tokens.append(guess[tokens[-1]])
        tokens = torch.stack(tokens, 1)
        counts = torch.randint(1, QUERIES + 1, (DRAWS,), generator=gen)
        new, n = kernels.accept(
            table[tokens], tokens, counts, seen, rows, params["temperature"], params["top_k"], params["top_p"],
            params["penalty"], params["seeds"], length - 1, greedy=False,
        )  # fmt: skip
        at = length[:, None] + steps
        write = (steps[None, :] < n[:, None]) & (at <= width)
        seq[rows[:, None].expand_as(at)[write], at[write]] = new[write]
        live = length <= LENGTH
        accepted += int((n - 1)[live].sum())
        rejected += int((n < counts)[live].sum())
        length += n
    return [tuple(r) for r in seq[:, 1 : 1 + LENGTH].tolist()], accepted, rejected


def _chi_square_ok(draws: list[tuple], exact: dict[tuple, float]) -> tuple[float, float]:
    """Pearson's statistic over the outcomes expected at least 5 times (the rest pooled) and the bound it stays
    under with probability 1 - 3e-5 (Wilson-Hilferty's approximation of the chi-square quantile)."""
    counts: dict[tuple, int] = {}
    for d in draws:
        counts[d] = counts.get(d, 0) + 1
    stat, pooled_seen, pooled_p, bins = 0.0, 0, 0.0, 0
    for seq, p in exact.items():
        if p * DRAWS >= 5:
            stat += (counts.get(seq, 0) - p * DRAWS) ** 2 / (p * DRAWS)
            bins += 1
        else:
            pooled_seen += counts.get(seq, 0)
            pooled_p += p
    if pooled_p * DRAWS >= 5:
        stat += (pooled_seen - pooled_p * DRAWS) ** 2 / (pooled_p * DRAWS)
        bins += 1
    df = bins - 1
    bound = df * (1 - 2 / (9 * df) + 4.0 * math.sqrt(2 / (9 * df))) ** 3
    return stat, bound


@pytest.mark.parametrize("name", list(FILTERS))
def test_sampled_speculation_keeps_the_distribution(name: str) -> None:
    """The test itself is checked by the plain sampler; both pass against the exact distribution. The proposals
    are often right (accepted runs happen) and often wrong (replacements happen). Each row draws the very tokens
    the plain sampler draws with its seed: the accept rule uses the plain step's noise."""
    temperature, top_k, top_p, penalty = FILTERS[name]
    table, guess = _chain(name)
    params = _params(DRAWS, temperature, top_k, top_p, penalty)
    exact = _exact(table, temperature, top_k, top_p, penalty)
    assert abs(sum(exact.values()) - 1) < 1e-5
    plain, (speculative, accepted, rejected) = _plain_draws(table, params), _speculative_draws(table, guess, params)
    stat, bound = _chi_square_ok(plain, exact)
    assert stat < bound, ("plain", stat, bound)
    stat, bound = _chi_square_ok(speculative, exact)
    assert stat < bound, ("speculative", stat, bound)
    assert speculative == plain and accepted > DRAWS // 4 and rejected > DRAWS // 4, (accepted, rejected)


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread, as the engine takes on a 2-core machine: two threads contend with the test runner's
    other work and each small product waits for the slower one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(device: str, slots: int, kv: str = "bf16") -> Llama:
    """Random weights at small shapes (grouped-query attention), large enough that greedy text loops now and then."""
    cfg = ModelConfig(
        dim=128, intermediate=320, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512,
        max_position=256, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False, bos_id=1, eos_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    m = Llama.empty(cfg, 256, SINGLE, torch.device(device), torch.float32)
    for p in m.parameters():
        p.normal_(0, 0.15) if p.dim() > 1 else p.fill_(1.0)
    m.setup_cache(slots + 1, 256, torch.float32, kv)
    return m


@torch.inference_mode()
@pytest.mark.parametrize("kv", ["bf16", "int8"])
@pytest.mark.parametrize("device", DEVICES)
def test_verify_steps_decode_what_plain_steps_decode(device: str, kv: str) -> None:
    """Three rows (one with a repetition penalty) decode 40 greedy tokens one step at a time; then, from the same
    prompts, through verify steps whose proposals are the known answer spoilt at random places and of random
    lengths, some rows proposing nothing: the same tokens, with runs accepted and proposals rejected on the way.
    On CUDA the verify steps replay their captured graphs. With an int8 KV cache (`kv`) too: rejected proposals'
    keys, values and scales are overwritten in place."""
    m = tiny_model(device, 4, kv)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (9, 30, 17)]
    for slot, ids in enumerate(prompts):
        m.prefill(torch.tensor(ids, device=device), slot, 0)
    buffers = [t for t in (m.cache.k, m.cache.v, m.cache.k_scale, m.cache.v_scale) if t is not None]
    saved = [t.clone() for t in buffers]
    seen = torch.zeros(5, 512, dtype=torch.bool, device=device)
    for slot, ids in enumerate(prompts):
        seen[slot, ids] = True
    penalties, length = [1.0, 1.3, 1.0], 40

    def row(i: int, out: list[int]) -> Row:
        return Row(
            token=out[-1], position=len(prompts[i]) + len(out) - 1, slot=i, temperature=0.0, top_k=0, top_p=1.0,
            penalty=penalties[i], seed=i, offset=len(out),
        )  # fmt: skip

    runner = DecodeRunner(m, seen.clone(), 4, 4, use_graphs=device == "cuda", speculate=7)
    assert runner.verify_graphs or device == "cpu"
    plain = [[t] for t in (5, 6, 7)]
    while len(plain[0]) < length:
        for out, token in zip(plain, runner([row(i, out) for i, out in enumerate(plain)]), strict=True):
            out.append(token)

    for t, kept in zip(buffers, saved, strict=True):
        t.copy_(kept)
    runner.seen.copy_(seen)
    spec = [[t] for t in (5, 6, 7)]
    accepted = rejected = 0
    while min(len(out) for out in spec) < length:
        proposals = []
        for i, out in enumerate(spec):
            truth = plain[i][len(out) : len(out) + int(torch.randint(0, 8, (1,), generator=gen))]
            spoilt = [t if torch.rand(1, generator=gen) > 0.15 else (t + 1) % 512 for t in truth]
            proposals.append(spoilt if len(out) < length else [])
        if not any(proposals):
            proposals[0] = [0]
        news = runner.verify([row(i, out) for i, out in enumerate(spec)], proposals)
        for out, proposed, new in zip(spec, proposals, news, strict=True):
            kept = len(new) - 1
            accepted += kept
            rejected += kept < len(proposed)
            out.extend(new)
    assert [out[:length] for out in spec] == [out[:length] for out in plain]
    assert accepted > 20 and rejected > 5, (accepted, rejected)

    for t, kept in zip(buffers, saved, strict=True):  # each verify step followed by the plain step fed from it
        t.copy_(kept)
    runner.seen.copy_(seen)
    fed = [[t] for t in (5, 6, 7)]
    while min(len(out) for out in fed) < length:
        proposals = [plain[i][len(out) : len(out) + 3 * (i != 1)] for i, out in enumerate(fed)]
        proposals[2] = proposals[2][:1] + [0]  # one rejected
        runner.launch_verify([row(i, out) for i, out in enumerate(fed)], proposals)
        runner.launch()
        news = runner.collect_verify()
        for out, new, token in zip(fed, news, runner.collect(), strict=True):
            out.extend([*new, token])
    assert [out[:length] for out in fed] == [out[:length] for out in plain]
    costs = runner.costs(3)
    prior = DecodeRunner(m, seen, 4, 4, use_graphs=False, speculate=7).costs(3)
    assert len(runner.verify_cost) > 1 and costs != prior  # measured
    assert len(costs) == 8 and costs[0] == 1.0 and all(0.0 < a <= b < 50.0 for a, b in itertools.pairwise(costs[1:]))


def test_verify_shapes_stay_few() -> None:
    """Verify steps for 1, 3, 7 or 15 proposals, only where batch times tokens per row fits one pass (64 rows)."""
    assert verify_shapes(8, 0) == []
    assert verify_shapes(8, 3) == [(1, 2), (1, 4), (2, 2), (2, 4), (4, 2), (4, 4), (8, 2), (8, 4)]
    shapes = verify_shapes(32, 15)
    assert (1, 16) in shapes and (4, 16) in shapes and (8, 16) not in shapes and (32, 2) in shapes
    assert len(shapes) == 19 and all(b * q <= 64 for b, q in shapes)


def test_bench_workloads_fit_the_demo_context() -> None:
    """The edit workload re-emits a renamed function of every held-out module, as a completion and as an infilling
    request, each fitting the demo model's context with room for the answer; the fresh and noise ones sample."""
    from engine.config import DEMO_DIR
    from engine.prompts import build_prompt
    from engine.speculate_bench import edit_workload, fresh_workload, noise_workload
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(DEMO_DIR)
    items = edit_workload(tok, 1024, per_module=1)
    assert [i.workload for i in items] == ["rename", "fill"] * 8
    for item in items:
        ids, sampling = build_prompt(tok, item.request), item.request.sampling
        assert len(ids) + sampling.max_new_tokens <= 1024 and sampling.temperature == 0
        name = item.name.split(".")[1]
        assert f"def {name}_v2(" in tok.decode(ids) and f"def {name}(" in tok.decode(ids)
    sampled = fresh_workload() + noise_workload(tok)
    assert len(sampled) == 16 and all(i.request.sampling.temperature > 0 for i in sampled)


# --- through the engine ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_engine():
    """The demo model (it copies what it has just seen, so proposals get accepted) with speculation allowed, on
    the CPU in float32 (also on a GPU machine): there a verify step's rows compute the bits one-token steps compute
    (reference.py's CPU paths), which the identity tests below need. In bf16 on a GPU they do not (see
    `test_greedy_accept_takes_what_one_token_steps_pick`; speculate_bench counts the identical texts)."""
    from engine.engine import Engine
    from engine.requests import EngineSpec

    threads = torch.get_num_threads()
    engine = Engine.load(EngineSpec(device="cpu", dtype="float32", max_batch=4, speculate=15))
    yield engine
    engine.close()
    torch.set_num_threads(threads)


@pytest.fixture
def cheap_verify(demo_engine, monkeypatch):
    """Verify steps priced as plain steps, so the identity tests below verify proposals on any host: a module's
    engine learns its verify costs from the steps it runs, and on a many-core CPU (the H200 machine's) those costs
    can rule proposals out, which would leave the identity untested."""
    costs = demo_engine.runner.costs
    monkeypatch.setattr(demo_engine.runner, "costs", lambda batch: [1.0 for _ in costs(batch)])


def _run(engine, *requests) -> dict:
    """Run the requests together; each one's Finished event by id (a Failed one fails the test)."""
    from engine.events import Failed, Finished

    events = [e for r in requests for e in engine.add(r)]
    while engine.busy:
        events += engine.step()
    assert not [e for e in events if isinstance(e, Failed)], events
    return {e.request_id: e for e in events if isinstance(e, Finished)}


def _renames(n: int) -> list:
    from engine.config import DEMO_DIR
    from engine.speculate_bench import edit_workload
    from engine.tokenizer import Tokenizer

    items = [i for i in edit_workload(Tokenizer.from_dir(DEMO_DIR), 1024, per_module=1) if i.workload == "rename"]
    return [i.request for i in items[1 : 1 + n]]


def test_greedy_output_is_identical_with_speculation(demo_engine, cheap_verify) -> None:
    """Four greedy requests (one with a repetition penalty) decode together with speculation, through continuous
    batching, each as it decodes alone without: the same text and finish reason, in fewer steps."""
    from dataclasses import replace

    requests = _renames(4)
    requests[1] = replace(requests[1], sampling=replace(requests[1].sampling, repetition_penalty=1.2))
    alone = {r.id: _run(demo_engine, r)[r.id] for r in requests}
    together = _run(demo_engine, *(replace(r, speculate=True) for r in requests))
    for r in requests:
        assert (together[r.id].text, together[r.id].reason) == (alone[r.id].text, alone[r.id].reason)
        assert alone[r.id].stats.proposed == 0 and alone[r.id].stats.steps == alone[r.id].stats.new_tokens - 1
    stats = [f.stats for f in together.values()]
    tokens, steps = sum(s.new_tokens - 1 for s in stats), sum(s.steps for s in stats)
    assert sum(s.accepted for s in stats) > 50 and tokens > 1.5 * steps


def test_where_the_host_outlasts_a_plain_step_a_plain_step_follows_each_verify_step(
    demo_engine, cheap_verify, monkeypatch
) -> None:
    """As on a GPU where the host's work outlasts a plain step (`feeds_verify`), each verify step is followed by a
    plain step launched from its outputs on the device before its tokens are read: greedy and seeded sampled
    requests decoding together give the very texts they give alone without speculation, and no plain step is
    launched from the host after a verify step."""
    from dataclasses import replace

    requests = _renames(3)
    requests[2] = replace(requests[2], sampling=replace(requests[2].sampling, temperature=0.6, seed=3))
    alone = {r.id: _run(demo_engine, r)[r.id].text for r in requests}
    runner = demo_engine.runner
    for timings in ("plain_s", "verify_cost", "verify_host_s", "cost_lists"):  # this CPU's fed steps mistime them
        monkeypatch.setattr(runner, timings, dict(getattr(runner, timings)))
    monkeypatch.setattr(runner, "feeds_verify", lambda batch: True)
    together = _run(demo_engine, *(replace(r, speculate=True) for r in requests))
    assert {r.id: together[r.id].text for r in requests} == alone
    assert sum(together[r.id].stats.accepted for r in requests) > 20
    calls = _runner_calls(demo_engine, monkeypatch, replace(requests[0], speculate=True, id="fed"))
    after = [calls[i + 1] for i, call in enumerate(calls[:-1]) if call == "verify"]
    assert after and set(after) == {"launch"}, calls


def test_no_plain_step_follows_a_verify_step_that_may_reach_the_context_end(demo_engine, monkeypatch) -> None:
    """A plain step fed from a verify step's tokens writes its token's keys and values at the position after
    them: where taking every proposal and one more would put that position past the context (the cache's last
    position, which it would overwrite), the verify step is collected first. A request running into the context
    end (64 tokens after its prompt, whose length follows this Python's standard library) decodes the text it
    decodes without speculation."""
    from dataclasses import replace

    from engine.engine import Engine
    from engine.requests import EngineSpec

    request = _renames(1)[0]
    context = _run(demo_engine, request)[request.id].stats.prompt_tokens + 64
    engine = Engine.load(EngineSpec(device="cpu", dtype="float32", max_batch=2, max_seq_len=context, speculate=15))
    try:
        want = _run(engine, request)[request.id]
        runner, last, held, fed = engine.runner, [], [], []  # each verify step's reach: the last; not fed; fed
        monkeypatch.setattr(runner, "costs", lambda batch: [1.0] * (MAX_SPECULATE + 1))
        monkeypatch.setattr(runner, "feeds_verify", lambda batch: True)
        launch, launch_verify = runner.launch, runner.launch_verify

        def logged_verify(rows, proposals):
            held.extend(last)
            last[:] = [max(r.position + len(p) + 2 for r, p in zip(rows, proposals, strict=True))]
            launch_verify(rows, proposals)

        def logged_launch(rows=None):
            (fed if rows is None else held).extend(last)
            last.clear()
            launch(rows)

        monkeypatch.setattr(runner, "launch_verify", logged_verify)
        monkeypatch.setattr(runner, "launch", logged_launch)
        got = _run(engine, replace(request, speculate=True, id="fed"))["fed"]
        held.extend(last)
    finally:
        engine.close()
    assert want.reason == "context" and (got.text, got.reason) == (want.text, want.reason)
    assert fed and max(fed) <= context, (fed, held)
    assert held and min(held) > context  # the verify steps near the end were not followed


def test_seeded_sampling_draws_the_same_tokens_with_speculation(demo_engine, cheap_verify) -> None:
    """Sampled requests with seeds (one filtered and penalised) give the very text they give without speculation,
    decoding together, with proposals accepted on the way. On the CPU in float32, also on the H200 machine's CPU
    (torch 2.11), where it is that machine's check of the sampled path's bits in a several-row step."""
    from dataclasses import replace

    sampled = [
        replace(r, sampling=replace(r.sampling, temperature=t, top_k=k, top_p=p, repetition_penalty=q, seed=i))
        for i, (r, (t, k, p, q)) in enumerate(zip(_renames(2), [(0.6, 0, 1.0, 1.0), (0.5, 20, 0.9, 1.05)], strict=True))
    ]
    alone = {r.id: _run(demo_engine, r)[r.id].text for r in sampled}
    together = _run(demo_engine, *(replace(r, speculate=True) for r in sampled))
    assert {r.id: together[r.id].text for r in sampled} == alone
    assert all(together[r.id].stats.accepted > 0 for r in sampled)


def test_rows_without_proposals_decode_as_plain_steps_do(demo_engine) -> None:
    """Verify steps carry requests that do not speculate (one greedy, one sampled with a seed): they get the very
    tokens they get alone (the sampled one too: its draw is the plain step's draw)."""
    from dataclasses import replace

    from engine.requests import Request, SamplingParams

    speculating = [replace(r, speculate=True) for r in _renames(2)]
    sampled = Request("completion", text="def parse(text):\n", sampling=SamplingParams(seed=5, max_new_tokens=60))
    greedy = Request("completion", text="class Stack:\n", sampling=SamplingParams(temperature=0, max_new_tokens=60))
    alone = {r.id: _run(demo_engine, r)[r.id].text for r in (sampled, greedy)}
    together = _run(demo_engine, sampled, *speculating, greedy)
    assert together[sampled.id].text == alone[sampled.id] and together[greedy.id].text == alone[greedy.id]
    assert sum(together[r.id].stats.accepted for r in speculating) > 10


def test_stops_apply_to_every_accepted_token(demo_engine, cheap_verify) -> None:
    """A token budget and a stop string that fall inside accepted runs end the request where plain decoding ends
    it; so does the end of the context."""
    from dataclasses import replace

    base = _renames(1)[0]
    plain = _run(demo_engine, base)[base.id].text
    stop = plain[len(plain) // 2 : len(plain) // 2 + 6]
    for params in (replace(base.sampling, max_new_tokens=7), replace(base.sampling, stop=(stop,))):
        request = replace(base, sampling=params)
        want = _run(demo_engine, request)[request.id]
        got = _run(demo_engine, replace(request, speculate=True, id=request.id + "-s"))[request.id + "-s"]
        assert (got.text, got.reason) == (want.text, want.reason) and got.stats.accepted > 0
    long = replace(base, text=base.text * 3, sampling=replace(base.sampling, max_new_tokens=1000), fit=True)
    want = _run(demo_engine, long)[long.id]
    got = _run(demo_engine, replace(long, speculate=True, id="long-s"))["long-s"]
    assert want.reason in ("context", "eos") and (got.text, got.reason) == (want.text, want.reason)


def _runner_calls(engine, monkeypatch, request) -> list[str]:
    """The runner's step calls while `request` runs alone: "launch" (fed from the device), "launch rows",
    "collect", "verify"."""
    calls: list[str] = []
    runner = engine.runner
    launch, collect, launch_verify = runner.launch, runner.collect, runner.launch_verify

    def logged_launch(rows=None):
        calls.append("launch" if rows is None else "launch rows")
        launch(rows)

    def logged_collect():
        calls.append("collect")
        return collect()

    def logged_verify(rows, proposals):
        calls.append("verify")
        launch_verify(rows, proposals)

    with monkeypatch.context() as m:
        m.setattr(runner, "launch", logged_launch)
        m.setattr(runner, "collect", logged_collect)
        m.setattr(runner, "launch_verify", logged_verify)
        _run(engine, request)
    return calls


def test_a_step_nobody_proposes_to_is_the_plain_pipelined_step(demo_engine, monkeypatch) -> None:
    """Where no proposal would pay (verify steps priced at 100 plain steps), a speculating request makes exactly
    the runner calls a plain one makes: every step launched from the device's own outputs before the last one is
    collected, no sync or copy of its own (on a GPU, where a tiny model's step is launch-bound, breaking that
    pipelining made speculation 2.5 times slower on text with nothing to copy). With real costs it verifies."""
    from dataclasses import replace

    request = _renames(1)[0]
    plain = _runner_calls(demo_engine, monkeypatch, request)
    assert plain.count("launch rows") == 1 and plain.count("launch") > 50
    costly = [1.0] + [100.0] * MAX_SPECULATE
    with monkeypatch.context() as m:
        m.setattr(demo_engine.runner, "costs", lambda batch: costly)
        spec = _runner_calls(demo_engine, monkeypatch, replace(request, speculate=True, id="costly"))
    assert spec == plain
    assert "verify" in _runner_calls(demo_engine, monkeypatch, replace(request, speculate=True, id="priced"))


def test_verify_costs_are_timed_per_shape_and_untimed_ones_priced_to_be_tried() -> None:
    """Before any timing: the prior line. A timed shape costs its timing (the first one counting half against the
    estimate, so one outlier cannot price it out); a longer untimed one costs the timed one below it plus the prior
    slope (optimistic: it gets tried, and timed); a shorter one at most a longer one's."""
    runner = DecodeRunner(tiny_model("cpu", 2), torch.zeros(3, 512, dtype=torch.bool), 2, 2, False, speculate=7)
    slope, overhead = runner.prior_slope, runner.prior_overhead
    assert runner.costs(1) == pytest.approx([1.0] + [1 + overhead + slope * k for k in range(1, 8)])
    runner.plain_s[1] = 0.010
    runner._cost((1, 4), 0.030)  # 3 proposals: 3.0 plain steps, against the prior's 1 + overhead + 3 slope
    three = 0.5 * (1 + overhead + 3 * slope) + 0.5 * 3.0
    costs = runner.costs(1)
    assert costs[3] == pytest.approx(three) and costs[5] == pytest.approx(three + 2 * slope)
    assert costs[1] == pytest.approx(min(1 + overhead + slope, three))
    runner._cost((1, 4), 0.020)
    assert runner.costs(1)[3] == pytest.approx(0.8 * three + 0.2 * 2.0)  # then an average over recent timings
    runner._cost((1, 2), 0.050)  # a slow timing of 1 proposal: no more than 3 proposals cost
    assert runner.costs(1)[1] == runner.costs(1)[3] < 5.0


@torch.inference_mode()
def test_a_step_in_flight_across_a_prefills_first_tokens_is_not_timed() -> None:
    """A step launched before a prefill and collected after its first tokens' sample (the scheduler's order) ran
    beside the prefill: measured from the sample it would take almost nothing, and plain steps would look cheaper
    (verify steps dearer) than they are. It is left untimed; the step after it is timed again."""
    runner = DecodeRunner(tiny_model("cpu", 2), torch.zeros(3, 512, dtype=torch.bool), 2, 2, False, speculate=3)
    rows = [Row(token=5, position=10 + i, slot=0, top_k=0, seed=0, offset=i, temperature=0.0, top_p=1.0, penalty=1.0)
            for i in range(8)]  # fmt: skip
    for row in rows[:5]:
        runner([row])
    plain = runner.plain_s[1]
    runner.launch([rows[5]])
    first = Row(token=0, position=3, slot=1, top_k=0, seed=0, offset=0, temperature=0.0, top_p=1.0, penalty=1.0)
    runner.sample(torch.randn(1, 512), [first])
    runner.collect()
    assert runner.plain_s[1] == plain
    runner([rows[6]])
    assert runner.plain_s[1] != plain


@torch.inference_mode()
def test_where_steps_overlap_the_host_a_verify_step_costs_the_pipelining_it_stops() -> None:
    """On a GPU the host's work overlaps a launched step; around a verify step it does not: from the tokens before
    it to its launch, and from its tokens to the next launch the device waits. Both are the verify step's cost (here
    host work of 50 ms before and after a verify step: at least 100 ms on top of its own time), not a plain
    step's (the plain steps' timing stays near its own)."""
    import time

    runner = DecodeRunner(tiny_model("cpu", 2), torch.zeros(3, 512, dtype=torch.bool), 2, 2, False, speculate=3)
    runner.overlaps = True  # as on a GPU (this CPU's steps run in full at their launch, which the timing allows)
    rows = [Row(token=5, position=10 + i, slot=0, top_k=0, seed=0, offset=i, temperature=0.0, top_p=1.0, penalty=1.0)
            for i in range(40)]  # fmt: skip
    for row in rows[:10]:
        runner([row])
    plain = runner.plain_s[1]
    time.sleep(0.05)
    runner.verify([rows[10]], [[5, 5, 5]])
    time.sleep(0.05)
    runner([rows[14]])
    assert runner.pending is None and runner.verify_cost[(1, 4)] * plain > 0.5 * 0.100  # half: a first timing
    assert runner.plain_s[1] < 2 * plain + 0.005
    assert runner.verify_host_s[1] >= 0.05 and runner.feeds_verify(1)  # 50 ms of host work: a plain step fits in it


def test_a_plain_step_follows_a_verify_step_only_where_it_fills_the_host_s_time() -> None:
    """`feeds_verify`: not before the host's work after a verify step is timed, not where it is shorter than a plain
    step, and never where the host's work does not overlap the device's (the CPU)."""
    runner = DecodeRunner(tiny_model("cpu", 2), torch.zeros(3, 512, dtype=torch.bool), 2, 2, False, speculate=3)
    rows = [Row(token=5, position=10 + i, slot=0, top_k=0, seed=0, offset=i, temperature=0.0, top_p=1.0, penalty=1.0)
            for i in range(40)]  # fmt: skip
    for row in rows[:10]:
        runner([row])
    runner.overlaps = True
    assert not runner.feeds_verify(1)
    runner.verify([rows[10]], [[5, 5, 5]])
    runner([rows[14]])
    assert runner.verify_host_s[1] < runner.plain_s[1] and not runner.feeds_verify(1)
    runner.verify_host_s[1] = 10 * runner.plain_s[1]
    assert runner.feeds_verify(1)
    runner.overlaps = False
    assert not runner.feeds_verify(1)


def test_every_step_runs_each_captured_shape_or_those_of_the_row_counts_named(monkeypatch) -> None:
    """`every_step` (what compiling ahead records, once per kernel choice) runs every bucket's plain step and every
    verify shape, greedy and sampled, largest first; with `rows` only the steps of those row counts, so a choice
    that changes only one-row kernels re-runs two steps, not all."""
    runner = DecodeRunner(tiny_model("cpu", 4), torch.zeros(5, 512, dtype=torch.bool), 4, 4, False, speculate=3)
    ran: list[tuple] = []
    monkeypatch.setattr(runner, "_step", lambda b, g: ran.append(("plain", b, g)))
    monkeypatch.setattr(runner, "_verify_step", lambda b, q, g: ran.append(("verify", b, q, g)))
    runner.every_step()
    plain = [s for s in ran if s[0] == "plain"]
    assert plain == [("plain", b, g) for b in (4, 2, 1) for g in (True, False)]
    assert {s[1:3] for s in ran if s[0] == "verify"} == set(runner.verify_shapes)
    assert len(ran) == 6 + 2 * len(runner.verify_shapes)
    ran.clear()
    runner.every_step(rows=(1,))
    assert ran == [("plain", 1, True), ("plain", 1, False)]
    ran.clear()
    runner.every_step(rows=(4,))
    assert ran[:2] == [("plain", 4, True), ("plain", 4, False)]
    assert all(s[0] == "plain" or s[1] * s[2] == 4 for s in ran) and len(ran) > 2
