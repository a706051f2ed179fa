"""The app with its engine behind a server (`--url`): against our server on the demo model F2, F3 over several
markers and chat do what they do with the engine here, Esc frees the server's slot; against a foreign one a dropped
connection keeps the partial answer marked interrupted, a server down at start or gone for a while is waited for,
and a slow one never freezes the keys."""

from __future__ import annotations

import time

import pytest

from engine.http_client import HttpClient
from engine.local_client import LocalClient
from engine.requests import EngineSpec
from tests.servers import FakeOpenAI, free_port, serving
from tests.test_app import wait_for
from tui.app import CodeLlamaApp

SOURCE = "def add(a, b):\n    <FILL>\n\n\ndef mul(a, b):\n    <FILL>\n\n\ndef sub(a, b):\n    <FILL>\n"
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}


@pytest.fixture(scope="module")
def server():
    with serving(lambda sink: LocalClient(EngineSpec(device="cpu", max_batch=2), on_event=sink), slots=2) as running:
        yield running


def remote(url: str, text: str = SOURCE, cap: str = "completion", overrides: dict | None = None) -> CodeLlamaApp:
    def connect(spec: EngineSpec, sink) -> HttpClient:
        return HttpClient(url, on_event=sink, ping_s=0.05)

    return CodeLlamaApp(None, EngineSpec(), cap, overrides=overrides or GREEDY, text=text, client_factory=connect)


async def _session(app: CodeLlamaApp) -> tuple[str, str, str]:
    """F2 at the first marker's line end, Esc, F3 over every marker, then a chat turn: the ghost, the filled
    text and the answer."""
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None
        app.editor.move_cursor((0, 14))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not app._jobs, timeout=60)
        ghost = app.editor.ghost
        await pilot.press("escape")
        await pilot.press("f3")
        await wait_for(pilot, lambda: "<FILL>" not in app.editor.text and not app._jobs, timeout=60)
        filled = app.editor.text
        app.chat_input.focus()
        app.chat_input.load_text("Write a function that reverses a list.")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.chat_log.last_answer and not app._jobs, timeout=60)
        status = app.status.render_text()
        if app.client.server is not None:
            host = app.client.server.removeprefix("http://")
            await wait_for(pilot, lambda: "rtt" in app.status.render_text(), timeout=10)
            assert f"{host} rtt " in app.status.render_text() and "DEMO" in status
        return ghost, filled, app.chat_log.last_answer


