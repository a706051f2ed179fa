"""Tensor parallelism on the CPU with gloo: the same tokens and logits as TP 1, clear errors, no orphans."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.bench import greedy_row
from engine.engine import Engine
from engine.errors import EngineError
from engine.events import Failed, Finished, TextDelta
from engine.local_client import LocalClient
from engine.model import Chunk
from engine.requests import EngineSpec, Request, SamplingParams
from engine.runner import Row

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "


def cli(*args: str, tag: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CODELLAMA_TP_TEST_TAG": tag}
    cmd = [sys.executable, "-m", "tui.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@functools.cache
def generated(model: Path, tp: int, *sampling: str) -> str:
    """What `generate --tp N --device cpu` prints (cached: the TP 1 reference is shared by several tests)."""
    result = cli("generate", "--model", str(model), "--device", "cpu", "--tp", str(tp), "--prompt", PROMPT, *sampling)
    assert result.returncode == 0, result.stderr
    assert f"tp {tp})" in result.stderr
    assert "Warning" not in result.stderr  # torch's FutureWarning on all_gather_into_tensor once leaked on every run
    return result.stdout


def tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment carries `tag` (the command's workers inherit it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"CODELLAMA_TP_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def children() -> list[int]:
    """Pids of this process's live tensor-parallel workers."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid() and state != "Z" and b"engine.tp_worker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


GREEDY = ("--temperature", "0", "--max-new-tokens", "24")


@pytest.mark.parametrize(
    ("checkpoint", "tp"),
    [
        ("tiny_model_dir", 4),  # TP 2 of this model: the sampling test below
        pytest.param(
            "tiny_model_dir", 8, marks=pytest.mark.slow
        ),  # 8 heads, 8 kv heads, 176 = 8 * 22, 32016 = 8 * 4002
        ("tiny_gqa_dir", 2),  # 2 kv heads: TP 2 at most; 3 weight files
    ],
)
def test_generate_tp_gives_the_tokens_of_tp1(request, checkpoint: str, tp: int) -> None:
    model = request.getfixturevalue(checkpoint)
    expected = generated(model, 1, *GREEDY)
    assert expected.strip()
    assert generated(model, tp, *GREEDY) == expected


def test_sampling_with_repetition_penalty_agrees_across_ranks(tiny_model_dir: Path) -> None:
    """Pipelined steps feed each rank its own sampled tokens: seeds, seen masks and penalties must agree."""
    sampling = ("--temperature", "0.8", "--top-k", "20", "--seed", "7", "--repetition-penalty", "1.3")
    sampling += ("--max-new-tokens", "24")
    assert generated(tiny_model_dir, 2, *sampling) == generated(tiny_model_dir, 1, *sampling)


def test_a_verify_plan_carries_its_rows_and_proposals() -> None:
    from engine import tp

    sampled = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "penalty": 1.2, "seed": 2**40 + 3, "offset": 7}
    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "penalty": 1.0, "seed": 0, "offset": 0}
    rows = [Row(token=5, position=10, slot=0, **sampled), Row(token=6, position=3, slot=2, **greedy)]
    proposals = [[1, 2, 3], []]
    assert tp.decode_proposals(tp.encode_proposals(rows, proposals), 2) == (rows, proposals)
    rows3 = [*rows, Row(token=1, position=1, slot=1, **greedy)]
    assert tp.decode_proposals(tp.encode_proposals(rows3, [[], [4, 4], [7]]), 3) == (rows3, [[], [4, 4], [7]])


def _finished(engine: Engine, *requests: Request) -> dict[str, Finished]:
    """Run the requests together; each one's Finished event by id."""
    events = [e for r in requests for e in engine.add(r)]
    while engine.busy:
        events += engine.step()
    assert not [e for e in events if isinstance(e, Failed)], events
    return {e.request_id: e for e in events if isinstance(e, Finished)}


def test_speculation_at_tp2_gives_the_tokens_of_tp1() -> None:
    """Verify steps relayed to every rank, rows proposing different k (the demo model copies, so runs are
    accepted): two greedy requests and a seeded sampled one, together, give the text TP 1 gives without
    speculation."""
    from engine.config import DEMO_DIR
    from engine.speculate_bench import edit_workload
    from engine.tokenizer import Tokenizer

    renames = [i.request for i in edit_workload(Tokenizer.from_dir(DEMO_DIR), 1024, per_module=1)][2:6:2]
    greedy = [replace(r, sampling=replace(r.sampling, max_new_tokens=48)) for r in renames]
    sampled = replace(greedy[0], id="sampled", sampling=replace(greedy[0].sampling, temperature=0.7, seed=3))
    spec = EngineSpec(device="cpu", dtype="float32", max_batch=3, speculate=8)
    one = Engine.load(spec)
    try:
        want = {r.id: _finished(one, r)[r.id].text for r in (*greedy, sampled)}
    finally:
        one.close()
    two = Engine.load(replace(spec, tp=2))
    try:
        got = _finished(two, *(replace(r, speculate=True) for r in greedy), replace(sampled, speculate=True))
    finally:
        two.close()
    assert {r.id: got[r.id].text for r in (*greedy, sampled)} == want
    assert all(got[r.id].stats.accepted > 0 for r in (*greedy, sampled))


