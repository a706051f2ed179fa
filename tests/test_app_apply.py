"""Pilot tests of F7: a chat's code block shown as a diff against the selection or the code around the cursor, then
applied as one undo step, or cancelled leaving the text untouched."""

from __future__ import annotations

import functools

from engine.requests import EngineSpec
from tests.fakes import FakeClient
from tests.test_app import ready, wait_for
from tui.app import CodeLlamaApp
from tui.apply_screen import ApplyScreen
from widgets.diff_view import DiffView

SOURCE = """import math


def area(r):
    return 3.14 * r * r


def main():
    print(area(2))
"""
FIXED = "def area(r):\n    return math.pi * r ** 2"
ANSWER = f"Use math.pi:\n\n```python\n{FIXED}\n```\n\nand a helper:\n\n```python\nTAU = 2 * math.pi\n```\n"


def make_app(text: str = SOURCE, path: str | None = None, answer: str = ANSWER) -> CodeLlamaApp:
    fake = functools.partial(FakeClient, answers={"chat": answer})
    return CodeLlamaApp(path, EngineSpec(), "chat", text=text, client_factory=fake)


async def answered(pilot) -> CodeLlamaApp:
    app = await ready(pilot)
    app.chat_input.load_text("fix area")
    await pilot.press("f5")
    await wait_for(pilot, lambda: app.client.submitted and not app._jobs)
    app.editor.focus()
    return app


async def test_the_function_at_the_cursor_diff_then_apply_then_one_undo() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await answered(pilot)
        app.editor.move_cursor((4, 8))
        await pilot.press("f7")
        screen = app.screen
        assert isinstance(screen, ApplyScreen)
        assert screen.query_one(DiffView).lines[-1] == "+TAU = 2 * math.pi"  # the last block comes first
        await pilot.press("left")  # the one before it: the fix of area()
        diff = screen.query_one(DiffView).lines
        assert diff == [
            "@@ -4,2 +4,2 @@",
            " def area(r):",
            "-    return 3.14 * r * r",
            "+    return math.pi * r ** 2",
        ]
        assert "area (lines 4-5)" in str(screen.query_one("#question").render())
        assert "block 1 of 2" in str(screen.query_one("#diff-summary").render())
        assert app.editor.text == SOURCE  # nothing changes before the yes
        await pilot.press("y")
        assert not isinstance(app.screen, ApplyScreen)
        assert app.editor.text == SOURCE.replace("3.14 * r * r", "math.pi * r ** 2")
        assert app.editor.has_focus and "applied to area" in app.status.render_text()
        app.editor.undo()
        assert app.editor.text == SOURCE  # one step back to the original
        app.editor.redo()
        assert app.editor.text == SOURCE.replace("3.14 * r * r", "math.pi * r ** 2")


async def test_escape_cancels_and_leaves_the_text_untouched() -> None:
    app = make_app()
    async with app.run_test() as pilot:
        await answered(pilot)
        app.editor.move_cursor((4, 0))
        await pilot.press("f7")
        assert isinstance(app.screen, ApplyScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, ApplyScreen)
        assert app.editor.text == SOURCE and "not applied" in app.status.render_text()
        app.editor.undo()
        assert app.editor.text == SOURCE  # nothing was recorded either


async def test_the_selection_is_what_gets_replaced() -> None:
    app = make_app(answer="```python\nmath.tau * r\n```")
    async with app.run_test() as pilot:
        await answered(pilot)
        app.editor.select_line(4)
        app.editor.selection = app.editor.selection.__class__((4, 11), (4, 23))  # `3.14 * r * r`
        await pilot.press("f7")
        assert app.screen.query_one(DiffView).lines[1:] == ["-    return 3.14 * r * r", "+    return math.tau * r"]
        await pilot.press("enter")
        assert app.editor.text == SOURCE.replace("3.14 * r * r", "math.tau * r")
        app.editor.undo()
        assert app.editor.text == SOURCE


async def test_a_method_from_an_answer_goes_back_at_its_indentation() -> None:
    source = "class C:\n    def f(self):\n        return 1\n"
    app = make_app(source, answer="```python\ndef f(self):\n    return 2\n```")
    async with app.run_test() as pilot:
        await answered(pilot)
        app.editor.move_cursor((2, 8))
        await pilot.press("f7", "y")
        assert app.editor.text == "class C:\n    def f(self):\n        return 2\n"


async def test_a_block_that_changes_nothing_cannot_be_applied() -> None:
    app = make_app(answer="```python\ndef area(r):\n    return 3.14 * r * r\n```")
    async with app.run_test() as pilot:
        await answered(pilot)
        app.editor.move_cursor((4, 0))
        await pilot.press("f7")
        assert app.screen.query_one(DiffView).lines == []
        assert "no change" in str(app.screen.query_one("#diff-summary").render())
        await pilot.press("y")
        assert isinstance(app.screen, ApplyScreen)  # y does nothing; Esc leaves
        await pilot.press("escape")
        assert app.editor.text == SOURCE


async def test_nothing_around_the_cursor_inserts_there_and_no_block_says_so() -> None:
    app = make_app("one\n\ntwo\n", path="notes.txt", answer="```\nmiddle\n```")
    async with app.run_test() as pilot:
        await answered(pilot)
        app.editor.move_cursor((1, 0))
        await pilot.press("f7")
        assert app.screen.query_one(DiffView).lines == ["@@ -1,0 +2 @@", "+middle"]
        await pilot.press("y")
        assert app.editor.text == "one\nmiddle\ntwo\n"
    app = make_app(answer="no code here")
    async with app.run_test() as pilot:
        await answered(pilot)
        await pilot.press("f7")
        assert not isinstance(app.screen, ApplyScreen) and "no code block" in app.status.render_text()
