"""The server's protocol over the fake engine client: OpenAI's error shapes (400, 401, 404, 413, 429, 503), admission
and its queue, the end of open streams at shutdown, llama.cpp's shapes for `/infill` and `/completion`, `/metrics`.
What the real engine answers through it is tests/test_server_demo.py's."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from engine.events import ModelInfo
from tests.fakes import ANSWERS, INFO, FakeClient
from tests.servers import metric, serving, sse_events
from tui.server.run import make_bridge, start_in_thread

KEY = "sekret-key"


class Fakes:
    """Builds the server's fake client, and keeps it for the test to look at."""

    def __init__(self, info: ModelInfo = INFO, **options: object) -> None:
        self.info, self.options = info, options
        self.client: FakeClient | None = None

    def __call__(self, sink) -> FakeClient:
        self.client = FakeClient(on_event=sink, info=self.info, **self.options)
        return self.client


@pytest.fixture(scope="module")
def fake_server():
    fakes = Fakes()
    with serving(fakes, slots=4, max_queue=4) as running:
        running.fakes = fakes
        yield running


def _error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["message"]
    assert "Traceback" not in response.text
    return error


def test_bad_fields_get_400_naming_the_field(fake_server) -> None:
    url = fake_server.url
    cases = [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 9}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "stop": [str(i) for i in range(17)]}, "stop"),
        ({}, "prompt"),
    ]
    for body, param in cases:
        assert _error(httpx.post(f"{url}/v1/completions", json=body), 400, "invalid_request_error")["param"] == param
    chat = {"messages": [{"role": "robot", "content": "hi"}]}
    error = _error(httpx.post(f"{url}/v1/chat/completions", json=chat), 400, "invalid_request_error")
    assert error["param"] == "messages.0.role" and "robot" in error["message"]
    error = _error(httpx.post(f"{url}/v1/chat/completions", json={"messages": []}), 400, "invalid_request_error")
    assert error["param"] == "messages"


