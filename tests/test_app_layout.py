"""What fits at 80x24 and 60x20: the status line and the footer shorten by priority, dialogs wrap, F1 lists every
key, Esc closes panels, and the editor's view follows the cursor after Tab and F7."""

from __future__ import annotations

import html
import re

import pytest
from textual.widgets import Static

from tests.fakes import INFO, FakeClient
from tests.test_app import idle, make_app, ready, wait_for
from tui.app import CodeLlamaApp
from tui.apply_screen import ApplyScreen
from tui.help_screen import HelpScreen
from tui.main_screen import MainScreen
from tui.screens import ConfirmScreen, ConflictScreen, PromptScreen, QuitScreen
from widgets.footer import Footer
from widgets.status_bar import StatusBar, shorten

NOTE = "file longer than the context: 336 lines above and 0 below left out"


def shown_status(app: CodeLlamaApp) -> str:
    return str(app.status.query_one("#status-text", Static).render())


def footer_keys(app: CodeLlamaApp) -> list[str]:
    return [key.key for key in app.screen.query_one(Footer).children]


def test_shorten_cuts_at_a_word_with_an_ellipsis() -> None:
    assert shorten(NOTE, 40) == "file longer than the context: 336 lines…"
    assert shorten(NOTE, 200) == NOTE
    assert shorten("abcdefghij", 5) == "abcd…"  # one long word is the only thing cut mid-word


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_status_line_keeps_state_cap_and_context_before_the_model(width: int) -> None:
    bar = StatusBar()
    bar.info, bar.cap, bar.context_used, bar.note = INFO, "chat", 27, NOTE
    bar.set_state("ready", "eos, 20 tokens, 47.5 tok/s")
    full = bar.render_text()
    assert INFO.name in full and "cpu tp1" in full and NOTE in full  # without a width: everything
    line = bar.render_text(width)
    assert len(line) <= width
    assert line.startswith("ready") and " │ chat │ " in line and line.endswith("ctx 27/16384")
    assert INFO.name not in line  # the model's name goes first
    note = line.split(" │ ")[1]
    assert NOTE.startswith(note.removesuffix("…")) and (note == NOTE or note.endswith("…"))
    assert note == NOTE or NOTE[len(note.removesuffix("…"))] in " :"  # cut at a word, never mid-word


@pytest.mark.parametrize("size", [(80, 24), (60, 20)])
async def test_status_and_footer_fit_and_keep_what_matters(size: tuple[int, int]) -> None:
    app = make_app(hold=True)
    app.cap = "chat"
    async with app.run_test(size=size) as pilot:
        await ready(pilot)
        app.chat_input.load_text("hello")
        await pilot.press("f5")  # held open: Esc stops it
        await wait_for(pilot, lambda: app._jobs)
        app.chat_input.load_text("and then")
        app.status.note = NOTE
        keys_while_running = {"escape", "f1", "f5", "f8", "ctrl+n"}

        def laid_out() -> bool:  # the note shortened, the keys rebuilt and measured
            keys = app.screen.query_one(Footer).children
            return (
                "…" in shown_status(app)
                and keys_while_running <= set(footer_keys(app))
                and all(key.outer_size.width for key in keys)
            )

        await wait_for(pilot, laid_out)
        line = shown_status(app)
        assert len(line) <= size[0] and "chat" in line and "ctx " in line and "…" in line, line
        keys = footer_keys(app)
        footer = app.screen.query_one(Footer)
        assert sum(key.outer_size.width for key in footer.children) <= size[0]  # nothing runs past the edge
        assert "ctrl+p" not in keys  # no docked palette key over the others at this width
        await pilot.press("escape")
        await wait_for(pilot, lambda: "escape" not in footer_keys(app))
        keys = footer_keys(app)
        assert not app._jobs and {"f1", "f5", "f8", "ctrl+n"} <= set(keys), keys


def screen_text(app: CodeLlamaApp) -> str:
    """What the terminal shows, as text (read from a screenshot: each piece at its column)."""
    rows: dict[float, str] = {}
    svg = app.export_screenshot()
    for x, y, text in re.findall(r'<text [^>]*x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>', svg):
        column = round(float(x) / 12.2)  # the cell width of Textual's screenshots
        rows[float(y)] = rows.get(float(y), "").ljust(column) + html.unescape(text).replace("\xa0", " ")
    return "\n".join(row for _, row in sorted(rows.items()))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_quit_dialog_shows_all_its_choices(size: tuple[int, int]) -> None:
    app = make_app()
    async with app.run_test(size=size) as pilot:
        app.editor.insert("x")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))

        def text() -> str:  # the dialog's lines, unboxed
            return " ".join(re.sub("[│█╭╮╰╯─▀▄]", " ", screen_text(app)).split())

        await wait_for(pilot, lambda: "Esc: keep editing" in text())  # drawn
        shown = text()
        assert "s: save and quit" in shown and "d: quit without saving" in shown


