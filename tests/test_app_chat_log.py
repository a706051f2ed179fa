"""The chat log from the keyboard: it takes focus, scrolls, fills the screen, and copies answers (OSC 52)."""

from __future__ import annotations

from tests.test_app import idle, make_app, ready, wait_for
from widgets.chat_log import ChatLog

CODE = "def add(a, b):\n    return a + b"
ANSWER = (
    "Here you go:\n\n```python\n" + CODE + "\n```\n" + "".join(f"\nline {i} of the explanation\n" for i in range(40))
)


async def _answered(pilot, app) -> ChatLog:  # noqa: ANN001 - the tests' pilot and app
    await ready(pilot)
    app.cap = "chat"
    app.chat_input.load_text("add two numbers")
    await pilot.press("f5")
    await wait_for(pilot, idle(app))
    await pilot.pause(0.2)
    return app.chat_log


async def test_the_log_takes_focus_from_the_chat_input_and_by_its_key() -> None:
    app = make_app(answers={"chat": ANSWER})
    async with app.run_test(size=(80, 24)) as pilot:
        log = await _answered(pilot, app)
        app.chat_input.focus()
        await pilot.press("shift+tab")
        assert app.focused is log
        app.editor.focus()
        await pilot.press("ctrl+l")
        assert app.focused is log


async def test_the_focused_log_scrolls_with_page_and_home_end_keys() -> None:
    app = make_app(answers={"chat": ANSWER})
    async with app.run_test(size=(80, 24)) as pilot:
        log = await _answered(pilot, app)
        await pilot.press("ctrl+l")
        assert log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y  # it followed the answer to its end
        await pilot.press("home")
        await wait_for(pilot, lambda: log.scroll_y == 0)  # the start of a long answer is reachable
        await pilot.press("pagedown")
        await wait_for(pilot, lambda: log.scroll_y > 0)
        down = log.scroll_y
        await pilot.press("pageup")
        await wait_for(pilot, lambda: log.scroll_y < down)
        await pilot.press("end")
        await wait_for(pilot, lambda: log.scroll_y == log.max_scroll_y)


async def test_the_log_fills_the_screen_and_gives_it_back() -> None:
    app = make_app(answers={"chat": ANSWER})
    async with app.run_test(size=(80, 24)) as pilot:
        log = await _answered(pilot, app)
        await pilot.press("ctrl+l", "m")
        assert app.screen.maximized is log
        await wait_for(pilot, lambda: log.region.width == 80 and log.region.height == 22)  # all but status, footer
        assert app.screen.query_one("#status").region.height == 1
        await pilot.press("m")
        assert app.screen.maximized is None
        await pilot.press("m")
        await pilot.press("escape")
        assert app.screen.maximized is None


async def test_copy_the_last_answer_and_its_code_block_to_the_clipboard() -> None:
    app = make_app(answers={"chat": ANSWER})
    async with app.run_test(size=(80, 24)) as pilot:
        await _answered(pilot, app)
        await pilot.press("ctrl+l", "y")
        assert app.clipboard == CODE
        assert app.status.note == "copied the last code block (2 lines) to the clipboard"
        await pilot.press("c")
        assert app.clipboard == ANSWER.strip("\n")
        assert app.status.note.startswith("copied the last answer")


async def test_copy_keys_wait_for_an_answer() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+l", "c", "y")
        assert app.clipboard == "" and "copied" not in app.status.note


async def test_the_focused_log_shows_its_own_keys_at_80_columns() -> None:
    app = make_app(answers={"chat": ANSWER})
    async with app.run_test(size=(80, 24)) as pilot:
        await _answered(pilot, app)
        await pilot.press("ctrl+l")

        def footer_keys() -> list[str]:
            return [key.key for key in app.screen.query_one("Footer").children]

        await wait_for(pilot, lambda: footer_keys()[:2] == ["f1", "c"])  # the footer is rebuilt after a refresh
        keys = footer_keys()
        assert {"y", "m", "f8", "ctrl+n"} <= set(keys), keys
