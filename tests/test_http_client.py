"""The HTTP client (`engine.http_client`, `engine.http_wire`): the wire rules alone, then the client against our
server on the demo model (every cap gives what the engine here gives, fitting, exact ids, cancelling frees the
slot, round-trip times) and against a foreign OpenAI-compatible server (completion and chat; no infilling unless it
takes `suffix`; none of our fields sent)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from engine.errors import CapabilityError, EngineError, PromptError
from engine.events import Failed, Finished, Link, ModelInfo, Started, TextClipped, TextDelta, TurnsDropped
from engine.http_client import HttpClient
from engine.http_wire import AnswerReader, Served, error_text, request_body, served
from engine.local_client import LocalClient
from engine.requests import ChatMessage, EngineSpec, Request, SamplingParams
from tests.servers import FakeOpenAI, metric, serving
from tui.conversation import Conversation

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
OURS = Served("CodeLlama demo", True, ModelInfo("CodeLlama demo", can_infill=True, context=1024, device="cpu"))
FOREIGN = Served("gpt", False, ModelInfo("gpt", can_infill=False, can_tokenize=False))
PREFIX, SUFFIX = "def remove_non_ascii(s: str) -> str:\n    ", "\n    return result\n"


# ---- the wire


def test_our_server_gets_every_field_and_a_foreign_one_only_openais() -> None:
    sampling = SamplingParams(temperature=0.3, top_k=7, repetition_penalty=1.2, seed=5, stop=("\n\n",))
    request = Request("infilling", prefix="a", suffix="b", suffix_first=True, fit=True, sampling=sampling)
    path, body = request_body(request, OURS)
    assert path == "/v1/completions"
    assert body["prompt"] == "a" and body["suffix"] == "b" and body["spm"] is True
    assert (body["top_k"], body["repetition_penalty"], body["fit"], body["engine_events"]) == (7, 1.2, True, True)
    assert body["speculate"] is False and request_body(replace(request, speculate=True), OURS)[1]["speculate"]
    assert (body["seed"], body["stop"], body["stream"], body["stream_options"]) == (
        5,
        ["\n\n"],
        True,
        {"include_usage": True},
    )
    path, body = request_body(Request("completion", text="x", fit=True, sampling=sampling), FOREIGN)
    assert path == "/v1/completions" and body["prompt"] == "x"
    assert not {"top_k", "repetition_penalty", "fit", "engine_events", "spm", "suffix", "speculate"} & set(body)
    messages = (ChatMessage("system", "s"), ChatMessage("user", "u"))
    path, body = request_body(Request("chat", messages=messages), FOREIGN)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_infilling_text_is_split_at_its_marker_and_a_foreign_server_without_suffix_cannot_infill() -> None:
    _, body = request_body(Request("infilling", text="a<FILL>b"), OURS)
    assert (body["prompt"], body["suffix"]) == ("a", "b")
    with pytest.raises(PromptError, match="exactly one <FILL>"):
        request_body(Request("infilling", text="a<FILL>b<FILL>"), OURS)
    with pytest.raises(CapabilityError, match="the server cannot infill"):
        request_body(Request("infilling", text="a<FILL>b"), FOREIGN)
    takes = Served("m", False, ModelInfo("m", can_infill=True, can_tokenize=False))
    _, body = request_body(Request("infilling", text="a<FILL>b"), takes)
    assert body["suffix"] == "b"
    with pytest.raises(CapabilityError, match="suffix-first"):
        request_body(Request("infilling", text="a<FILL>b", suffix_first=True), takes)


def test_the_block_end_goes_to_our_server_only() -> None:
    request = Request("completion", text="def f():", stop_at_block_end=True)
    assert request_body(request, OURS)[1]["stop_at_block_end"] is True
    assert "stop_at_block_end" not in request_body(request, FOREIGN)[1]
    assert "stop_at_block_end" not in request_body(Request("completion", text="x"), OURS)[1]


def test_model_cards_say_whose_server_it_is() -> None:
    ours = {"codellama_tui": {"name": "m", "can_infill": True, "can_tokenize": True, "context": 64, "device": "cpu"}}
    found = served({"data": [{"id": "m", **ours}]}, None)
    assert found.ours and found.info.context == 64 and found.info.device == "cpu"
    vllm = served({"data": [{"id": "a", "max_model_len": 4096}, {"id": "b"}]}, "b")
    assert not vllm.ours and vllm.model == "b" and vllm.info.context is None and not vllm.info.can_tokenize
    assert served({"data": [{"id": "a", "max_model_len": 4096}]}, None).info.context == 4096
    with pytest.raises(EngineError, match="does not serve 'c'; it serves: a, b") as err:
        served({"data": [{"id": "a"}, {"id": "b"}]}, "c")
    assert err.value.fields == ("served_model",)
    with pytest.raises(EngineError, match="not an OpenAI model list"):
        served({"models": []}, None)


def test_error_bodies_become_one_line() -> None:
    assert error_text(401, b'{"error": {"message": "the API key is wrong"}}') == (
        "the server answered 401: the API key is wrong"
    )
    assert error_text(422, b'{"detail": "bad"}') == "the server answered 422: bad"
    assert error_text(502, b"<html>\n Bad   gateway </html>") == "the server answered 502: <html> Bad gateway </html>"
    assert error_text(500, b"") == "the server answered 500"


def _lines(*payloads: str) -> list[str]:
    return [line for payload in payloads for line in (f"data: {payload}", "")]


def _read(request: Request, served_by: Served, lines: list[str]) -> tuple[list, object]:
    reader = AnswerReader(request, served_by)
    events = [event for line in lines for event in reader.feed(line)]
    return events, reader.end("lost")


def test_a_foreign_stream_becomes_the_engines_events() -> None:
    request = Request("chat", messages=(ChatMessage("user", "hi"),))
    chunks = _lines(
        '{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {"content": "He"}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
        '{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": '
        '{"cached_tokens": 4}}}',
        "[DONE]",
    )
    events, end = _read(request, FOREIGN, [": keep-alive", *chunks])
    assert events == [Started(request.id, 0, None), TextDelta(request.id, "He"), TextDelta(request.id, "llo")]
    assert isinstance(end, Finished) and (end.reason, end.text) == ("eos", "Hello")
    assert (end.stats.prompt_tokens, end.stats.new_tokens, end.stats.cached_tokens) == (9, 2, 4)


def test_openais_finish_reasons_map_to_the_engines() -> None:
    fill = Request("infilling", prefix="a", suffix="b")
    done = '{"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}'
    assert _read(fill, FOREIGN, _lines('{"choices": [{"text": "x"}]}', done, "[DONE]"))[1].reason == "eot"
    vllm_stop = '{"choices": [{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": "\\n"}]}'
    assert _read(Request("completion"), FOREIGN, _lines(vllm_stop, "[DONE]"))[1].reason == "stop"
    small = Served("m", False, ModelInfo("m", can_infill=False, context=6))
    length = (
        '{"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}'
    )
    assert _read(Request("completion"), small, _lines(length, "[DONE]"))[1].reason == "context"
    assert _read(Request("completion"), FOREIGN, _lines(length, "[DONE]"))[1].reason == "length"


def test_our_servers_engine_objects_give_back_its_own_events() -> None:
    request = Request("completion", text="x" * 3000, fit=True)
    started = {"prompt_tokens": 700, "context": 1024, "turns_dropped": 0, "clipped": [12, 0]}
    first = json.dumps({"choices": [{"index": 0, "text": ""}], "engine": started})
    last = json.dumps(
        {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "engine": {"reason": "context"}}
    )
    events, end = _read(request, OURS, _lines(first, '{"choices": [{"index": 0, "text": "y"}]}', last, "[DONE]"))
    assert events == [TextClipped(request.id, 12, 0), Started(request.id, 700, 1024), TextDelta(request.id, "y")]
    assert end.reason == "context" and end.stats.prompt_tokens == 700
    speculated = {"reason": "eos", "steps": 4, "proposed": 9, "accepted": 6}
    finish = json.dumps({"choices": [{"index": 0, "text": "z", "finish_reason": "stop"}], "engine": speculated})
    _, end = _read(request, OURS, _lines(first, finish, "[DONE]"))
    assert (end.stats.steps, end.stats.proposed, end.stats.accepted) == (4, 9, 6)
    chat = Request("chat", messages=(ChatMessage("user", "u"),), fit=True)
    started = {"prompt_tokens": 3, "context": 1024, "turns_dropped": 2, "clipped": None}
    dropped = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "engine": started})
    events, _ = _read(chat, OURS, _lines(dropped))
    assert events == [TurnsDropped(chat.id, 2), Started(chat.id, 3, 1024)]


def test_an_error_event_or_a_stream_that_stops_short_fails_the_answer() -> None:
    request = Request("completion")
    text = '{"choices": [{"index": 0, "text": "par"}]}'
    error = '{"error": {"message": "the server is shutting down", "type": "unavailable_error"}}'
    events, end = _read(request, FOREIGN, _lines(text, error, "[DONE]"))
    assert events[-1] == TextDelta(request.id, "par")
    assert end == Failed(request.id, "the server stopped the answer: the server is shutting down")
    assert _read(request, FOREIGN, _lines(text))[1] == Failed(request.id, "lost")
    reader = AnswerReader(request, FOREIGN)
    for line in _lines(text):
        reader.feed(line)
    cancelled = reader.cancelled()
    assert isinstance(cancelled, Finished) and (cancelled.reason, cancelled.text) == ("cancelled", "par")


def test_an_event_split_over_data_lines_is_one_event() -> None:
    request = Request("completion")
    lines = ['data: {"choices": [{"index": 0,', 'data:  "text": "ok"}]}', "", "data: [DONE]", ""]
    events, end = _read(request, FOREIGN, lines)
    assert events[-1] == TextDelta(request.id, "ok") and end.text == "ok"


# ---- against our server


@pytest.fixture(scope="module")
def server():
    spec = EngineSpec(device="cpu", max_batch=2, speculate=8)  # `serve --speculate 8`
    with serving(lambda sink: LocalClient(spec, on_event=sink), slots=2) as running:
        yield running


@pytest.fixture(scope="module")
def here():
    """The same engine in this process, for what the server's answers must equal."""
    client = LocalClient(EngineSpec(device="cpu", max_batch=1)).start()
    client.wait_ready()
    yield client
    client.close()


