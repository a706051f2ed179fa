"""The app never loses the user's work and never grows without bound: memory, recovery copies, signals, bad input,
huge files (Pilot against the fake engine; the real command in a pseudo-terminal where signals are involved)."""

from __future__ import annotations

import gc

from textual.widget import Widget

from tests.test_app import make_app, ready, wait_for


def _live_widgets() -> int:
    gc.collect()
    return sum(isinstance(o, Widget) for o in gc.get_objects())


async def test_memory_stays_flat_over_fifty_completions() -> None:
    """Each completion streams ~30 deltas; the footer is rebuilt only when its keys change, and a rebuild lets go of
    the keys it replaced, so the number of live widgets does not grow with the number of completions."""
    app = make_app(answers={"completion": "x = 1\n" * 15}, chunk=3)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        rebuilds: list[object] = []
        app.screen.bindings_updated_signal.subscribe(app, rebuilds.append)
        counts = []
        for n in range(1, 51):
            await pilot.press("f2")
            await wait_for(pilot, lambda n=n: len(app.client.submitted) == n and not app._jobs)
            assert app.editor.ghost == "x = 1\n" * 15
            await pilot.press("escape")
            if n in (10, 50):
                await pilot.pause()
                counts.append((_live_widgets(), len(app.query("*"))))
        (widgets_10, dom_10), (widgets_50, dom_50) = counts
        assert dom_50 == dom_10
        assert widgets_50 - widgets_10 < 20, f"{widgets_50 - widgets_10} widgets kept over 40 completions"
        assert len(rebuilds) <= 50 * 4, f"{len(rebuilds)} footer rebuilds for 50 completions of 30 deltas"
