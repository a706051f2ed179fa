"""Prefill's fused rotary embedding and KV-cache write (engine/kernels/triton_rotary.py) against
`reference.prefill_rotary`, and the kernel switches (engine/kernels/switches.py).

The kernel rounds where the unfused ops round, so its output and the cache must equal the reference's to the bit
(fp16 in the interpreter, which truncates float32 -> bfloat16 where compiled Triton rounds to nearest; bf16 on the
GPU), float32 within an ulp (the compiler may fuse a product into the sum). Token counts that do not fill the last
block, a start past 0 (a prompt continuing a cached prefix), several sequences in one launch (each token at its own
slot and position, blocks that straddle two sequences), GQA and strided views of the fused QKV output are covered;
everything in the cache outside the new positions must stay as it was. With an int8 cache (`--kv int8`, cases
named `-int8`) the quantized keys, values and scales must equal the reference's to the bit too, as the kernel
quantizes the same rounded rotation the reference does.
"""

from __future__ import annotations

import importlib.util
import zlib
from typing import Any

import pytest
import torch

from engine import kernels
from engine.kernels import reference, switches
from tests import compiled, interpreted

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


Chunk = tuple[int, int, int]  # one sequence's tokens: (slot, start, length)


def make_inputs(name: str, device: str, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int,
                chunks: list[Chunk], n_slots: int, max_seq: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """q, k, v as views of one fused QKV output for the chunks' tokens concatenated, their positions' cos/sin rows
    cast as prefill casts them, caches [n_slots, n_kv, max_seq, head_dim], each token's position and slot."""
    gen = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
    tokens = sum(length for _, _, length in chunks)
    qkv = torch.randn(tokens, n_heads + 2 * n_kv, head_dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=1)
    positions = torch.cat([torch.arange(start, start + length) for _, start, length in chunks]).to(device)
    slots = torch.cat([torch.full((length,), slot) for slot, _, length in chunks]).to(device)
    inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(positions.cpu().float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).to(device)
    k_cache, v_cache = (torch.randn(n_slots, n_kv, max_seq, head_dim, generator=gen, device=device).to(dtype)
                        for _ in "kv")  # fmt: skip
    return q, k, v, emb.cos().to(dtype), emb.sin().to(dtype), k_cache, v_cache, positions, slots


def check_prefill_rotary_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                              slots: torch.Tensor) -> None:  # fmt: skip
    """`check_prefill_rotary` on an int8 cache: the rotated q, the int8 keys and values and their scales equal the
    reference's in the interpreter (float32: within an ulp before rounding, so one int8 step); on the GPU, whose
    division is within an ulp, one step and the scales' ulp."""
    from engine.kernels import triton_rotary

    (k8, k_scale), (v8, v_scale) = reference.quantize_kv(k_cache), reference.quantize_kv(v_cache)
    want = [t.clone() for t in (k8, v8, k_scale, v_scale)]
    expected = reference.prefill_rotary(q, k, v, cos, sin, want[0], want[1], positions, slots, (want[2], want[3]))
    out = triton_rotary.prefill_rotary(q, k, v, cos, sin, k8, v8, positions, slots, (k_scale, v_scale))
    assert out.dtype == q.dtype and (torch.equal(out.cpu(), expected.cpu()) or q.dtype == torch.float32)
    torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=1e-6, atol=1e-6)
    exact = q.dtype != torch.float32 and q.is_cpu
    assert k8.dtype == v8.dtype == torch.int8
    for ours, theirs in ((k8, want[0]), (v8, want[1])):
        assert (ours.int() - theirs.int()).abs().max() <= (0 if exact else 1)
    for ours, theirs in ((k_scale, want[2]), (v_scale, want[3])):
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=0 if exact else 1e-6, atol=0)
    before = reference.quantize_kv(k_cache)[0]
    assert not torch.equal(k8[slots, :, positions], before[slots, :, positions])  # the new rows were written


