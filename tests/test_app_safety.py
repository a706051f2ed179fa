"""The app never loses the user's work and never grows without bound: memory, recovery copies, signals, bad input,
huge files (Pilot against the fake engine; the real command in a pseudo-terminal where signals are involved)."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from textual import events
from textual.widget import Widget
from textual.widgets import Label, Static

from tests.test_app import make_app, ready, wait_for
from tui.recover_screen import RecoverScreen
from tui.recovery import RecoveryCopy, RecoveryStore
from tui.screens import QuitScreen
from widgets.editor import HIGHLIGHT_MAX_BYTES, MAX_BYTES, MAX_LINES

ROOT = Path(__file__).resolve().parents[1]


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


def _copies(path: str | None) -> list[RecoveryCopy]:
    return RecoveryStore().copies_of(path)


async def test_recovery_copy_follows_the_edits_and_goes_on_save(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    app = make_app(text="x = 1\n", path=str(file))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("y", "=", "2")
        await wait_for(pilot, lambda: _copies(str(file)))
        (copy,) = _copies(str(file))
        assert (copy.path, copy.text, copy.pid) == (str(file.resolve()), "y=2x = 1\n", os.getpid())
        assert copy.file.parent == Path(os.environ["XDG_STATE_HOME"]) / "codellama-tui" / "recovery"
        assert stat.S_IMODE(copy.file.stat().st_mode) == 0o600
        await pilot.press("ctrl+s")
        assert file.read_text() == "y=2x = 1\n"
        assert not _copies(str(file)) and not copy.file.exists()


async def test_a_new_buffer_gets_a_recovery_copy_and_discarding_on_quit_removes_it() -> None:
    app = make_app(text="")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("a", "b")
        await wait_for(pilot, lambda: _copies(None))
        assert [copy.text for copy in _copies(None)] == ["ab"]
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("d")
    assert app.return_code == 0 and not _copies(None)


async def test_undoing_back_to_the_file_drops_the_copy(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    app = make_app(text="x = 1\n", path=str(file))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("z")
        await wait_for(pilot, lambda: _copies(str(file)))
        app.editor.undo()
        await wait_for(pilot, lambda: not _copies(str(file)))


def _left_copy(file: Path, text: str) -> RecoveryCopy:
    """A copy left by an earlier session (another store: another session id)."""
    RecoveryStore().write(str(file), text)
    (copy,) = _copies(str(file))
    return copy


async def test_opening_a_file_with_a_copy_offers_it_and_recover_takes_it(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\ny = 2\n")
    left = _left_copy(file, "x = 1\ny = 3\nz = 4\n")
    app = make_app(text="x = 1\ny = 2\n", path=str(file))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RecoverScreen) and app.screen.query("#recovery-summary"))
        summary = str(app.screen.query_one("#recovery-summary", Label).render())
        assert "by process" in summary and "The copy has 3 lines, a.py on disk has 2." in summary
        assert str(app.screen.query_one("#diff-summary", Label).render()) == "2 lines added, 1 removed in the copy"
        diff = str(app.screen.query_one("#diff Static", Static).render()).splitlines()
        assert [line for line in diff if line[:1] in "+-"] == ["-y = 2", "+y = 3", "+z = 4"]
        await pilot.press("r")
        assert app.editor.text == "x = 1\ny = 3\nz = 4\n" and app.modified
        assert file.read_text() == "x = 1\ny = 2\n"  # nothing is written to the file until ctrl+s
        assert app.recovery_file == left.file  # further edits go to the recovered copy, not to a second one
        await pilot.press("w")
        await wait_for(pilot, lambda: left.file.exists() and "w" in _copies(str(file))[0].text)
        assert len(_copies(str(file))) == 1
        app.editor.undo()
        app.editor.undo()
        assert app.editor.text == "x = 1\ny = 2\n"  # recovering is one undo step


async def test_discard_removes_the_offered_copy(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    left = _left_copy(file, "x = 2\n")
    app = make_app(text="x = 1\n", path=str(file))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RecoverScreen))
        await pilot.press("d")
        assert not isinstance(app.screen, RecoverScreen)
        assert app.editor.text == "x = 1\n" and not left.file.exists()


async def test_keep_for_later_never_writes_over_the_kept_copy(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    left = _left_copy(file, "x = 2\n")
    kept = left.file.read_bytes()
    app = make_app(text="x = 1\n", path=str(file))
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, RecoverScreen))
        await pilot.press("k")
        assert app.editor.text == "x = 1\n"
        await pilot.press("q")
        await wait_for(pilot, lambda: len(_copies(str(file))) == 2)
        assert {copy.text for copy in _copies(str(file))} == {"x = 2\n", "qx = 1\n"}
        assert left.file.read_bytes() == kept


async def test_a_copy_that_matches_the_file_is_removed_without_asking(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    left = _left_copy(file, "x = 1\n")
    app = make_app(text="x = 1\n", path=str(file))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.pause()
        assert not isinstance(app.screen, RecoverScreen) and not left.file.exists()


async def test_an_unexpected_exception_keeps_the_edits_and_exits_non_zero(tmp_path: Path) -> None:
    file = tmp_path / "a.py"
    file.write_text("x = 1\n")
    app = make_app(text="x = 1\n", path=str(file))

    def broken() -> None:
        raise RuntimeError("a bug")

    app.action_switch_cap = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        async with app.run_test() as pilot:
            await ready(pilot)
            await pilot.press("n", "e", "w")
            await pilot.press("f8")
            await pilot.pause()
    assert app.return_code == 1
    assert [copy.text for copy in _copies(str(file))] == ["newx = 1\n"]


async def test_a_panic_keeps_the_edits_and_exits_non_zero() -> None:
    """Textual panics (and exits 0) when its input thread dies; the app keeps the edits and exits 1."""
    app = make_app(text="")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("o", "k")
        app.panic("the input thread died")
    assert app.return_code == 1
    assert [copy.text for copy in _copies(None)] == ["ok"]


def _command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("big.py", "x = 1  # " + "y" * 90 + "\n", "MiB, more than the 2 MiB the editor takes"),
        ("long.txt", "x\n", "lines, more than the 30,000 the editor takes"),
    ],
)
def test_a_file_too_big_to_edit_is_refused_in_one_line(tmp_path: Path, name: str, text: str, reason: str) -> None:
    """A 20 MB file took 84 s to paint and 30 s a keystroke: past the editor's limits the command refuses it
    before the app starts (the size on disk before reading it, then the lines)."""
    file = tmp_path / name
    file.write_text(text * (MAX_BYTES // len(text) + 1 if name == "big.py" else MAX_LINES + 1))
    result = _command(str(file))
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"codellama-tui: error: {file}: too big to edit here (") and reason in line
    assert line.endswith("; open it in another editor")


async def test_a_big_file_is_edited_as_plain_text(tmp_path: Path) -> None:
    """Syntax highlighting re-parses the whole file on every keystroke: past HIGHLIGHT_MAX_BYTES it is off."""
    big = "x = 1\n" * (HIGHLIGHT_MAX_BYTES // 6 + 1)
    app = make_app(text=big, path=str(tmp_path / "big.py"))
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.editor.language is None and app.editor.plain_for_size
        assert "no syntax highlighting" in app.status.note
    app = make_app(text="x = 1\n", path=str(tmp_path / "small.py"))
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.editor.language == "python" and "highlighting" not in app.status.note


async def test_a_paste_that_would_make_the_text_too_big_is_refused() -> None:
    app = make_app(text="x = 1\n")
    async with app.run_test() as pilot:
        await ready(pilot)
        app.post_message(events.Paste("y\n" * MAX_LINES))  # as the driver does: the app hands it to the editor
        await pilot.pause()
        assert app.editor.text == "x = 1\n"
        assert app.status.note.startswith("paste refused: the text would be too big to edit here (30,002 lines")
        app.post_message(events.Paste("y = 2\n"))
        await pilot.pause()
        assert app.editor.text == "y = 2\nx = 1\n"