async def test_f1_lists_every_key_from_the_bindings_and_esc_closes_it() -> None:
    app = CodeLlamaApp(None, text="x\n", keys={"complete": "f9,ctrl+space,ctrl+@"}, client_factory=FakeClient)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        text = str(app.screen.query_one("#help-keys", Static).render())
        for binding in MainScreen.BINDINGS:
            assert binding.description in text  # every main key, so the screen is never stale
        assert "f9 / ^space / ^@" in text and "Complete" in text  # the user's keymap, not the default F2
        assert "esc" in text and "Stop" in text and "Copy code" in text and "Command palette" in text
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_esc_closes_the_keys_panel() -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.action_show_help_panel()
        await wait_for(pilot, lambda: app.screen.query("HelpPanel"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query("HelpPanel"))


LONG = "".join(f"x{i} = {i}\n" for i in range(60))


async def test_the_view_follows_the_cursor_after_tab_accepts_a_suggestion() -> None:
    answer = "".join(f"y{i} = {i}\n" for i in range(30))
    app = make_app(LONG, answers={"completion": answer})
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app.editor.move_cursor((60, 0))  # the end: the view must go past where the document ended
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        await pilot.press("tab")
        editor = app.editor
        assert editor.cursor_location == (90, 0)
        await wait_for(pilot, lambda: editor.scroll_y <= 90 < editor.scroll_y + editor.scrollable_content_region.height)


async def test_the_view_follows_the_cursor_after_f7_applies_a_block() -> None:
    code = "".join(f"z{i} = {i}\n" for i in range(30))
    app = make_app(LONG, answers={"chat": f"Here:\n```python\n{code}```\n"})
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app.cap = "chat"
        app.chat_input.load_text("more")
        await pilot.press("f5")
        await wait_for(pilot, idle(app))
        app.editor.focus()
        app.editor.move_cursor((60, 0))  # the end, past the last paragraph: the block is inserted there
        await pilot.press("f7")
        await wait_for(pilot, lambda: isinstance(app.screen, ApplyScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, MainScreen))
        editor = app.editor
        row = editor.cursor_location[0]
        assert row == 60 + 29
        height = editor.scrollable_content_region.height
        await wait_for(pilot, lambda: editor.scroll_y <= row < editor.scroll_y + height)


async def test_ghost_lines_below_the_viewport_scroll_into_view() -> None:
    answer = "".join(f"w{i} = {i}\n" for i in range(6))
    app = make_app(LONG, answers={"completion": answer})
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        editor = app.editor
        height = editor.scrollable_content_region.height
        editor.move_cursor((height - 2, 0))  # the cursor on the viewport's last rows
        await pilot.pause(0.1)
        assert editor.scroll_y == 0
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        row = editor.cursor_location[0]
        await wait_for(pilot, lambda: editor.scroll_y > 0 and row + len(editor.ghost_tail()) < editor.scroll_y + height)
        assert app.query_one("#ghost-lines").has_class("-visible")


@pytest.mark.parametrize(
    "dialog",
    [
        lambda: QuitScreen("example.py"),
        lambda: PromptScreen("Save as:"),
        lambda: ConfirmScreen("Replace it?"),
        lambda: ConflictScreen("changed on disk", "a\n", "b\n"),
        lambda: HelpScreen([], []),
    ],
    ids=["quit", "prompt", "confirm", "conflict", "help"],
)
async def test_esc_closes_every_dialog(dialog) -> None:  # noqa: ANN001 - a screen factory
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        app.push_screen(dialog())
        await wait_for(pilot, lambda: not isinstance(app.screen, MainScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, MainScreen))


async def test_a_suggestion_at_the_end_of_a_long_file_scrolls_into_view() -> None:
    answer = "".join(f"v{i} = {i}\n" for i in range(6))
    app = make_app(LONG, answers={"completion": answer})
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        editor = app.editor
        editor.move_cursor((60, 0))  # the last line, at the viewport's bottom
        height = editor.scrollable_content_region.height
        await wait_for(pilot, lambda: editor.scroll_y == 60 - height + 1)
        await pilot.press("f2")
        await wait_for(pilot, idle(app))
        await wait_for(pilot, lambda: 60 + len(editor.ghost_tail()) < editor.scroll_y + height)  # every ghost line
        assert app.query_one("#ghost-lines").has_class("-visible")
        await pilot.press("escape")
        assert editor.virtual_size.height == 61  # the room goes with the ghost
