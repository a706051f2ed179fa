"""Snapshots of the ctrl+r conversation list and the F7 diff dialog at 80x24 (fake engine, fixed texts and dates).

Update them with `pytest tests/test_app_dialog_snapshots.py --snapshot-update` and look at the report.
"""

from __future__ import annotations

import functools
import time

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from tests.fakes import FakeClient
from tests.test_app_apply import ANSWER, SOURCE
from tui.app import CodeLlamaApp
from tui.history import ChatRecord, HistoryStore, Turn

DAY = 86400.0
START = 1764700000.0  # 2025-12-02 18:26 UTC
CHATS = (
    ("Write a function that parses ISO dates and keeps the timezone of each", "CodeLlama-7b-Instruct-hf"),
    ("why is my regex slow", "CodeLlama-13b-Instruct-hf"),
    ("sort a list of dicts by key", "CodeLlama-7b-Instruct-hf"),
)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch):
    """The list shows local dates: fix the zone so that the picture is the same everywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def app_for_snapshot() -> CodeLlamaApp:
    fake = functools.partial(FakeClient, answers={"chat": ANSWER})
    return CodeLlamaApp("area.py", cap="chat", text=SOURCE, client_factory=fake)


async def _settle(pilot: Pilot) -> None:
    pilot.app.editor.cursor_blink = pilot.app.chat_input.cursor_blink = False  # a blinking cursor makes two pictures
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


async def _open_history(pilot: Pilot) -> None:
    app = pilot.app
    while app.info is None:
        await pilot.pause(0.02)
    await pilot.press("ctrl+r")
    await _settle(pilot)


async def _open_diff(pilot: Pilot) -> None:
    app = pilot.app
    assert isinstance(app, CodeLlamaApp)
    while app.info is None:
        await pilot.pause(0.02)
    app.chat_input.load_text("fix area")
    await pilot.press("f5")
    while not app.client.submitted or app._jobs:
        await pilot.pause(0.02)
    app.editor.focus()
    app.editor.move_cursor((4, 8))
    await pilot.press("f7", "left")
    await _settle(pilot)


def test_history_list(snap_compare, utc) -> None:
    store = HistoryStore()
    for i, (title, model) in enumerate(CHATS):
        record = ChatRecord(created=START + i * DAY)
        record.add(Turn("chat", title, "…", at=START + i * DAY + 600), [(title, "…")], model)
        store.save(record)
    assert snap_compare(app_for_snapshot(), terminal_size=(80, 24), run_before=_open_history)


def test_apply_diff_dialog(snap_compare) -> None:
    assert snap_compare(app_for_snapshot(), terminal_size=(80, 24), run_before=_open_diff)
