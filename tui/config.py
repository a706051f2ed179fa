"""The user's config file: `$XDG_CONFIG_HOME/codellama-tui/config.toml` (default `~/.config/...`).

    theme = "light"                   # dark, light, high-contrast, or a Textual theme (the palette's pick)
    model = "/models/CodeLlama-7b-Instruct-hf"
    system = "Provide answers in Python"
    speculate = 8                     # tokens proposed per step, 0 off (--speculate of all but the benches)
    kv = "int8"                       # the KV cache: bf16 (default) or int8 (--kv of all but the benches)
    url = "http://localhost:23333"    # a server instead of the model (the app, chat, generate and web)
    api_key = "..."                   # its key ($CODELLAMA_TUI_API_KEY and --api-key win)
    served_model = "CodeLlama-7b-Instruct-hf"  # which of its models (default: its first)
    suggest = "auto"                  # suggestions as you type; "off": F2 only (default: auto on CUDA, else off)
    suggest_max_tokens = 64           # a suggestion's budget (F2 and as you type); it ends with its block
    suggest_delay_ms = 300            # as you type: the pause after the last key before a suggestion is asked
    history = false                   # keep no chat history on disk (default true; see tui/history.py)

    [keys]                            # binding id = key(s), comma-separated
    complete = "f2,ctrl+space"        # ctrl+space binds ctrl+@ too (what tmux sends for it)
    send = "f5"

    [sampling]                        # defaults for every cap; command-line options win
    temperature = 0.1
    max_new_tokens = 256

Every value is optional; a missing file means defaults. A bad file is an error with a one-line
message naming the file, so that a typo never silently changes what a key does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from engine.requests import KV, MAX_SPECULATE, SamplingParams
from tui.files import save_atomic
from tui.suggestions import SUGGEST_MODES, SuggestSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The ids of the app's rebindable bindings (see tui.app): what a [keys] table may name.
BINDING_IDS = (
    "complete", "infill", "switch_pane", "send", "ask", "insert_code", "switch_cap",
    "stop", "save", "save_as", "quit", "new_chat", "accept", "accept_word", "accept_line", "help", "focus_log",
    "copy_answer", "copy_code", "maximize", "open_file", "toggle_tree", "close_file", "next_file", "previous_file",
    "goto_line", "find", "replace", "history",
)  # fmt: skip
_SUGGEST_LIMITS = {"suggest_max_tokens": (1, 4096), "suggest_delay_ms": (0, 60_000)}
_SAMPLING_FIELDS = {f.name: f.type for f in fields(SamplingParams)}


def with_terminal_aliases(keys: str) -> str:
    """`keys` plus what terminals send for them: ctrl+space arrives as ctrl+@ (a NUL byte) in tmux and in most
    terminals, which cannot tell the two apart."""
    names = keys.split(",")
    if "ctrl+space" in names and "ctrl+@" not in names:
        names.append("ctrl+@")
    return ",".join(names)


class ConfigError(Exception):
    """The config file cannot be read or holds values the app does not know."""


@dataclass
class Config:
    theme: str | None = None
    model: str | None = None
    system: str | None = None
    speculate: int | None = None
    kv: str | None = None
    url: str | None = None
    api_key: str | None = None
    served_model: str | None = None
    history: bool = True
    keys: dict[str, str] = field(default_factory=dict)
    sampling: dict[str, object] = field(default_factory=dict)
    suggest: SuggestSettings = field(default_factory=SuggestSettings)


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
        elif key == "speculate":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SPECULATE:
                raise fail(f"speculate must be a whole number from 0 (off) to {MAX_SPECULATE}")
            config.speculate = value
        elif key == "kv":
            if value not in KV:
                raise fail(f"kv must be one of: {', '.join(KV)}")
            config.kv = value
        elif key == "suggest":
            if value not in SUGGEST_MODES:
                raise fail(f"suggest must be one of: {', '.join(SUGGEST_MODES)}")
            config.suggest = replace(config.suggest, mode=value)
        elif key in _SUGGEST_LIMITS:
            low, high = _SUGGEST_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise fail(f"{key} must be a whole number from {low} to {high}")
            if key == "suggest_max_tokens":
                config.suggest = replace(config.suggest, max_tokens=value)
            else:
                config.suggest = replace(config.suggest, delay_s=value / 1000)
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
                config.keys[binding_id] = with_terminal_aliases(keys.replace(" ", ""))
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


_TABLE_RE = re.compile(r"^\s*\[")
_THEME_RE = re.compile(r"^\s*theme\s*=")


def save_theme(theme: str, path: Path | None = None) -> None:
    """Write `theme = "..."` into the config file, keeping every other line as it is; ConfigError (and the file
    untouched) when the file cannot be read as the app's config or written."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    load_config(path)  # a file the app cannot read is never rewritten
    lines = text.splitlines(keepends=True)
    setting = f"theme = {json.dumps(theme)}\n"
    top = next((i for i, line in enumerate(lines) if _TABLE_RE.match(line)), len(lines))
    at = next((i for i in range(top) if _THEME_RE.match(lines[i])), None)
    if at is not None:
        lines[at] = setting
    else:
        if top and not lines[top - 1].endswith("\n"):
            lines[top - 1] += "\n"
        lines.insert(top, setting)
    new = "".join(lines)
    after, kept = tomllib.loads(new), tomllib.loads(text)
    kept.pop("theme", None)
    if after.pop("theme", None) != theme or after != kept:  # every other setting stays what it was
        raise ConfigError(f"{path}: the theme line cannot be rewritten safely; set theme = {json.dumps(theme)} by hand")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(str(path), new)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
