"""GPTQ and AWQ checkpoints load as they are: packed by AutoAWQ's own code (tests/hub_checkpoints.py), repacked at
load into our int4 layout, and the engine's logits equal transformers' on the weights the library's unpacking gives
back; tensor parallelism gives the tokens of TP 1; unsupported configs are one line."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from engine import quant
from engine.engine import Engine
from engine.errors import CheckpointError
from engine.prequant import scheme_of
from engine.requests import EngineSpec, Request

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings(record=True):  # AutoAWQ says on import that it is deprecated (and resets the filters)
    pytest.importorskip("awq")
from tests.checkpoints import make_tiny_checkpoint  # noqa: E402
from tests.hub_checkpoints import awq_modules, make_hub_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "
VARIANTS = {  # name: make_hub_checkpoint's arguments
    "awq": dict(method="awq"),
    "gptq-sym": dict(method="gptq", sym=True),
    "gptq-act-order": dict(method="gptq", desc_act=True),
    "gptq-act-order-sym": dict(method="gptq", desc_act=True, sym=True, o_order="blocks"),
    "gptq-per-row": dict(method="gptq", group=-1),
}


@functools.cache
def _hub(dense: Path, variant: str) -> tuple[Path, dict]:
    out = dense.parent / f"{dense.name}-{variant}"
    return out, make_hub_checkpoint(dense, out, **VARIANTS[variant])


def _reference(path: Path, weights: dict):
    """transformers' model of the dense checkpoint at `path` holding the library-unpacked `weights`."""
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w in weights.items():
            model.get_parameter(name).copy_(w)
    return model


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tui.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_our_unpacking_gives_autoawq_s_values() -> None:
    """AWQ's interleaved nibbles and GPTQ's K-packed words with the zero stored less one: our unpackers read what
    AutoAWQ packed (its `from_linear` and `unpack_reorder_pack`) as AutoAWQ's own unpacking does."""
    WQLinear_GEMM, packing = awq_modules()
    n, k = 64, 256
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, k))
    zeros, scales = torch.randint(1, 16, (k // 128, n)), (torch.rand(k // 128, n) / 10 + 0.01).half().float()
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = (q - zeros.repeat_interleave(128, 0).T) * scales.repeat_interleave(128, 0).T
    awq = WQLinear_GEMM.from_linear(linear, 4, 128, scales=scales, zeros=zeros)
    ours_q, ours_z = quant.unpack_awq(awq.qweight, awq.qzeros)
    theirs_q, theirs_z = packing.reverse_awq_order(*packing.unpack_awq(awq.qweight, awq.qzeros, 4), 4)
    assert torch.equal(ours_q, q.to(torch.uint8)) and torch.equal(ours_q.T, (theirs_q & 15).to(torch.uint8))
    assert torch.equal(ours_z, zeros.to(torch.uint8)) and torch.equal(ours_z, (theirs_z & 15).to(torch.uint8))
    gptq_q, gptq_z = packing.unpack_reorder_pack(awq.qweight, awq.qzeros, 4)
    assert gptq_q.shape == (k // 8, n) and gptq_z.shape == (k // 128, n // 8)
    assert [t.equal(u) for t, u in zip(quant.unpack_gptq(gptq_q, gptq_z, 1), (ours_q, ours_z), strict=True)] == [1, 1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hub_checkpoint_logits_equal_transformers_on_the_library_s_dequantized_weights(
    tiny_int4_dir: Path, variant: str
) -> None:
    """Prefill and decode logits (float32) of the engine on the GPTQ/AWQ checkpoint equal transformers' holding the
    weights AutoAWQ's unpacking gives back, to rounding; act order runs through sorted groups."""
    path, weights = _hub(tiny_int4_dir, variant)
    engine = Engine.load(EngineSpec(model=str(path), device="cpu", dtype="float32", max_batch=2))
    model = engine.model
    assert engine.info.quant == VARIANTS[variant]["method"]
    assert model.layers[0].attention.wqkv.format == "int4" and model.output.format == "dense"
    if VARIANTS[variant].get("desc_act"):
        assert model.layers[0].attention.wqkv.perm is not None and model.layers[0].feed_forward.w2.perm is None
    ref = _reference(tiny_int4_dir, weights)
    ids = engine.prompt_ids(Request("completion", text=PROMPT))
    follow = [450, 1243, 338]
    with torch.no_grad():
        expected = ref(torch.tensor([ids + follow])).logits[0]
        got = model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
        assert (got - expected[: len(ids)]).abs().max().item() < 1e-4
        for i, token in enumerate(follow):
            logits = model.decode(torch.tensor([token, 5]), torch.tensor([len(ids) + i, 0]), torch.tensor([0, 1]))
            assert (logits[0] - expected[len(ids) + i]).abs().max().item() < 1e-4
    assert expected.std() > 0.1  # logits that vary: a wrong nibble would show


@functools.cache
def _generated(model: Path, tp: int) -> str:
    result = cli("generate", "--model", str(model), "--device", "cpu", "--tp", str(tp), "--temperature", "0",
                 "--max-new-tokens", "16", "--prompt", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"gptq weights, tp {tp})" in result.stderr
    return result.stdout


def test_tensor_parallel_gptq_gives_the_tokens_of_tp1(tiny_int4_dir: Path) -> None:
    """Act-order GPTQ over TP 2 on gloo: whole groups per rank, the down projection's order folded into gate/up
    rows, the attention output's kept per rank."""
    path, _ = _hub(tiny_int4_dir, "gptq-act-order-sym")
    assert len(_generated(path, 2).strip()) > 0
    assert _generated(path, 2) == _generated(path, 1)


def test_an_act_order_that_mixes_the_ranks_inputs_is_one_line(tiny_int4_dir: Path) -> None:
    path, _ = _hub(tiny_int4_dir, "gptq-act-order")
    line = error_line(cli("generate", "--model", str(path), "--device", "cpu", "--tp", "2", "--prompt", "x"))
    expected = (
        "o_proj: its act order (g_idx) mixes the inputs of GPUs under tensor parallelism over 2; run it on one GPU"
    )
    assert f"{expected} (--tp)" in line


def _with_config(src: Path, dst: Path, quantization: dict | None, drop: str = "") -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization or cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        from safetensors.torch import load_file, save_file

        state = {k: v for k, v in load_file(dst / "model.safetensors").items() if not k.endswith(drop)}
        save_file(state, str(dst / "model.safetensors"))
    return dst


TAKE = "we take 4-bit GPTQ (group 128 or -1) and AWQ GEMM (group 128, zero points)"


@pytest.mark.parametrize(
    ("quantization", "expected"),
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, f"GPTQ with 3 bits; {TAKE}"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32}, f"GPTQ with group size 32; {TAKE}"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
         f"GPTQ in the 'marlin' layout; {TAKE}"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True},
         f"GPTQ in the 'marlin' layout; {TAKE}"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True},
         f"GPTQ with a quantized LM head; {TAKE}"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, f"GPTQ with 8 bits; {TAKE}"),
        ({"quant_method": "exl2", "bits": 4.0}, f"quantized as 'exl2'; {TAKE}"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, f"AWQ version 'exllama'; {TAKE}"),
        ({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}, f"AWQ with group size 64; {TAKE}"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
         f"AWQ without zero points; {TAKE}"),
    ],
)  # fmt: skip
def test_unsupported_quantization_configs_name_what_they_have_and_what_we_take(
    tmp_path: Path, quantization: dict, expected: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quantization}))
    with pytest.raises(CheckpointError) as err:
        scheme_of(tmp_path)
    assert str(err.value) == f"{tmp_path}: {expected}"


