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

The verify step's attention (several new tokens per sequence, `verify_attention`) is checked the same way, and its
reference against decoding the same tokens one at a time.

The int8 KV cache (`--kv int8`, cases named `-int8`) is checked the same way against the reference on the same int8
cache: its scales hold NaN where the kernel must not read, the new tokens' int8 keys and values land within one
step of the reference's (the new key is rounded to the input dtype first, which the interpreter truncates) and their
scales within the dtype's tolerance.
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
# Triton's interpreter truncates float32 to bfloat16 where the GPU rounds to nearest: twice the rounding error.
INTERPRETED_TOLERANCE = {**TOLERANCE, torch.bfloat16: {"rtol": 3.2e-2, "atol": 2e-2}}


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
    """A copy with NaN wherever attention must not read: at and past each new position and in unused slots (of a
    cache [n_slots, Hkv, max_seq, D], or of an int8 cache's scales [n_slots, Hkv, max_seq])."""
    keep = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool, device=cache.device)
    for slot, position in zip(slots.tolist(), positions.tolist(), strict=True):
        keep[slot, :position] = True
    return cache.masked_fill(~keep.view(*keep.shape[:1], 1, keep.shape[1], *[1] * (cache.dim() - 3)), float("nan"))


def assert_int8_writes(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], tolerance: dict) -> None:
    """An int8 cache's keys, values and their scales after the kernel (`got`) against the reference's (`want`): the
    int8 values within one step (the interpreter truncates the new key to bf16 where the GPU rounds, and the GPU
    divides within an ulp), the scales (NaN where poisoned) within the dtype's tolerance."""
    for ours, theirs in zip(got[:2], want[:2], strict=True):
        assert ours.dtype == torch.int8
        assert (ours.int() - theirs.int()).abs().max() <= 1
    for ours, theirs in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), equal_nan=True, **tolerance)


def check_attention_int8(
    name: str, device: str, dt: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    lengths: list[int], num_splits: int | None,
) -> None:  # fmt: skip
    """`check_attention` on an int8 cache (`kv_scales`)."""
    from engine.kernels import triton_attention

    q, k, v, cos, sin, k_cache, v_cache, slots, positions = make_inputs(
        name, device, dt, n_heads, n_kv_heads, head_dim, max_seq, lengths
    )
    scale = head_dim**-0.5
    (k8, k_scale), (v8, v_scale) = reference.quantize_kv(k_cache), reference.quantize_kv(v_cache)
    ours = [k8.clone(), v8.clone(), poisoned(k_scale, slots, positions), poisoned(v_scale, slots, positions)]
    want = [k8, v8, k_scale, v_scale]
    expected = reference.rotary_attention(q, k, v, cos, sin, positions, slots, k8, v8, scale, (k_scale, v_scale))
    for i, written in ((2, k_scale), (3, v_scale)):  # the poisoned scales, with the reference's new rows
        want[i] = ours[i].clone()
        want[i][slots, :, positions] = written[slots, :, positions]
    out = triton_attention.rotary_attention(
        q, k, v, cos, sin, positions, slots, ours[0], ours[1], scale, num_splits=num_splits, kv_scales=tuple(ours[2:])
    )
    tolerance = (TOLERANCE if device == "cuda" else INTERPRETED_TOLERANCE)[dt]
    assert out.dtype == dt and out.shape == expected.shape
    torch.testing.assert_close(out.cpu().float(), expected.cpu().float(), **tolerance)
    assert_int8_writes(tuple(ours), tuple(want), tolerance)


def check_attention(
    name: str, device: str, dtype: str, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    lengths: list[int], num_splits: int | None, kv: str = "bf16",
) -> None:  # fmt: skip
    from engine.kernels import triton_attention

    dt = DTYPES[dtype]
    if kv == "int8":
        return check_attention_int8(name, device, dt, n_heads, n_kv_heads, head_dim, max_seq, lengths, num_splits)
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
    splits: tuple[int | None, ...], kv: str = "bf16",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    shape = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "max_seq": max_seq, "kv": kv}
    name = prefix + ("-int8" if kv == "int8" else "")
    return {
        f"{name}-splits{s or 'auto'}": {"dtype": dtype, **shape, "lengths": lengths, "num_splits": s} for s in splits
    }