def test_values_the_engine_cannot_hold_get_400_for_every_choice(fake_server) -> None:
    """Seeds are int64 on the device and choice i draws from seed + i; top-k is int32; NaN is no number. One bad
    value in the engine's step would fail every sequence running with it."""
    url = fake_server.url
    for body in (
        {"prompt": "x", "seed": 2**63},
        {"prompt": "x", "seed": 2**63 - 1, "n": 2},
        {"prompt": "x", "top_k": 2**40},
    ):
        error = _error(httpx.post(f"{url}/v1/completions", json=body), 400, "invalid_request_error")
        assert "seed" in error["message"] or "top-k" in error["message"]
    nan = httpx.post(
        f"{url}/v1/completions",
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert _error(nan, 400, "invalid_request_error")["param"] == "temperature"


def test_a_prompt_over_the_context_gets_400_before_it_queues(fake_server) -> None:
    """The fake counts a token per character of the prompt; its context is INFO.context."""
    body = {"prompt": "x" * INFO.context, "max_tokens": 4}
    error = _error(httpx.post(f"{fake_server.url}/v1/completions", json=body), 400, "invalid_request_error")
    assert error["code"] == "context_length_exceeded" and f"context holds {INFO.context}" in error["message"]
    assert all(r.text != body["prompt"] for r in fake_server.fakes.client.submitted)


def test_broken_bodies_get_400_and_unknown_fields_are_ignored(fake_server) -> None:
    url = fake_server.url
    bad = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert _error(bad, 400, "invalid_request_error")["code"] == "invalid_json"
    form = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x"}')  # no content type, as curl -d sends
    assert "JSON object" in _error(form, 400, "invalid_request_error")["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "frobnicate": 3, "logit_bias": {"1": 2}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_unknown_paths_and_methods_get_404_and_405(fake_server) -> None:
    assert "/v1/engines" in _error(httpx.get(f"{fake_server.url}/v1/engines"), 404, "not_found_error")["message"]
    _error(httpx.get(f"{fake_server.url}/v1/completions"), 405, "invalid_request_error")


def test_the_api_key_is_needed_everywhere_but_health() -> None:
    with serving(Fakes(), api_key=KEY) as running:
        url = running.url
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            for path in ("/v1/models", "/metrics", "/nowhere"):
                error = _error(httpx.get(f"{url}{path}", headers=headers), 401, "authentication_error")
                assert error["code"] == "invalid_api_key"
        good = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", headers=good).status_code == 200
        assert httpx.get(f"{url}/nowhere", headers=good).status_code == 404


def test_bodies_over_the_limit_get_413_declared_or_chunked() -> None:
    with serving(Fakes(), max_body=1000) as running:
        big = {"prompt": "x" * 2000}
        error = _error(httpx.post(f"{running.url}/v1/completions", json=big), 413, "invalid_request_error")
        assert error["code"] == "request_too_large" and "1000 bytes" in error["message"]

        def chunks():
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        chunked = httpx.post(
            f"{running.url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert _error(chunked, 413, "invalid_request_error")["code"] == "request_too_large"
        assert httpx.post(f"{running.url}/v1/completions", json={"prompt": "x"}).status_code == 200


def test_past_the_queue_requests_get_429_and_the_queue_is_fifo() -> None:
    """One slot, one place in the queue: the first request runs (held open by the fake), the second waits, the
    third is refused with Retry-After; when the first goes away the second runs."""
    fakes = Fakes(hold=True)
    with serving(fakes, slots=1, max_queue=1) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        body = {"prompt": "first", "stream": True, "max_tokens": 50}
        with http.stream("POST", "/v1/completions", json=body) as first:
            first_events = sse_events(first)  # kept: an iterator dropped half-read closes its connection
            assert next(first_events)["choices"][0]["text"]
            with (
                httpx.Client(base_url=running.url, timeout=30) as other,
                other.stream("POST", "/v1/completions", json={**body, "prompt": "second"}) as second,
            ):
                assert metric(running.url, "codellama_requests_waiting") == 1
                assert metric(running.url, "codellama_requests_running") == 1
                refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "third"})
                error = _error(refused, 429, "rate_limit_error")
                assert refused.headers["Retry-After"] == "1" and error["code"] == "queue_full"
                assert [r.text for r in fakes.client.submitted] == ["first"]
                first.close()  # the first client goes away: its request is cancelled, the second starts
                second_events = sse_events(second)
                assert next(second_events)["choices"][0]["text"]
                assert [r.text for r in fakes.client.submitted] == ["first", "second"]
                assert fakes.client.cancelled[0] == fakes.client.submitted[0].id


def test_n_larger_than_the_server_holds_is_a_400() -> None:
    with serving(Fakes(), slots=1, max_queue=1) as running:
        error = _error(
            httpx.post(f"{running.url}/v1/completions", json={"prompt": "x", "n": 3}), 400, "invalid_request_error"
        )
        assert error["param"] == "n"


def test_a_model_that_cannot_infill_says_so() -> None:
    with serving(Fakes(info=replace(INFO, name="CodeLlama-34b-hf", can_infill=False))) as running:
        body = {"prompt": "def f(", "suffix": "\n    return x\n"}
        error = _error(httpx.post(f"{running.url}/v1/completions", json=body), 400, "invalid_request_error")
        assert "CodeLlama-34b-hf cannot infill" in error["message"] and error["param"] == "suffix"
        infill = httpx.post(f"{running.url}/infill", json={"input_prefix": "a", "input_suffix": "b"})
        assert "cannot infill" in _error(infill, 400, "invalid_request_error")["message"]
        plain = httpx.post(f"{running.url}/v1/completions", json={"prompt": "def f("})
        assert plain.status_code == 200


def test_a_model_that_is_loading_or_failed_gets_503() -> None:
    fakes = Fakes(load_error="no weights in /models/x")
    running = start_in_thread(make_bridge(fakes, 1, 1))
    try:
        deadline = time.monotonic() + 30
        while "no weights" not in httpx.get(f"{running.url}/health").text:  # the fake fails at once
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for path in ("/health", "/v1/models"):
            error = _error(httpx.get(f"{running.url}{path}"), 503, "unavailable_error")
            assert "no weights in /models/x" in error["message"]
        completion = httpx.post(f"{running.url}/v1/completions", json={"prompt": "x"})
        assert "could not be loaded" in _error(completion, 503, "unavailable_error")["message"]
    finally:
        running.stop()


def test_shutdown_ends_open_streams_with_an_error_event_and_waiting_answers_with_503() -> None:
    fakes = Fakes(hold=True)
    with serving(fakes, slots=1, max_queue=2) as running:
        stopper = threading.Timer(0.3, running.stop)
        waiting: list[httpx.Response] = []
        body = {"prompt": "x", "max_tokens": 50}
        with httpx.stream(
            "POST",
            f"{running.url}/v1/chat/completions",
            timeout=30,
            json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as stream:
            events = sse_events(stream)
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"
            queued = threading.Thread(
                target=lambda: waiting.append(httpx.post(f"{running.url}/v1/completions", json=body, timeout=30))
            )
            queued.start()
            stopper.start()
            rest = list(events)
        queued.join(30)
        stopper.join()
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == "the server is shutting down"
        assert _error(waiting[0], 503, "unavailable_error")["message"] == "the server is shutting down"
        assert fakes.client.closed and fakes.client.cancelled


def test_streams_have_openai_form(fake_server) -> None:
    url = fake_server.url
    chat = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    chunks = events[:-2]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"]["content"] or "" for c in mine) == ANSWERS["chat"]
        assert mine[-1]["finish_reason"] == "stop" and all(c["finish_reason"] is None for c in mine[:-1])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "stream": True}) as response:
        events = list(sse_events(response))
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert all(e["usage"] is None for e in events[:-1])  # no usage chunk unless asked