def test_prefill_and_decode_logits_match_tp1(tiny_gqa_dir: Path) -> None:
    spec = EngineSpec(model=str(tiny_gqa_dir), device="cpu", dtype="float32", max_batch=2, max_seq_len=512)
    one = Engine.load(spec)
    two = Engine.load(EngineSpec(**{**spec.__dict__, "tp": 2}))
    try:
        assert two.info.tp == 2 and len(children()) == 1
        ids = (one.prompt_ids(Request("completion", text=PROMPT)) * 60)[:506]  # longer than a plan's inline part
        for engine in (one, two):
            engine.first = engine.model.prefill(torch.tensor(ids), 0, 0, all_logits=True)
            engine.model.prefill(torch.tensor(ids[:2]), 1, 0)
            # one pass over two sequences: slot 1 continues its cached prefix, the scratch slot starts afresh
            chunks = [Chunk(1, 2, 3), Chunk(2, 0, 4)]
            engine.both = engine.model.prefill_many(torch.tensor(ids[2:5] + ids[:4]), chunks)
        assert (two.first - one.first).abs().max().item() < 1e-4
        assert two.both.shape == (2, one.info.vocab_size)
        assert (two.both - one.both).abs().max().item() < 1e-4
        assert (one.both - one.first[[4, 3]]).abs().max().item() < 1e-4  # each chunk's last token, as alone
        tokens = [int(one.first[-1].argmax()), 450]
        for step in range(4):
            rows = [greedy_row(tokens[0], len(ids) + step, 0, top_k=0), greedy_row(tokens[1], 5 + step, 1, top_k=0)]
            got = [engine.runner(rows) for engine in (one, two)]
            assert (two.runner.logits[:2] - one.runner.logits[:2]).abs().max().item() < 1e-4
            assert got[0] == got[1]
            tokens = got[0]
    finally:
        two.close()
    assert children() == []


def _cancelled_in_a_pass(engine: Engine) -> dict[str, tuple[str, str, int]]:
    """A sampled request decoding in pipelined steps; then, in one pass of 12 tokens, a prompt that ends at its
    first token, a short one and a long one in chunks, both cancelled after it; then the long one again (what
    it prefilled is a cached prefix). Each request's (reason, text, cached tokens)."""
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=7, repetition_penalty=1.3, max_new_tokens=16)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    decoding = Request("completion", id="decoding", text=PROMPT, sampling=sampled)
    events = list(engine.add(decoding))
    while engine.scheduler.inflight is None or len(events) < 3:
        events += engine.step()
    one = Request("completion", id="one", text="import os", sampling=replace(greedy, max_new_tokens=1))
    short = Request("completion", id="short", text="class Stack:", sampling=greedy)
    long = Request("completion", id="long", text=PROMPT * 6, sampling=greedy)
    for r in (one, short, long):
        events += engine.add(r)
    events += engine.step()
    assert [s.request.id for s in engine.scheduler.prefilling] == ["long"]
    events += engine.cancel("short") + engine.cancel("long")
    while engine.busy:
        events += engine.step()
    events += _finished(engine, replace(long, id="again")).values()
    assert not [e for e in events if isinstance(e, Failed)], events
    return {e.request_id: (e.reason, e.text, e.stats.cached_tokens) for e in events if isinstance(e, Finished)}


def test_a_pass_cancelled_midway_at_tp2_ends_as_at_tp1(tiny_model_dir: Path, monkeypatch) -> None:
    """`_cancelled_in_a_pass` at TP 2 (the scheduler on rank 0, the passes, samples and launches relayed) gives
    every request the reason, text and cached prefix it gets at TP 1."""
    from engine import scheduler

    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 12)
    spec = EngineSpec(model=str(tiny_model_dir), device="cpu", dtype="float32", max_batch=4, max_seq_len=256)
    one = Engine.load(spec)
    want = _cancelled_in_a_pass(one)
    assert [want[i][0] for i in ("decoding", "one", "short", "long", "again")] == [
        "length", "length", "cancelled", "cancelled", "length",
    ]  # fmt: skip
    assert want["again"][2] > 0
    two = Engine.load(replace(spec, tp=2))
    try:
        assert _cancelled_in_a_pass(two) == want
    finally:
        two.close()
    assert children() == []


