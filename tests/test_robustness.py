"""Bad input and faults inside the engine: one-line errors, never a dead worker thread or a hung stream."""

from __future__ import annotations

import math

import pytest

from engine.engine import Engine
from engine.events import Failed, Finished, Started
from engine.local_client import LocalClient
from engine.requests import ChatMessage, EngineSpec, Request, SamplingParams, clean_text

SHORT = SamplingParams(temperature=0, max_new_tokens=4)
DEMO = EngineSpec(device="cpu", max_batch=2)


def test_clean_text_replaces_lone_surrogates_and_counts_them() -> None:
    escaped = b"a\xffb\xc3(".decode("utf-8", errors="surrogateescape")  # how stdin's invalid bytes arrive
    assert clean_text(escaped) == ("a\ufffdb\ufffd(", 2)
    assert clean_text("x\ud800y\udfff") == ("x\ufffdy\ufffd", 2)
    assert clean_text("ok ✓ \ufffd 😀") == ("ok ✓ \ufffd 😀", 0)
    request, replaced = Request("infilling", prefix="a\udcff", suffix="b").cleaned()
    assert (request.prefix, request.suffix, replaced) == ("a\ufffd", "b", 1)
    chat = (ChatMessage("system", "\ud800"), ChatMessage("user", "hi \udcff\udcfe"))
    request, replaced = Request("chat", messages=chat).cleaned()
    assert replaced == 3
    assert request.messages == (ChatMessage("system", "\ufffd"), ChatMessage("user", "hi \ufffd\ufffd"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", math.nan),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", math.inf),
        ("seed", 2**70),
        ("seed", -(2**63) - 1),
        ("top_k", 2**40),
    ],
)
def test_sampling_check_refuses_non_finite_and_out_of_range_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field.replace("_", ".")):
        SamplingParams(**{field: value}).check()


def test_sampling_check_accepts_the_int64_seed_range() -> None:
    SamplingParams(seed=2**63 - 1).check()
    SamplingParams(seed=-(2**63)).check()


@pytest.fixture(scope="module")
def client():
    client = LocalClient(DEMO).start()
    client.wait_ready(timeout=120)
    yield client
    client.close()


@pytest.mark.timeout(120)  # a hang guard: these once waited forever
def test_the_engine_reports_replaced_characters_on_started(client: LocalClient) -> None:
    events = list(client.stream(Request("completion", text="def f(\udcff\ud800", sampling=SHORT)))
    started = next(e for e in events if isinstance(e, Started))
    assert started.replaced == 2 and isinstance(events[-1], Finished)


@pytest.mark.timeout(120)  # a hang guard: these once waited forever
def test_an_unexpected_fault_of_one_request_fails_it_and_the_worker_goes_on(monkeypatch) -> None:
    real_add = Engine.add

    def add(self: Engine, request: Request) -> list:
        if request.text == "boom":
            raise RuntimeError("tokenizer exploded\nsecond line")
        return real_add(self, request)

    monkeypatch.setattr(Engine, "add", add)
    client = LocalClient(DEMO).start()
    try:
        client.wait_ready(timeout=120)
        events = list(client.stream(Request("completion", text="boom", sampling=SHORT)))
        assert events == [Failed(events[0].request_id, "the request failed: RuntimeError: tokenizer exploded")]
        assert isinstance(list(client.stream(Request("completion", text="def f(", sampling=SHORT)))[-1], Finished)
    finally:
        client.close()


@pytest.mark.timeout(120)  # a hang guard: these once waited forever
def test_a_fault_of_the_worker_loop_fails_every_open_request_and_refuses_new_ones(monkeypatch) -> None:
    def broken_cancel(self: Engine, request_id: str) -> list:
        raise KeyError("slot table")

    monkeypatch.setattr(Engine, "cancel", broken_cancel)
    client = LocalClient(DEMO).start()
    try:
        client.wait_ready(timeout=120)
        long = Request("completion", text="def f(", sampling=SamplingParams(temperature=0, max_new_tokens=900))
        events = []
        for event in client.stream(long):
            events.append(event)
            if isinstance(event, Started):
                client.cancel(long.id)
        message = "the engine stopped: KeyError: 'slot table'"
        assert events[-1] == Failed(long.id, message)
        assert list(client.stream(Request("completion", text="x", sampling=SHORT)))[-1].message == message
    finally:
        client.close()
    assert list(client.stream(Request("completion", text="x", sampling=SHORT)))[-1].message == message


@pytest.mark.timeout(120)  # a hang guard: these once waited forever
def test_a_stream_after_close_ends_instead_of_waiting() -> None:
    client = LocalClient(DEMO).start()
    client.wait_ready(timeout=120)
    client.close()
    (event,) = client.stream(Request("completion", text="x", sampling=SHORT))
    assert isinstance(event, Failed) and event.message == "the engine was closed"
