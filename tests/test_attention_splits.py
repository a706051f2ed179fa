"""Decode attention's split count and its skipped splits (`attention_splits` in engine/kernels/switches.py):
`fill_splits` against whole waves, and the kernel against `reference.rotary_attention` with rows of one, a few and
all splits holding keys (the row of one writes its output itself; the others merge only the splits with keys), and
the same cases with the change switched off (every split counts and merges, as before). The checks are
tests/test_attention_kernel.py's: NaN past each length in the cache, the new keys and values written and nothing
else; interpreted on the CPU in one child process and compiled for sm_90, and on CUDA where there is a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

from engine.kernels import switches
from tests import compiled, interpreted
from tests.test_attention_kernel import check_attention

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()


def _case(dtype: str, n_heads: int, n_kv: int, max_seq: int, lengths: list[int], splits: int | None, on: bool) -> dict:
    shape = {"dtype": dtype, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": 32, "max_seq": max_seq}
    return {**shape, "lengths": lengths, "num_splits": splits, "on": on}


# Lengths against chunks of 32 keys (lanes) or 64 (tl.dot): one split with keys, two, three, all of them.
INTERPRETED_CASES: dict[str, dict[str, Any]] = {
    "mha-8-splits": _case("fp32", 2, 2, 256, [1, 33, 96, 256, 2], 8, True),
    "mha-auto-splits": _case("fp32", 2, 2, 256, [1, 200, 64], None, True),
    "gqa4-4-splits": _case("fp32", 8, 2, 256, [1, 65, 256, 130], 4, True),
    "mha-8-splits-off": _case("fp32", 2, 2, 256, [1, 33, 96, 256, 2], 8, False),
    "gqa4-4-splits-off": _case("fp32", 8, 2, 256, [1, 65, 256, 130], 4, False),
}
CUDA_CASES: dict[str, dict[str, Any]] = {
    "7b-16k-batch1": {**_case("bf16", 32, 32, 16500, [16385], None, True), "head_dim": 128},
    "7b-16k-batch8": {**_case("bf16", 32, 32, 16500, [16385 - 7 * i for i in range(8)], None, True), "head_dim": 128},
    "7b-short-batch1": {**_case("bf16", 32, 32, 2112, [129], None, True), "head_dim": 128},
    "34b-batch1": {**_case("bf16", 64, 8, 3000, [2999, 1], None, True), "head_dim": 128},
}


def run_case(name: str, device: str) -> None:
    kwargs = dict(INTERPRETED_CASES.get(name) or CUDA_CASES[name])
    previous = os.environ.get(switches.ENV)
    os.environ[switches.ENV] = "" if kwargs.pop("on") else "attention_splits"
    try:
        check_attention(name, device, **kwargs)
    finally:
        os.environ.pop(switches.ENV) if previous is None else os.environ.update({switches.ENV: previous})


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_attention_splits")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_attention_splits")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(INTERPRETED_CASES) + list(CUDA_CASES))
def test_cuda(name: str) -> None:
    run_case(name, "cuda")


def test_fill_splits() -> None:
    """Whole waves of 3 programs per SM (lanes) or 4 (tl.dot) on 132 SMs: the fewest splits within 5% of the best
    fill, at most two waves, one where the batch fills a wave, no more than the key blocks."""
    triton_attention = pytest.importorskip("engine.kernels.triton_attention")
    lanes, dot = 3 * 132, 4 * 132
    assert triton_attention.fill_splits(32, 16500, 32, lanes) == 12  # 7B batch 1: 384 of 396 programs
    assert triton_attention.fill_splits(8 * 32, 16500, 32, lanes) == 3  # 7B batch 8: 768 programs, two waves
    assert triton_attention.fill_splits(4 * 32, 16500, 32, lanes) == 3
    assert triton_attention.fill_splits(16 * 32, 16500, 32, lanes) == 1  # the batch fills a wave
    assert triton_attention.fill_splits(32 * 32, 4096, 32, lanes) == 1
    assert triton_attention.fill_splits(32, 40, 32, lanes) == 2  # no more splits than key blocks
    assert triton_attention.fill_splits(8, 10**6, 64, dot) == 61  # 34B batch 1: 488 programs, 64 would give 512
    assert triton_attention.fill_splits(8 * 8, 10**6, 64, dot) == 8  # 34B batch 8: 512 of 528


if __name__ == "__main__":
    interpreted.child_main(INTERPRETED_CASES, lambda name: run_case(name, "cpu"))