# Small shapes: the interpreter runs every program in Python.
INTERPRETED_CASES = {
    **_cases("mha-fp32", "fp32", 2, 2, 32, 96, [1, 32, 96, 33, 64], (1, None)),
    **_cases("mha-bf16", "bf16", 3, 3, 16, 130, [130, 1, 64, 65], (1, 4)),
    **_cases("gqa2-bf16", "bf16", 4, 2, 16, 70, [70, 1, 64, 2], (1, 3)),
    **_cases("gqa4-fp32", "fp32", 8, 2, 32, 128, [128, 1, 64, 65], (1, 3)),
    **_cases("gqa8-bf16", "bf16", 16, 2, 16, 130, [1, 64, 130], (1, None)),
    **_cases("mha-fp32", "fp32", 2, 2, 32, 96, [1, 32, 96, 33, 64], (1, None), kv="int8"),
    **_cases("mha-bf16", "bf16", 3, 3, 16, 130, [130, 1, 64, 65], (1, 4), kv="int8"),
    **_cases("gqa4-fp32", "fp32", 8, 2, 32, 128, [128, 1, 64, 65], (1, 3), kv="int8"),
    **_cases("gqa8-bf16", "bf16", 16, 2, 16, 130, [1, 64, 130], (1, None), kv="int8"),
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
    **_cases("7b-bf16", "bf16", 32, 32, 128, 4096, [1, 129, 4096, 2048, 4095], (None, 1), kv="int8"),
    **_cases("7b-batch32", "bf16", 32, 32, 128, 512, [1 + 16 * i for i in range(32)], (None,), kv="int8"),
    **_cases("34b-bf16", "bf16", 64, 8, 128, 3000, [2999, 65, 1, 3000], (None, 1), kv="int8"),
    **_cases("34b-batch32", "bf16", 64, 8, 128, 300, [1 + 9 * i for i in range(32)], (None,), kv="int8"),
}
cuda_only = pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", list(INTERPRETED_CASES) + list(CUDA_CASES))
def test_cuda(name: str) -> None:
    check_attention(name, "cuda", **(INTERPRETED_CASES.get(name) or CUDA_CASES[name]))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("kv", ["bf16", "int8"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "batch"), [(32, 32, 1), (32, 32, 32), (64, 8, 2)])
def test_cuda_graph_replays_at_any_length(n_heads: int, n_kv_heads: int, batch: int, kv: str) -> None:
    """One capture (fixed grid and splits) serves every position: the positions live on the device; the int8
    cache's kernel is captured the same way."""
    from engine.kernels import triton_attention

    max_seq = 1024
    q, k, v, cos, sin, k_cache, v_cache, slots, positions = make_inputs(
        f"graph-{n_heads}-{batch}", "cuda", torch.bfloat16, n_heads, n_kv_heads, 128, max_seq, [1] * batch
    )
    scale = 128**-0.5
    args = (q, k, v, cos, sin, positions, slots)
    kv_scales = None
    if kv == "int8":
        (k_cache, k_scale), (v_cache, v_scale) = reference.quantize_kv(k_cache), reference.quantize_kv(v_cache)
        kv_scales = (k_scale, v_scale)
    triton_attention.rotary_attention(*args, k_cache, v_cache, scale, kv_scales=kv_scales)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.rotary_attention(*args, k_cache, v_cache, scale, kv_scales=kv_scales)
    for lengths in ([1] * batch, [max_seq] * batch, [(37 * i) % max_seq + 1 for i in range(batch)]):
        positions.copy_(torch.tensor(lengths) - 1)
        graph.replay()
        scales = kv_scales and tuple(t.clone() for t in kv_scales)
        expected = reference.rotary_attention(*args, k_cache.clone(), v_cache.clone(), scale, scales)
        torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[torch.bfloat16])


