"""Decode attention with its rotary embedding and cache write (engine/kernels/triton_attention.py) against
`reference.rotary_attention`.

Both inner loops are covered: per query head without tl.dot (groups 1 and 2) and per kv head with
tl.dot (groups 4 and 8), each with one split (the output written directly) and several (merged).
Lengths (positions + 1) include 1, multiples of both key-block sizes (32 and 64), max_seq and one more
than a block. The cache at and beyond each new position and the unused slots hold NaN, so any read past a
length, or of the new key from the cache instead of from the kernel's registers, shows; the new keys and
values must land in the cache and nothing else may change there. As in tests/test_kernels.py, the interpreted
cases run in one child process (`python -m tests.test_attention_kernel` with TRITON_INTERPRET=1); with CUDA they
also run compiled, with real 7B/34B head counts and inside a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import zlib
from typing import Any

import pytest
import torch

from engine.kernels import reference
from tests import compiled, interpreted

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}


def make_inputs(
    name: str, device: str, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    lengths: list[int],
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """q, k, v (strided views, as the fused QKV output gives them), rotary tables, clean caches, slots, positions."""
    gen = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
    batch, n_slots = len(lengths), len(lengths) + 2
    qkv = torch.randn(batch, n_heads + 2 * n_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    k_cache, v_cache = (
        torch.randn(n_slots, n_kv_heads, max_seq, head_dim, generator=gen, device=device).to(dtype) for _ in range(2)
    )
    slots = torch.randperm(n_slots, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))[:batch]
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = (t(torch.cat((freqs, freqs), dim=-1)).to(device) for t in (torch.cos, torch.sin))
    positions = torch.tensor(lengths, device=device) - 1
    return q, k, v, cos, sin, k_cache, v_cache, slots.to(device), positions


def poisoned(cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy with NaN wherever attention must not read: at and past each new position and in unused slots."""
    keep = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool, device=cache.device)
    for slot, position in zip(slots.tolist(), positions.tolist(), strict=True):
        keep[slot, :position] = True
    return cache.masked_fill(~keep[:, None, :, None], float("nan"))


def check_attention(
    name: str, device: str, dtype: str, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    lengths: list[int], num_splits: int | None,
) -> None:  # fmt: skip
    from engine.kernels import triton_attention

    dt = DTYPES[dtype]
    q, k, v, cos, sin, k_cache, v_cache, slots, positions = make_inputs(
        name, device, dt, n_heads, n_kv_heads, head_dim, max_seq, lengths
    )
    scale = head_dim**-0.5
    expected = reference.rotary_attention(q, k, v, cos, sin, positions, slots, k_cache, v_cache, scale)
    k_bad, v_bad = poisoned(k_cache, slots, positions), poisoned(v_cache, slots, positions)
    k_want, v_want = k_bad.clone(), v_bad.clone()
    for want, cache in ((k_want, k_cache), (v_want, v_cache)):  # the reference wrote the new rows
        want[slots, :, positions] = cache[slots, :, positions]
    out = triton_attention.rotary_attention(
        q, k, v, cos, sin, positions, slots, k_bad, v_bad, scale, num_splits=num_splits
    )
    assert out.dtype == dt and out.shape == expected.shape
    torch.testing.assert_close(out.cpu().float(), expected.cpu().float(), **TOLERANCE[dt])
    torch.testing.assert_close(k_bad.cpu().float(), k_want.cpu().float(), equal_nan=True, **TOLERANCE[dt])
    assert torch.equal(v_bad.isnan(), v_want.isnan()) and torch.equal(v_bad.nan_to_num(), v_want.nan_to_num())


def _cases(
    prefix: str, dtype: str, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int, lengths: list[int],
    splits: tuple[int | None, ...],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    shape = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "max_seq": max_seq}
    return {
        f"{prefix}-splits{s or 'auto'}": {"dtype": dtype, **shape, "lengths": lengths, "num_splits": s} for s in splits
    }