@pytest.mark.parametrize(
    ("checkpoint", "tp", "expected"),
    [
        ("tiny_model_dir", 3, "tensor-parallel size 3 does not divide the model's 8 attention heads"),
        ("tiny_gqa_dir", 4, "tensor-parallel size 4 does not divide the model's 2 key/value heads"),
    ],
)
def test_a_size_that_does_not_divide_is_one_line(request, checkpoint: str, tp: int, expected: str) -> None:
    tag = uuid.uuid4().hex
    model = request.getfixturevalue(checkpoint)
    result = cli("generate", "--model", str(model), "--device", "cpu", "--tp", str(tp), "--prompt", "x", tag=tag)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    divisor = "8" if "8" in expected else "2"
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"codellama-tui: error: {expected}; choose a divisor of {divisor} (--tp)"
    )
    assert tagged(tag) == []


def test_every_rank_checks_the_whole_shape_of_each_tensor(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    """With half the intermediate size in config.json, each rank's slice of the MLP fits; the whole tensor does not."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_gqa_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] // 2}))
    tag = uuid.uuid4().hex
    result = cli("generate", "--model", str(bad), "--device", "cpu", "--tp", "2", "--prompt", "x", tag=tag)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("codellama-tui: error: ") and "config.json implies" in last and "_proj.weight" in last
    assert tagged(tag) == []


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("device", "dtype", "within"),
    # On GPUs the step in flight waits in the one-shot all-reduce until it gives up on the dead peer; the demo
    # model, whose heads are wide enough for the GPU kernels, stands in for the tiny checkpoint there
    [("cpu", "float32", 5.0), pytest.param("cuda", "bfloat16", 15.0, marks=TWO_GPUS, id="cuda")],
)
def test_a_killed_rank_fails_the_request_fast_and_close_leaves_no_process(
    request, device: str, dtype: str, within: float
) -> None:
    model = str(request.getfixturevalue("tiny_model_dir")) if device == "cpu" else None
    spec = EngineSpec(model=model, device=device, dtype=dtype, tp=2, max_batch=1)
    client = LocalClient(spec).start()
    try:
        client.wait_ready(timeout=60)
        (worker,) = children()
        long = Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=400))
        events, killed = [], None
        for event in client.stream(long):
            events.append(event)
            if isinstance(event, TextDelta) and killed is None:
                os.kill(worker, signal.SIGKILL)
                killed = time.monotonic()
        assert killed is not None and time.monotonic() - killed < within
        assert not any(isinstance(e, Finished) for e in events)
        failed = events[-1]
        assert isinstance(failed, Failed)
        # the whole line: a warning's source line once followed the signal as the rank's "last words"
        assert failed.message == f"tensor-parallel rank 1 (pid {worker}) was killed by SIGKILL; the engine has stopped"
        # The engine stays down, with the same message, instead of hanging on the next request.
        again = list(client.stream(Request("completion", text="x", sampling=SamplingParams(max_new_tokens=4))))
        assert isinstance(again[-1], Failed) and again[-1].message == failed.message
    finally:
        client.close()
    assert children() == []


@pytest.mark.timeout(90)  # the hang guard: a stopped rank once blocked the step for 300 s
def test_a_stopped_rank_fails_the_request_and_close_leaves_no_process(tiny_model_dir: Path) -> None:
    spec = EngineSpec(model=str(tiny_model_dir), device="cpu", dtype="float32", tp=2, max_batch=1)
    client = LocalClient(spec).start()
    try:
        client.wait_ready(timeout=60)
        (worker,) = children()
        long = Request("completion", text=PROMPT, sampling=SamplingParams(temperature=0, max_new_tokens=400))
        events, stopped = [], False
        for event in client.stream(long):
            events.append(event)
            if isinstance(event, TextDelta) and not stopped:
                os.kill(worker, signal.SIGSTOP)
                stopped = True
        assert isinstance(events[-1], Failed) and not any(isinstance(e, Finished) for e in events)
        assert events[-1].message == (
            f"tensor-parallel rank 1 (pid {worker}) has not responded for 5 s (stopped or hung); the engine has stopped"
        )
    finally:
        client.close()
    assert children() == []


def test_an_idle_world_stays_up(tiny_model_dir: Path) -> None:
    """Workers waiting for the next plan keep beating: a pause longer than the silence limit is no fault."""
    from engine.tp import SILENT_S

    spec = EngineSpec(model=str(tiny_model_dir), device="cpu", dtype="float32", tp=2, max_batch=1)
    client = LocalClient(spec).start()
    try:
        client.wait_ready(timeout=60)
        time.sleep(SILENT_S + 1)
        events = list(client.stream(Request("completion", text=PROMPT, sampling=SamplingParams(max_new_tokens=4))))
        assert isinstance(events[-1], Finished)
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_paused_command_resumes_without_a_false_alarm(tiny_model_dir: Path) -> None:
    """ctrl+z, then fg: while rank 0 was stopped its workers' heartbeats waited in their pipes, which is no fault."""
    from engine.tp import SILENT_S

    cmd = [sys.executable, "-m", "tui.cli", "generate", "--model", str(tiny_model_dir), "--device", "cpu", "--tp", "2"]
    cmd += ["--temperature", "0", "--max-new-tokens", "300", "--prompt", PROMPT]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout.read(8)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(SILENT_S + 2)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    finally:
        proc.kill()


def test_workers_exit_when_rank_0_is_killed(tiny_model_dir: Path) -> None:
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "tui.cli", "generate", "--model", str(tiny_model_dir), "--device", "cpu", "--tp", "2"]
    cmd += ["--temperature", "0", "--max-new-tokens", "400", "--prompt", PROMPT]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CODELLAMA_TP_TEST_TAG": tag}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        assert proc.stdout.read(8)  # generating, so every rank is busy
        assert len(tagged(tag)) == 2  # rank 0 (the command) and rank 1
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tagged(tag) == []
    finally:
        proc.kill()
        proc.stdout.close()