@pytest.fixture
def remote(server):
    events: list = []
    client = HttpClient(server.url, on_event=events.append, ping_s=0.05).start()
    client.wait_ready(30)
    client.events = events
    yield client
    client.close()


def _end(client, request: Request) -> Finished | Failed:
    return list(client.stream(request))[-1]


def test_every_cap_gives_what_the_engine_here_gives(remote: HttpClient, here: LocalClient) -> None:
    history = Conversation("Answer in Python.")
    history.exchanges.append(("Write a stack.", "class Stack:\n    pass"))
    requests = [
        Request("completion", text="def fibonacci(n):\n"),
        Request("python", text="import os\n"),
        Request("infilling", prefix=PREFIX, suffix=SUFFIX),
        Request("infilling", text=f"{PREFIX}<FILL>{SUFFIX}", suffix_first=True),
        history.request("Now add a peek.", GREEDY),
    ]
    assert remote.info == here.info and remote.server == remote.url
    for request in requests:
        request = Request(**{**request.__dict__, "sampling": GREEDY, "id": "r"})
        there, local = _end(remote, request), _end(here, request)
        assert isinstance(there, Finished), there
        assert (there.text, there.reason) == (local.text, local.reason)
        assert (there.stats.prompt_tokens, there.stats.new_tokens) == (
            local.stats.prompt_tokens,
            local.stats.new_tokens,
        )
        assert remote.tokenize(request) == here.tokenize(request)


