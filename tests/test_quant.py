"""`--quant` end to end on the CPU: the quantized engine against a reference model that holds the dequantized
weights, the real command, tensor parallelism, and bad input."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import quant
from engine.bench import hf_twin
from engine.config import DEMO_DIR
from engine.engine import Engine
from engine.prompts import build_prompt
from engine.requests import EngineSpec, Request
from engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "


def cli(*args: str, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tui.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("checkpoint", "name", "head", "error"),
    [
        ("tiny_model_dir", "int8", False, 0.01),
        ("tiny_model_dir", "int8", True, 0.01),
        ("tiny_int4_dir", "int4", False, 0.15),
        ("tiny_int4_dir", "int4", True, 0.15),
    ],
)
def test_quantized_logits_equal_a_reference_holding_the_dequantized_weights(
    request: pytest.FixtureRequest, checkpoint: str, name: str, head: bool, error: float
) -> None:
    """Prefill and decode logits of the quantized engine equal transformers' on the engine's dequantized weights
    (float32: to rounding), and those weights are the checkpoint's to the format's precision."""
    path = request.getfixturevalue(checkpoint)
    spec = EngineSpec(model=str(path), device="cpu", dtype="float32", max_batch=2, quant=name, quant_head=head)
    engine = Engine.load(spec)
    model = engine.model
    assert model.layers[0].attention.wqkv.format == name and model.output.format == (name if head else "dense")
    original = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    down = original.model.layers[1].mlp.down_proj.weight.detach()
    relative = float((model.layers[1].feed_forward.w2.dense() - down).norm() / down.norm())
    assert 0 < relative < error
    ref = hf_twin(engine)
    ids = engine.prompt_ids(Request("completion", text=PROMPT))
    follow = [450, 1243, 338]
    with torch.no_grad():
        expected = ref(torch.tensor([ids + follow])).logits[0]
        got = model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
        assert (got - expected[: len(ids)]).abs().max().item() < 1e-4
        for i, token in enumerate(follow):
            logits = model.decode(torch.tensor([token, 5]), torch.tensor([len(ids) + i, 0]), torch.tensor([0, 1]))
            assert (logits[0] - expected[len(ids) + i]).abs().max().item() < 1e-4


def _int8_reference(path: Path):
    """transformers' model of `path` with every projection replaced by its int8 round trip, made by engine.quant
    from the checkpoint's own tensors (not through the engine's weight objects)."""
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (*(getattr(layer.self_attn, f"{x}_proj") for x in "qkvo"), layer.mlp.gate_proj,
                         layer.mlp.up_proj, layer.mlp.down_proj):  # fmt: skip
                proj.weight.copy_(quant.dequantize_int8(*quant.quantize_int8(proj.weight), torch.float32))
    return model


def test_generate_quant_int8_on_the_demo_model_is_the_reference_greedy_answer() -> None:
    """`generate --quant int8` on the built-in demo model prints what transformers generates greedily from the same
    prompt ids with the int8-rounded weights."""
    prompt = "def read_lines(path):\n"
    result = cli("generate", "--quant", "int8", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "24",
                 "--prompt", prompt)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8 weights" in result.stderr
    tok = Tokenizer.from_dir(DEMO_DIR)
    ids = build_prompt(tok, Request("completion", text=prompt))
    ref = _int8_reference(DEMO_DIR)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert result.stdout.strip() == tok.decode(out[0, len(ids) :].tolist()).strip()
    assert len(result.stdout.strip()) > 10


@functools.cache
def _generated(model: Path, tp: int, name: str) -> str:
    result = cli("generate", "--model", str(model), "--device", "cpu", "--tp", str(tp), "--quant", name,
                 "--temperature", "0", "--max-new-tokens", "16", "--prompt", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{name} weights, tp {tp})" in result.stderr
    return result.stdout


@pytest.mark.parametrize(("checkpoint", "name"), [("tiny_model_dir", "int8"), ("tiny_int4_dir", "int4")])
def test_tensor_parallel_quantized_weights_give_the_tokens_of_tp1(
    request: pytest.FixtureRequest, checkpoint: str, name: str
) -> None:
    """Row-parallel shards keep the one-GPU quantization: int8 the whole rows' scales, int4 whole groups."""
    path = request.getfixturevalue(checkpoint)
    assert _generated(path, 2, name) == _generated(path, 1, name)


