"""CUDA checks of the formats this branch adds (skipped without CUDA): nf4 through bitsandbytes' `matmul_4bit` on our
bytes, inside the engine's captured decode step, and an int4 weight stored in act order (permuted columns) on both
GPU paths: the Triton GEMV on gathered x and the dequantize-then-cuBLAS path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.bench import hf_twin
from engine.engine import Engine
from engine.requests import EngineSpec, Request
from engine.weights import NF4, Int4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rows", [1, 8, 100])
def test_nf4_on_cuda_is_bitsandbytes_matmul_4bit_on_our_bytes(rows: int) -> None:
    torch.manual_seed(0)
    w = NF4.from_dense(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ w.dense(torch.float32).T
    assert rel(kernels.linear(x, w), expected) < 1e-2
    assert rel(kernels.linear(x, w), x @ w.dense().T) < 1e-2


def test_the_engine_runs_nf4_in_its_captured_decode_step(tiny_int4_dir: Path) -> None:
    """Start-up captures the decode graphs with bitsandbytes' kernels inside; the logits of prefill and of a decode
    step stay those of transformers holding the dequantized weights (float32), to bf16 rounding."""
    engine = Engine.load(EngineSpec(model=str(tiny_int4_dir), device="cuda", dtype="bfloat16", max_batch=2,
                                    quant="nf4"))  # fmt: skip
    assert engine.runner.graphs
    ref = hf_twin(engine).float()
    ids = engine.prompt_ids(Request("completion", text="def f(x):\n    "))
    with torch.no_grad():
        expected = ref(torch.tensor([ids + [450]], device="cuda")).logits[0]
        got = engine.model.prefill(torch.tensor(ids, device="cuda"), slot=0, start=0, all_logits=True)
        assert rel(got, expected[: len(ids)]) < 2e-2
        step = engine.model.decode(*(torch.tensor(v, device="cuda") for v in ([450, 5], [len(ids), 0], [0, 1])))
        assert rel(step[0], expected[len(ids)]) < 2e-2


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_a_permuted_int4_weight_on_cuda_computes_with_its_inputs_order(rows: int) -> None:
    from engine.kernels import triton_gemv

    torch.manual_seed(0)
    w = Int4.from_dense(torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16) * 0.02)
    w.set_perm(torch.randperm(1024, device="cuda"))
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ w.dense(torch.float32).T
    assert rel(w.linear(x), expected) < 1e-2  # dequantized (columns put back), then cuBLAS
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    key = (rows, *w.key)
    kernels._TRITON_CONFIG[key] = triton_gemv.choose_config(rows, w.n, w.k, sm, "int4")
    try:
        assert rel(kernels.linear(x, w), expected) < 1e-2  # our GEMV on x gathered into the stored order
        normed, _ = kernels.norm_linear(x, None, torch.ones(1024, device="cuda", dtype=x.dtype), 1e-5, w)
        assert rel(normed, kernels.rms_norm(x, torch.ones_like(x[0]), 1e-5).float() @ w.dense(torch.float32).T) < 1e-2
    finally:
        del kernels._TRITON_CONFIG[key]