def check_prefill_rotary(name: str, device: str, dtype: str, n_heads: int, n_kv: int, head_dim: int,
                         chunks: list[Chunk], n_slots: int, max_seq: int, kv: str = "bf16") -> None:  # fmt: skip
    from engine.kernels import triton_rotary

    dt = DTYPES[dtype]
    q, k, v, cos, sin, k_cache, v_cache, positions, slots = make_inputs(
        name, device, dt, n_heads, n_kv, head_dim, chunks, n_slots, max_seq
    )
    if kv == "int8":
        return check_prefill_rotary_int8(q, k, v, cos, sin, k_cache, v_cache, positions, slots)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    expected = reference.prefill_rotary(q, k, v, cos, sin, k_want, v_want, positions, slots)
    out = triton_rotary.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, positions, slots)
    assert out.shape == expected.shape == (len(positions), n_heads, head_dim) and out.dtype == dt
    if dt == torch.float32:
        close = {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(out.cpu(), expected.cpu(), **close)
        torch.testing.assert_close(k_cache.cpu(), k_want.cpu(), **close)
    else:
        assert torch.equal(out.cpu(), expected.cpu())
        assert torch.equal(k_cache.cpu(), k_want.cpu())
    assert torch.equal(v_cache.cpu(), v_want.cpu())


def _case(dtype: str, n_heads: int, n_kv: int, head_dim: int, chunks: list[Chunk], max_seq: int,
          n_slots: int = 2, kv: str = "bf16") -> dict:  # fmt: skip
    return {"dtype": dtype, "n_heads": n_heads, "n_kv": n_kv, "head_dim": head_dim, "chunks": chunks,
            "n_slots": n_slots, "max_seq": max_seq, "kv": kv}  # fmt: skip


# Small shapes: the interpreter runs every program in Python.
INTERPRETED_CASES: dict[str, dict[str, Any]] = {
    "mha-fp16-partial-block": _case("fp16", 3, 3, 16, [(1, 0, 45)], 64),
    "mha-fp32": _case("fp32", 2, 2, 32, [(0, 0, 32)], 40),
    "gqa4-fp16-from-start": _case("fp16", 8, 2, 16, [(1, 20, 7)], 30),
    "gqa2-fp32-one-token": _case("fp32", 4, 2, 16, [(0, 9, 1)], 10),
    "gqa4-fp16-three-sequences": _case("fp16", 8, 2, 16, [(2, 0, 5), (0, 20, 30), (1, 3, 9)], 64, n_slots=4),
    "mha-fp32-two-sequences": _case("fp32", 2, 2, 32, [(1, 4, 40), (0, 0, 3)], 48),
    "mha-fp16-partial-block-int8": _case("fp16", 3, 3, 16, [(1, 0, 45)], 64, kv="int8"),
    "gqa4-fp16-from-start-int8": _case("fp16", 8, 2, 16, [(1, 20, 7)], 30, kv="int8"),
    "gqa2-fp32-one-token-int8": _case("fp32", 4, 2, 16, [(0, 9, 1)], 10, kv="int8"),
    "gqa4-fp16-three-sequences-int8": _case("fp16", 8, 2, 16, [(2, 0, 5), (0, 20, 30), (1, 3, 9)], 64, n_slots=4,
                                            kv="int8"),  # fmt: skip
}

CUDA_CASES: dict[str, dict[str, Any]] = {
    "7b-bf16-2048": _case("bf16", 32, 32, 128, [(0, 0, 2048)], 2112),
    "7b-bf16-chunk": _case("bf16", 32, 32, 128, [(1, 1000, 300)], 1400),
    "7b-bf16-16-prompts": _case("bf16", 32, 32, 128, [(s, 8 * s, 128) for s in range(16)], 320, n_slots=17),
    "34b-bf16": _case("bf16", 64, 8, 128, [(0, 0, 513)], 600),
    "7b-fp32": _case("fp32", 32, 32, 128, [(1, 5, 100), (0, 0, 28)], 128),
    "7b-bf16-2048-int8": _case("bf16", 32, 32, 128, [(0, 0, 2048)], 2112, kv="int8"),
    "34b-bf16-int8": _case("bf16", 64, 8, 128, [(0, 0, 513)], 600, kv="int8"),
    "7b-bf16-16-prompts-int8": _case("bf16", 32, 32, 128, [(s, 8 * s, 128) for s in range(16)], 320, n_slots=17,
                                     kv="int8"),  # fmt: skip
}


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_prefill_kernels")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted(name: str, interpreted_results: dict[str, str]) -> None:
    if interpreted_results[name] != "ok":
        pytest.fail(interpreted_results[name], pytrace=False)


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_prefill_kernels")


@pytest.mark.parametrize("name", list(INTERPRETED_CASES))
def test_interpreted_compiles_for_sm90(name: str, compiled_results: dict[str, str]) -> None:
    """Every launch of the interpreted case, as the H200 gets it, compiles (tests/compiled.py)."""
    if compiled_results[name] != "ok":
        pytest.fail(compiled_results[name], pytrace=False)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(INTERPRETED_CASES) + list(CUDA_CASES))
