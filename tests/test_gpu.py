"""GPU-only checks (skipped without CUDA): CUDA-graph replay of the decode step against eager decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.model import Chunk, Llama
from engine.parallel import SINGLE
from engine.runner import DecodeRunner, Row
from engine.weights import DENSE, Quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = ModelConfig(
    dim=512, intermediate=1408, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, vocab_size=32016,
    max_position=1024, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False, bos_id=1, eos_id=2,
)  # fmt: skip


def model(dtype: torch.dtype, slots: int, quant: Quant = DENSE, kv: str = "bf16") -> Llama:
    torch.manual_seed(0)
    m = Llama.empty(CFG, 1024, SINGLE, torch.device("cuda"), dtype, quant)
    for p in m.parameters():
        p.normal_(0, 0.1) if p.dim() > 1 else p.fill_(1.0)
    for w in m.weights():
        if w.format != "dense":
            w.fill(torch.randn(w.shape, device="cuda", dtype=dtype) * 0.1)
    m.setup_cache(slots + 1, 1024, dtype, kv)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graph_replay_matches_eager(dtype: torch.dtype, batch: int) -> None:
    m = model(dtype, 8)
    prompts = [torch.randint(3, 32000, (20 + 7 * i,), device="cuda") for i in range(batch)]
    for slot, ids in enumerate(prompts):
        m.prefill(ids, slot, 0)
    (graph_tokens, graph_logits), (eager_tokens, eager_logits) = decode_with_and_without_graphs(m, prompts)
    assert graph_tokens == eager_tokens
    for eager, graph in zip(eager_logits, graph_logits, strict=True):
        assert torch.allclose(eager, graph, atol=1e-3 if dtype == torch.float32 else 2e-2)


def decode_with_and_without_graphs(m: Llama, prompts: list[torch.Tensor], steps: int = 6) -> list[tuple[list, list]]:
    """The tokens and logits of `steps` greedy decode steps after the prompts (already prefilled, slot i for prompt
    i), first through captured graphs, then eagerly from the same cache: [(tokens, logits)] for each."""
    cache = [t for t in (m.cache.k, m.cache.v, m.cache.k_scale, m.cache.v_scale) if t is not None]
    saved = [t.clone() for t in cache]
    seen = torch.zeros(9, CFG.vocab_size, dtype=torch.bool, device="cuda")
    results = []
    for graphs in (True, False):  # graphs first: their start-up picks Triton or cuBLAS per shape for both
        for t, kept in zip(cache, saved, strict=True):
            t.copy_(kept)
        runner = DecodeRunner(m, seen.clone(), 8, 8, use_graphs=graphs)
        tokens, out, logits = [5 + i for i in range(len(prompts))], [], []
        for step in range(steps):
            rows = [Row(t, len(prompts[i]) + step, i, 40, i, step, 0.0, 1.0, 1.0) for i, t in enumerate(tokens)]
            tokens = runner(rows)
            out.append(tokens)
            logits.append(runner.logits[: len(prompts)].clone())
        results.append((out, logits))
    return results


@pytest.mark.parametrize("batch", [1, 8])
def test_int8_kv_graphs_match_eager_and_stay_near_the_bf16_cache(batch: int) -> None:
    """With an int8 KV cache the captured decode step (the int8 attention kernel inside the graph) gives the eager
    step's tokens and logits; its prefill logits stay within twice what bf16 arithmetic costs against float32 (on the
    CPU's reference path, this model: 4.5% against 3.1% overall)."""
    m = model(torch.bfloat16, 8, kv="int8")
    prompts = [torch.randint(3, 32000, (200 + 9 * i,), device="cuda") for i in range(batch)]
    prefill = [m.prefill(ids, slot, 0, all_logits=True).float() for slot, ids in enumerate(prompts)]
    (graph_tokens, graph_logits), (eager_tokens, eager_logits) = decode_with_and_without_graphs(m, prompts)
    assert graph_tokens == eager_tokens
    for graph, eager in zip(graph_logits, eager_logits, strict=True):
        assert torch.allclose(graph, eager, atol=2e-2)
    wide, plain = model(torch.float32, 8), model(torch.bfloat16, 8)
    for ours, w, p in zip(m.parameters(), wide.parameters(), plain.parameters(), strict=True):
        w.copy_(ours)
        p.copy_(ours)
    want = torch.cat([wide.prefill(ids, slot, 0, all_logits=True) for slot, ids in enumerate(prompts)])
    bf16 = torch.cat([plain.prefill(ids, slot, 0, all_logits=True).float() for slot, ids in enumerate(prompts)])
    int8 = torch.cat(prefill)
    assert (int8 - want).norm() / want.norm() < 2 * (bf16 - want).norm() / want.norm()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_model_matches_the_model_of_its_dequantized_weights(name: str) -> None:
    """Prefill (each weight dequantized by its kernel, then cuBLAS) gives the dense model's logits bit for bit; the
    decode graphs (the quantized GEMV, fused, as `tune_linear` chose) give them to bf16 rounding, step after step."""
    quantized = model(torch.bfloat16, 4, Quant.of(name, head=True))
    dense = model(torch.bfloat16, 4)
    with torch.no_grad():
        for ours, theirs in zip(quantized.weights(), dense.weights(), strict=True):
            theirs.weight.copy_(ours.dense())
        dense.tok_embeddings.copy_(quantized.tok_embeddings)
    prompts = [torch.randint(3, 32000, (20 + 9 * i,), device="cuda") for i in range(3)]
    for slot, ids in enumerate(prompts):
        assert torch.equal(
            quantized.prefill(ids, slot, 0, all_logits=True), dense.prefill(ids, slot, 0, all_logits=True)
        )
    runner = DecodeRunner(quantized, torch.zeros(5, CFG.vocab_size, dtype=torch.bool, device="cuda"), 4, 4, True)
    assert any(name in key for key in runner.linear_choice), runner.linear_choice
    assert set(runner.fusion) == {f"{name} {form}" for form in kernels.FUSED_FORMS}, runner.fusion
    inputs = [5, 6, 7]
    for step in range(4):
        positions = [len(p) + step for p in prompts]
        outputs = runner([Row(t, positions[i], i, 0.0, 40, 1.0, 1.0, i, step) for i, t in enumerate(inputs)])
        expected = dense.decode(*(torch.tensor(v, device="cuda") for v in (inputs, positions, [0, 1, 2])))
        scale = float(expected.abs().max())
        torch.testing.assert_close(runner.logits[:3], expected, rtol=2e-2, atol=2e-2 * scale)
        inputs = outputs