def test_a_request_that_speculates_on_the_server_gives_the_same_text_and_its_figures(remote, here) -> None:
    """`speculate` crosses the wire: greedy text as the engine here gives it without speculation, with the server's
    steps, proposals and acceptances in the stats (for the status line's tokens per step)."""
    text = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"
    request = Request("completion", text=text, sampling=GREEDY, id="copy")
    plain, fast = _end(remote, request), _end(remote, replace(request, speculate=True))
    assert isinstance(fast, Finished) and fast.text == _end(here, request).text == plain.text
    assert plain.stats.proposed == 0 and fast.stats.proposed > 0 and fast.stats.steps > 0
    assert 0 < fast.stats.accepted <= fast.stats.proposed and fast.stats.tokens_per_step > 1


def test_a_suggestion_ends_at_its_block_on_the_server_as_here(remote: HttpClient, here: LocalClient) -> None:
    sampling = SamplingParams(temperature=0, max_new_tokens=64)
    for request in (
        Request("completion", text="def f(xs):\n    total = 0\n    for x in xs:", stop_at_block_end=True),
        Request("infilling", prefix="def f(xs):\n    ", suffix="\n\nprint(f([1]))\n", stop_at_block_end=True),
    ):
        request = replace(request, sampling=sampling, id="block")
        there, local = _end(remote, request), _end(here, request)
        assert (there.reason, there.text) == (local.reason, local.text) == ("block", local.text)
        assert there.stats.new_tokens == local.stats.new_tokens < 64


