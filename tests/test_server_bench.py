"""`codellama-tui bench-serve`: its statistics, its random prompts, a run against a server's URL, and a run that
serves random weights at a (tiny) shape itself and times `bench`'s decode on the same engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine import config
from engine.local_client import LocalClient
from engine.requests import EngineSpec
from tests.servers import serving
from tui import cli
from tui.server.bench import percentile, random_prompt

TINY = dict(dim=256, intermediate=512, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=4096)  # head_dim 128


@pytest.fixture(scope="module")
def demo_server():
    with serving(lambda sink: LocalClient(EngineSpec(device="cpu", max_batch=2), on_event=sink), slots=2) as running:
        yield running


def test_percentiles_interpolate_as_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([], 50) == 0.0


def test_random_prompts_have_the_asked_length(demo_server) -> None:
    import random

    async def lengths() -> list[int]:
        async with httpx.AsyncClient(base_url=demo_server.url) as client:
            rng = random.Random(0)
            prompts = [await random_prompt(client, rng, 64) for _ in range(4)]
            counts = [len((await client.post("/tokenize", json={"text": p})).json()["tokens"]) for p in prompts]
        assert len(set(prompts)) == 4
        return counts

    assert all(62 <= n <= 64 for n in asyncio.run(lengths()))


def test_bench_serve_measures_a_running_server(demo_server, tmp_path, capsys) -> None:
    out = tmp_path / "serve.json"
    argv = [
        "bench-serve",
        "--url",
        demo_server.url,
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--prompt-len",
        "16",
        "--max-tokens",
        "4",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["failed"] == 0 and level["requests"] == 2
        assert 0 < level["output_tokens"] <= 8 and level["output_tps"] > 0
        assert level["ttft_ms"]["p50"] > 0 and level["ttft_ms"]["p99"] >= level["ttft_ms"]["p50"]
    assert "out tok/s" in capsys.readouterr().out


def test_bench_serve_serves_random_weights_itself_and_times_bench_alongside(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(config.SHAPES, "tiny", TINY)
    out = tmp_path / "serve.json"
    argv = [
        "bench-serve",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--prompt-len",
        "16",
        "--max-tokens",
        "4",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert "CodeLlama-tiny shape, random weights" in result["model"]
    assert set(result["bench"]["decode_tps"]) == {"1", "2"} and result["bench"]["position"] == 16 + 2
    for level in result["levels"]:
        assert level["failed"] == 0 and level["bench_decode_tps"] > 0


def test_bench_serve_times_the_server_over_a_paced_stand_in(tmp_path) -> None:
    """`--step-ms`: no model runs; the stand-in's device takes 2 ms a step (`bench` times it at that rate), 10 ms a
    prefill pass plus 50 µs a prompt token, and each level says how busy the device was and what the load allows."""
    out = tmp_path / "paced.json"
    argv = ["bench-serve", "--step-ms", "2", "--prefill-ms", "10", "--prefill-token-us", "50", "--concurrency", "1,4"]
    argv += ["--requests", "4"]  # 64 tokens each: even the 4-stream level outlasts two of the loop clock's samples
    assert cli.main([*argv, "--prompt-len", "16", "--max-tokens", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "paced stand-in, 2 ms a step, 10 ms a prefill + 50 us a token" in result["model"]
    assert result["bench"]["decode_tps"]["1"] == pytest.approx(500, rel=0.2)
    for level in result["levels"]:
        assert level["failed"] == 0 and level["output_tokens"] == 4 * 64
        assert 0 < level["device_busy"] <= 1 and level["loop_cpu_s"] is not None and level["client_cpu_s"] > 0
        # 1 stream: each prompt's pass pauses the batch; 4: the four 16-token prompts fit one pass
        requests, tokens, passes = 4, 4 * 64, 4 // level["concurrency"]
        prefill = passes * 0.010 + requests * 16 * 50e-6
        assert level["ceiling_tps"] == pytest.approx(
            tokens / (prefill + (tokens - requests) / level["concurrency"] * 0.002)
        )
        assert level["output_tps"] <= level["ceiling_tps"] * 1.05


def test_bench_serve_refuses_a_step_time_that_is_not_positive(capsys) -> None:
    assert cli.main(["bench-serve", "--step-ms", "0"]) == 2
    assert "--step-ms and --prefill-ms > 0" in capsys.readouterr().err