def test_bench_runs_tp2(tiny_gqa_dir: Path) -> None:
    tag = uuid.uuid4().hex
    args = ("--model", str(tiny_gqa_dir), "--device", "cpu", "--batch", "1,2", "--steps", "4", "--prompt-lens", "8")
    result = cli("bench", *args, "--tp", "2", tag=tag)
    assert result.returncode == 0, result.stderr
    assert "decode, batch 2" in result.stdout
    assert tagged(tag) == []


def test_launch_refuses_more_gpus_than_there_are() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    from engine.tp import _devices

    assert _devices(EngineSpec(device="cpu", tp=4), 4) == ("gloo", ["cpu"] * 4)
    with pytest.raises(EngineError, match="no CUDA device"):
        _devices(EngineSpec(device="cuda", tp=2), 2)


ONE_SHOT_WORKER = """
import os, torch, torch.distributed as dist
from engine.parallel import Parallel
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
par = Parallel(rank, 2)
assert par.enable_one_shot(4 * 4096, 8, torch.bfloat16, torch.device("cuda", rank))
torch.manual_seed(rank)
inputs = [torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) for n in (1, 2, 4, 1, 3)]
expected = [x.clone() for x in inputs]
for x in expected:
    dist.all_reduce(x)
residual = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(9))
par.start_pass()
par.all_reduce(inputs[0].clone())  # compile outside the capture
par.reduce_into(inputs[1].clone(), residual)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    par.start_pass()
    outs = [par.all_reduce(x) for x in inputs]  # back to back, each in its own region of the buffer
    h, none, squares = par.reduce_into(inputs[1], residual)
for _ in range(20):  # back-to-back passes: each region and flag word is reused while the peer may lag a call
    graph.replay()
torch.cuda.synchronize()
for out, want in zip(outs, expected):
    assert torch.equal(out, want), (out - want).abs().max()
assert none is None and torch.equal(h, (expected[1].float() + residual.float()).bfloat16())
assert torch.allclose(squares.sum(0), (h.float() ** 2).sum(-1), rtol=1e-5)
gathered = [torch.empty_like(outs[0]) for _ in range(2)]
dist.all_gather(gathered, outs[0])
assert torch.equal(gathered[0], gathered[1])
big = torch.ones(8, 4096, device="cuda", dtype=torch.bfloat16)
assert torch.equal(par.all_reduce(big), torch.full_like(big, 2))  # over the buffer: NCCL
par.start_pass()
for x in inputs * 2:  # more calls than regions: the rest go to NCCL
    par.all_reduce(x.clone())
assert torch.equal(par.all_reduce(inputs[0].clone()), expected[0])
dist.destroy_process_group()
print("ok", rank)
"""


@TWO_GPUS
def test_one_shot_all_reduce_on_two_gpus_matches_nccl(tmp_path: Path) -> None:
    """In a CUDA graph, back-to-back one-shot all-reduces give NCCL's bits on both ranks, the fused residual add
    NCCL's sum plus the residual and its squares; past the buffer's size or regions, NCCL takes over."""
    script = tmp_path / "one_shot.py"
    script.write_text(ONE_SHOT_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 0" in result.stdout and "ok 1" in result.stdout