def test_autogptq_s_quantize_config_json_is_read(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": True,
                                                               "sym": True}))  # fmt: skip
    scheme = scheme_of(tmp_path)
    assert (scheme.method, scheme.desc_act, scheme.zero_offset) == ("gptq", True, 1)


def test_bad_hub_checkpoints_are_one_line(tiny_int4_dir: Path, codellama_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Through the real command: 3 bits, --quant on a GPTQ checkpoint, an act-order one without g_idx, and a --tp
    that splits a group."""
    path, _ = _hub(tiny_int4_dir, "gptq-act-order")
    three = _with_config(path, tmp_path / "three", {"quant_method": "gptq", "bits": 3, "group_size": 128})
    assert f"GPTQ with 3 bits; {TAKE}" in error_line(cli("generate", "--model", str(three), "--prompt", "x"))
    line = error_line(cli("generate", "--model", str(path), "--quant", "int8", "--prompt", "x"))
    assert "already quantized (gptq); it loads as it is, not quantized again to int8 (--quant)" in line
    no_g_idx = _with_config(path, tmp_path / "no-g-idx", None, drop=".g_idx")
    line = error_line(cli("generate", "--model", str(no_g_idx), "--device", "cpu", "--prompt", "x"))
    assert "model.layers.0.mlp.down_proj: no g_idx, which an act-order (desc_act) GPTQ checkpoint needs" in line
    dense = make_tiny_checkpoint(tmp_path / "dense", codellama_tokenizer_dir, hidden_size=256, intermediate_size=384,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    make_hub_checkpoint(dense, tmp_path / "three-groups", "gptq")
    line = error_line(cli("generate", "--model", str(tmp_path / "three-groups"), "--device", "cpu", "--tp", "2",
                          "--prompt", "x"))  # fmt: skip
    assert "2 GPUs split the down projection's 384 inputs into 192 per GPU, not whole int4 groups of 128" in line
    assert line.endswith("choose a tensor-parallel size that keeps them whole (--tp)")
