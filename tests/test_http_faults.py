"""Faults as a user on a flaky link meets them, each through a real socket: the server down at start, the
connection dropped mid-answer, the server killed and restarted, a slow server, a wrong key. A tiny foreign server
(`tests.servers.FakeOpenAI`) plays the slow and dropping ones; a real `codellama-tui serve` the rest."""

from __future__ import annotations

import time

import pytest

from engine.events import Failed, Finished, Link, LoadFailed, Loading, Ready, TextDelta
from engine.http_client import HttpClient
from engine.local_client import LocalClient
from engine.requests import EngineSpec, Request, SamplingParams
from tests.servers import FakeOpenAI, Serve, free_port, serving
from tui import cli

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


def _wait_for(events: list, kind: type, timeout: float = 30, after: int = 0):
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events[after:] if isinstance(e, kind)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {kind.__name__} among {events}"
        time.sleep(0.02)


def test_a_server_down_at_start_is_one_line_for_generate(capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = HttpClient(url, retry=False).start()
    try:
        with pytest.raises(Exception, match="cannot reach .*: nothing listens there"):
            client.wait_ready(10)
    finally:
        client.close()
    assert cli.main(["generate", "--url", url, "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"codellama-tui: error: cannot reach {url}: nothing listens there (connection refused) (--url)"]


def test_a_server_down_at_start_is_waited_for_with_backoff() -> None:
    port = free_port()
    events: list = []
    client = HttpClient(f"http://127.0.0.1:{port}", on_event=events.append).start()
    try:
        tries = _wait_for(events, Loading)
        assert "nothing listens there" in tries.stage and "trying again in 0.5 s" in tries.stage
        with FakeOpenAI(port=port):
            assert client.wait_ready(30).name == FakeOpenAI.MODEL
            assert isinstance(list(client.stream(Request("completion", text="x")))[-1], Finished)
    finally:
        client.close()
    waits = [e.stage.rsplit("in ", 1)[1] for e in events if isinstance(e, Loading)]
    assert waits[:2] == ["0.5 s", "1 s"][: len(waits[:2])]  # each wait twice the last


def test_a_connection_dropped_mid_answer_fails_it_after_the_text_that_came() -> None:
    with FakeOpenAI(drop_after=2) as fake:
        client = HttpClient(fake.url).start()
        try:
            client.wait_ready(10)
            events = list(client.stream(Request("completion", text="x")))
        finally:
            client.close()
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", ","]
    assert isinstance(events[-1], Failed) and "lost the connection" in events[-1].message
    assert "mid-answer" in events[-1].message


def test_a_slow_server_times_out_between_pieces_not_over_the_whole_answer() -> None:
    with FakeOpenAI(pause_s=0.1) as steady:  # six pieces, each well within the timeout, more than it in all
        client = HttpClient(steady.url, read_timeout=0.4).start()
        try:
            client.wait_ready(10)
            assert list(client.stream(Request("completion", text="x")))[-1].text == "Hello, world!"
        finally:
            client.close()
    with FakeOpenAI(pause_s=2) as stalled:
        client = HttpClient(stalled.url, read_timeout=0.4).start()
        try:
            client.wait_ready(10)
            end = list(client.stream(Request("completion", text="x")))[-1]
        finally:
            client.close()
    assert end == Failed(end.request_id, "the server sent nothing for 0.4 s; the request was given up")


def test_a_wrong_key_is_one_line_saying_401(capsys: pytest.CaptureFixture) -> None:
    with FakeOpenAI(key="right") as fake:
        client = HttpClient(fake.url, api_key="wrong").start()
        try:
            with pytest.raises(Exception, match="the server answered 401: Incorrect API key provided"):
                client.wait_ready(10)
        finally:
            client.close()
    with serving(lambda sink: LocalClient(EngineSpec(device="cpu", max_batch=1), on_event=sink), api_key="k") as ours:
        events: list = []
        client = HttpClient(ours.url, api_key="nope", on_event=events.append).start()
        try:
            failed = _wait_for(events, LoadFailed)
        finally:
            client.close()
        assert failed.message == f"{ours.url}: the server answered 401: the API key is wrong"
        assert failed.fields == ("api_key",)
        capsys.readouterr()  # the server's own log
        assert cli.main(["generate", "--url", ours.url, "--api-key", "nope", "--prompt", "x"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"codellama-tui: error: {ours.url}: the server answered 401: the API key is wrong (--api-key)"]
        assert (
            cli.main(["generate", "--url", ours.url, "--api-key", "k", "--prompt", "x", "--max-new-tokens", "2"]) == 0
        )


@pytest.mark.slow
def test_a_server_killed_mid_answer_and_restarted_is_reconnected_to() -> None:
    port = free_port()
    first = Serve("--port", str(port), "--device", "cpu")
    events: list = []
    client = HttpClient(f"http://127.0.0.1:{port}", on_event=events.append, ping_s=0.2)
    second = None
    try:
        first.ready()
        client.start().wait_ready(30)
        long = Request(
            "completion", text="def fibonacci(n):\n", sampling=SamplingParams(temperature=0, max_new_tokens=900)
        )
        answer: list[TextDelta] = []
        for event in client.stream(long):
            if isinstance(event, TextDelta):
                answer.append(event)
                if len(answer) == 3:
                    first.proc.kill()
            last = event
        assert len(answer) >= 3
        assert isinstance(last, Failed) and "lost the connection" in last.message
        down = len(events)
        assert not _wait_for(events, Link, after=down).up
        refused = list(client.stream(Request("completion", text="x", sampling=GREEDY)))
        assert len(refused) == 1 and "cannot reach" in refused[0].message
        second = Serve("--port", str(port), "--device", "cpu")
        second.ready()
        deadline = time.monotonic() + 30
        while not (links := [e for e in events[down:] if isinstance(e, Link)]) or not links[-1].up:
            assert time.monotonic() < deadline, events[down:]
            time.sleep(0.05)
        assert not [e for e in events[down:] if isinstance(e, Ready)]  # the same model: nothing new to say
        after = list(client.stream(Request("completion", text="def fibonacci(n):\n", sampling=GREEDY)))[-1]
        assert isinstance(after, Finished) and after.text.startswith("".join(e.text for e in answer))
    finally:
        client.close()
        first.stop()
        if second is not None:
            second.stop()