def make_verify_inputs(
    name: str, device: str, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    positions: list[int], counts: list[int], queries: int,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """`make_inputs` for `queries` new tokens per row: q, k, v [B, T, heads, D] (views of one fused output), the
    rotary tables, caches, slots, first positions and real-token counts."""
    gen = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
    batch = len(positions)
    qkv = torch.randn(batch, queries, n_heads + 2 * n_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    _, _, _, cos, sin, k_cache, v_cache, slots, _ = make_inputs(
        name, device, dtype, n_heads, n_kv_heads, head_dim, max_seq, [1] * batch
    )
    as_tensor = lambda xs: torch.tensor(xs, device=device)  # noqa: E731
    return q, k, v, cos, sin, k_cache, v_cache, slots, as_tensor(positions), as_tensor(counts)


def check_verify_int8(
    name: str, device: str, dt: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    positions: list[int], counts: list[int], queries: int, num_splits: int | None,
) -> None:  # fmt: skip
    """`check_verify` on an int8 cache (`kv_scales`), poisoned in its scales."""
    from engine.kernels import triton_attention

    q, k, v, cos, sin, k_cache, v_cache, slots, first, count = make_verify_inputs(
        name, device, dt, n_heads, n_kv_heads, head_dim, max_seq, positions, counts, queries
    )
    scale = head_dim**-0.5
    (k8, k_scale), (v8, v_scale) = reference.quantize_kv(k_cache), reference.quantize_kv(v_cache)
    ours = [k8.clone(), v8.clone(), poisoned(k_scale, slots, first), poisoned(v_scale, slots, first)]
    expected = reference.verify_attention(q, k, v, cos, sin, first, slots, count, k8, v8, scale, (k_scale, v_scale))
    want = [k8, v8, ours[2].clone(), ours[3].clone()]
    for slot, p, n in zip(slots.tolist(), positions, counts, strict=True):
        for bad, written in ((want[2], k_scale), (want[3], v_scale)):  # the reference wrote the real tokens' rows
            bad[slot, :, p : p + n] = written[slot, :, p : p + n]
    out = triton_attention.verify_attention(
        q, k, v, cos, sin, first, slots, count, ours[0], ours[1], scale, num_splits=num_splits,
        kv_scales=tuple(ours[2:]),
    )  # fmt: skip
    assert out.dtype == dt and out.shape == expected.shape
    real = torch.arange(queries, device=device)[None, :] < count[:, None]
    tolerance = (TOLERANCE if device == "cuda" else INTERPRETED_TOLERANCE)[dt]
    torch.testing.assert_close(out[real].cpu().float(), expected[real].cpu().float(), **tolerance)
    assert_int8_writes(tuple(ours), tuple(want), tolerance)


def check_verify(
    name: str, device: str, dtype: str, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
    positions: list[int], counts: list[int], queries: int, num_splits: int | None, kv: str = "bf16",
) -> None:  # fmt: skip
    """The kernel against `reference.verify_attention` on a cache poisoned at and past each row's first new
    position: the real tokens' outputs match, their keys and values land, and nothing else in the cache changes."""
    from engine.kernels import triton_attention

    dt = DTYPES[dtype]
    if kv == "int8":
        args = (n_heads, n_kv_heads, head_dim, max_seq, positions, counts, queries, num_splits)
        return check_verify_int8(name, device, dt, *args)
    q, k, v, cos, sin, k_cache, v_cache, slots, first, count = make_verify_inputs(
        name, device, dt, n_heads, n_kv_heads, head_dim, max_seq, positions, counts, queries
    )
    scale = head_dim**-0.5
    expected = reference.verify_attention(q, k, v, cos, sin, first, slots, count, k_cache, v_cache, scale)
    k_bad, v_bad = poisoned(k_cache, slots, first), poisoned(v_cache, slots, first)
    k_want, v_want = k_bad.clone(), v_bad.clone()
    for slot, p, n in zip(slots.tolist(), positions, counts, strict=True):
        for want, cache in ((k_want, k_cache), (v_want, v_cache)):  # the reference wrote the real tokens' rows
            want[slot, :, p : p + n] = cache[slot, :, p : p + n]
    out = triton_attention.verify_attention(
        q, k, v, cos, sin, first, slots, count, k_bad, v_bad, scale, num_splits=num_splits
    )
    assert out.dtype == dt and out.shape == expected.shape
    real = torch.arange(queries, device=device)[None, :] < count[:, None]
    tolerance = (TOLERANCE if device == "cuda" else INTERPRETED_TOLERANCE)[dt]
    torch.testing.assert_close(out[real].cpu().float(), expected[real].cpu().float(), **tolerance)
    torch.testing.assert_close(k_bad.cpu().float(), k_want.cpu().float(), equal_nan=True, **tolerance)
    assert torch.equal(v_bad.isnan(), v_want.isnan()) and torch.equal(v_bad.nan_to_num(), v_want.nan_to_num())


def _verify_cases(
    prefix: str, dtype: str, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int, positions: list[int],
    counts: list[int], queries: int, splits: tuple[int | None, ...], kv: str = "bf16",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    shape = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "max_seq": max_seq, "kv": kv}
    rows = {"positions": positions, "counts": counts, "queries": queries}
    name = prefix + ("-int8" if kv == "int8" else "")
    return {f"verify-{name}-splits{s or 'auto'}": {"dtype": dtype, **shape, **rows, "num_splits": s} for s in splits}


# First positions include 0 (nothing cached), multiples of the key block (64) and a row that ends at the cache's end;
# counts include 1 (a row with nothing proposed) and the full T.
VERIFY_INTERPRETED_CASES = {
    **_verify_cases("mha-fp32", "fp32", 2, 2, 32, 96, [0, 64, 30, 92], [4, 4, 1, 4], 4, (1, 3)),
    **_verify_cases("mha-bf16", "bf16", 3, 3, 16, 130, [129, 5, 64], [1, 2, 2], 2, (1, None)),
    **_verify_cases("gqa2-fp32", "fp32", 4, 2, 16, 70, [10, 0, 62], [5, 8, 8], 8, (1, 2)),
    **_verify_cases("gqa8-bf16", "bf16", 16, 2, 16, 130, [65, 1, 120], [3, 1, 3], 3, (1, 4)),
    **_verify_cases("mha-fp32", "fp32", 2, 2, 32, 96, [0, 64, 30, 92], [4, 4, 1, 4], 4, (1, 3), kv="int8"),
    **_verify_cases("gqa8-bf16", "bf16", 16, 2, 16, 130, [65, 1, 120], [3, 1, 3], 3, (1, 4), kv="int8"),
}
VERIFY_CUDA_CASES = {
    **_verify_cases("7b-bf16", "bf16", 32, 32, 128, 4096, [0, 128, 4080, 2047], [16, 9, 16, 1], 16, (None, 1)),
    **_verify_cases("7b-batch8", "bf16", 32, 32, 128, 512, [9 + 50 * i for i in range(8)], [4] * 8, 4, (None,)),
    **_verify_cases("34b-bf16", "bf16", 64, 8, 128, 3000, [2990, 64, 0], [8, 8, 3], 8, (None, 1)),
    **_verify_cases("34b-t16", "bf16", 64, 8, 128, 600, [500, 1], [16, 16], 16, (None,)),
    **_verify_cases("7b-fp32", "fp32", 8, 8, 128, 600, [512, 1, 63], [2, 2, 1], 2, (None, 1)),
    **_verify_cases(
        "7b-bf16", "bf16", 32, 32, 128, 4096, [0, 128, 4080, 2047], [16, 9, 16, 1], 16, (None, 1), kv="int8"
    ),
    **_verify_cases("34b-bf16", "bf16", 64, 8, 128, 3000, [2990, 64, 0], [8, 8, 3], 8, (None, 1), kv="int8"),
}


@pytest.mark.parametrize("name", list(VERIFY_INTERPRETED_CASES))
def test_verify_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


@pytest.mark.parametrize("name", list(VERIFY_INTERPRETED_CASES))
def test_verify_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted verify case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", list(VERIFY_INTERPRETED_CASES) + list(VERIFY_CUDA_CASES))
def test_verify_cuda(name: str) -> None:
    check_verify(name, "cuda", **(VERIFY_INTERPRETED_CASES.get(name) or VERIFY_CUDA_CASES[name]))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "batch", "queries"), [(32, 32, 1, 16), (32, 32, 8, 4), (64, 8, 2, 8)]
)
def test_verify_cuda_graph_replays_at_any_position(n_heads: int, n_kv_heads: int, batch: int, queries: int) -> None:
    """One captured verify step serves every first position and count: both live on the device."""
    from engine.kernels import triton_attention

    max_seq = 1024
    q, k, v, cos, sin, k_cache, v_cache, slots, first, count = make_verify_inputs(
        f"verify-graph-{n_heads}-{batch}", "cuda", torch.bfloat16, n_heads, n_kv_heads, 128, max_seq, [0] * batch,
        [queries] * batch, queries,
    )  # fmt: skip
    scale = 128**-0.5
    args = (q, k, v, cos, sin, first, slots, count)
    triton_attention.verify_attention(*args, k_cache, v_cache, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.verify_attention(*args, k_cache, v_cache, scale)
    for starts, counts in (([0] * batch, [queries] * batch), ([max_seq - queries] * batch, [1] * batch)):
        first.copy_(torch.tensor(starts))
        count.copy_(torch.tensor([(c + 3 * i) % queries + 1 for i, c in enumerate(counts)]))
        graph.replay()
        expected = reference.verify_attention(*args, k_cache.clone(), v_cache.clone(), scale)
        real = torch.arange(queries, device="cuda")[None, :] < count[:, None]
        torch.testing.assert_close(out[real].float(), expected[real].float(), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verify_reference_is_decoding_one_token_at_a_time(dtype: str) -> None:
    """The reference verify step equals `rotary_attention` run token after token (each real token's output and the
    cache); the tokens past a row's count write nothing new: the cache after it matches the one-at-a-time cache."""
    dt = DTYPES[dtype]
    positions, counts, queries = [7, 0, 40], [5, 3, 1], 5
    q, k, v, cos, sin, k_cache, v_cache, slots, first, count = make_verify_inputs(
        f"verify-ref-{dtype}", "cpu", dt, 8, 2, 32, 64, positions, counts, queries
    )
    ours = k_cache.clone(), v_cache.clone()
    out = reference.verify_attention(q, k, v, cos, sin, first, slots, count, *ours, 32**-0.5)
    for b, n in enumerate(counts):
        for t in range(n):
            rows = slice(b, b + 1)
            want = reference.rotary_attention(
                q[rows, t], k[rows, t], v[rows, t], cos, sin, first[rows] + t, slots[rows], k_cache, v_cache, 32**-0.5
            )
            torch.testing.assert_close(out[b, t].float(), want[0].float(), **TOLERANCE[dt])
    torch.testing.assert_close(ours[0], k_cache, **TOLERANCE[dt])
    assert torch.equal(ours[1], v_cache)
    if dt == torch.float32:  # one float32 CPU sequence takes a shortcut: the same outputs and cache
        alone = k_cache.clone(), v_cache.clone()
        batched = alone[0].clone(), alone[1].clone()
        out = reference.verify_attention(q, k, v, cos, sin, first, slots, count, *batched, 32**-0.5)
        for b, n in enumerate(counts):
            rows = slice(b, b + 1)
            args = q[rows], k[rows], v[rows], cos, sin, first[rows], slots[rows], count[rows]
            one = reference.verify_attention(*args, *alone, 32**-0.5)
            torch.testing.assert_close(one[0, :n], out[b, :n], **TOLERANCE[dt])
        torch.testing.assert_close(alone[0], batched[0], **TOLERANCE[dt])
        assert torch.equal(alone[1], batched[1])


if __name__ == "__main__":

    def run(name: str) -> None:
        if name in VERIFY_INTERPRETED_CASES:
            check_verify(name, "cpu", **VERIFY_INTERPRETED_CASES[name])
        else:
            check_attention(name, "cpu", **INTERPRETED_CASES[name])

    interpreted.child_main([*INTERPRETED_CASES, *VERIFY_INTERPRETED_CASES], run)