async def test_f2_f3_over_several_markers_and_chat_do_through_the_server_what_they_do_here(
    server, tmp_path, monkeypatch
) -> None:
    """Each app has a state folder of its own: the first one's F3 edits its new buffer, and where its session
    outlasts RECOVERY_DELAY_S after that edit (on a loaded CPU) it leaves a recovery copy, which the second app
    would offer in a dialog that takes its F2."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "here"))
    here = await _session(CodeLlamaApp(None, EngineSpec(device="cpu", max_batch=1), overrides=GREEDY, text=SOURCE))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "there"))
    there = await _session(remote(server.url))
    assert there == here
    ghost, filled, answer = there
    assert ghost and answer and filled.count("def ") >= 3 and filled != SOURCE


async def test_esc_stops_an_answer_and_the_server_frees_its_slot(server) -> None:
    app = remote(server.url, cap="chat", overrides={"max_new_tokens": 900, "temperature": 0.0})
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: app.info is not None, timeout=30)
        app.chat_input.focus()
        app.chat_input.load_text("Write a long story about a list.")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.chat_log.last_answer, timeout=30)
        await pilot.press("escape")
        assert not app._jobs
        await wait_for(pilot, lambda: "(stopped)" in _log_text(app), timeout=5)
        deadline = time.monotonic() + 30
        while server.bridge.slots_in_use():
            assert time.monotonic() < deadline, "the server still runs the stopped request"
            await pilot.pause(0.05)


def _log_text(app: CodeLlamaApp) -> str:
    return "\n".join(str(getattr(child, "content", "")) for child in app.chat_log.children)


async def test_a_dropped_connection_keeps_what_arrived_marked_interrupted() -> None:
    text = "def add(a, b):\n    <FILL>\n# end\n"
    with FakeOpenAI(drop_after=2, takes_suffix=True) as fake:
        app = remote(fake.url, text=text)
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_for(pilot, lambda: app.info is not None, timeout=30)
            await pilot.press("f3")
            await wait_for(pilot, lambda: not app._jobs, timeout=30)
            assert app.editor.text == text.replace("<FILL>", "Hello,")  # nothing else touched
            assert app.status.state == "error" and "lost the connection" in app.status.render_text()
            assert "interrupted" in app.status.note
            app.editor.undo()
            assert app.editor.text == text

            app.editor.move_cursor((2, 5))
            await pilot.press("f2")
            await wait_for(pilot, lambda: not app._jobs, timeout=30)
            assert app.editor.ghost == "Hello," and "Tab" in app.status.note
            await pilot.press("tab")
            assert app.editor.text == text.replace("# end", "# endHello,")

            app.chat_input.focus()
            app.chat_input.load_text("hi")
            await pilot.press("f5")
            await wait_for(pilot, lambda: not app._jobs and "Interrupted" in _log_text(app), timeout=30)
            assert "Hello," in app.chat_log.last_answer
            assert not app.conversation.exchanges  # an interrupted answer is not part of the conversation


async def test_the_app_opens_with_the_server_down_says_so_and_connects_when_it_comes() -> None:
    port = free_port()
    app = remote(f"http://127.0.0.1:{port}", text="x = 1\n")
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, lambda: "nothing listens there" in app.status.render_text(), timeout=10)
        assert app.status.state == "loading" and "trying again" in app.status.render_text()
        assert f"127.0.0.1:{port}" in app.status.render_text()
        with FakeOpenAI(port=port):
            await wait_for(pilot, lambda: app.info is not None, timeout=30)
            assert app.status.state == "ready" and "connected" in app.status.render_text()


async def test_a_server_that_goes_away_shows_in_the_status_line_and_a_later_request_works() -> None:
    port = free_port()
    app = remote(f"http://127.0.0.1:{port}", cap="chat")
    with FakeOpenAI(port=port) as first:
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_for(pilot, lambda: app.info is not None, timeout=30)
            first.__exit__()
            await wait_for(pilot, lambda: "unreachable" in app.status.render_text(), timeout=10)
            assert app.status.has_class("-link-down")
            app.chat_input.focus()
            app.chat_input.load_text("hi")
            await pilot.press("f5")
            await wait_for(pilot, lambda: not app._jobs, timeout=10)
            assert "cannot reach" in _log_text(app)
            with FakeOpenAI(port=port):
                await wait_for(pilot, lambda: "rtt" in app.status.render_text(), timeout=30)
                assert not app.status.has_class("-link-down")
                app.chat_input.load_text("hi again")
                await pilot.press("f5")
                await wait_for(pilot, lambda: not app._jobs, timeout=10)
                assert app.chat_log.last_answer == "Hello, world!"


async def test_a_slow_server_never_freezes_the_keys() -> None:
    with FakeOpenAI(pause_s=0.3, hold=True) as slow:
        app = remote(slow.url, text="", cap="chat")
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_for(pilot, lambda: app.info is not None, timeout=30)
            app.chat_input.focus()
            app.chat_input.load_text("hi")
            await pilot.press("f5")
            await pilot.press("f4")  # to the editor, while the answer is on its way
            await pilot.press("a", "b", "c")
            assert app.editor.text == "abc" and app._jobs  # the keys landed before the answer did
            slow.release.set()
            await wait_for(pilot, lambda: not app._jobs, timeout=30)
            assert app.chat_log.last_answer == "Hello, world!"
