"""The app as a coding workspace: open files from inside it (ctrl+o picker, ctrl+t tree), several files in tabs with
every save guarantee each, the file's name and marker in the titles, go to line, find and replace (Pilot against
the fake engine)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from textual.binding import Binding
from textual.pilot import Pilot
from textual.widgets import Input, Label, OptionList

from engine.requests import EngineSpec
from tests.fakes import FakeClient
from tests.test_app import make_app, ready, wait_for
from tests.test_app_terminal import MARKER, ROOT, Terminal
from tui.app import CodeLlamaApp
from tui.buffers import MODIFIED
from tui.config import BINDING_IDS
from tui.main_screen import MainScreen
from tui.path_picker import PathPicker, best_matches, workspace_files
from tui.recovery import RecoveryStore
from tui.screens import CloseScreen, PromptScreen, QuitScreen
from tui.terminal import TITLE_POP, TITLE_PUSH, title_sequence
from widgets.file_tree import FileTree
from widgets.find_bar import FindBar, parse_location

A = "def add(a, b):\n    return a + b\n"
B = "import os\n\nprint(os.getcwd())\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with two files to open and everything the picker and the tree must leave out."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text(A)
    (root / "pkg" / "b.py").write_text(B)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\x00\x01")
    (root / "env").mkdir()
    (root / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "env" / "site.py").write_text("x = 1\n")
    (root / "logo.dat").write_bytes(b"\x89PNG\x00\xff")
    (root / "huge.txt").write_bytes(b"x" * (3 * 2**20))
    monkeypatch.chdir(root)
    return root


async def pick(pilot: Pilot, query: str, best: str) -> None:
    """ctrl+o, type `query`, and wait until `best` is listed first, highlighted."""
    app = pilot.app
    await pilot.press("ctrl+o")
    assert isinstance(app.screen, PathPicker)
    picker = app.screen
    await wait_for(pilot, lambda: "files" in str(picker.query_one("#picker-note", Label).render()))
    picker.query_one("#picker-query", Input).value = query
    matches = picker.query_one(OptionList)
    await wait_for(pilot, lambda: matches.highlighted == 0 and matches.highlighted_option.id == best)


async def open_two(pilot: Pilot, project: Path) -> CodeLlamaApp:
    app = pilot.app
    assert isinstance(app, CodeLlamaApp)
    await app.open_path(str(project / "a.py"))
    await app.open_path(str(project / "pkg" / "b.py"))
    await pilot.pause()
    return app


# ----- opening files


def test_the_workspace_list_leaves_out_what_no_one_edits_and_is_bounded(project: Path) -> None:
    assert sorted(workspace_files(project)) == ["a.py", os.path.join("pkg", "b.py")]
    (project / "loop").symlink_to(project)  # a symlinked folder is not followed: no endless walk
    for n in range(30):
        (project / "pkg" / f"m{n}.py").write_text("")
    assert len(list(workspace_files(project, limit=10))) == 10
    assert best_matches("pkgb", ["a.py", "pkg/b.py", "pkg/m1.py"]) == ["pkg/b.py"]


async def test_ctrl_o_opens_the_picked_file_in_a_new_tab(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pick(pilot, "pkgb", os.path.join("pkg", "b.py"))
        picker = app.screen
        assert isinstance(picker, PathPicker)
        assert sorted(picker._paths) == ["a.py", os.path.join("pkg", "b.py")]
        assert str(picker.query_one("#picker-note", Label).render()) == "2 files"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.file.path == str(project / "pkg" / "b.py"))
        assert app.editor.text == B and not app.modified
        assert list(app.buffers) == ["file-2"]  # the empty buffer the app started with gave its place
        await pick(pilot, "a.py", "a.py")
        await pilot.press("escape")  # nothing opened
        assert app.file.path == str(project / "pkg" / "b.py") and len(app.buffers) == 1


async def test_enter_before_the_matches_come_opens_the_best_match_of_what_was_typed(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pick(pilot, "", "a.py")
        picker = app.screen
        monkeypatch.setattr(picker, "_find", lambda query, candidates: None)  # its matcher thread answers late
        picker.query_one("#picker-query", Input).value = "pkgb"
        await pilot.press("enter")  # the list still shows the empty query's matches, a.py first
        await wait_for(pilot, lambda: app.file.path == str(project / "pkg" / "b.py"))


async def test_a_file_that_cannot_be_edited_is_refused_in_one_line_and_an_open_one_comes_to_the_front(
    project: Path,
) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await app.open_path(str(project / "logo.dat"))
        assert "not opened" in app.status.note and "binary" in app.status.note
        await app.open_path(str(project / "huge.txt"))
        assert "too big to edit here" in app.status.note and len(app.buffers) == 2
        await app.open_path("a.py")  # the same file by another name: its tab comes to the front
        assert len(app.buffers) == 2 and app.file.path == str(project / "a.py")


async def test_the_tree_opens_the_file_under_the_cursor(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+t")
        tree = app.query_one(FileTree)
        assert tree.has_focus and tree.display
        await wait_for(pilot, lambda: tree.root.children)
        assert sorted(str(node.label) for node in tree.root.children) == ["a.py", "huge.txt", "logo.dat", "pkg"]
        node = next(node for node in tree.root.children if str(node.label) == "a.py")
        tree.move_cursor(node)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.file.path == str(project / "a.py"))
        assert app.editor.has_focus and app.editor.text == A
        await pilot.press("ctrl+t")  # back to the tree
        assert tree.has_focus
        await pilot.press("ctrl+t")  # and away: hidden
        assert not tree.display and app.editor.has_focus


# ----- tabs


async def test_each_tab_keeps_its_text_cursor_undo_and_modified_state(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        assert app.file.path.endswith("b.py") and app.tabs.has_class("-single") is False
        app.editor.move_cursor((2, 0))
        await pilot.press("x")
        await pilot.press("ctrl+pageup")  # to a.py
        assert app.file.path.endswith("a.py") and app.editor.text == A and not app.modified
        app.editor.move_cursor((1, 4))
        await pilot.press("y")
        assert app.editor.text == A.replace("    return", "    yreturn")
        await pilot.press("ctrl+pagedown")  # back to b.py: its text, cursor and undo are as left
        assert app.file.path.endswith("b.py") and app.editor.text == B.replace("print", "xprint")
        assert app.editor.cursor_location == (2, 1) and app.modified
        await pilot.press("ctrl+z")
        assert app.editor.text == B and not app.modified
        await pilot.press("ctrl+pagedown")  # round the end, to a.py: still modified, undo is its own
        assert app.file.path.endswith("a.py") and app.modified and app.editor.cursor_location == (1, 5)
        await pilot.press("ctrl+z")
        assert app.editor.text == A


async def test_switching_tabs_stops_a_fill_and_keeps_what_arrived_in_its_own_file(project: Path) -> None:
    (project / "a.py").write_text("def f():\n    <FILL>\n")
    app = make_app(text="", answers={"infilling": "abcdefghijkl"}, hold=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await pilot.press("ctrl+pageup", "f3")  # a.py: fill its marker
        await wait_for(pilot, lambda: "abc" in app.editor.text)
        request_id = app.client.submitted[-1].id
        await pilot.press("ctrl+pagedown")  # to b.py: the fill stops
        assert request_id in app.client.cancelled and not app._jobs
        app.client.release.set()
        await pilot.pause(0.2)
        assert app.editor.text == B  # nothing of it reached the file in front
        await pilot.press("ctrl+pageup")
        assert app.editor.text == "def f():\n    abc\n" and app.modified  # what arrived stays, in a.py


async def test_closing_a_tab_with_unsaved_changes_asks(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await pilot.press("x", "ctrl+w")
        assert isinstance(app.screen, CloseScreen)
        await pilot.press("escape")  # keep editing
        assert len(app.buffers) == 2 and app.editor.text == "x" + B
        await pilot.press("ctrl+w", "s")  # save and close
        await wait_for(pilot, lambda: len(app.buffers) == 1)
        assert (project / "pkg" / "b.py").read_text() == "x" + B and app.file.path.endswith("a.py")
        assert app.tabs.has_class("-single")
        await pilot.press("y", "ctrl+w", "d")  # discard and close the last: a new buffer takes its place
        await wait_for(pilot, lambda: app.file.path is None)
        assert (project / "a.py").read_text() == A and app.editor.text == "" and len(app.buffers) == 1


async def test_quit_asks_about_every_unsaved_tab(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await pilot.press("x")
        await pilot.press("ctrl+pageup", "y")
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, QuitScreen) and app.file.path.endswith("a.py")
        shown = " ".join(str(label.render()) for label in app.screen.query(Label))
        assert "a.py has unsaved changes" in shown and "1 more unsaved file after this one" in shown
        await pilot.press("d")  # a.py: discard
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen) and app.file.path.endswith("b.py"))
        await pilot.press("escape")  # keep editing: nothing quits, b.py still unsaved
        assert app.is_running and app.modified
        await pilot.press("ctrl+q")  # a.py was answered before but is asked again: nothing lost by Esc
        assert isinstance(app.screen, QuitScreen) and app.file.path.endswith("a.py")
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen) and app.file.path.endswith("b.py"))
        await pilot.press("s")
    assert app.return_code == 0
    assert (project / "a.py").read_text() == A and (project / "pkg" / "b.py").read_text() == "x" + B
    assert not RecoveryStore().copies_of(str(project / "a.py"))


async def test_every_modified_buffer_has_its_recovery_copy(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await pilot.press("x", "ctrl+pageup", "y")
        store = RecoveryStore()
        a, b = str(project / "a.py"), str(project / "pkg" / "b.py")
        await wait_for(pilot, lambda: store.copies_of(a) and store.copies_of(b))
        assert [c.text for c in store.copies_of(a)] == ["y" + A] and [c.text for c in store.copies_of(b)] == ["x" + B]
        await pilot.press("ctrl+pagedown", "z")  # the signal path writes every modified buffer at once
        assert app.keep_recovery_copy()
        assert [c.text for c in store.copies_of(b)] == ["xz" + B] and [c.text for c in store.copies_of(a)] == ["y" + A]
        await pilot.press("ctrl+s")  # b.py saved: its copy goes, a.py's stays
        assert not store.copies_of(b) and store.copies_of(a)


# ----- titles


def test_the_terminal_title_cannot_carry_control_sequences() -> None:
    assert title_sequence("a\x1b]0;evil\x07.py ●") == "\x1b]2;a]0;evil.py ●\x07"


async def test_the_name_and_a_marker_are_in_the_tab_border_and_terminal_titles(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert app.sub_title == "new buffer"
        await open_two(pilot, project)
        pane = app.query_one("#editor-pane")
        assert app.sub_title == "b.py" and pane.border_title == "b.py"
        await pilot.press("x")
        assert app.sub_title == f"b.py {MODIFIED}" and pane.border_title == f"b.py {MODIFIED}"
        assert str(app.tabs.get_tab("file-3").label) == f"b.py {MODIFIED}"
        await pilot.press("ctrl+pageup")
        assert app.sub_title == "a.py" and str(app.tabs.get_tab("file-2").label) == "a.py"
        assert str(app.tabs.get_tab("file-3").label) == f"b.py {MODIFIED}"  # the other tab keeps its marker
        await pilot.press("ctrl+pagedown", "ctrl+s")
        assert app.sub_title == "b.py" and app.status.note == f"saved {project / 'pkg' / 'b.py'}"
        await pilot.press("y")  # the note no longer says what the buffer holds: it goes
        assert app.status.note == "" and app.sub_title == f"b.py {MODIFIED}"


async def test_save_as_never_makes_two_tabs_of_one_file(project: Path) -> None:
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        await pilot.press("x", "f12")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one(Input).value = str(project / "a.py")
        await pilot.press("enter")
        assert isinstance(app.screen, PromptScreen)  # asked again, with the reason
        assert "open in another tab" in str(app.screen.query_one("#problem", Label).render())
        assert (project / "a.py").read_text() == A and app.file.path.endswith("b.py") and app.modified


async def test_the_picker_says_when_it_stopped_listing_and_a_long_list_fits_80x24(project: Path) -> None:
    for n in range(60):
        (project / f"m{n}.py").write_text("")
    app = make_app(text="")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app.push_screen(PathPicker(project, limit=50))
        await wait_for(pilot, lambda: isinstance(app.screen, PathPicker) and len(app.screen._paths) == 50)
        note = app.screen.query_one("#picker-note", Label)
        await wait_for(pilot, lambda: str(note.render()).startswith("the first 50 files only"))
        await pilot.pause()
        dialog = app.screen.query_one("#picker").region
        assert dialog.bottom <= 24 and note.region.bottom <= dialog.bottom
        assert app.screen.query_one(OptionList).region.height >= 8


async def test_two_files_of_the_same_name_show_their_folders(project: Path) -> None:
    (project / "a").mkdir()
    (project / "a" / "b.py").write_text("x\n")
    app = make_app(text="")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await open_two(pilot, project)
        assert str(app.tabs.get_tab("file-3").label) == "b.py"
        await app.open_path("a/b.py")
        assert [str(app.tabs.get_tab(pane).label) for pane in app.buffers] == ["a.py", "b.py · pkg", "b.py · a"]
        assert app.status.note == "opened a/b.py"
        await pilot.press("ctrl+w")
        await wait_for(pilot, lambda: len(app.buffers) == 2)
        assert str(app.tabs.get_tab("file-3").label) == "b.py"


# ----- go to line, find, replace


def test_go_to_line_reads_line_and_column() -> None:
    assert parse_location("3", 10) == ((2, 0), "")
    assert parse_location(" 3:5 ", 10) == ((2, 4), "")
    assert parse_location("99", 10) == ((9, 0), "line 99 is past the end: the last line is 10")
    for bad in ("abc", "3:", "-1", "1.5"):
        with pytest.raises(ValueError, match="is not line"):
            parse_location(bad, 10)


async def test_ctrl_g_goes_to_line_and_column_and_bad_input_says_so() -> None:
    app = make_app(text="one\ntwo\nthree three\nfour\n")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+g")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one(Input).value = "3:7"
        await pilot.press("enter")
        assert app.editor.cursor_location == (2, 6) and app.editor.has_focus
        await pilot.press("ctrl+g")
        app.screen.query_one(Input).value = "two"
        await pilot.press("enter")
        assert app.editor.cursor_location == (2, 6)
        assert app.status.note == "go to line: 'two' is not line[:column] (for example 12 or 12:5)"


async def test_find_goes_round_the_end_and_back() -> None:
    app = make_app(text="Add\nadd\nsub\nadd\n")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.editor.move_cursor((1, 1))
        await pilot.press("ctrl+f")
        bar = app.query_one(FindBar)
        assert bar.query_one("#find-query", Input).has_focus
        await pilot.press("a", "d", "d", "enter")  # lower case: any case
        assert app.editor.selection == ((3, 0), (3, 3))
        await pilot.press("enter")  # round the end, to the first line
        assert app.editor.selection == ((0, 0), (0, 3))
        assert str(bar.query_one("#find-note", Label).render()) == "wrapped round the end"
        await pilot.press("up")  # backwards, round the start
        assert app.editor.selection == ((3, 0), (3, 3))
        bar.query_one("#find-query", Input).value = "Add"  # a capital: exact case
        await pilot.press("enter")
        assert app.editor.selection == ((0, 0), (0, 3))
        bar.query_one("#find-query", Input).value = "mul"
        await pilot.press("enter")
        assert str(bar.query_one("#find-note", Label).render()) == "no 'mul' in new buffer"
        await pilot.press("escape")  # the bar closes, the editor has the keys again
        assert not bar.display and app.editor.has_focus


async def test_replace_one_then_all_and_all_is_one_undo_step() -> None:
    text = "x = 1\ny = x + x\nprint(x)\n"
    app = make_app(text=text)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+backslash")
        bar = app.query_one(FindBar)
        assert bar.has_class("-replace")
        bar.query_one("#find-query", Input).value = "x"
        bar.query_one("#find-replacement", Input).focus()
        bar.query_one("#find-replacement", Input).value = "value"
        await pilot.press("enter")  # nothing selected yet: finds the first
        assert app.editor.selection == ((0, 0), (0, 1)) and app.editor.text == text
        await pilot.press("enter")  # replaces it, selects the next
        assert app.editor.text == text.replace("x = 1", "value = 1", 1)
        assert app.editor.selection == ((1, 4), (1, 5))
        await pilot.press("ctrl+a")  # all the others
        assert app.editor.text == text.replace("x", "value")
        assert "replaced 3" in str(bar.query_one("#find-note", Label).render())
        await pilot.press("escape")
        await pilot.press("ctrl+z")  # one step back: before replace all
        assert app.editor.text == text.replace("x = 1", "value = 1", 1)


async def test_every_binding_can_be_rebound_from_the_config(project: Path) -> None:
    bindings = [*CodeLlamaApp.BINDINGS, *MainScreen.BINDINGS]
    ids = {binding.id for binding in bindings if isinstance(binding, Binding)}
    assert {"open_file", "toggle_tree", "close_file", "next_file", "previous_file", "goto_line", "find"} < ids
    assert ids <= set(BINDING_IDS)
    keys = {"goto_line": "f9", "open_file": "f10"}
    app = CodeLlamaApp(None, EngineSpec(), "completion", text="a\nb\n", keys=keys, client_factory=FakeClient)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f9")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press("escape", "f10")
        assert isinstance(app.screen, PathPicker)


@pytest.mark.slow
def test_the_real_command_sets_the_terminal_title(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text(f"{MARKER}\n")
    terminal = Terminal(file, tmp_path / "state")
    try:
        terminal.wait_for(title_sequence("notes.txt — codellama-tui"))
        terminal.wait_for(MARKER)
        terminal.type(b"x")
        terminal.wait_for(title_sequence(f"notes.txt {MODIFIED} — codellama-tui"))
        terminal.proc.send_signal(signal.SIGTERM)
        assert terminal.end() == 128 + signal.SIGTERM
        output = bytes(terminal.output)  # the title before the app's comes back
        assert output.find(TITLE_PUSH.encode()) < output.find(b"\x1b]2;") < output.rfind(TITLE_POP.encode())
        assert output.find(TITLE_PUSH.encode()) >= 0
    finally:
        terminal.close()


@pytest.mark.slow
def test_a_signal_keeps_every_unsaved_tab(tmp_path: Path) -> None:
    """The real command: a second file opened with ctrl+o (the repository's README, never saved), both edited, then
    SIGTERM: each has its recovery copy and neither file changed."""
    file = tmp_path / "notes.txt"
    file.write_text(f"{MARKER}\n")
    readme = ROOT / "README.md"
    before = readme.read_bytes()
    terminal = Terminal(file, tmp_path / "state")
    try:
        terminal.wait_for(MARKER)
        terminal.type(b"a_")
        terminal.wait_for("a_" + MARKER)
        terminal.type(b"\x0f")  # ctrl+o
        listed = len(list(workspace_files(ROOT)))
        terminal.wait_for(f"{listed:,} files")
        terminal.type(b"README.md\r")  # the best match, and the first before any query too
        terminal.wait_for(title_sequence("README.md — codellama-tui"))
        terminal.type(b"b_")
        terminal.wait_for(title_sequence(f"README.md {MODIFIED} — codellama-tui"))
        terminal.proc.send_signal(signal.SIGTERM)
        assert terminal.end() == 128 + signal.SIGTERM
    finally:
        terminal.close()
    store = RecoveryStore(tmp_path / "state" / "codellama-tui" / "recovery")
    assert [copy.text for copy in store.copies_of(str(file))] == [f"a_{MARKER}\n"]
    assert [copy.text for copy in store.copies_of(str(readme))] == ["b_" + before.decode()]
    assert readme.read_bytes() == before and file.read_text() == f"{MARKER}\n"
