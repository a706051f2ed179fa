"""The user's config file: `$XDG_CONFIG_HOME/codellama-tui/config.toml` (default `~/.config/...`).

    theme = "light"                   # dark, light, high-contrast
    model = "/models/CodeLlama-7b-Instruct-hf"
    system = "Provide answers in Python"
    url = "http://localhost:23333"    # a server instead of the model (the app, chat, generate and web)
    api_key = "..."                   # its key ($CODELLAMA_TUI_API_KEY and --api-key win)
    served_model = "CodeLlama-7b-Instruct-hf"  # which of its models (default: its first)
    history = false                   # keep no chat history on disk (default true; see tui/history.py)

    [keys]                            # binding id = key(s), comma-separated
    complete = "f2,ctrl+space"
    send = "f5"

    [sampling]                        # defaults for every cap; command-line options win
    temperature = 0.1
    max_new_tokens = 256

Every value is optional; a missing file means defaults. A bad file is an error with a one-line
message naming the file, so that a typo never silently changes what a key does.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.requests import SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The ids of the app's rebindable bindings (see tui.app): what a [keys] table may name.
BINDING_IDS = (
    "complete", "infill", "switch_pane", "send", "ask", "insert_code", "switch_cap",
    "stop", "save", "save_as", "quit", "new_chat", "accept", "history",
)  # fmt: skip
_SAMPLING_FIELDS = {f.name: f.type for f in fields(SamplingParams)}


class ConfigError(Exception):
    """The config file cannot be read or holds values the app does not know."""


@dataclass
class Config:
    theme: str | None = None
    model: str | None = None
    system: str | None = None
    url: str | None = None
    api_key: str | None = None
    served_model: str | None = None
    history: bool = True
    keys: dict[str, str] = field(default_factory=dict)
    sampling: dict[str, object] = field(default_factory=dict)


def config_path() -> Path:
    """Where the config file lives, following the XDG base directory convention."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "codellama-tui" / "config.toml"


def load_config(path: Path | None = None) -> Config:
    """Read the config file (defaults when it does not exist); raise ConfigError when it is wrong."""
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    config = Config()
    for key, value in data.items():
        if key in ("theme", "model", "system", "url", "api_key", "served_model"):
            if not isinstance(value, str):
                raise fail(f"{key} must be a string")
            setattr(config, key, value)
        elif key == "history":
            if not isinstance(value, bool):
                raise fail("history must be true or false")
            config.history = value
        elif key == "keys":
            if not isinstance(value, dict):
                raise fail("[keys] must be a table")
            for binding_id, keys in value.items():
                if binding_id not in BINDING_IDS:
                    raise fail(f"unknown key binding {binding_id!r}; known: {', '.join(BINDING_IDS)}")
                if not isinstance(keys, str) or not keys.strip():
                    raise fail(f'keys.{binding_id} must be a key name such as "f2" or "ctrl+space"')
                config.keys[binding_id] = keys.replace(" ", "")
        elif key == "sampling":
            if not isinstance(value, dict):
                raise fail("[sampling] must be a table")
            for name, setting in value.items():
                if name not in _SAMPLING_FIELDS:
                    raise fail(f"unknown sampling setting {name!r}; known: {', '.join(_SAMPLING_FIELDS)}")
                config.sampling[name] = tuple(setting) if name == "stop" else setting
            try:
                SamplingParams.for_cap("completion", **config.sampling).check()
            except (TypeError, ValueError) as err:
                raise fail(f"[sampling]: {err}") from None
        else:
            raise fail(f"unknown setting {key!r}")
    return config
