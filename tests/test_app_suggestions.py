"""Pilot tests of suggestions in the app: F2's block stop and budget, accepting a word or a line, suggestions as
you type (debounced, cancelled by the next key, never in the way of typing), and F3's fills added up."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from engine.events import ModelInfo
from engine.requests import EngineSpec
from tests.fakes import INFO, FakeClient
from tests.test_app import idle, ready, wait_for
from tui.app import CodeLlamaApp
from tui.config import ConfigError, load_config
from tui.suggestions import SuggestSettings
from widgets.editor import CodeEditor

SOURCE = "def add(a, b):\n    \n\nprint(add(1, 2))\n"
ANSWER = "total = a + b\n    return total"
CUDA = replace(INFO, device="cuda:0")


def make_app(text: str = SOURCE, suggest: SuggestSettings | None = None, **fake: object) -> CodeLlamaApp:
    fake = {"answers": {"completion": ANSWER}, **fake}
    return CodeLlamaApp(
        None, EngineSpec(), "completion", text=text, suggest=suggest,
        client_factory=functools.partial(FakeClient, **fake),
    )  # fmt: skip


async def test_f2_asks_for_a_suggestion_that_stops_at_its_block_end_within_64_tokens() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 4))
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        request = app.client.submitted[-1]
        assert request.stop_at_block_end and request.sampling.max_new_tokens == 64
        assert request.text == "def add(a, b):\n    " and app.editor.ghost == ANSWER
    app = make_app(suggest=SuggestSettings(max_tokens=20))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        assert app.client.submitted[-1].sampling.max_new_tokens == 20


async def test_ctrl_right_takes_a_word_and_ctrl_down_a_line_and_the_rest_stays() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 4))
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        await pilot.press("ctrl+right")
        assert app.editor.document.get_line(1) == "    total" and app.editor.ghost == " = a + b\n    return total"
        await pilot.press("ctrl+right")
        assert app.editor.document.get_line(1) == "    total =" and app.editor.ghost == " a + b\n    return total"
        await pilot.press("ctrl+down")
        assert app.editor.document.get_line(1) == "    total = a + b" and app.editor.ghost == "\n    return total"
        assert app.editor.cursor_location == (1, 17) and app.client.cancelled == []
        await pilot.press("ctrl+down")  # at a line break: the next line
        assert app.editor.text == SOURCE.replace("    \n", "    total = a + b\n    return total\n", 1)
        assert app.editor.ghost == "" and app.editor.cursor_location == (2, 16)
        for line in ("    total = a + b", "    total =", "    total", "    "):  # each accept is one undo step
            app.editor.undo()
            assert app.editor.document.get_line(1) == line
        app.editor.move_cursor((0, 0))
        await pilot.press("ctrl+right")  # without a ghost, ctrl+right moves by word as usual
        assert app.editor.text == SOURCE and app.editor.cursor_location == (0, 3)


async def test_after_a_partial_accept_the_rest_goes_on_streaming_into_the_ghost() -> None:
    app = make_app(hold=True)
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 4))
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.editor.ghost == ANSWER[:3])
        await pilot.press("ctrl+right")
        assert app.editor.document.get_line(1) == "    tot" and app.editor.ghost == ""
        assert app.editor.ghost_active and app._jobs  # still live
        app.client.release.set()
        await wait_for(pilot, idle(app))
        assert app.editor.ghost == ANSWER[3:] and app.client.cancelled == []
        await pilot.press("tab")
        assert app.editor.document.get_line(1) == "    total = a + b"


async def test_a_fast_burst_of_keys_is_typed_exactly_and_the_suggestion_comes_after_the_pause() -> None:
    app = make_app("", suggest=SuggestSettings(mode="auto", delay_s=1.0))
    typed = "def add(a, b):"
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press(*typed)
        assert app.editor.text == typed  # nothing waits on the engine while the keys come
        assert app.client.submitted == []  # no suggestion while typing
        await wait_for(pilot, lambda: app.editor.ghost == ANSWER)
        (request,) = app.client.submitted
        assert request.text == typed and request.stop_at_block_end
        assert app.editor.text == typed  # the ghost is not in the text


async def test_the_next_key_cancels_a_suggestion_as_you_type_and_is_typed() -> None:
    app = make_app("", suggest=SuggestSettings(mode="auto", delay_s=1.0), hold=True)
    typed: list[tuple[CodeEditor.Typed, str, str]] = []  # each key's edit as it is reported: before the next pause

    def seen(message: object) -> None:
        if isinstance(message, CodeEditor.Typed) and all(message is not known for known, _, _ in typed):
            typed.append((message, app.editor.text, app.editor.ghost))

    async with app.run_test(message_hook=seen) as pilot:
        await ready(pilot)
        await pilot.press("x")
        await wait_for(pilot, lambda: app.editor.ghost)
        first = app.client.submitted[-1]
        await pilot.press("y")
        await wait_for(pilot, lambda: len(typed) == 2)
        assert typed[1][1:] == ("xy", "")  # a loaded machine may already show the next pause's ghost: not this one's
        await wait_for(pilot, lambda: first.id in app.client.cancelled)
        await wait_for(pilot, lambda: len(app.client.submitted) == 2)  # the next pause asks again, from "xy"
        assert app.client.submitted[-1].text == "xy"
        app.client.release.set()


@pytest.mark.parametrize(("info", "mode", "asks"), [(INFO, None, False), (CUDA, None, True), (CUDA, "off", False)])
async def test_as_you_type_is_off_on_the_cpu_and_on_with_cuda_unless_the_config_says(info, mode, asks) -> None:
    app = make_app("", suggest=SuggestSettings(mode=mode, delay_s=0.05), info=info)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("a")
        if asks:
            await wait_for(pilot, lambda: app.client.submitted)  # however late a loaded machine runs the timer
        else:
            await pilot.pause(0.3)  # six pauses: one would have asked by now
        assert bool(app.client.submitted) is asks


def test_the_cuda_default_also_holds_for_a_server() -> None:
    settings = SuggestSettings()
    assert settings.as_you_type(ModelInfo("m", can_infill=True, device="cuda:1"))
    assert not settings.as_you_type(ModelInfo("m", can_infill=True))  # a foreign server does not say
    assert not settings.as_you_type(None)


async def test_f3_stops_every_fill_at_its_block_and_the_status_adds_them_up() -> None:
    text = "def a():\n    <FILL>\n\ndef b():\n    <FILL>\n\ndef c():\n    <FILL>\n"
    app = make_app(text, answers={"infilling": ["return 1", "return 22", "return 333"]})
    async with app.run_test(size=(160, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_for(pilot, lambda: len(app.client.submitted) == 3 and not app._jobs)
        assert all(r.stop_at_block_end for r in app.client.submitted)
        assert app.editor.text == text.replace("<FILL>", "return 1", 1).replace("<FILL>", "return 22", 1).replace(
            "<FILL>", "return 333"
        )
        tokens = sum(max(1, len(answer) // 3) for answer in ("return 1", "return 22", "return 333"))  # the fake's
        seconds = sum(0.05 + 0.02 * max(1, len(answer) // 3) for answer in ("return 1", "return 22", "return 333"))
        status = app.status.render_text()
        assert f"ready: 3 fills, {tokens} tokens in {seconds:.1f}s" in status and "all markers filled" in status


def test_the_config_sets_suggestions(tmp_path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('suggest = "auto"\nsuggest_max_tokens = 32\nsuggest_delay_ms = 150\n')
    assert load_config(path).suggest == SuggestSettings(mode="auto", max_tokens=32, delay_s=0.15)
    assert load_config(tmp_path / "none.toml").suggest == SuggestSettings()
    for bad, message in [
        ('suggest = "always"', "suggest must be one of: auto, off"),
        ("suggest_max_tokens = 0", "suggest_max_tokens must be a whole number from 1 to 4096"),
        ("suggest_delay_ms = 1.5", "suggest_delay_ms must be a whole number"),
    ]:
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