def test_quant_on_an_already_quantized_checkpoint_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(cfg))
    line = error_line(cli("generate", "--model", str(quantized), "--device", "cpu", "--quant", "int8", "--prompt", "x"))
    assert "already quantized (gptq); it loads as it is, not quantized again to int8 (--quant)" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--tp", "2", "--quant", "int4"), "2 GPUs split the down projection's 896 inputs into 448 per GPU"),
        (("--quant", "int3"), "invalid choice: 'int3'"),
    ],
)
def test_bad_quant_input_is_one_line(args: tuple[str, ...], expected: str) -> None:
    assert expected in error_line(cli("generate", "--device", "cpu", *args, "--prompt", "x"))


def test_int4_on_a_model_without_whole_groups_is_one_line(tiny_model_dir: Path) -> None:
    line = error_line(cli("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--quant", "int4", "--prompt",
                          "x"))  # fmt: skip
    assert "the attention QKV projection has 64; choose int8 (--quant)" in line


def test_the_demo_evaluation_scores_quantized_weights() -> None:
    """`evaluate --quant`: the round trip changes the projections (not the LM head) to what `--quant` holds, and
    the scores come next to the unquantized model's on the same lines (a small run: a few lines, short windows)."""
    from engine.demo import evaluate as ev

    res = ev.quantized_scores(DEMO_DIR, torch.device("cpu"), ["int8", "bfloat16"], n_infills=6, seq_len=256,
                              max_new=8, max_chars_per_file=600)  # fmt: skip
    base, int8, bf16 = (res["formats"][f] for f in ("unquantized", "int8", "bfloat16"))
    assert res["lines"] == 6 and base["same_infill"] == 1.0 and bf16["same_infill_bfloat16"] == 1.0
    assert res["yardstick"] == "bfloat16" and res["median_gap"] > 0
    assert 0 < abs(int8["perplexity"] / base["perplexity"] - 1) < 0.02
    assert 0 < abs(bf16["perplexity"] / base["perplexity"] - 1) < 0.02
    assert 0 <= int8["same_infill_bfloat16"] <= 1
    assert "- int8: perplexity" in ev._quant_summary(res) and "against bfloat16" in ev._quant_summary(res)
    model, _ = ev.load(DEMO_DIR, torch.device("cpu"))
    head, down = model.lm_head.weight.clone(), model.model.layers[0].mlp.down_proj.weight.clone()
    ev.round_trip(model, "int4")
    assert torch.equal(model.lm_head.weight, head) and not torch.equal(model.model.layers[0].mlp.down_proj.weight, down)


def test_the_bfloat16_yardstick_computes_what_a_bfloat16_gemm_does() -> None:
    """On the CPU the yardstick's linear layers are float32 GEMMs of their bfloat16 values, rounded to bfloat16:
    PyTorch's own bfloat16 GEMM gives the same values but for the order of its sums (a last bit, rarely)."""
    from engine.demo.evaluate import bfloat16_gemms

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    native = linear(x)
    with bfloat16_gemms(linear):
        emulated = linear(x)
    assert emulated.dtype == torch.bfloat16
    assert torch.equal(emulated, torch.nn.functional.linear(x.float(), linear.weight.float()).to(torch.bfloat16))
    assert float((emulated != native).float().mean()) < 0.01
    assert torch.allclose(emulated.float(), native.float(), rtol=2**-6, atol=0)
    assert "forward" not in vars(linear)


def test_greedy_reports_each_lines_closest_call() -> None:
    """`greedy_with_gaps`: the ids up to the stop, and the smallest best-minus-second logit over the chosen tokens
    (the stop's choice included)."""
    from types import SimpleNamespace

    from engine.demo.evaluate import greedy_with_gaps

    table = torch.zeros(8, 8)
    table[0, 4], table[0, 5] = 3.0, 2.0  # after 0: 4, by 1.0
    table[4, 3], table[4, 6] = 2.0, 1.75  # after 4: the stop, by 0.25
    table[7, 3], table[7, 1] = 1.0, 0.5  # after 7: the stop, by 0.5

    class TableModel(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
            return SimpleNamespace(logits=table[input_ids], past_key_values=None)

    ids, gaps = greedy_with_gaps(TableModel(), [[1, 0], [7]], 5, {3}, torch.device("cpu"))
    assert ids == [[4], []]
    assert gaps == [0.25, 0.5]


def test_every_command_that_runs_the_engine_documents_quant(capsys: pytest.CaptureFixture[str]) -> None:
    """`--quant` (and `--quant-head`) in the --help of the app and of every subcommand that loads a model here."""
    from engine.demo.evaluate import main as evaluate
    from tui.cli import build_parser

    parsers = build_parser()
    for command in ("app", "generate", "chat", "serve", "bench-serve", "web", "bench"):
        text = parsers[command].format_help()
        assert "--quant" in text and "--quant-head" in text and "nf4" in text, command
    with pytest.raises(SystemExit):
        evaluate(["--help"])
    assert "--quant LIST" in capsys.readouterr().out