def test_cuda(name: str) -> None:
    check_prefill_rotary(name, "cuda", **(INTERPRETED_CASES.get(name) or CUDA_CASES[name]))


def test_reference_matches_the_unfused_prefill() -> None:
    """The reference is what prefill did before the kernel: rotate [H, T, D] in the input dtype, slice into the
    cache (bf16, where the roundings matter); with two sequences, each one's tokens land in its own slot."""
    chunks = [(1, 3, 9), (0, 0, 4)]
    q, k, v, cos, sin, k_cache, v_cache, positions, slots = make_inputs("unfused", "cpu", torch.bfloat16, 4, 2, 16,
                                                                        chunks, 2, 16)  # fmt: skip
    k_want, v_want = k_cache.clone(), v_cache.clone()
    out = reference.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, positions, slots)

    def rotate(x: torch.Tensor, rows: slice) -> torch.Tensor:  # HF's rotate_half form, each op in bf16
        rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        return x * cos[rows] + rotated * sin[rows]

    for (slot, start, length), rows in zip(chunks, (slice(0, 9), slice(9, 13)), strict=True):
        k_want[slot, :, start : start + length] = rotate(k[rows].transpose(0, 1), rows)
        v_want[slot, :, start : start + length] = v[rows].transpose(0, 1)
        assert torch.equal(out[rows].transpose(0, 1), rotate(q[rows].transpose(0, 1), rows))
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every change is on by default; $CODELLAMA_TUI_OFF names the ones off (`all`: every one); a typo is an error."""
    monkeypatch.delenv(switches.ENV, raising=False)
    assert all(switches.on(n) for n in switches.NAMES)
    monkeypatch.setenv(switches.ENV, "prefill_rotary, attention_splits")
    assert [switches.on(n) for n in switches.NAMES] == [False, True, False, True]
    monkeypatch.setenv(switches.ENV, "all")
    assert not any(switches.on(n) for n in switches.NAMES)
    monkeypatch.setenv(switches.ENV, "prefill_rotry")
    with pytest.raises(ValueError, match="unknown prefill_rotry"):
        switches.on("prefill_rotary")


def test_dispatch_uses_the_reference_on_cpu() -> None:
    args = make_inputs("dispatch", "cpu", torch.float32, 4, 4, 16, [(0, 0, 5)], 1, 8)
    mine = [a.clone() for a in args]
    out = kernels.prefill_rotary(*args)
    assert torch.equal(out, reference.prefill_rotary(*mine))
    assert torch.equal(args[5], mine[5]) and torch.equal(args[6], mine[6])


if __name__ == "__main__":
    interpreted.child_main(INTERPRETED_CASES, lambda name: check_prefill_rotary(name, "cpu", **INTERPRETED_CASES[name]))