# Small shapes: the interpreter runs every program in Python.
INTERPRETED_CASES = {
    **_cases("mha-fp32", "fp32", 2, 2, 32, 96, [1, 32, 96, 33, 64], (1, None)),
    **_cases("mha-bf16", "bf16", 3, 3, 16, 130, [130, 1, 64, 65], (1, 4)),
    **_cases("gqa2-bf16", "bf16", 4, 2, 16, 70, [70, 1, 64, 2], (1, 3)),
    **_cases("gqa4-fp32", "fp32", 8, 2, 32, 128, [128, 1, 64, 65], (1, 3)),
    **_cases("gqa8-bf16", "bf16", 16, 2, 16, 130, [1, 64, 130], (1, None)),
}


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_attention_kernel")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_attention_kernel")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


def test_choose_splits() -> None:
    """One split (no merge) once the batch fills a wave of four programs per SM, otherwise enough to fill it."""
    triton_attention = pytest.importorskip("engine.kernels.triton_attention")
    assert triton_attention.choose_splits(32 * 32, 4096, 32, 132) == 1  # 7B, batch 32
    assert triton_attention.choose_splits(16 * 32, 4096, 32, 132) == 1  # 7B, batch 16
    assert triton_attention.choose_splits(8 * 32, 4096, 32, 132) == 2  # 7B, batch 8
    assert triton_attention.choose_splits(32, 4096, 32, 132) == 16  # 7B, batch 1
    assert triton_attention.choose_splits(32, 40, 32, 132) == 2  # no more splits than key blocks
    assert triton_attention.choose_splits(8, 10**6, 64, 132) == triton_attention.MAX_SPLITS  # 34B, batch 1


# Real CodeLlama head counts, compiled, only where there is a GPU.
CUDA_CASES = {
    **_cases("7b-bf16", "bf16", 32, 32, 128, 4096, [1, 129, 4096, 2048, 4095], (None, 1)),
    **_cases("7b-batch32", "bf16", 32, 32, 128, 512, [1 + 16 * i for i in range(32)], (None,)),
    **_cases("34b-bf16", "bf16", 64, 8, 128, 3000, [2999, 65, 1, 3000], (None, 1)),
    **_cases("34b-batch32", "bf16", 64, 8, 128, 300, [1 + 9 * i for i in range(32)], (None,)),
    **_cases("gqa2-bf16", "bf16", 16, 8, 128, 1000, [1000, 1, 333], (None,)),
    **_cases("gqa4-bf16", "bf16", 16, 4, 128, 1000, [1000, 1, 333], (None,)),
    **_cases("7b-fp32", "fp32", 8, 8, 128, 600, [513, 1, 64], (None, 1)),
    **_cases("gqa8-fp32", "fp32", 16, 2, 128, 600, [513, 1, 64], (None, 1)),
}
cuda_only = pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", list(INTERPRETED_CASES) + list(CUDA_CASES))
def test_cuda(name: str) -> None:
    check_attention(name, "cuda", **(INTERPRETED_CASES.get(name) or CUDA_CASES[name]))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "batch"), [(32, 32, 1), (32, 32, 32), (64, 8, 2)])
def test_cuda_graph_replays_at_any_length(n_heads: int, n_kv_heads: int, batch: int) -> None:
    """One capture (fixed grid and splits) serves every position: the positions live on the device."""
    from engine.kernels import triton_attention

    max_seq = 1024
    q, k, v, cos, sin, k_cache, v_cache, slots, positions = make_inputs(
        f"graph-{n_heads}-{batch}", "cuda", torch.bfloat16, n_heads, n_kv_heads, 128, max_seq, [1] * batch
    )
    scale = 128**-0.5
    args = (q, k, v, cos, sin, positions, slots)
    triton_attention.rotary_attention(*args, k_cache, v_cache, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.rotary_attention(*args, k_cache, v_cache, scale)
    for lengths in ([1] * batch, [max_seq] * batch, [(37 * i) % max_seq + 1 for i in range(batch)]):
        positions.copy_(torch.tensor(lengths) - 1)
        graph.replay()
        expected = reference.rotary_attention(*args, k_cache.clone(), v_cache.clone(), scale)
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[torch.bfloat16])


if __name__ == "__main__":
    interpreted.child_main(INTERPRETED_CASES, lambda name: check_attention(name, "cpu", **INTERPRETED_CASES[name]))