def test_a_file_longer_than_the_context_is_fitted_by_the_server(remote: HttpClient, here: LocalClient) -> None:
    lines = "".join(f"value_{i} = {i} * {i}\n" for i in range(400))
    request = Request("infilling", prefix=lines, suffix=lines, fit=True, sampling=GREEDY, id="long")
    there, local = list(remote.stream(request)), list(here.stream(request))
    clipped = [e for e in there if isinstance(e, TextClipped)]
    assert clipped and clipped == [e for e in local if isinstance(e, TextClipped)]
    assert there[-1].text == local[-1].text
    refused = _end(remote, Request("completion", text=lines * 2, sampling=GREEDY))
    assert isinstance(refused, Failed) and "the context holds 1024" in refused.message


def test_a_chat_that_outgrows_the_context_drops_the_same_turns(remote: HttpClient, here: LocalClient) -> None:
    chat = Conversation()
    chat.exchanges += [(f"Question {i}: " + "word " * 60, "Answer: " + "text " * 60) for i in range(8)]
    request = Request(**{**chat.request("Last one?", GREEDY).__dict__, "id": "chat"})
    dropped = [e for e in remote.stream(request) if isinstance(e, TurnsDropped)]
    assert dropped and dropped == [e for e in here.stream(request) if isinstance(e, TurnsDropped)]


def test_cancelling_closes_the_stream_and_the_server_frees_the_slot(server, remote: HttpClient) -> None:
    cancelled = metric(server.url, 'codellama_sequences_finished_total{reason="cancelled"}')
    request = Request(
        "completion", text="def fibonacci(n):\n", sampling=SamplingParams(temperature=0, max_new_tokens=900)
    )
    pieces = 0
    for event in remote.stream(request):
        if isinstance(event, TextDelta):
            pieces += 1
            if pieces == 3:
                remote.cancel(request.id)
        last = event
    assert isinstance(last, Finished) and last.reason == "cancelled"
    deadline = time.monotonic() + 30
    while (
        server.bridge.slots_in_use()
        or metric(server.url, 'codellama_sequences_finished_total{reason="cancelled"}') == cancelled
    ):
        assert time.monotonic() < deadline, "the server did not cancel the request"
        time.sleep(0.05)
    remote.cancel(request.id)  # a finished id is ignored
    assert isinstance(_end(remote, Request("completion", text="x", sampling=GREEDY)), Finished)


def test_for_a_foreign_server_the_client_ends_a_suggestion_at_its_block() -> None:
    request = Request("completion", text="def f():", stop_at_block_end=True)
    pieces = ["\n    return", " 1\n", "def g", "():\n", "    pass"]
    chunks = [json.dumps({"choices": [{"index": 0, "text": p, "finish_reason": None}]}) for p in pieces]
    reader = AnswerReader(request, FOREIGN)
    events = [event for line in _lines(*chunks) for event in reader.feed(line)]
    assert reader.done and "".join(e.text for e in events if isinstance(e, TextDelta)) == "\n    return 1"
    end = reader.end("lost")
    assert isinstance(end, Finished) and (end.reason, end.text) == ("block", "\n    return 1")
    done = json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    events, end = _read(request, FOREIGN, _lines(*chunks[:2], done, "[DONE]"))  # the server ends first
    assert end.text == "\n    return 1\n" and end.reason == "eos"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == end.text  # the held line break too
    events, end = _read(request, OURS, _lines(*chunks, done, "[DONE]"))  # our server ends it itself
    assert end.text == "".join(pieces)


