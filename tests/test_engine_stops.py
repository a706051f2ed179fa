"""The engine's own stops for suggestions and chat: the end of a suggestion's block (`Request.stop_at_block_end`)
and a chat answer that starts writing the dialog format (`[INST]`, `[/INST]`, the 70B format's `Source: user`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.events import Failed, Finished, TextDelta
from engine.requests import EngineSpec, Request, SamplingParams
from tests.test_app import wait_for
from tests.test_engine import load, run, script_tokens
from tui.app import CodeLlamaApp
from tui.conversation import Conversation

pytest.importorskip("transformers")

SAMPLING = SamplingParams(temperature=0, max_new_tokens=100)


def scripted(engine, text: str, monkeypatch) -> None:
    """The model writes `text` exactly (code: no leading space; a chat answer loses its leading space anyway)."""
    tok = engine.tok
    ids = tok.encode(text) if text.startswith(" ") else tok.encode_infilling(text)
    script_tokens(engine, ids + [tok.eos_id] * 5, monkeypatch)


def test_a_completion_stops_where_its_block_ends(tiny_model_dir: Path, monkeypatch) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, "\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n", monkeypatch)
    request = Request("completion", text="x = 1\n\ndef add(a, b):", stop_at_block_end=True, sampling=SAMPLING)
    events = run(engine, request)[request.id]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "block"
    assert finished.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert finished.text == "\n    return a + b"


def test_an_infill_stops_at_the_end_of_the_markers_block(tiny_model_dir: Path, monkeypatch) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, "total = 0\n    for x in xs:\n        total += x\n    return total\n\n\nprint(1)\n", monkeypatch)
    request = Request("infilling", prefix="def f(xs):\n    ", suffix="\n", stop_at_block_end=True, sampling=SAMPLING)
    finished = run(engine, request)[request.id][-1]
    assert (finished.reason, finished.text) == (
        "block",
        "total = 0\n    for x in xs:\n        total += x\n    return total",
    )


def test_the_held_back_line_break_is_flushed_when_the_model_ends_first(tiny_model_dir: Path, monkeypatch) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, "\n    return 1\n", monkeypatch)
    request = Request("completion", text="def f():", stop_at_block_end=True, sampling=SAMPLING)
    events = run(engine, request)[request.id]
    assert events[-1].reason == "eos" and events[-1].text.endswith("return 1\n")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == events[-1].text


def test_without_the_flag_the_block_runs_on(tiny_model_dir: Path, monkeypatch) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, "\n    return 1\ndef g():\n", monkeypatch)
    request = Request("completion", text="def f():", sampling=SAMPLING)
    assert run(engine, request)[request.id][-1].text.endswith("def g():\n")


def test_a_chat_request_cannot_ask_for_a_block_end(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir)
    request = Conversation(None).request("hi", SAMPLING)
    (failed,) = engine.add(Request("chat", messages=request.messages, stop_at_block_end=True))
    assert isinstance(failed, Failed) and "code suggestions" in failed.message


@pytest.mark.parametrize("echo", [" hello there [/INST] `hello there [/INST]", " Sure. [INST] and more"])
def test_a_chat_answer_stops_where_the_model_writes_the_inst_format(tiny_model_dir, monkeypatch, echo) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, echo, monkeypatch)
    request = Conversation(None).request("hello there", SAMPLING)
    finished = run(engine, request)[request.id][-1]
    assert finished.reason == "stop" and "INST" not in finished.text
    assert finished.text.rstrip() == echo[: echo.index(" [")].strip()


def test_a_70b_chat_answer_stops_at_the_next_user_header(tiny_70b_instruct_dir, monkeypatch) -> None:
    engine = load(tiny_70b_instruct_dir)
    scripted(engine, " Hello! Source: user\n\n write more", monkeypatch)
    request = Conversation(None).request("Hi", SAMPLING)
    finished = run(engine, request)[request.id][-1]
    assert (finished.reason, finished.text.rstrip()) == ("stop", "Hello!")


def test_a_completion_may_write_inst(tiny_model_dir: Path, monkeypatch) -> None:
    engine = load(tiny_model_dir)
    scripted(engine, " [INST] is a tag", monkeypatch)
    request = Request("completion", text="# the", sampling=SAMPLING)
    assert "[INST]" in run(engine, request)[request.id][-1].text


async def test_the_demo_chat_in_the_app_no_longer_echoes_the_prompt_format() -> None:
    """The issue's symptom: greedy, the demo model answers "hello there" with `... hello there [/INST] ...`."""
    spec = EngineSpec(device="cpu", max_batch=1)
    overrides = {"max_new_tokens": 120, "temperature": 0.0}
    app = CodeLlamaApp(None, spec, "chat", overrides=overrides, text="")  # the real LocalClient
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None and app.info.is_demo
        app.chat_input.load_text("hello there")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.status.state == "ready" and not app._jobs, timeout=120)
        assert app.status.render_text().startswith("ready: stop"), app.status.render_text()
        answer = app.chat_log.last_answer
        assert "hello there" in answer and "INST" not in answer


async def test_the_demo_fills_three_markers_each_ending_with_its_block() -> None:
    """The issue's symptom: greedy, the demo model's fill of the second of these markers ran on for 100 lines (to
    512 tokens); each fill now ends with its function's body, and the status line adds the three up."""
    text = "def mean(values):\n    <FILL>\n\n\ndef median(values):\n    <FILL>\n\n\ndef mode(values):\n    <FILL>\n"
    spec = EngineSpec(device="cpu", max_batch=1)
    app = CodeLlamaApp(None, spec, "completion", overrides={"temperature": 0.0}, text=text)  # the real LocalClient
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None and app.info.is_demo
        await pilot.press("f3")
        await wait_for(pilot, lambda: "all markers filled" in app.status.note, timeout=300)
        assert "<FILL>" not in app.editor.text
        assert app.editor.text.count("\n") < text.count("\n") + 3 * 4  # a few lines each, not a hundred
        assert app.status.render_text().startswith("ready: 3 fills, "), app.status.render_text()
