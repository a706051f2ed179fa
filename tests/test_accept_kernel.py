"""The greedy accept rule's Triton kernel (engine/kernels/triton_accept.py) against the plain ops of
engine/kernels/accept.py: the same choices at every position (padding ones too), counts and seen mask, with and
without the repetition penalty. Rows take every count, all their proposals, none, or a run in between; proposals
repeat tokens, a proposal's penalty flips a later position's choice, ties go to the first index (across blocks where
the vocabulary spans two), and the last row shares the first one's slot as padding rows do. Interpreted on the CPU in
one child process and compiled for sm_90, and on CUDA (with a CUDA-graph replay) where there is a GPU.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.kernels import accept_rule
from tests import compiled, interpreted

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
LIFT = 30.0  # a planned token's logit lift: still the largest after a penalty of 3 (randn stays under 6)


def verify_inputs(name: str, batch: int, queries: int, vocab: int, penalty: bool) -> dict[str, Any]:
    """A verify step's accept inputs on the CPU, each row with a planned accepted run (`plan`, proposals beyond it
    wrong) over a few tokens, so that runs repeat them. Row 0 accepts everything, row 1 nothing; row 2's second
    proposal is right only with the penalty (its first proposal, seen from then on, is the largest logit there);
    row 3 ties at position 0, a block apart where the vocabulary has two, and proposes the later index."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    logits = torch.randn(batch, queries, vocab, generator=gen)
    counts = torch.randint(1, queries + 1, (batch,), generator=gen)
    plan = (torch.rand(batch, generator=gen) * counts).long()  # accepted proposals planned, 0 .. counts - 1
    if batch > 3 and queries > 2:
        counts[:4] = queries
        plan[:4] = torch.tensor([queries - 1, 0, 2, 0])
    few = torch.tensor([7, vocab - 2, 100 % vocab])
    planned = few[torch.randint(0, 3, (batch, queries), generator=gen)]
    tokens = torch.randint(0, vocab, (batch, queries), generator=gen)
    seen = torch.rand(batch + 1, vocab, generator=gen) < 0.3
    slots = torch.randperm(batch + 1, generator=gen)[:batch]
    slots[-1] = slots[0]
    for b in range(batch):
        logits[b, torch.arange(queries), planned[b]] += LIFT
        tokens[b, 1 : plan[b] + 1] = planned[b, : plan[b]]
        if plan[b] + 1 < counts[b]:  # the first wrong proposal
            tokens[b, plan[b] + 1] = (planned[b, plan[b]] + 1) % vocab
    if batch > 3 and queries > 2:
        a, b_ = 11 % vocab, 12 % vocab
        seen[slots[2], [a, b_]] = False
        logits[2, :2] = torch.randn(2, vocab, generator=gen)
        logits[2, 0, a] = logits[2, 1, a] = LIFT
        logits[2, 1, b_] = 0.8 * LIFT  # second only to a, which is seen at position 1 with the penalty
        tokens[2, 1:3] = torch.tensor([a, b_])
        first, second = 3, vocab - 5
        seen[slots[3], [first, second]] = False
        logits[3, 0] = torch.randn(vocab, generator=gen)
        logits[3, 0, [first, second]] = 2 * LIFT
        tokens[3, 1] = second
    return {
        "logits": logits, "tokens": tokens, "counts": counts, "seen": seen, "slots": slots,
        "penalty": torch.linspace(1.5, 3.0, batch) if penalty else None,
    }  # fmt: skip


def _plain(inputs: dict[str, Any], rule: Callable[..., Any] = accept_rule.accept) -> tuple[torch.Tensor, torch.Tensor]:
    """accept.py's greedy path (or `rule`, taking its arguments) on `inputs`, their seen mask marked in place."""
    batch = inputs["counts"].shape[0]
    device = inputs["logits"].device
    ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, dtype=torch.int64, device=device)
    return rule(
        inputs["logits"], inputs["tokens"], inputs["counts"], inputs["seen"], inputs["slots"], 0 * ones,
        zeros.int(), ones, inputs["penalty"], zeros, zeros, greedy=True,
    )  # fmt: skip


def _kernel(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels import triton_accept

    keys = ("logits", "tokens", "counts", "seen", "slots", "penalty")
    return triton_accept.accept_greedy(*(inputs[k] for k in keys))


def _on(inputs: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, copy=True) if v is not None else None for k, v in inputs.items()}


