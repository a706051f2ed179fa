"""The client contract's rules (`engine.client`), through the fake (its base class is the real one) and through
the in-process engine client on a tiny checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.client import ForceQuit
from engine.errors import CapabilityError, EngineError, PromptError
from engine.events import Failed, Finished, LoadFailed, Ready, Started, TextDelta
from engine.local_client import LocalClient
from engine.prompts import build_prompt
from engine.requests import ChatMessage, EngineSpec, Request, SamplingParams
from tests.fakes import INFO, FakeClient


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_events_reach_the_stream_and_on_event_in_order() -> None:
    seen = []
    client = FakeClient(on_event=seen.append, answers={"completion": "abcdef"}, chunk=2).start()
    try:
        assert client.wait_ready(5) == INFO
        request = Request("completion", text="x", id="caller-chosen-id")
        events = list(client.stream(request))
        assert [type(e) for e in events] == [Started, TextDelta, TextDelta, TextDelta, Finished]
        assert all(e.request_id == "caller-chosen-id" for e in events)
        assert events[-1].text == "abcdef" and events[-1].reason == "eos"
        wait_until(lambda: seen and isinstance(seen[-1], Finished))
        assert isinstance(seen[3], Ready) and seen[4:] == events  # the loading events came first
    finally:
        client.close()


def test_request_ids_are_opaque_and_fresh() -> None:
    a, b = Request("completion"), Request("completion")
    assert isinstance(a.id, str) and a.id != b.id


def test_ctrl_c_after_the_engine_finished_still_stops_the_output() -> None:
    """The engine may run ahead of the printing: text it made before the cancel arrived is not shown, and the
    stream ends "cancelled" with the text that was shown, even when the request had already finished."""
    delivered = []
    client = FakeClient(on_event=delivered.append, answers={"completion": "abcdef"}, chunk=1, delay=0).start()
    before = signal.getsignal(signal.SIGINT)
    try:
        events = []
        for event in client.stream(Request("completion", text="x")):
            events.append(event)
            if isinstance(event, TextDelta):
                wait_until(lambda: any(isinstance(e, Finished) for e in delivered))
                os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the stream's handler takes it
        started, delta, finished = events
        assert delta.text == "a" and (finished.reason, finished.text) == ("cancelled", "a")
        assert client.cancelled == [started.request_id]  # a cancel of a finished request is harmless
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        client.close()


def test_a_second_ctrl_c_raises_force_quit() -> None:
    """The second press comes while the stream waits for an engine that does not stop."""
    client = FakeClient(hold=True, ignore_cancel=True).start()

    def press_again() -> None:
        assert client.cancel_seen.wait(5)  # the first press reached the stream, which cancelled
        os.kill(os.getpid(), signal.SIGINT)

    try:
        with pytest.raises(ForceQuit):
            for event in client.stream(Request("completion", text="x")):
                if isinstance(event, TextDelta):
                    threading.Thread(target=press_again).start()
                    os.kill(os.getpid(), signal.SIGINT)
    finally:
        client.close()


def test_a_process_that_ignores_sigint_keeps_ignoring_it() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = FakeClient(answers={"completion": "abc"}, chunk=1).start()
    try:
        events = []
        for event in client.stream(Request("completion", text="x")):
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            events.append(event)
        assert events[-1].reason == "eos" and client.cancelled == []
    finally:
        signal.signal(signal.SIGINT, previous)
        client.close()


def test_streams_off_the_main_thread_install_no_handler() -> None:
    client = FakeClient(answers={"completion": "abc"}).start()
    before, results = signal.getsignal(signal.SIGINT), []

    def consume() -> None:
        results.append(list(client.stream(Request("completion", text="x")))[-1])

    try:
        worker = threading.Thread(target=consume)
        worker.start()
        worker.join(5)
        assert results[0].text == "abc" and signal.getsignal(signal.SIGINT) is before
    finally:
        client.close()


def test_cancel_of_an_unknown_id_is_ignored_and_a_held_request_ends_cancelled() -> None:
    client = FakeClient(hold=True).start()
    try:
        client.cancel("no-such-request")
        request = Request("completion", text="x")
        events = []
        for event in client.stream(request):
            events.append(event)
            if isinstance(event, TextDelta):
                client.cancel(request.id)
                client.cancel(request.id)
        assert events[-1].reason == "cancelled" and events[-1].text == events[1].text
    finally:
        client.close()


def test_load_failure_fails_wait_ready_and_every_request() -> None:
    client = FakeClient(load_error="no config.json in /x").start()
    try:
        with pytest.raises(EngineError, match="no config.json in /x"):
            client.wait_ready(5)
        assert client.load_error == "no config.json in /x" and client.info is None
        (failed,) = client.stream(Request("completion", text="x"))
        assert isinstance(failed, Failed) and failed.message == "no config.json in /x"
    finally:
        client.close()


def test_tokenize_needs_the_capability() -> None:
    from dataclasses import replace

    client = FakeClient(info=replace(INFO, can_tokenize=False)).start()
    try:
        with pytest.raises(CapabilityError, match="does not tell"):
            client.tokenize(Request("completion", text="x"))
    finally:
        client.close()


def test_local_client_serves_and_tokenizes_like_the_engine(tiny_model_dir: Path) -> None:
    from engine.tokenizer import Tokenizer

    events = []
    client = LocalClient(EngineSpec(model=str(tiny_model_dir), device="cpu", max_batch=2), on_event=events.append)
    client.start()
    try:
        info = client.wait_ready(120)
        assert info.can_tokenize and info.context and isinstance(events[-1], Ready)
        chat = Request("chat", messages=(ChatMessage("system", "Be brief"), ChatMessage("user", "Hi")))
        assert client.tokenize(chat) == build_prompt(Tokenizer.from_dir(tiny_model_dir), chat)
        with pytest.raises(PromptError, match="must end with a user message"):
            client.tokenize(Request("chat", messages=(ChatMessage("system", "Be brief"),)))
        sampling = SamplingParams(temperature=0, max_new_tokens=4)
        done = list(client.stream(Request("completion", text="def f(", sampling=sampling)))[-1]
        assert isinstance(done, Finished) and done.stats.new_tokens == 4
    finally:
        client.close()
    assert not any(isinstance(e, LoadFailed) for e in events)


def test_a_transport_that_stops_leaves_no_request_waiting() -> None:
    """What an HTTP client does when its connection is lost: the open requests fail with the reason, later ones at
    once (on the caller's thread: nothing is left to deliver them)."""
    seen = []
    client = FakeClient(on_event=seen.append, hold=True).start()
    try:
        client.wait_ready(5)
        held = Request("completion", text="x")
        client.submit(held)
        wait_until(lambda: any(isinstance(e, TextDelta) for e in seen))
        client.stopped("the connection to the server was lost")
        assert seen[-1] == Failed(held.id, "the connection to the server was lost")
        (late,) = client.stream(Request("completion", text="y"))
        assert isinstance(late, Failed) and late.message == "the connection to the server was lost"
        client.release.set()  # the script goes on to finish the held request: none of that goes out any more
        client.close()  # joins the fake's thread
        held_events = [e for e in seen if getattr(e, "request_id", None) == held.id]
        assert held_events[-1] == Failed(held.id, "the connection to the server was lost")
    finally:
        client.close()
