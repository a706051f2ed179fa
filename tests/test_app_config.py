"""The config file: where it lives, what it may hold, and that mistakes are reported, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui.config import Config, ConfigError, config_path, load_config
from tui.files import save_atomic


def test_config_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "codellama-tui" / "config.toml"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.toml") == Config()


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'theme = "light"\nsystem = "Answer in Python"\nhistory = false\n[keys]\ncomplete = "f9, ctrl+space"\n'
        '[sampling]\ntemperature = 0.1\nmax_new_tokens = 64\nstop = ["\\n\\n"]\n'
    )
    config = load_config(path)
    assert config.theme == "light" and config.system == "Answer in Python" and config.history is False
    assert config.keys == {"complete": "f9,ctrl+space"}
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
