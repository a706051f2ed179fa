"""`codellama-tui convert`: GPTQ (engine.gptq) against round-to-nearest on the same layer, workspaces that load as
what `--quant` makes at load (round-to-nearest) or as GPTQ made them, and the atomic write."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import convert as convert_module
from engine import gptq, quant
from engine.convert import convert
from engine.engine import Engine
from engine.errors import EngineError
from engine.requests import EngineSpec, Request

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tui.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight `[192, 256]` and correlated inputs `[4096, 256]` with a few loud features, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 32, generator=gen) @ torch.randn(32, 256, generator=gen) + 0.1 * torch.randn(4096, 256)
    x[:, :8] *= 10
    return torch.randn(192, 256, generator=gen), x


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_error_is_below_round_to_nearest_on_the_same_layer(act_order: bool) -> None:
    """On the calibration inputs, GPTQ's output error is well below round-to-nearest's, with the same groups' scales
    and zeros (static groups: the layout our int4 kernels run)."""
    w, x = _layer()
    hessian = gptq.Hessian(256, torch.device("cpu"))
    for rows in x.split(1000):
        hessian.add(rows)
    assert torch.allclose(hessian.sum, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-3)
    rtn = quant.quantize_int4(w)
    ours = gptq.quantize(w, hessian.sum, act_order=act_order)
    assert torch.equal(ours[1], rtn[1]) and torch.equal(ours[2], rtn[2])

    def error(q: tuple) -> float:
        return float((x @ (quant.dequantize_int4(*q, torch.float32) - w).T).norm() / (x @ w.T).norm())

    assert error(ours) < 0.7 * error(rtn)
    assert not torch.equal(ours[0], rtn[0])


@functools.cache
def _workspace(dense: Path, fmt: str, calibrated: bool) -> Path:
    out = dense.parent / f"{dense.name}-{fmt}-{'gptq' if calibrated else 'rtn'}"
    calib = [ROOT / "engine" / "model.py", ROOT / "engine" / "engine.py"] if calibrated else None
    convert(str(dense), out, fmt, calib, device="cpu", progress=False)
    return out


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_round_to_nearest_workspace_loads_as_quant_at_load_does(tiny_int4_dir: Path, fmt: str) -> None:
    """The workspace holds, bit for bit, what `--quant FMT` quantizes at load, and every command loads it as it is."""
    out = _workspace(tiny_int4_dir, fmt, False)
    how = json.loads((out / "config.json").read_text())["quantization_config"]
    assert how["quant_method"] == "codellama-tui" and how["format"] == fmt and how["method"] == "rtn"
    assert {"tokenizer.model", "model.safetensors.index.json"} <= {f.name for f in out.iterdir()}
    spec = EngineSpec(device="cpu", dtype="float32", max_batch=1)
    ours = Engine.load(EngineSpec(**{**spec.__dict__, "model": str(out)}))
    at_load = Engine.load(EngineSpec(**{**spec.__dict__, "model": str(tiny_int4_dir), "quant": fmt}))
    assert ours.info.quant == f"{fmt} (converted)"
    for a, b in zip(ours.model.weights(), at_load.model.weights(), strict=True):
        assert a.format == b.format
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers(), strict=True)) or a.format == "dense"
        assert torch.equal(a.dense(), b.dense())
    assert torch.equal(ours.model.tok_embeddings, at_load.model.tok_embeddings)


def test_a_gptq_workspace_runs_what_gptq_made(tiny_int4_dir: Path) -> None:
    """--calib: act-order GPTQ with static groups; the weights are not round-to-nearest's, stay as near the
    checkpoint, and the engine's logits are those of transformers holding them."""
    from engine.bench import hf_twin

    out = _workspace(tiny_int4_dir, "int4", True)
    how = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (how["method"], how["act_order"], how["group_size"]) == ("gptq", True, 128)
    assert how["calibration"]["windows"] >= 1
    engine = Engine.load(EngineSpec(model=str(out), device="cpu", dtype="float32", max_batch=1))
    rtn = Engine.load(EngineSpec(model=str(_workspace(tiny_int4_dir, "int4", False)), device="cpu", dtype="float32",
                                 max_batch=1))  # fmt: skip
    ours, theirs = engine.model.layers[1].feed_forward.w2, rtn.model.layers[1].feed_forward.w2
    assert not torch.equal(ours.qweight, theirs.qweight) and torch.equal(ours.scales, theirs.scales)
    ref = hf_twin(engine)
    ids = engine.prompt_ids(Request("completion", text=PROMPT))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
        got = engine.model.prefill(torch.tensor(ids), slot=0, start=0, all_logits=True)
    assert (got - expected).abs().max().item() < 1e-4


