"""`--quant nf4`: bitsandbytes' own 4-bit format (blocksize 64). Our plain-PyTorch dequantization equals
bitsandbytes' `dequantize_4bit` on the same bytes (its CPU backend runs it), and the engine's logits equal transformers'
holding those weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import quant
from engine.bench import hf_twin
from engine.config import ModelConfig
from engine.engine import Engine
from engine.errors import EngineError
from engine.parallel import Shard
from engine.requests import EngineSpec, Request
from engine.weights import NF4, Quant

bnb = pytest.importorskip("bitsandbytes.functional")


def test_our_nf4_code_table_is_bitsandbytes():
    _, state = bnb.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
    assert state.code.tolist() == list(quant.NF4_CODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantization_equals_bitsandbytes_dequantize_4bit(dtype: torch.dtype) -> None:
    """The bytes are bitsandbytes' own (`quantize_4bit`, as `load_in_4bit` makes them) and our dequantization of
    them is its `dequantize_4bit`, exactly."""
    torch.manual_seed(0)
    w = (torch.randn(96, 320) * torch.rand(96, 1)).to(dtype)
    ours = NF4.from_dense(w)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.packed.flatten(), packed.flatten())
    assert torch.equal(ours.absmax.flatten(), state.absmax)
    theirs = bnb.dequantize_4bit(packed, state)
    assert ours.dense().dtype == dtype and torch.equal(ours.dense(), theirs)
    assert 0 < float((theirs.float() - w.float()).norm() / w.float().norm()) < 0.12


def test_nf4_zero_rows_compute_zero() -> None:
    w = NF4.from_dense(torch.randn(8, 64))
    w.zero_rows(5)
    assert w.dense()[5:].abs().max() == 0 and w.dense()[:5].abs().max() > 0


def test_quant_nf4_logits_equal_transformers_on_the_dequantized_weights(tiny_int4_dir: Path) -> None:
    engine = Engine.load(EngineSpec(model=str(tiny_int4_dir), device="cpu", dtype="float32", max_batch=2,
                                    quant="nf4"))  # fmt: skip
    model = engine.model
    assert model.layers[0].feed_forward.w13.format == "nf4" and engine.info.quant == "nf4"
    ref = hf_twin(engine)
    ids = engine.prompt_ids(Request("completion", text="def f(x):\n    "))
    with torch.no_grad():
        expected = ref(torch.tensor([ids + [450]])).logits[0]
        got = model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
        assert (got - expected[: len(ids)]).abs().max().item() < 1e-4
        logits = model.decode(torch.tensor([450, 5]), torch.tensor([len(ids), 0]), torch.tensor([0, 1]))
        assert (logits[0] - expected[len(ids)]).abs().max().item() < 1e-4


def test_nf4_on_inputs_not_in_whole_blocks_is_one_line(tiny_model_dir: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_model_dir)  # intermediate 176
    with pytest.raises(EngineError, match="nf4 weights need inputs in whole blocks of 64: the down projection has 176"):
        Quant.of("nf4").check(cfg, Shard.of(cfg, 1), 1)
    cfg = replace(cfg, dim=128, n_heads=4, head_dim=32, n_kv_heads=4, intermediate=192)  # down: 96 per GPU at --tp 2
    with pytest.raises(EngineError, match="2 GPUs split the down projection's 192 inputs into 96 per GPU, not whole"):
        Quant.of("nf4").check(cfg, Shard.of(cfg, 2), 2)


def test_the_bitsandbytes_baseline_holds_our_nf4_bytes(tiny_int4_dir: Path) -> None:
    """`bench --baseline --quant nf4` times transformers on bitsandbytes' `Linear4bit` modules (what `load_in_4bit`
    builds), quantized from the twin's weights: the very bytes the engine runs."""
    from engine.bench import bnb_4bit

    engine = Engine.load(EngineSpec(model=str(tiny_int4_dir), device="cpu", dtype="float32", max_batch=1,
                                    quant="nf4"))  # fmt: skip
    four = bnb_4bit(hf_twin(engine))
    theirs = four.model.layers[1].mlp.down_proj
    assert type(theirs).__name__ == "Linear4bit" and theirs.weight.quant_state.blocksize == 64
    assert torch.equal(theirs.weight.data.flatten(), engine.model.layers[1].feed_forward.w2.packed.flatten())
    assert torch.equal(theirs.weight.quant_state.absmax, engine.model.layers[1].feed_forward.w2.absmax.flatten())


def test_bench_baseline_nf4_on_the_cpu_says_it_is_not_available(tiny_int4_dir: Path) -> None:
    """The transformers + bitsandbytes baseline runs on CUDA only: on the CPU the run says so in one line and times
    the rest."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "tui.cli", "bench", "--model", str(tiny_int4_dir), "--device", "cpu", "--batch", "1",
           "--steps", "2", "--prompt-lens", "16", "--quant", "nf4", "--quant-only", "--baseline"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    note = "--baseline: transformers + bitsandbytes load_in_4bit is timed only on CUDA; not available in this run"
    assert note in result.stderr
    assert "nf4 weights" in result.stdout and "decode, batch 1" in result.stdout
