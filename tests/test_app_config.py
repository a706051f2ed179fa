"""The config file: where it lives, what it may hold, and that mistakes are reported, not ignored."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from tests.fakes import FakeClient
from tests.test_app import wait_for
from tests.test_cli import cli, error_line
from themes import theme_name
from tui.app import CodeLlamaApp
from tui.config import Config, ConfigError, config_path, load_config, save_theme
from tui.files import save_atomic


def test_config_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "codellama-tui" / "config.toml"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml") == Config()


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'theme = "light"\nsystem = "Answer in Python"\nspeculate = 8\nhistory = false\n'
        '[keys]\ncomplete = "f9, ctrl+space"\n'
        '[sampling]\ntemperature = 0.1\nmax_new_tokens = 64\nstop = ["\\n\\n"]\n'
    )
    config = load_config(path)
    assert config.theme == "light" and config.system == "Answer in Python" and config.speculate == 8
    assert config.history is False
    assert config.keys == {"complete": "f9,ctrl+space,ctrl+@"}  # what tmux sends for ctrl+space
    assert config.sampling == {"temperature": 0.1, "max_new_tokens": 64, "stop": ("\n\n",)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("theme = ", "config.toml"),
        ("colour = 'red'", "unknown setting 'colour'"),
        ("[keys]\nfly = 'f1'", "unknown key binding 'fly'"),
        ("history = 'no'", "history must be true or false"),
        ("[sampling]\ntemperature = -1", "temperature must be >= 0"),
        ("[sampling]\nwarmth = 1", "unknown sampling setting 'warmth'"),
        ("speculate = 16", "speculate must be a whole number from 0"),
        ("speculate = true", "speculate must be a whole number from 0"),
    ],
)
def test_bad_config_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_save_atomic_writes_through_a_symlink_and_new_files_get_default_mode(tmp_path: Path) -> None:
    real = tmp_path / "real.py"
    real.write_text("old")
    link = tmp_path / "link.py"
    link.symlink_to(real)
    save_atomic(str(link), "new")
    assert link.is_symlink() and real.read_text() == "new"
    fresh = tmp_path / "fresh.py"
    save_atomic(str(fresh), "x")
    assert fresh.read_text() == "x" and fresh.stat().st_mode & 0o600 == 0o600


def test_save_theme_rewrites_only_the_theme_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    mine = '# my settings\nmodel = "/models/7b"  # the big one\n\n[keys]\nsend = "f5"\n[sampling]\ntemperature = 0.1\n'
    path.write_text(mine)
    save_theme("nord", path)
    assert path.read_text() == mine.replace("\n[keys]", '\ntheme = "nord"\n[keys]')  # above the first table
    save_theme("dark", path)
    assert path.read_text() == mine.replace("\n[keys]", '\ntheme = "dark"\n[keys]')  # the same line, rewritten
    assert load_config(path) == Config(
        theme="dark", model="/models/7b", keys={"send": "f5"}, sampling={"temperature": 0.1}
    )


def test_save_theme_creates_the_file_and_never_rewrites_a_bad_one(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "config.toml"
    save_theme("light", fresh)
    assert fresh.read_text() == 'theme = "light"\n'
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        save_theme("light", bad)
    assert bad.read_text() == "model = \n"


async def test_a_theme_picked_in_the_app_is_remembered(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('system = "Answer in Python"\n')
    app = CodeLlamaApp(None, text="x\n", client_factory=FakeClient, config_file=path)
    async with app.run_test() as pilot:
        app.theme = "nord"  # what the palette's "Change theme" does
        await pilot.pause()
        app.theme = "codellama-light"
        await pilot.pause()
    assert load_config(path) == Config(theme="light", system="Answer in Python")
    untouched = CodeLlamaApp(None, text="x\n", client_factory=FakeClient)  # tests and embedders write nothing
    async with untouched.run_test() as pilot:
        untouched.theme = "nord"
        await pilot.pause()
    assert load_config(path).theme == "light"


def test_textual_themes_are_accepted_by_name() -> None:
    assert theme_name("nord") == "nord" and theme_name("textual-light") == "textual-light"
    assert theme_name("dark") == "codellama-dark"
    with pytest.raises(ValueError, match="nord"):
        theme_name("no-such-theme")


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"codellama-tui {version('codellama-tui')}"


def test_ctrl_space_also_binds_what_tmux_sends(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[keys]\ncomplete = "f2,ctrl+space"\n')
    assert load_config(path).keys == {"complete": "f2,ctrl+space,ctrl+@"}


async def test_ctrl_at_from_tmux_completes() -> None:
    app = CodeLlamaApp(None, text="x = ", keys={"complete": "f2,ctrl+space,ctrl+@"}, client_factory=FakeClient)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.info is not None)
        await pilot.press("ctrl+@")  # the NUL byte tmux sends for ctrl+space
        await wait_for(pilot, lambda: app.client.submitted and not app._jobs)
        assert app.client.submitted[-1].cap == "completion" and app.editor.ghost


def test_an_unknown_theme_is_one_line_naming_the_choices() -> None:
    line = error_line(cli("--theme", "no-such-theme"))
    assert "unknown theme 'no-such-theme'" in line and "high-contrast" in line and "nord" in line