def test_llama_cpp_infill_shapes(fake_server) -> None:
    url, fake = fake_server.url, fake_server.fakes.client
    body = {
        "input_prefix": "def f(x):\n    ",
        "input_suffix": "\n    return y\n",
        "prompt": "y = ",
        "input_extra": [{"filename": "util.py", "text": "def g():\n    pass"}],
        "n_predict": 20,
    }
    answer = httpx.post(f"{url}/infill", json=body).json()
    assert answer["content"] == fake.answers["infilling"] and answer["stop"] is True
    assert {"prompt_n", "predicted_n", "predicted_per_second"} <= set(answer["timings"])
    sent = fake.submitted[-1]
    assert sent.cap == "infilling" and sent.suffix == body["input_suffix"]
    assert sent.prefix == "--- util.py ---\ndef g():\n    pass\n\n" + body["input_prefix"] + body["prompt"]
    fields = ["content", "timings/prompt_n", "tokens_cached", "nothing/here"]
    picked = httpx.post(f"{url}/infill", json={**body, "response_fields": fields}).json()
    assert set(picked) == {"content", "timings/prompt_n", "tokens_cached"}
    assert httpx.post(f"{url}/infill", json={**body, "n_predict": 0}).json()["content"] == ""
    with httpx.stream("POST", f"{url}/infill", json={**body, "stream": True}) as response:
        events = list(sse_events(response))
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == fake.answers["infilling"]


def test_the_block_end_extension_reaches_the_engine_and_its_reason_reads_as_stop() -> None:
    fakes = Fakes(answers=lambda request: "return 1")
    with serving(fakes, slots=2) as running:
        url = running.url
        body = {"prompt": "def f():", "stop_at_block_end": True, "engine_events": True, "stream": True}
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
        assert fakes.client.submitted[-1].stop_at_block_end
        httpx.post(f"{url}/v1/completions", json={**body, "suffix": "\n", "stream": False})
        assert fakes.client.submitted[-1].cap == "infilling" and fakes.client.submitted[-1].stop_at_block_end
        httpx.post(f"{url}/infill", json={"input_prefix": "def f():", "stop_at_block_end": True})
        assert fakes.client.submitted[-1].stop_at_block_end
        httpx.post(f"{url}/v1/completions", json={"prompt": "def f():"})
        assert not fakes.client.submitted[-1].stop_at_block_end
        fakes.client.reason = "block"
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            last = [e for e in sse_events(response) if e != "[DONE]"][-1]
        assert last["choices"][0]["finish_reason"] == "stop" and last["engine"]["reason"] == "block"
        answer = httpx.post(f"{url}/infill", json={"input_prefix": "def f():", "stop_at_block_end": True}).json()
        assert answer["stop"] is True and answer["stop_type"] == "word"


def test_llama_cpp_completion_reads_codellamas_fim_template(fake_server) -> None:
    """Tabby's llama.cpp backend sends `prompt_template = "<PRE> {prefix} <SUF>{suffix} <MID>"` to /completion."""
    url, fake = fake_server.url, fake_server.fakes.client
    httpx.post(f"{url}/completion", json={"prompt": "<PRE> def f( <SUF>):\n    pass <MID>", "n_predict": 8})
    sent = fake.submitted[-1]
    assert (sent.cap, sent.prefix, sent.suffix) == ("infilling", "def f(", "):\n    pass")
    httpx.post(f"{url}/v1/completions", json={"prompt": "<PRE> a <SUF>b <MID>"})
    assert (fake.submitted[-1].cap, fake.submitted[-1].prefix) == ("infilling", "a")
    httpx.post(f"{url}/completion", json={"prompt": "<PRE> is not a template", "n_predict": 8})
    assert (fake.submitted[-1].cap, fake.submitted[-1].text) == ("completion", "<PRE> is not a template")


