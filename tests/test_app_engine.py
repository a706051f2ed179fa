"""The app against the real engine on the CPU, with a tiny random-weight checkpoint."""

from __future__ import annotations

from pathlib import Path

from engine.requests import EngineSpec
from tests.test_app import wait_for
from tui.app import CodeLlamaApp

SOURCE = "def add(a, b):\n    <FILL>\n"


async def test_real_engine_loads_completes_and_infills(tiny_model_dir: Path) -> None:
    spec = EngineSpec(model=str(tiny_model_dir), device="cpu", dtype="float32", max_batch=2)
    overrides = {"max_new_tokens": 8, "temperature": 0.0}
    app = CodeLlamaApp(None, spec, "completion", overrides=overrides, text=SOURCE)  # the real LocalClient
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None
        assert app.info.can_infill and app.status.state == "ready"
        assert f"ctx 0/{app.info.context}" in app.status.render_text()

        app.editor.move_cursor((1, 4))
        await pilot.press("f2")
        await wait_for(pilot, lambda: not app._jobs, timeout=60)
        assert app.status.state == "ready", app.status.render_text()
        assert app.editor.ghost  # random weights still produce some text
        await pilot.press("escape")

        await pilot.press("f3")
        await wait_for(pilot, lambda: not app._jobs, timeout=60)
        assert app.status.state == "ready", app.status.render_text()
        assert "<FILL>" not in app.editor.text
        app.editor.undo()  # the whole infill is one undo step
        assert app.editor.text == SOURCE


async def test_without_a_model_the_app_runs_the_demo_model() -> None:
    """What the README's first command does: no --model, the built-in demo model loads and completes."""
    spec = EngineSpec(device="cpu", max_batch=1)
    app = CodeLlamaApp(None, spec, "completion", overrides={"max_new_tokens": 12, "temperature": 0.0}, text=SOURCE)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None and app.info.is_demo
        assert "DEMO" in app.status.render_text()
        app.editor.move_cursor((1, 4))
        await pilot.press("f3")  # the demo model has the infilling pieces
        await wait_for(pilot, lambda: not app._jobs, timeout=60)
        assert app.status.state == "ready", app.status.render_text()
        assert "<FILL>" not in app.editor.text


async def test_a_file_longer_than_the_context_still_fills() -> None:
    """The editor sends whole files: one that outgrows the context loses the lines farthest from the cursor,
    says so in the status line, and the fill still lands."""
    spec = EngineSpec(device="cpu", max_batch=1, max_seq_len=256)
    body = "".join(f"    total = total + values[{i}]\n" for i in range(300))
    text = "def add_all(values):\n    total = 0\n" + body + "    <FILL>\n" + body + "    return total\n"
    app = CodeLlamaApp(None, spec, "completion", overrides={"max_new_tokens": 8, "temperature": 0.0}, text=text)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.info is not None or app.load_error is not None, timeout=120)
        assert app.load_error is None
        await pilot.press("f3")
        await wait_for(pilot, lambda: not app._jobs, timeout=60)
        assert app.status.state == "ready", app.status.render_text()
        assert "<FILL>" not in app.editor.text
        assert "lines above" in app.status.note and "left out" in app.status.note
