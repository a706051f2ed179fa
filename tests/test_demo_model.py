"""The shipped demo model: intact files, deterministic greedy output that matches `transformers`, CodeLlama's
infilling pieces, and the CLI falling back to it. Everything runs on the CPU in a few seconds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import DEMO_DIR
from engine.engine import Engine
from engine.events import Finished
from engine.prompts import infilling_ids
from engine.requests import EngineSpec, Request, SamplingParams
from engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "import os\n\n\ndef list_python_files(root):\n"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineSpec(device="cpu", max_batch=1, max_seq_len=256))


def greedy_text(engine: Engine, request: Request) -> str:
    events = engine.add(request)
    while True:
        for e in events:
            if isinstance(e, Finished):
                return e.text
        events = engine.step()


def test_shipped_files_match_their_checksums() -> None:
    listed = {}
    for line in (DEMO_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 16 * 2**20


def test_greedy_completion_is_deterministic_and_matches_transformers(engine: Engine) -> None:
    from transformers import LlamaForCausalLM

    def request() -> Request:
        return Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))

    first, second = greedy_text(engine, request()), greedy_text(engine, request())
    assert first == second and first.strip()

    hf = LlamaForCausalLM.from_pretrained(str(DEMO_DIR), dtype=torch.float32).eval()
    ids = engine.tok.encode(PROMPT, bos=True)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=engine.tok.eos_id
        )
    new = [i for i in out[0, len(ids) :].tolist() if i != engine.tok.eos_id]
    assert first == engine.tok.decode(new)


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infilling_prompt_uses_single_fim_pieces(suffix_first: bool) -> None:
    tok = Tokenizer.from_dir(DEMO_DIR)
    assert tok.can_infill
    fim = [tok.pre_id, tok.suf_id, tok.mid_id, tok.eot_id]
    assert len(set(fim)) == 4 and all(tok.token_bytes(i) == b"" for i in fim)  # control pieces: no text
    prefix, suffix = "def mean(values):\n    total = 0\n", "\n    return total / len(values)\n"
    ids = infilling_ids(tok, prefix, suffix, suffix_first)
    assert ids[:2] == [tok.bos_id, tok.pre_id] and [ids.count(i) for i in fim] == [1, 1, 1, 0]
    if suffix_first:
        assert ids[2] == tok.suf_id and ids[ids.index(tok.mid_id) + 1 :] == tok.encode(prefix)
    else:
        assert ids[-1] == tok.mid_id and ids[2 : ids.index(tok.suf_id)] == tok.encode(prefix)
    between = ids[ids.index(tok.suf_id) + 1 : ids.index(tok.mid_id)]
    assert between == tok.encode_infilling(suffix) and tok.decode(between) == suffix


def test_generate_without_model_runs_the_demo() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tui.cli", "generate", "--prompt", "def add(a, b):", "--device", "cpu"]
    cmd += ["--temperature", "0", "--max-new-tokens", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "demo model" in result.stderr


def test_bench_runs_on_the_demo_model_and_leaves_out_prompts_over_its_context() -> None:
    """README's `codellama-tui bench --device cpu`: the default prompt lengths (128, 2048) meet a demo model whose
    context is 1024; the longer one is left out with a note instead of failing the whole benchmark."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tui.cli", "bench", "--device", "cpu", "--batch", "1", "--steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "decode, batch 1" in result.stdout and "time to first token, 128-token prompt" in result.stdout
    assert "2048-token prompt" not in result.stdout
    assert "time to first token at 2048 tokens left out: the context holds 1024" in result.stderr


def test_evaluation_prompts_fit_the_context_as_the_app_fits_a_file() -> None:
    """The held-out evaluation sends only prompts the app would: a case whose clipped text outgrows the demo's
    context (less the 64 new tokens) loses the lines farthest from the hole; the rest are only clipped."""
    from engine.demo import evaluate as ev

    text = "".join(f"    value_{i} = compute(value_{i - 1}, 'item number {i}')\n" for i in range(1, 400))
    long_case = ev._case("long.py", text, 200)
    short_case = ev._case("short.py", "def f(x):\n    y = x + 1\n    return y\n", 1)
    tok = Tokenizer.from_dir(DEMO_DIR)
    (long_pre, long_suf), (short_pre, short_suf) = ev.fitted_texts(DEMO_DIR, [long_case, short_case], 1800, 700, 64)
    assert (short_pre, short_suf) == (short_case.prefix, short_case.suffix)
    clipped = ev._clip(long_case.prefix, long_case.suffix, 1800, 700)
    assert len(infilling_ids(tok, *clipped)) > 1024 - 64  # the case needs fitting
    assert len(infilling_ids(tok, long_pre, long_suf)) <= 1024 - 64
    assert clipped[0].endswith(long_pre) and clipped[1].startswith(long_suf) and long_pre and long_suf


def test_a_comparison_adds_its_results_to_eval_json_and_keeps_the_rest(tmp_path: Path) -> None:
    from engine.demo import evaluate as ev

    (tmp_path / "eval.json").write_text(json.dumps({"perplexity": {"ppl": 8.39}, "kv_cache": {"old": 1}}))
    ev.merge_into_eval(tmp_path, "kv_cache", {"int8": 8.3931})
    ev.merge_into_eval(tmp_path, "quantized", {"int8": 8.383})
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == {"perplexity": {"ppl": 8.39}, "kv_cache": {"int8": 8.3931}, "quantized": {"int8": 8.383}}
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ev.merge_into_eval(fresh, "kv_cache", {"int8": 1.0})
    assert json.loads((fresh / "eval.json").read_text()) == {"kv_cache": {"int8": 1.0}}
