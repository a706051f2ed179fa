"""The app never loses a file's content or the user's text: saving, save-as and opening, through the app (Pilot)
and the real command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from engine.requests import EngineSpec
from tests.fakes import FakeClient
from tests.test_app import SOURCE, make_app, ready
from tui.app import CodeLlamaApp
from tui.files import OpenFile
from tui.screens import ConfirmScreen, ConflictScreen, PromptScreen, QuitScreen

ROOT = Path(__file__).resolve().parents[1]


def opened(path: Path) -> CodeLlamaApp:
    """The app on `path`, read from disk as the command does."""
    return CodeLlamaApp(OpenFile.open(str(path)), EngineSpec(), "completion", client_factory=FakeClient)


async def answer(pilot: Pilot, text: str) -> None:
    """Put an answer into the open prompt and submit it."""
    assert isinstance(pilot.app.screen, PromptScreen)
    pilot.app.screen.query_one(Input).value = text
    await pilot.press("enter")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----- save: what is on disk is never clobbered


async def test_a_change_on_disk_is_shown_and_never_overwritten_unasked(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((0, 0))
        await pilot.press("#")
        path.write_text(SOURCE + "# added by someone else\n")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ConflictScreen)
        shown = " ".join(str(label.render()) for label in app.screen.query("Label, Static"))
        assert "changed on disk" in shown and "1 line added, 0 removed" in shown and "added by someone else" in shown
        await pilot.press("escape")  # keep editing: nothing written
        assert path.read_text() == SOURCE + "# added by someone else\n"
        assert app.modified and "NOT saved" in app.status.render_text()
        await pilot.press("ctrl+s", "o")  # overwrite, asked
        assert path.read_text() == "#" + SOURCE and not app.modified
        await pilot.press("ctrl+s")  # no change on disk since: saves at once
        assert not isinstance(app.screen, ConflictScreen)


async def test_reload_from_disk_is_one_undo_step(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        app.editor.move_cursor((0, 0))
        await pilot.press("#")
        path.write_text("theirs\n")
        await pilot.press("ctrl+s", "r")
        assert app.editor.text == "theirs\n" and not app.modified
        await pilot.press("ctrl+z")  # the user's version comes back
        assert app.editor.text == "#" + SOURCE and app.modified
        await pilot.press("ctrl+s")  # the disk holds what was reloaded: no question
        assert path.read_text() == "#" + SOURCE


async def test_a_touch_or_an_identical_rewrite_is_no_conflict(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        os.utime(path, (1, 1))
        (tmp_path / "new.py").write_text(SOURCE)
        os.replace(tmp_path / "new.py", path)  # another inode, the same bytes
        await pilot.press("x", "ctrl+s")
        assert not isinstance(app.screen, ConflictScreen)
        assert path.read_text() == "x" + SOURCE


async def test_a_file_created_at_a_new_files_path_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "new.py"
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        path.write_text("made meanwhile\n")
        await pilot.press("x", "ctrl+s")
        assert isinstance(app.screen, ConflictScreen)
        await pilot.press("escape")
        assert path.read_text() == "made meanwhile\n"


async def test_a_read_only_file_is_refused_and_save_as_offered(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    path.chmod(0o444)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+s")
        assert isinstance(app.screen, PromptScreen)
        problem = str(app.screen.query_one("#problem").render())
        assert "read-only" in problem and "0444" in problem
        assert path.read_text() == SOURCE and stat.S_IMODE(path.stat().st_mode) == 0o444
        await answer(pilot, str(tmp_path / "copy.py"))
        assert (tmp_path / "copy.py").read_text() == "x" + SOURCE
        assert app.file.path == str(tmp_path / "copy.py") and not app.modified
        assert path.read_text() == SOURCE


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
async def test_root_saving_another_users_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    os.chown(path, 1234, 4321)
    path.chmod(0o664)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+s")
    st = path.stat()
    assert path.read_text() == "x" + SOURCE
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o664)


async def test_hard_links_stay_links(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    other = tmp_path / "other-name.py"
    os.link(path, other)
    inode = path.stat().st_ino
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+s")
    assert path.stat().st_ino == inode and path.stat().st_nlink == 2
    assert other.read_text() == "x" + SOURCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py", "other-name.py"]  # the backup is gone


def test_a_failed_in_place_write_restores_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    os.link(path, tmp_path / "link.py")
    file = OpenFile.open(str(path))
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the backup's fsync passes, the in-place write's fails
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        file.save("half" * 1000)
    monkeypatch.undo()
    assert path.read_text() == SOURCE and file.text == SOURCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py", "link.py"]


async def test_a_fifo_or_device_is_never_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    app = make_app(SOURCE)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "f12")
        await answer(pilot, str(fifo))
        assert "a FIFO" in str(app.screen.query_one("#problem").render())
        await answer(pilot, "/dev/null")
        assert "a character device" in str(app.screen.query_one("#problem").render())
        assert stat.S_ISFIFO(fifo.stat().st_mode) and app.file.path is None and app.modified


async def test_stale_temporaries_of_dead_saves_are_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    dead, live = dead_pid(), os.getpid()
    stale = tmp_path / f".code.py.codellama-tui-{dead}-abc123.tmp"
    running = tmp_path / f".code.py.codellama-tui-{live}-abc123.tmp"
    backup = tmp_path / f".code.py.codellama-tui-{dead}-abc123.bak"
    other = tmp_path / f".else.py.codellama-tui-{dead}-abc123.tmp"
    for leftover in (stale, running, backup, other):
        leftover.write_text("partial")
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert "interrupted save left a backup" in app.status.render_text()
        assert not stale.exists()  # cleaned at open
        stale.write_text("partial")
        await pilot.press("x", "ctrl+s")
    assert not stale.exists()  # and at save
    assert running.exists() and other.exists()  # a live process's, another file's
    assert backup.exists()  # an interrupted in-place write may have left the only intact copy in it


# ----- save-as: never a dead end, never stranded text


async def test_save_as_asks_before_replacing_a_file(tmp_path: Path) -> None:
    existing = tmp_path / "keep.py"
    existing.write_text("precious\n")
    app = make_app(SOURCE)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("f12")
        await answer(pilot, str(existing))
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # back in the dialog, with the name and why
        assert isinstance(app.screen, PromptScreen) and "not replaced" in str(app.screen.query_one("#problem").render())
        assert existing.read_text() == "precious\n" and app.file.path is None
        await answer(pilot, str(existing))
        await pilot.press("y")
        assert existing.read_text() == SOURCE and app.file.path == str(existing)


async def test_save_as_expands_home_and_offers_to_create_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    app = make_app(SOURCE)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+s")  # a new buffer: asks for a name
        await answer(pilot, "~/project/x.py")
        assert isinstance(app.screen, ConfirmScreen)
        assert str(tmp_path / "project") in str(app.screen.query_one("#question").render())
        await pilot.press("n")  # not created: nothing saved, nothing named
        assert not (tmp_path / "project").exists() and app.file.path is None and app.modified
        await pilot.press("f12")
        await answer(pilot, "~/project/x.py")
        await pilot.press("y")
        assert (tmp_path / "project" / "x.py").read_text() == "x" + SOURCE and not app.modified


async def test_save_as_is_in_the_palette_and_rebindable() -> None:
    app = CodeLlamaApp(None, text=SOURCE, keys={"save_as": "f11"}, client_factory=FakeClient)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert "Save as" in [command.title for command in app.get_system_commands(app.screen)]
        await pilot.press("f11")
        assert isinstance(app.screen, PromptScreen)


async def test_a_bad_name_keeps_the_dialog_and_the_text(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    app = make_app(SOURCE)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x", "ctrl+s")
        await answer(pilot, str(tmp_path))  # a directory
        assert isinstance(app.screen, PromptScreen)
        assert "is a directory" in str(app.screen.query_one("#problem").render())
        await answer(pilot, str(tmp_path / "plain" / "x.py"))  # below a file
        assert "is not a folder" in str(app.screen.query_one("#problem").render())
        await pilot.press("a", "b")  # typed for the dialog: lands in it, not in the buffer
        assert app.screen.query_one(Input).value.endswith("x.pyab")
        assert app.editor.text == "x" + SOURCE and app.file.path is None
        await pilot.press("escape")
        assert app.modified and "not saved" in app.status.render_text()


async def test_a_failed_save_of_a_named_file_asks_again_each_time(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "code.py"
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert "does not exist" in app.status.render_text()  # said at open
        await pilot.press("x", "ctrl+s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert "NOT saved" in app.status.render_text() and app.modified
        assert app.file.path == str(path)
        await pilot.press("ctrl+s")  # asked again, not retried blindly
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        assert path.read_text() == "x" and not app.modified


async def test_quit_then_save_goes_through_the_same_questions(tmp_path: Path) -> None:
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("x")
        path.write_text("theirs\n")
        await pilot.press("ctrl+q", "s")
        assert isinstance(app.screen, ConflictScreen)
        await pilot.press("escape")  # nothing written, still running
        assert app.is_running and path.read_text() == "theirs\n"
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("s", "o")
    assert path.read_text() == "x" + SOURCE and app.return_code == 0


# ----- line endings and the byte-order mark


async def test_line_endings_are_kept_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.py"
    path.write_bytes(b"a = 1\r\nb = 2\nc = 3\r\n\x0cd = 4\n")
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.editor.text == "a = 1\nb = 2\nc = 3\n\nd = 4\n"
        app.editor.move_cursor((1, 5))
        await pilot.press("0", "enter", "e", "ctrl+s")
    # the edited line keeps its own ending, the new one gets the file's most common (\r\n: the first of a tie)
    assert path.read_bytes() == b"a = 1\r\nb = 20\ne\r\nc = 3\r\n\x0cd = 4\n"


async def test_a_windows_file_stays_a_windows_file(tmp_path: Path) -> None:
    path = tmp_path / "win.py"
    path.write_bytes(b"a\r\nb\r\n")
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert not app.modified
        app.editor.move_cursor((2, 0))
        await pilot.press("c", "enter", "ctrl+s")
    assert path.read_bytes() == b"a\r\nb\r\nc\r\n"


async def test_a_byte_order_mark_is_kept_and_hidden(tmp_path: Path) -> None:
    path = tmp_path / "bom.py"
    path.write_bytes(b"\xef\xbb\xbfx = 1\n")
    app = opened(path)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.editor.text == "x = 1\n"
        app.editor.move_cursor((0, 0))
        await pilot.press("y", "ctrl+s")
    assert path.read_bytes() == b"\xef\xbb\xbfyx = 1\n"


# ----- opening, through the real command


def command(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_binary_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x7fELF\x00\x01\xff\xfe")
    result = command(str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"codellama-tui: error: {path}: a binary file, not text"
    latin = tmp_path / "latin1.py"
    latin.write_bytes(b"x = 1\ns = '\xe9t\xe9'\n")
    result = command(str(latin))
    assert result.returncode == 2 and f"{latin}: not UTF-8 text (byte 0xe9 at line 2)" in result.stderr


def test_a_fifo_or_a_device_is_refused_at_open_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in ((str(fifo), "a FIFO"), ("/dev/zero", "a character device"), (str(tmp_path), "a directory")):
        result = command(path, timeout=20)
        assert (
            result.returncode == 2
            and result.stderr.strip() == f"codellama-tui: error: {path}: {kind}, not a file that can be edited"
        )
