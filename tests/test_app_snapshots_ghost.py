"""Snapshots of a ghost suggestion after a partial accept (ctrl+right twice) at 80x24 and 120x40: the accepted words
are in the text, the rest of the first line shows inline after the cursor and the further lines below it.

Update it with `pytest tests/test_app_snapshots_ghost.py --snapshot-update` and look at the report.
"""

from __future__ import annotations

import functools

import pytest
from textual.pilot import Pilot

from tests.fakes import FakeClient
from tui.app import CodeLlamaApp

SOURCE = (
    'def mean(values: list[float]) -> float:\n    """The arithmetic mean."""\n    \n\n'
    "def main() -> None:\n    print(mean([1.0, 2.0]))\n"
)
ANSWER = "total = sum(values)\n    count = len(values)\n    return total / count"


async def _accept_two_words(pilot: Pilot) -> None:
    app = pilot.app
    assert isinstance(app, CodeLlamaApp)
    while app.info is None:
        await pilot.pause(0.02)
    app.editor.cursor_blink = False  # a blinking cursor makes two pictures
    app.editor.move_cursor((2, 4))
    await pilot.press("f2")
    while not app.client.submitted or app._jobs:
        await pilot.pause(0.02)
    await pilot.press("ctrl+right", "ctrl+right")
    assert app.editor.ghost == ANSWER[len("total =") :]
    await pilot.pause(0.3)  # let syntax highlighting settle
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_ghost_after_a_partial_accept(snap_compare, size: tuple[int, int]) -> None:
    fake = functools.partial(FakeClient, answers={"completion": ANSWER})
    app = CodeLlamaApp("stats.py", text=SOURCE, client_factory=fake)
    assert snap_compare(app, terminal_size=size, run_before=_accept_two_words)
