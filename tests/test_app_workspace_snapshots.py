"""Snapshots of the workspace (fake engine, fixed files): the ctrl+o picker and an editor with two tabs, one of them
unsaved, at 80x24 and 120x40.

Update them with `pytest tests/test_app_workspace_snapshots.py --snapshot-update` and look at the report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Label

from tests.fakes import FakeClient
from tui.app import CodeLlamaApp
from tui.path_picker import PathPicker

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
MAIN = "def add(a: int, b: int) -> int:\n    return a + b\n"
HELPERS = "import os\n\n\ndef here() -> str:\n    return os.getcwd()\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    for name in ("main.py", "helpers.py", "README.md", "pkg/models.py", "pkg/views.py", "tests/test_models.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(HELPERS if name == "helpers.py" else MAIN)
    monkeypatch.chdir(root)
    return root


async def _settle(pilot: Pilot, layout_width: int) -> None:
    app = pilot.app
    layout = "-wide" if layout_width >= 100 else "-narrow"
    while not app.screen_stack[0].has_class(layout):
        await pilot.pause(0.02)
    await pilot.pause(0.3)  # let syntax highlighting settle
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


async def _ready(pilot: Pilot) -> CodeLlamaApp:
    app = pilot.app
    assert isinstance(app, CodeLlamaApp)
    while app.info is None:
        await pilot.pause(0.02)
    app.editor.cursor_blink = app.chat_input.cursor_blink = False
    return app


@SIZES
def test_path_picker(snap_compare, project: Path, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot) -> None:
        app = await _ready(pilot)
        await pilot.press("ctrl+o")
        picker = app.screen
        assert isinstance(picker, PathPicker)
        query = picker.query_one("#picker-query", Input)
        query.cursor_blink = False
        while str(picker.query_one("#picker-note", Label).render()) != "6 files":
            await pilot.pause(0.02)
        await pilot.press("m", "o", "d")
        while picker.query("#picker-matches").first().option_count != 2:
            await pilot.pause(0.02)
        await _settle(pilot, size[0])

    app = CodeLlamaApp("main.py", text=MAIN, client_factory=FakeClient)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_two_tabs(snap_compare, project: Path, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot) -> None:
        app = await _ready(pilot)
        app.editor.move_cursor((1, 4))
        await pilot.press("#")  # main.py: unsaved
        await app.open_path("helpers.py")
        app.editor.cursor_blink = False
        app.editor.move_cursor((3, 4))
        await _settle(pilot, size[0])

    app = CodeLlamaApp("main.py", text=MAIN, client_factory=FakeClient)
    assert snap_compare(app, terminal_size=size, run_before=run_before)