def test_convert_refuses_an_existing_folder_and_bad_input(tiny_int4_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ws"
    out.mkdir()
    with pytest.raises(EngineError, match="ws exists; pass --force to replace it"):
        convert(str(tiny_int4_dir), out, "int4", device="cpu", progress=False)
    with pytest.raises(EngineError, match="--calib calibrates GPTQ, which convert runs for --quant int4"):
        convert(str(tiny_int4_dir), tmp_path / "x", "int8", [ROOT / "README.md"], device="cpu", progress=False)
    with pytest.raises(EngineError, match="already quantized \\(int4 \\(converted\\)\\); convert takes an unquantized"):
        convert(str(_workspace(tiny_int4_dir, "int4", False)), tmp_path / "y", device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_a_failed_conversion_leaves_nothing_and_force_replaces(
    tiny_int4_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion that dies half-way (the disk full, Ctrl-C) leaves no workspace and no half-written folder; an
    existing one is replaced only with force, by renames."""
    out = tmp_path / "ws"
    out.mkdir()
    (out / "old").write_text("x")
    real = convert_module._Shards.add

    def full_disk(self, name: str, t: torch.Tensor) -> None:
        if name.startswith("model.layers.1."):
            raise OSError(28, "No space left on device")
        real(self, name, t)

    monkeypatch.setattr(convert_module._Shards, "add", full_disk)
    with pytest.raises(OSError):
        convert(str(tiny_int4_dir), out, "int4", device="cpu", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"] and (out / "old").is_file()
    monkeypatch.setattr(convert_module._Shards, "add", real)
    convert(str(tiny_int4_dir), out, "int4", device="cpu", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"] and not (out / "old").exists()
    assert (out / "config.json").is_file()


def test_the_convert_command_then_generate_from_the_workspace(tiny_int4_dir: Path, tmp_path: Path) -> None:
    """The real commands: convert with a progress bar on stderr; generate on the workspace prints what `--quant
    int4` prints, at TP 1 and TP 2 (row-parallel shards sliced from the stored layout)."""
    out = tmp_path / "ws"
    result = cli("convert", str(tiny_int4_dir), "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "convert (int4 rtn): 100%" in result.stderr and f"{out}: int4 weights (rtn)" in result.stderr
    runs = []
    for args in (("--model", str(out)), ("--model", str(out), "--tp", "2"), ("--model", str(tiny_int4_dir),
                 "--quant", "int4")):  # fmt: skip
        result = cli("generate", *args, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "16",
                     "--prompt", PROMPT)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs.append(result.stdout)
    assert runs[0] == runs[1] == runs[2] and runs[0].strip()
    again = cli("convert", str(tiny_int4_dir), "--out", str(out), "--device", "cpu")
    assert (
        again.returncode == 1
        and again.stderr.strip() == f"codellama-tui convert: error: {out} exists; pass --force to replace it"
    )


def test_evaluate_scores_a_workspace_as_the_engine_loads_it(tiny_int4_dir: Path) -> None:
    """`evaluate --converted DIR`: transformers' weights are the workspace's, dequantized (here round-to-nearest,
    so `--quant int4`'s round trip of the checkpoint)."""
    from safetensors.torch import load_file

    from engine.demo.evaluate import converted_weights

    name, state = converted_weights(_workspace(tiny_int4_dir, "int4", False), torch.device("cpu"))
    assert name == "int4 rtn"
    dense = {}
    for f in tiny_int4_dir.glob("*.safetensors"):
        dense.update(load_file(f))
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(state[key], quant.dequantize_int4(*quant.quantize_int4(dense[key]), torch.float32))