def test_metrics_count_requests_tokens_and_latencies(fake_server) -> None:
    url = fake_server.url
    before = metric(url, 'codellama_http_requests_total{route="/v1/completions",status="200"}')
    ttft = metric(url, "codellama_time_to_first_token_seconds_count")
    itl = metric(url, "codellama_inter_token_latency_seconds_count")
    slow = metric(url, 'codellama_inter_token_latency_seconds_bucket{le="0.001"}')
    httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
    assert metric(url, 'codellama_http_requests_total{route="/v1/completions",status="200"}') == before + 1
    assert metric(url, "codellama_time_to_first_token_seconds_count") == ttft + 1
    pieces = -(-len(ANSWERS["completion"]) // fake_server.fakes.client.chunk)  # the fake's text deltas
    assert metric(url, "codellama_inter_token_latency_seconds_count") == itl + pieces - 1  # one gap after each
    assert metric(url, 'codellama_inter_token_latency_seconds_bucket{le="+Inf"}') == itl + pieces - 1
    assert metric(url, 'codellama_inter_token_latency_seconds_bucket{le="0.001"}') >= slow
    assert metric(url, "codellama_inter_token_latency_seconds_sum") > 0
    assert metric(url, "codellama_generation_tokens_total") > 0
    assert metric(url, "codellama_kv_slots") == 4
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "codellama_inter_token_latency_seconds_bucket",
        "codellama_prefix_cache_hit_tokens_total",
        "codellama_kv_slots_in_use",
        'codellama_sequences_finished_total{reason="eos"}',
    ):
        assert name in text


def test_a_generation_hands_over_everything_queued_at_once() -> None:
    """A stream that fell behind writes what waits for it in one go: the events queued since its last batch."""
    import asyncio

    from engine.events import Finished, Stats, TextDelta
    from tui.server.bridge import Generation, ShuttingDown

    async def batches(items: list) -> list:
        generation = Generation((), 0.0, open={"a"})
        for item in items:
            generation.put(item)
        generation.open.clear()
        got = []
        try:
            async for batch in generation.batches():
                got.append(batch)
        except ShuttingDown:
            got.append("shutting down")
        return got

    deltas = [(0, TextDelta("a", t)) for t in ("x", "y")]
    done = (0, Finished("a", "eos", "xy", Stats(1, 2, 0.0, 0.0)))
    assert asyncio.run(batches([*deltas, done])) == [[*deltas, done]]
    assert asyncio.run(batches([*deltas, None])) == [deltas, "shutting down"]


def test_tokenize_gives_the_clients_prompt_ids(fake_server) -> None:
    """The fake's ids are the prompt's characters."""
    url = fake_server.url
    assert httpx.post(f"{url}/tokenize", json={"text": "ab"}).json() == {"tokens": [97, 98]}
    assert httpx.post(f"{url}/tokenize", json={"content": "ab"}).json() == {"tokens": [97, 98]}
    chat = {"cap": "chat", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert httpx.post(f"{url}/tokenize", json=chat).json() == {"tokens": [ord("s"), ord("u")]}


def test_the_server_imports_no_torch_and_its_commands_explain_themselves() -> None:
    """The engine loads on the server's worker thread; `--help` is instant."""
    root = Path(__file__).resolve().parents[1]
    probe = "import sys, tui.server.app, tui.server.run, tui.server.bench; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root).stdout == "False\n"
    for command, words in (
        ("serve", ("--instance-num", "--max-queue", "--api-key", "--host", "--tp", "--shape")),
        ("bench-serve", ("--url", "--concurrency", "--requests", "--prompt-len", "--json")),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "tui.cli", command, "--help"], capture_output=True, text=True, cwd=root
        )
        assert out.returncode == 0 and all(word in out.stdout for word in words), out.stdout


def test_speculate_is_the_clients_choice_and_an_editors_infill_speculates(fake_server) -> None:
    """OpenAI's routes speculate when the body says so (our client sends the request's own choice); llama.cpp's
    /infill and /completion, an editor's fill, speculate unless told not to."""
    url, fake = fake_server.url, fake_server.fakes.client
    for body, expected in (({}, False), ({"speculate": True}, True), ({"speculate": False}, False)):
        httpx.post(f"{url}/v1/completions", json={"prompt": "def f(", "max_tokens": 4, **body})
        assert fake.submitted[-1].speculate is expected
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
        httpx.post(f"{url}/v1/chat/completions", json=chat)
        assert fake.submitted[-1].speculate is expected
    for body, expected in (({}, True), ({"speculate": False}, False)):
        httpx.post(f"{url}/infill", json={"input_prefix": "a", "input_suffix": "b", "n_predict": 4, **body})
        assert fake.submitted[-1].speculate is expected
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "speculate": "lots"})
    assert "speculate" in _error(bad, 400, "invalid_request_error")["message"]


def test_events_escape_what_line_readers_take_for_line_ends() -> None:
    """U+2028, U+2029 and U+0085 in an answer go out escaped, so every client's line reader (httpx's `aiter_lines`
    splits at them) reads each event whole, and the text comes back the same."""
    import json

    from tui.server.responses import TextChunks, sse

    text = "a\u2028b\u2029c\x85d"
    for event in (sse({"text": text}), TextChunks(lambda i, t: _chunk(t))(0, text)):
        assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1, event
        assert json.loads(event.removeprefix("data: "))["text"] == text


def _chunk(text: str):
    from pydantic import BaseModel

    class Chunk(BaseModel):
        text: str

    return Chunk(text=text)
