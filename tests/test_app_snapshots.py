"""Snapshots of the main screen (fake engine, fixed file) at 80x24, 60x20 and 120x40, dark and light, and of the
help screen at 80x24 and the quit dialog at 80x24 and 120x40: nothing essential is cut (state, cap and context in
the status line, F1, F8 and ctrl+n in the footer, every choice of the quit dialog). The footer while an answer
streams (Esc, F5) is checked by tests/test_app_layout.py: a held stream does not repaint the same way twice.

Update them with `pytest tests/test_app_snapshots.py --snapshot-update` and look at the report.
"""

from __future__ import annotations

import functools

import pytest
from textual.pilot import Pilot

from tests.fakes import FakeClient
from tui.app import CodeLlamaApp

SOURCE = '''def remove_non_ascii(s: str) -> str:
    """ <FILL>
    return result


def add(a: int, b: int) -> int:
    return a + b
'''


async def _converse(pilot: Pilot) -> None:
    app = pilot.app
    assert isinstance(app, CodeLlamaApp)
    while app.info is None:
        await pilot.pause(0.02)
    app.chat_input.load_text("Write add() in Python")
    await pilot.press("f5")
    while not app.client.submitted or app._jobs:
        await pilot.pause(0.02)
    app.editor.cursor_blink = app.chat_input.cursor_blink = False  # a blinking cursor makes two pictures
    app.editor.focus()
    app.editor.move_cursor((1, 8))
    layout = "-wide" if app.size.width >= 100 else "-narrow"
    while not app.screen.has_class(layout):  # the breakpoint class arrives with a resize event: wait for it
        await pilot.pause(0.02)
    await pilot.pause(0.3)  # let syntax highlighting settle
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (60, 20), (120, 40)], ids=["80x24", "60x20", "120x40"])
@pytest.mark.parametrize("theme", ["dark", "light"])
def test_main_screen(snap_compare, size: tuple[int, int], theme: str) -> None:
    app = CodeLlamaApp("example.py", cap="chat", theme=theme, text=SOURCE, client_factory=FakeClient)
    assert snap_compare(app, terminal_size=size, run_before=_converse)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_quit_dialog(snap_compare, size: tuple[int, int]) -> None:
    async def quit_with_changes(pilot: Pilot) -> None:
        app = pilot.app
        assert isinstance(app, CodeLlamaApp)
        while app.info is None:
            await pilot.pause(0.02)
        app.editor.cursor_blink = False
        app.editor.insert("# changed\n")
        await pilot.press("ctrl+q")
        await pilot.pause(0.3)

    app = CodeLlamaApp("example.py", text=SOURCE, client_factory=functools.partial(FakeClient, hold=True))
    assert snap_compare(app, terminal_size=size, run_before=quit_with_changes)


def test_help_screen(snap_compare) -> None:
    async def help_open(pilot: Pilot) -> None:
        app = pilot.app
        assert isinstance(app, CodeLlamaApp)
        while app.info is None:
            await pilot.pause(0.02)
        app.editor.cursor_blink = False
        await pilot.press("f1")
        await pilot.pause(0.3)

    app = CodeLlamaApp("example.py", text=SOURCE, client_factory=functools.partial(FakeClient, hold=True))
    assert snap_compare(app, terminal_size=(80, 24), run_before=help_open)
