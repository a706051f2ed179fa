"""Pilot tests of the full-screen app's actions, against the fake engine client."""

from __future__ import annotations

import errno
import functools
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from textual import events
from textual.notifications import Notify
from textual.pilot import Pilot

from engine.requests import ChatMessage, EngineSpec
from tests.fakes import INFO, FakeClient
from tui.app import CodeLlamaApp
from tui.screens import PromptScreen, QuitScreen
from widgets.chat_log import Notice
from widgets.editor import CodeEditor

SOURCE = "def add(a, b):\n    <FILL>\n\nprint(add(1, 2))\n"


def make_app(text: str = SOURCE, path: str | None = None, **fake: object) -> CodeLlamaApp:
    return CodeLlamaApp(
        path, EngineSpec(), "completion", text=text, client_factory=functools.partial(FakeClient, **fake)
    )


async def wait_for(pilot: Pilot, predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)


async def ready(pilot: Pilot) -> CodeLlamaApp:
    app = pilot.app
    await wait_for(pilot, lambda: app.info is not None or app.load_error is not None)
    return app


def idle(app: CodeLlamaApp) -> Callable[[], bool]:
    return lambda: bool(app.client and app.client.submitted) and not app._jobs


async def type_like_a_person(pilot: Pilot, *keys: str) -> None:
    """Keys spaced like typing, so that the chat input does not take them for a paste burst."""
    for key in keys:
        await pilot.press(key)
        await pilot.pause(0.02)


