"""The weight type (engine.weights) and the quantization math under it (engine.quant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import quant
from engine.config import ModelConfig
from engine.engine import Engine
from engine.errors import EngineError
from engine.model import Llama
from engine.parallel import SINGLE, Shard
from engine.requests import EngineSpec
from engine.weights import Dense, Int4, Int8, Quant

CFG = ModelConfig(
    dim=256, intermediate=384, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=1000,
    max_position=256, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False, bos_id=1, eos_id=2,
)  # fmt: skip


def _weights(n: int = 96, k: int = 384, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05 + 0.01 * torch.randn(n, 1, generator=gen)


def test_int4_packing_is_the_documented_planar_layout() -> None:
    """In group g, word c holds input 128 g + 16 j + c in bits 4j..4j+3."""
    q = torch.randint(0, 16, (5, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = quant.pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (5, 32)
    for k in range(256):
        g, j, c = k // 128, (k % 128) // 16, k % 16
        assert torch.equal((words[:, 16 * g + c] >> (4 * j)) & 15, q[:, k].int()), k
    assert torch.equal(quant.unpack_int4(words), q)


def test_int4_round_to_nearest_within_half_a_step_and_exact_on_its_own_grid() -> None:
    w = _weights()
    qweight, scales, zeros = quant.quantize_int4(w)
    assert scales.shape == zeros.shape == (3, 96) and scales.dtype == torch.float16 and zeros.dtype == torch.uint8
    assert int(zeros.max()) <= 15
    dequantized = quant.dequantize_int4(qweight, scales, zeros, torch.float32)
    step = scales.T.float().repeat_interleave(quant.GROUP, dim=1)
    assert ((dequantized - w).abs() <= step / 2 + 1e-6).all()  # the groups' extremes are in range: no clipping
    again = quant.dequantize_int4(*quant.quantize_int4(dequantized), torch.float32)
    torch.testing.assert_close(again, dequantized, rtol=0, atol=1e-3 * float(step.min()))


def test_int8_symmetric_per_output_channel() -> None:
    w = _weights()
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    assert ((quant.dequantize_int8(q, scale, torch.float32) - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    zero_row = quant.quantize_int8(torch.zeros(2, 8))
    assert not zero_row[0].any() and torch.isfinite(zero_row[1]).all()


@pytest.mark.parametrize("cls", [Dense, Int8, Int4])
def test_loading_parts_gives_the_weight_of_the_whole(cls: type) -> None:
    """Rows loaded piecewise into a fused weight (as q, k and v fill wqkv) and a row-parallel shard of columns (as
    `--tp 2` loads o_proj) dequantize to the rows and columns of the whole weight quantized on one GPU."""
    w = _weights(96, 512)
    whole = cls.from_dense(w).dense()
    fused = cls.from_dense(torch.zeros(96, 512))
    for start, size in ((0, 64), (64, 32)):
        fused.load(w[start : start + size], 0, start, lambda: w)
    assert torch.equal(fused.dense(), whole)
    shard = cls.from_dense(torch.zeros(96, 256))
    shard.load(w[:, 256:], 1, 0, lambda: w)
    assert torch.equal(shard.dense(), whole[:, 256:])
    shard.zero_rows(90)
    assert not shard.dense()[90:].any() and shard.dense()[:90].any()


def test_each_weight_knows_its_bytes() -> None:
    n, k = 96, 512
    assert Dense.from_dense(torch.zeros(n, k, dtype=torch.bfloat16)).nbytes() == 2 * n * k
    assert Int8.from_dense(torch.zeros(n, k)).nbytes() == n * k + 4 * n
    assert Int4.from_dense(torch.zeros(n, k)).nbytes() == n * k // 2 + 3 * n * k // quant.GROUP
    meta = Llama.empty(CFG, 8, SINGLE, torch.device("meta"), torch.bfloat16, Quant.of("int4"))
    real = Llama.empty(CFG, 8, SINGLE, torch.device("cpu"), torch.bfloat16, Quant.of("int4"))
    assert meta.nbytes() == real.nbytes() < Llama.empty(CFG, 8, SINGLE, torch.device("meta"), torch.bfloat16).nbytes()
    assert real.output.format == "dense" and real.layers[1].feed_forward.w2.format == "int4"
    assert Quant.of("int8", head=True).make(8, 128, head=True).format == "int8"


@pytest.mark.parametrize(
    ("cfg", "world", "expected"),
    [
        (ModelConfig(**{**CFG.__dict__, "dim": 192}), 1, "need inputs in whole groups of 128: the attention QKV"),
        (CFG, 2, "2 GPUs split the down projection's 384 inputs into 192 per GPU, not whole int4 groups of 128"),
    ],
)
def test_int4_shapes_it_cannot_hold_are_one_line(cfg: ModelConfig, world: int, expected: str) -> None:
    Quant.of("int4").check(CFG, Shard.of(CFG, 1), 1)  # 256 and 384 inputs: whole groups on one GPU
    with pytest.raises(EngineError, match=expected) as err:
        Quant.of("int4").check(cfg, Shard.of(cfg, world), world)
    assert "\n" not in str(err.value)


def test_unknown_quant_is_one_line() -> None:
    with pytest.raises(EngineError, match="unknown quantization 'int3'; choose int8 or int4"):
        Quant.of("int3")


def test_a_tied_lm_head_is_loaded_from_the_embedding(codellama_tokenizer_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "tied", codellama_tokenizer_dir, tie_word_embeddings=True)
    engine = Engine.load(EngineSpec(model=str(path), device="cpu", dtype="float32", max_batch=1))
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [1, 450, 1243, 338]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
        got = engine.model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
    assert (got - expected).abs().max().item() < 1e-4