def test_decode_matches_prefill_on_gpu() -> None:
    """The decode path (Triton kernels) and the prefill path (SDPA, cuBLAS) agree on the next token's logits."""
    m = model(torch.float32, 2)
    ids = torch.randint(3, 32000, (40,), device="cuda")
    full = m.prefill(ids, 0, 0, all_logits=True)
    m.prefill(ids[:-1], 1, 0)
    step = m.decode(ids[-1:], torch.tensor([39], device="cuda"), torch.tensor([1], device="cuda"))
    assert torch.allclose(step[0], full[-1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_prefill_pass_over_several_prompts_matches_each_alone(dtype: torch.dtype) -> None:
    """`prefill_many` on the GPU (the Triton rotary kernel writing each token at its own slot, flash attention per
    chunk, one of them past a cached prefix): each chunk's last logits and its slot's keys are those of the chunk
    prefilled alone."""
    m = model(dtype, 4)
    lengths, starts = [100, 7, 64, 1], [0, 0, 30, 50]
    prompts = [torch.randint(3, 32000, (s + n,), device="cuda") for s, n in zip(starts, lengths, strict=True)]
    for slot, (ids, start) in enumerate(zip(prompts, starts, strict=True)):
        if start:
            m.prefill(ids[:start], slot, 0)
    chunks = [Chunk(slot, start, n) for slot, (start, n) in enumerate(zip(starts, lengths, strict=True))]
    together = m.prefill_many(torch.cat([ids[s:] for ids, s in zip(prompts, starts, strict=True)]), chunks)
    keys = m.cache.k.clone()
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for slot, (ids, start) in enumerate(zip(prompts, starts, strict=True)):
        alone = m.prefill(ids[start:], slot, start)
        torch.testing.assert_close(together[slot], alone, **tol)
        torch.testing.assert_close(keys[:, slot, :, : len(ids)], m.cache.k[:, slot, :, : len(ids)], **tol)


def test_a_prompt_ending_at_its_first_token_leaves_the_captured_decode_batch_as_it_was() -> None:
    """Through the engine (the demo model) with CUDA graphs: a prompt that ends at its first token (max_new_tokens=1)
    while another request decodes in pipelined steps. Its sample loads its row into the graphs' static inputs, so the
    next step is launched with rows (`runner.sample`): the decoding request's text is the one it gets alone (its batch
    stays one row, so the same graph computes it, bit for bit)."""
    from engine.engine import Engine
    from engine.events import Failed, Finished
    from engine.requests import EngineSpec, Request, SamplingParams

    engine = Engine.load(EngineSpec(device="cuda", dtype="float32", max_batch=4))
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=3, max_new_tokens=24)
    decoding = Request("completion", id="decoding", text="def fibonacci(n):\n    ", sampling=sampling)
    events = list(engine.add(decoding))
    while engine.busy:
        events += engine.step()
    alone = events[-1]
    engine.scheduler.cache.forget()  # prefilled in full again, as alone
    events = list(engine.add(replace(decoding, id="beside")))
    while engine.scheduler.inflight is None or len(events) < 4:
        events += engine.step()
    one = Request("completion", id="one", text="import os", sampling=replace(sampling, max_new_tokens=1))
    events += engine.add(one)
    while engine.busy:
        events += engine.step()
    assert not [e for e in events if isinstance(e, Failed)], events
    finished = {e.request_id: e for e in events if isinstance(e, Finished)}
    assert finished["one"].stats.new_tokens == 1
    assert isinstance(alone, Finished) and finished["beside"].text == alone.text


def test_pipelined_steps_feed_themselves_on_the_device() -> None:
    """launch() without rows continues the batch from its own outputs: the same tokens as uploading them."""
    m = model(torch.float32, 4)
    prompts = [torch.randint(3, 32000, (30 + 5 * i,), device="cuda") for i in range(3)]
    for slot, ids in enumerate(prompts):
        m.prefill(ids, slot, 0)
    saved = (m.cache.k.clone(), m.cache.v.clone())
    seen = torch.zeros(5, CFG.vocab_size, dtype=torch.bool, device="cuda")
    runner = DecodeRunner(m, seen, 4, 4, use_graphs=True)
    rows = [Row(7 + i, len(prompts[i]), i, 40, 100 + i, 0, 0.8, 0.9, 1.1) for i in range(3)]
    runner.launch(rows)
    for _ in range(5):
        runner.launch()
    piped = [runner.collect() for _ in range(6)]
    m.cache.k.copy_(saved[0])
    m.cache.v.copy_(saved[1])
    seen.zero_()
    tokens, explicit = [r.token for r in rows], []
    for step in range(6):
        tokens = runner(
            [Row(t, len(prompts[i]) + step, i, 40, 100 + i, step, 0.8, 0.9, 1.1) for i, t in enumerate(tokens)]
        )
        explicit.append(tokens)
    assert piped == explicit


COMPILE_AHEAD = """
import json, sys, torch
from triton import knobs
from engine.runner import DecodeRunner, compile_ahead
from engine.weights import Quant
from tests.test_gpu import CFG, model

misses = []
quant = Quant.of(sys.argv[1] or None)
knobs.compilation.listener = lambda *, src, cache_hit, **_: cache_hit or misses.append(src.name)
speculate = int(sys.argv[2])
with compile_ahead(CFG, 1024, 8, torch.device("cuda"), torch.bfloat16, quant=quant, speculate=speculate) as compiling:
    m = model(torch.bfloat16, 8, quant)
seen = torch.zeros(9, m.cfg.vocab_size, dtype=torch.bool, device="cuda")
DecodeRunner(m, seen, 8, 8, use_graphs=True, speculate=speculate)
result = {"kernels": compiling.kernels, "compiled": compiling.compiled, "errors": compiling.errors, "misses": misses}
print(json.dumps(result))
"""


@pytest.mark.parametrize(("quant", "speculate"), [("", 0), ("int4", 0), ("", 7)])
def test_compile_ahead_leaves_the_capture_nothing_to_compile(tmp_path, quant: str, speculate: int) -> None:
    """On a cold Triton cache the workers compile every kernel the capture launches (the verify steps' too, with
    speculation); on the warm cache of a second start nothing is left for them (fresh processes: this one has the
    kernels compiled already)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    results = []
    for _ in range(2):
        command = [sys.executable, "-c", COMPILE_AHEAD, quant, str(speculate)]
        out = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = results
    assert cold["kernels"] >= 5 and cold["compiled"] == cold["kernels"], cold
    assert warm["kernels"] == cold["kernels"] and warm["compiled"] == 0, warm
    assert cold["errors"] == warm["errors"] == [] and cold["misses"] == warm["misses"] == [], results