def check_accept(name: str, device: str, batch: int, queries: int, vocab: int, penalty: bool) -> None:
    inputs = verify_inputs(name, batch, queries, vocab, penalty)
    want_seen = inputs["seen"].clone()
    want_new, want_n = _plain({**inputs, "seen": want_seen})
    on = _on(inputs, device)
    new, n = _kernel(on)
    assert new.dtype == n.dtype == torch.int64 and new.shape == (batch, queries) and n.shape == (batch,)
    assert torch.equal(new.cpu(), want_new) and torch.equal(n.cpu(), want_n)
    assert torch.equal(on["seen"].cpu(), want_seen)
    assert not torch.equal(want_seen, inputs["seen"])  # the marks are checked
    if batch > 3 and queries > 2:
        assert want_n[:4].tolist() == [queries, 1, 3 if penalty else 2, 1]
        assert want_new[3, 0] == 3
    if queries > 2:
        assert len(set(want_n.tolist())) > 1


CASES: dict[str, dict[str, Any]] = {
    "penalty-one-block": {"batch": 7, "queries": 5, "vocab": 300, "penalty": True},
    "plain-one-block": {"batch": 7, "queries": 5, "vocab": 300, "penalty": False},
    "penalty-two-blocks": {"batch": 5, "queries": 4, "vocab": 5000, "penalty": True},
    "plain-two-blocks": {"batch": 5, "queries": 4, "vocab": 5000, "penalty": False},
    "penalty-16-queries": {"batch": 4, "queries": 16, "vocab": 130, "penalty": True},
    "penalty-one-query": {"batch": 3, "queries": 1, "vocab": 50, "penalty": True},
}
CUDA_CASES: dict[str, dict[str, Any]] = {
    "demo-b1-16": {"batch": 1, "queries": 16, "vocab": 4096, "penalty": True},
    "demo-b8-16": {"batch": 8, "queries": 16, "vocab": 4096, "penalty": True},
    "7b-b32-8": {"batch": 32, "queries": 8, "vocab": 32016, "penalty": True},
    "7b-b4-16-plain": {"batch": 4, "queries": 16, "vocab": 32016, "penalty": False},
}


def run_case(name: str, device: str) -> None:
    check_accept(name, device, **(CASES.get(name) or CUDA_CASES[name]))


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_accept_kernel")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


def test_interpreted_cases_launch_one_kernel(interpreted_results: dict[str, str]) -> None:
    """The whole rule is one launch (the plain ops: 16 aten ops launching kernels without the penalty, 29 with it)."""
    for name, specs in interpreted.launches_of("tests.test_accept_kernel").items():
        assert [s.name for s in specs] == ["_accept_kernel"], name


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_accept_kernel")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_interpreted_penalty_launch_divides_as_torch_does() -> None:
    """A penalised positive logit is x / p rounded to nearest, as torch divides: `/` in Triton compiles to the
    approximate div.full.f32 (2 ulp), which would flip near-ties against the plain ops (bf16 logits tie often)."""
    from engine.kernels.compile_ahead import compile_spec

    (spec,) = interpreted.launches_of("tests.test_accept_kernel")["penalty-two-blocks"]
    ptx = compile_spec(spec).asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(CASES) + list(CUDA_CASES))
def test_cuda(name: str) -> None:
    run_case(name, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
def test_cuda_graph_replays_new_inputs() -> None:
    """Captured once, the kernel takes each replay's inputs from the same buffers (the counter left zeroed)."""
    from engine import kernels

    first = _on(verify_inputs("graph-a", 6, 8, 4096, True), "cuda")
    second = _on(verify_inputs("graph-b", 6, 8, 4096, True), "cuda")
    buffers = {k: v.clone() for k, v in first.items()}
    want = {}
    for key, inputs in (("a", first), ("b", second)):
        want_seen = inputs["seen"].clone()
        want[key] = (*_plain({**inputs, "seen": want_seen}), want_seen)
    run = lambda: _plain(buffers, kernels.accept)  # noqa: E731
    run()  # compile before capturing
    for k, v in first.items():
        buffers[k].copy_(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new, n = run()
    for key, inputs in (("a", first), ("b", second)):
        for k, v in inputs.items():
            buffers[k].copy_(v)
        graph.replay()
        want_new, want_n, want_seen = want[key]
        assert torch.equal(new, want_new) and torch.equal(n, want_n), key
        assert torch.equal(buffers["seen"], want_seen), key


if __name__ == "__main__":
    interpreted.child_main(CASES, lambda name: run_case(name, "cpu"))