def test_pings_carry_the_round_trip_time(remote: HttpClient) -> None:
    deadline = time.monotonic() + 10
    while not [e for e in remote.events if isinstance(e, Link)]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    link = next(e for e in remote.events if isinstance(e, Link))
    assert link.up and link.server == remote.url and link.rtt_s is not None and link.rtt_s > 0


# ---- against a foreign server


def test_a_foreign_server_completes_and_chats_and_says_it_cannot_infill() -> None:
    with FakeOpenAI() as fake:
        client = HttpClient(fake.url).start()
        try:
            info = client.wait_ready(10)
            assert info == ModelInfo("fake-model", can_infill=False, can_tokenize=False)
            assert "suffix" in fake.bodies[0]  # the one probe
            done = _end(client, Request("completion", text="say hi", sampling=GREEDY))
            assert isinstance(done, Finished) and done.text == "Hello, world!" and done.reason == "eos"
            chat = _end(client, Request("chat", messages=(ChatMessage("user", "hi"),), sampling=GREEDY))
            assert isinstance(chat, Finished) and chat.text == "Hello, world!"
            assert not {"top_k", "fit", "engine_events"} & set(fake.bodies[-1])
            fill = _end(client, Request("infilling", prefix="a", suffix="b"))
            assert isinstance(fill, Failed) and fill.message.startswith("the server cannot infill")
            with pytest.raises(CapabilityError, match="does not tell the prompt's token ids"):
                client.tokenize(Request("completion", text="x"))
        finally:
            client.close()


def test_a_foreign_servers_suggestion_ends_at_its_block_and_the_stream_is_left() -> None:
    with FakeOpenAI(words=("\n    return", " 1\n", "def g():\n", "    pass\n") * 20, pause_s=0.01) as fake:
        client = HttpClient(fake.url).start()
        try:
            client.wait_ready(10)
            done = _end(client, Request("completion", text="def f():", stop_at_block_end=True, sampling=GREEDY))
            assert isinstance(done, Finished) and (done.reason, done.text) == ("block", "\n    return 1")
            assert "stop_at_block_end" not in fake.bodies[-1]
        finally:
            client.close()


def test_a_foreign_server_that_takes_suffix_infills() -> None:
    with FakeOpenAI(("x = 1",), takes_suffix=True) as fake:
        client = HttpClient(fake.url).start()
        try:
            assert client.wait_ready(10).can_infill
            fill = _end(client, Request("infilling", prefix="a", suffix="b"))
            assert isinstance(fill, Finished) and fill.text == "x = 1" and fill.reason == "eot"
            assert (fake.bodies[-1]["prompt"], fake.bodies[-1]["suffix"]) == ("a", "b")
        finally:
            client.close()


def test_characters_json_cannot_carry_are_replaced_and_counted_as_the_engine_does(remote, here) -> None:
    request = Request("completion", text="name = '\udcff\udcfe'\n", sampling=GREEDY, id="bad")
    there, local = list(remote.stream(request)), list(here.stream(request))
    started = [e for e in there if isinstance(e, Started)]
    assert started and started[0].replaced == 2 == next(e for e in local if isinstance(e, Started)).replaced
    assert there[-1].text == local[-1].text


def test_event_lines_split_at_line_feeds_alone() -> None:
    """A JSON string may hold U+2028, U+2029 or U+0085 raw (a foreign server's answer): httpx's `aiter_lines` would
    end the line there and cut the event in two (bench-serve died on random weights' text so, on the H200)."""
    import asyncio

    from engine.http_wire import sse_lines

    async def chunks():
        for piece in ('data: {"t": "a\u2028b\x85', 'c\u2029"}\r\n', "\n", "data: [DO", "NE]"):
            yield piece

    async def lines() -> list[str]:
        return [line async for line in sse_lines(chunks())]

    got = asyncio.run(lines())
    assert got == ['data: {"t": "a\u2028b\x85c\u2029"}', "", "data: [DONE]"]
    assert json.loads(got[0].removeprefix("data: "))["t"] == "a\u2028b\x85c\u2029"
