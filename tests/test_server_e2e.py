"""`codellama-tui serve` as a real command: it answers, cancels and, on SIGTERM with streams open, ends them with
an error event, exits, frees its port and leaves no tensor-parallel rank behind (`--tp 2 --device cpu`, on gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import Serve, metric, sse_events
from tui.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_free(url: str) -> bool:
    """Whether a new server could listen on the port (as servers bind: the closed connections' TIME_WAIT allowed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
            sock.listen()
        except OSError:
            return False
    return True


def _open_stream(url: str) -> tuple[httpx.Client, object, object]:
    client = httpx.Client(timeout=60)
    body = {"prompt": "def fibonacci(n):\n", "max_tokens": 900, "temperature": 0, "stream": True}
    response = client.send(client.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
    events = sse_events(response)
    assert next(events)["choices"][0]["text"] is not None
    return client, response, events


def test_serve_answers_and_on_sigterm_ends_open_streams_exits_and_frees_its_port() -> None:
    serve = Serve("--device", "cpu")
    try:
        url = serve.ready()
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = sdk.completions.create(model="m", prompt="def add(a, b):\n", max_tokens=6, temperature=0)
        assert answer.usage.completion_tokens == 6
        streams = [_open_stream(url) for _ in range(2)]
        serve.proc.send_signal(signal.SIGTERM)
        for client, response, events in streams:
            rest = list(events)
            assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == "the server is shutting down"
            response.close()
            client.close()
        assert serve.proc.wait(60) in (0, -signal.SIGTERM)
        assert _port_free(url)
        assert "Traceback" not in serve.log
    finally:
        serve.stop()


def test_serve_with_two_cpu_ranks_answers_cancels_and_leaves_no_rank_behind() -> None:
    serve = Serve("--device", "cpu", "--tp", "2", "--instance-num", "2")
    try:
        url = serve.ready()
        ranks = serve.children()
        assert len(ranks) == 1 and all(_alive(pid) for pid in ranks)
        body = {"prompt": "def add(a, b):\n", "max_tokens": 6, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 6
        client, response, _events = _open_stream(url)
        response.close()  # the client goes away mid-stream
        client.close()
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        assert metric(url, 'codellama_sequences_finished_total{reason="cancelled"}') == 1
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(60) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, "a tensor-parallel rank outlived the server"
            time.sleep(0.1)
        assert _port_free(url)
    finally:
        serve.stop()


def test_a_model_that_cannot_load_ends_the_server_with_one_line_and_an_open_bind_warns() -> None:
    serve = Serve("--host", "0.0.0.0", "--model", "/nonexistent/CodeLlama-7b-hf")
    try:
        assert serve.proc.wait(120) == 1
        serve._reader.join(10)
        assert "warning: listening on 0.0.0.0 without --api-key" in serve.log
        assert "/nonexistent/CodeLlama-7b-hf" in serve.log and "Traceback" not in serve.log
    finally:
        serve.stop()


def test_the_seeds_instance_num_spelling_is_the_batch() -> None:
    parser = build_parser()["serve"]
    assert parser.parse_args(["--instance_num", "32"]).max_batch == 32
    assert parser.parse_args(["--instance-num", "4"]).max_batch == 4
    assert parser.parse_args([]).host == "127.0.0.1"


def test_a_busy_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-m", "tui.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1
    assert (
        out.stderr.strip() == f"codellama-tui serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