def test_import_and_first_frame_without_torch() -> None:
    """`import tui.app` must not import torch (the first frame must not wait for it). The time to the first
    frame is printed, not asserted: speed targets belong to benchmarks, not to tests on a loaded machine."""
    script = """
import sys, time, asyncio
t0 = time.perf_counter()
import tui, tui.app
assert 'torch' not in sys.modules, 'import tui.app imported torch'
from tests.fakes import FakeClient
painted = []
class Timed(tui.app.CodeLlamaApp):
    def on_mount(self):  # runs after CodeLlamaApp.on_mount (Textual calls each class's handler)
        self.call_after_refresh(lambda: painted.append(time.perf_counter() - t0))
async def main():
    app = Timed(None, text='x = 1\\n', client_factory=FakeClient)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        print('first-frame', painted[0], 'torch' in sys.modules)
asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr
    _, seconds, torch_loaded = out.stdout.split()[-3:]
    assert torch_loaded == "False"
    print(f"first frame after {float(seconds):.2f} s")


async def test_complete_then_accept_is_one_undo_step() -> None:
    app = make_app(answers={"completion": "return a + b\n    # done"})
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 4))
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        request = app.client.submitted[-1]
        assert request.cap == "completion" and request.text == "def add(a, b):\n    "
        assert app.editor.ghost == "return a + b\n    # done"
        assert app.editor.text == SOURCE  # a ghost is not in the document
        assert app.query_one("#ghost-lines").has_class("-visible")  # its second line is drawn below
        await pilot.press("tab")
        assert app.editor.text == SOURCE.replace("<FILL>", "return a + b\n    # done<FILL>")
        assert app.editor.ghost == ""
        app.editor.undo()
        assert app.editor.text == SOURCE


async def test_complete_then_dismiss_with_escape() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        assert app.editor.ghost
        await pilot.press("escape")
        assert app.editor.ghost == "" and not app.editor.ghost_active
        await pilot.press("tab")  # with no ghost, tab indents as usual
        assert app.editor.text == "    " + SOURCE


async def test_the_editors_and_the_chats_requests_speculate_and_the_status_line_shows_tokens_per_step() -> None:
    """F2, F3 and the chat pane's answers (which F7 inserts) are grounded in the file: they ask for speculation;
    a finished request that speculated shows its tokens per decode step."""
    app = make_app(speculation=True, answers={"completion": "return a + b  # and a long enough answer"})
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        assert app.client.submitted[-1].speculate and "tok/step" in app.status.render_text()
        await pilot.press("escape", "f3")
        await wait_for(pilot, lambda: len(app.client.submitted) == 2 and not app._jobs)
        app.chat_input.load_text("rename add to plus")
        await pilot.press("f5")
        await wait_for(pilot, lambda: len(app.client.submitted) == 3 and not app._jobs)
        assert [r.cap for r in app.client.submitted] == ["completion", "infilling", "completion"]
        assert all(r.speculate for r in app.client.submitted)


async def test_infill_one_marker_streams_into_place_as_one_undo_step() -> None:
    app = make_app(answers={"infilling": "return a + b"})
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_for(pilot, idle(app))
        request = app.client.submitted[-1]
        assert (request.cap, request.prefix, request.suffix) == (
            "infilling",
            "def add(a, b):\n    ",
            "\n\nprint(add(1, 2))\n",
        )
        assert request.sampling.stop == ("\nprint(add(1, 2))",)  # a fill stops before repeating the next line
        assert app.editor.text == SOURCE.replace("<FILL>", "return a + b")
        app.editor.undo()
        assert app.editor.text == SOURCE


async def test_infill_two_markers_left_to_right() -> None:
    text = "x = <FILL>\ny = <FILL>\n"
    app = make_app(text, answers={"infilling": ["1", "2"]})
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_for(pilot, lambda: len(app.client.submitted) == 2 and not app._jobs)
        first, second = app.client.submitted
        assert (first.prefix, first.suffix) == ("x = ", "\ny = \n")  # later markers are not shown to the model
        assert (second.prefix, second.suffix) == ("x = 1\ny = ", "\n")
        assert app.editor.text == "x = 1\ny = 2\n"


async def test_infill_at_cursor_without_markers() -> None:
    app = make_app("def f():\n    return\n", answers={"infilling": " 42"})
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 10))
        await pilot.press("f3")
        await wait_for(pilot, idle(app))
        request = app.client.submitted[-1]
        assert (request.prefix, request.suffix) == ("def f():\n    return", "\n")
        assert app.editor.text == "def f():\n    return 42\n"


async def test_a_foreign_server_that_tells_little_still_shows_a_clean_status_line() -> None:
    """ModelInfo's optional fields (an OpenAI-compatible server knows neither device nor context) stay out of the
    line rather than showing as None; chat still works."""
    from engine.events import ModelInfo

    app = make_app(info=ModelInfo(name="gpt-like", can_infill=False, can_tokenize=False))
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        line = app.status.render_text()
        assert "gpt-like" in line and "None" not in line and "ctx" not in line
        app.chat_input.load_text("hi")
        await pilot.press("f5")
        await wait_for(pilot, idle(app))
        assert "def add" in app.chat_log.last_answer and "None" not in app.status.render_text()


async def test_infill_on_a_model_without_fim_offers_completion() -> None:
    app = make_app(info=INFO.__class__(**{**INFO.__dict__, "can_infill": False, "flavour": "python"}))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f3")
        line = app.status.render_text()
        assert "cannot infill" in line and "F2" in line
        assert app.client.submitted == []
        await pilot.press("f2")  # -Python models complete with the python cap
        await wait_for(pilot, idle(app))
        assert app.client.submitted[-1].cap == "python"


async def test_typing_during_infill_cancels_it_and_is_not_mixed_in() -> None:
    app = make_app(answers={"infilling": "abcdefghijkl"}, hold=True)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_for(pilot, lambda: "abc" in app.editor.text)
        request_id = app.client.submitted[-1].id
        app.editor.move_cursor((0, 0))
        await pilot.press("z")
        assert request_id in app.client.cancelled
        app.client.release.set()
        await pilot.pause(0.2)
        assert app.editor.text == "z" + SOURCE.replace("<FILL>", "abc")  # nothing arrived after the key
        app.editor.undo()  # the key
        app.editor.undo()  # the partial infill, in one step
        assert app.editor.text == SOURCE


async def test_escape_stops_a_chat_answer() -> None:
    app = make_app(hold=True)
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.focus()
        app.chat_input.load_text("hi")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.chat_log.last_answer)
        request_id = app.client.submitted[-1].id
        await pilot.press("escape")
        assert request_id in app.client.cancelled
        assert not app._jobs
        assert any("stopped" in str(n.render()) for n in app.query(Notice))
        app.client.release.set()
        await pilot.pause(0.2)
        assert app.chat_log.last_answer == "Her"  # text after the cancel never shows


async def test_chat_send_with_bang_line() -> None:
    app = make_app()
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f4")
        assert app.chat_input.has_focus
        await type_like_a_person(pilot, "h", "i", "enter", "!", "!", "enter")
        await wait_for(pilot, idle(app))
        request = app.client.submitted[-1]
        assert (request.cap, request.messages, request.fit) == ("chat", (ChatMessage("user", "hi"),), True)
        assert app.chat_input.text == ""
        assert "def add" in app.chat_log.last_answer
        # F7 puts the answer's last code block in place of the function it defines (y confirms), as one undo step
        await pilot.press("f7", "y")
        assert app.editor.text == SOURCE.replace("<FILL>", "return a + b")
        app.editor.undo()
        assert app.editor.text == SOURCE


async def test_chat_sends_the_whole_conversation_and_a_new_chat_forgets_it() -> None:
    app = make_app()
    app.cap = "chat"
    app.system = app.conversation.system = "Answer in Python"
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.focus()
        for text in ("first", "second\nline"):
            app.chat_input.load_text(text)
            await pilot.press("f5")
            await wait_for(
                pilot, lambda n=text: app.client.submitted and app.client.submitted[-1].messages[-1].content == n
            )
            await wait_for(pilot, idle(app))
        await pilot.press("ctrl+n")
        app.chat_input.load_text("third")
        await pilot.press("f5")
        await wait_for(pilot, lambda: len(app.client.submitted) == 3 and not app._jobs)
        first, second, third = app.client.submitted
        system, answer = ChatMessage("system", "Answer in Python"), ChatMessage("assistant", app.client.answers["chat"])
        assert first.messages == (system, ChatMessage("user", "first"))
        assert second.messages == (system, ChatMessage("user", "first"), answer, ChatMessage("user", "second\nline"))
        assert third.messages == (system, ChatMessage("user", "third"))


async def test_paste_without_bracketed_paste_is_not_sent() -> None:
    """A burst of keys (a paste over a link without bracketed paste) holding a `!!` line never sends."""
    app = make_app()
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.focus()
        await pilot.pause()
        pasted = "a = 1\n\n!!\nb = 2\n"
        keys = [events.Key("enter", "\r") if c == "\n" else events.Key("exclamation_mark" if c == "!" else c, c)
                for c in pasted]  # fmt: skip
        keys = [events.Key("space", " ") if k.character == " " else k for k in keys]
        for key in keys:  # all at once, as a terminal delivers a pasted block
            app.post_message(key)
        await wait_for(pilot, lambda: app.chat_input.text == pasted)  # sent at the "!!", it would be gone
        assert app.client.submitted == []
        await pilot.press("f5")
        await wait_for(pilot, idle(app))
        assert app.client.submitted[-1].messages[-1].content == pasted.strip("\n")


async def test_bracketed_paste_is_not_sent() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        app.chat_input.focus()
        app.post_message(events.Paste("x = 1\n!!\ny = 2\n"))
        await wait_for(pilot, lambda: "!!" in app.chat_input.text)
        assert app.client.submitted == []


async def test_turns_dropped_are_reported_and_forgotten() -> None:
    """A context of 64 tokens (a token per character here) keeps 48 for the prompt: three exchanges of 2 + 20 and a
    message of 10 leave out the two oldest, which the app then forgets too."""
    app = make_app(info=replace(INFO, context=64), chars_per_token=1, answers={"chat": "a" * 20})
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        for n, text in enumerate(["hi", "hi", "hi", "0123456789"], 1):
            app.chat_input.load_text(text)
            await pilot.press("f5")
            await wait_for(pilot, lambda n=n: len(app.client.submitted) == n and not app._jobs)
        assert any("2 oldest turns were dropped" in str(n.render()) for n in app.query(Notice))
        assert app.conversation.exchanges == [("hi", "a" * 20), ("0123456789", "a" * 20)]


async def test_replaced_characters_are_one_warning() -> None:
    app = make_app()
    app.cap = "chat"
    notes: list[Notify] = []
    async with app.run_test(message_hook=lambda m: notes.append(m) if isinstance(m, Notify) else None) as pilot:
        await ready(pilot)
        app.chat_input.load_text("what is \udcff here?")  # a byte that was not UTF-8, kept by surrogateescape
        await pilot.press("f5")
        await wait_for(pilot, idle(app))
        warnings = [n.notification.message for n in notes if n.notification.severity == "warning"]
        assert warnings == ["1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD"]


async def test_save_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    path.chmod(0o640)
    app = make_app(SOURCE, path=str(path))
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((0, 0))
        await pilot.press("#", "ctrl+s")
        assert path.read_text() == "#" + SOURCE
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py"]  # no temporary file left
        assert not app.modified
        await pilot.press("ctrl+q")  # nothing unsaved: quits at once
    assert app.return_code == 0


async def test_failed_save_keeps_the_buffer_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = make_app(SOURCE, path=str(path))

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with app.run_test() as pilot:
        await ready(pilot)
        monkeypatch.setattr(os, "fsync", disk_full)
        await pilot.press("x", "ctrl+s")
        monkeypatch.undo()
        assert "NOT saved" in app.status.render_text() and "No space left" in app.status.render_text()
        assert path.read_text() == SOURCE and sorted(p.name for p in tmp_path.iterdir()) == ["code.py"]
        assert app.editor.text == "x" + SOURCE and app.modified
        assert isinstance(app.screen, PromptScreen)  # another place can be tried at once
        await pilot.press("escape", "ctrl+q")  # the guard still protects the unsaved buffer
        assert isinstance(app.screen, QuitScreen)


async def test_unsaved_changes_guard(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = make_app(SOURCE, path=str(path))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("escape")  # keep editing
        assert not isinstance(app.screen, QuitScreen) and app.is_running
        await pilot.press("ctrl+q", "s")  # save and quit
    assert path.read_text() == "x" + SOURCE
    app = make_app(SOURCE, path=str(path))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("y", "ctrl+q", "d")  # quit without saving
    assert path.read_text() == "x" + SOURCE


async def test_engine_error_is_shown_and_editing_still_works(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    app = make_app("", path=str(path), load_error="CUDA out of memory: 13.2 GB of weights do not fit")
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.status.state == "error" and "out of memory" in app.status.render_text()
        assert any("could not be loaded" in str(n.render()) for n in app.query(Notice))
        await pilot.press("f2")
        assert "no model" in app.status.render_text()
        assert app.client.submitted == []
        await pilot.press("o", "k", "ctrl+s")
        assert path.read_text() == "ok"


async def test_failed_request_restores_the_marker() -> None:
    app = make_app(fail="the prompt is longer than the context")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f3")
        await wait_for(pilot, idle(app))
        assert app.editor.text == SOURCE
        assert "longer than the context" in app.status.render_text()


async def test_ask_about_selection_and_switch_cap() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.select_line(0)
        await pilot.press("f6")
        assert app.chat_input.has_focus
        assert app.chat_input.text == "```python\ndef add(a, b):\n```\n"
        assert app.cap == "chat"  # asking switches to chat
        await pilot.press("f8")
        assert app.cap == "python" and "python" in app.status.render_text()
        await pilot.press("f8")
        assert app.cap == "completion"


async def test_stream_updates_are_coalesced() -> None:
    """Thousands of one-character deltas reach the log in at most ~30 updates a second."""
    answer = "x" * 3000
    app = make_app(answers={"chat": answer}, chunk=1, delay=0.0)
    app.cap = "chat"
    async with app.run_test() as pilot:
        await ready(pilot)
        calls = 0
        append = app.chat_log.append

        def counting(text: str) -> None:
            nonlocal calls
            calls += 1
            append(text)

        app.chat_log.append = counting
        app.chat_input.load_text("go")
        start = time.monotonic()
        await pilot.press("f5")
        await wait_for(pilot, idle(app), timeout=20)
        elapsed = time.monotonic() - start
        assert app.chat_log.last_answer == answer
        assert calls <= elapsed * 30 + 3


async def test_keys_are_rebindable() -> None:
    app = CodeLlamaApp(None, text=SOURCE, keys={"complete": "f9"}, client_factory=FakeClient)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f2")
        assert app.client.submitted == []
        await pilot.press("f9")
        await wait_for(pilot, idle(app))
        assert app.client.submitted[-1].cap == "completion"


async def test_themes_and_fill_marker_highlight() -> None:
    for short, editor_theme in (("light", "codellama-light"), ("high-contrast", "codellama-contrast")):
        app = CodeLlamaApp(None, text=SOURCE, theme=short, client_factory=FakeClient)
        async with app.run_test() as pilot:
            await pilot.pause()
            assert app.editor.theme == editor_theme
            app.theme = "codellama-dark"
            await pilot.pause()
            assert app.editor.theme == "codellama-dark"
            marker = app.editor._highlights[1]
            assert (4, 10, "fill.marker") in marker


async def test_narrow_terminal_stacks_the_panes() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        editor, chat = app.query_one("#editor-pane"), app.query_one("#chat-pane")
        assert chat.region.y > editor.region.y and chat.region.x == editor.region.x
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        editor, chat = app.query_one("#editor-pane"), app.query_one("#chat-pane")
        assert chat.region.x > editor.region.x and chat.region.y == editor.region.y


def test_editor_language_by_file_type() -> None:
    assert CodeEditor("", path="a.rs").language == "rust"
    assert CodeEditor("").language == "python"
    assert CodeEditor("", path="notes.txt").language is None


def test_no_color_environment_is_honoured() -> None:
    env = {**os.environ, "NO_COLOR": "1", "TEXTUAL_COLOR_SYSTEM": "standard"}
    script = (
        "import asyncio, tui.app\nfrom tests.fakes import FakeClient\n"
        "async def main():\n"
        "    app = tui.app.CodeLlamaApp(None, text='<FILL>', client_factory=FakeClient)\n"
        "    async with app.run_test(size=(80, 24)) as pilot:\n"
        "        await pilot.pause()\n"
        "        print(app.no_color)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "True"
