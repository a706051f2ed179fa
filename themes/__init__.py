"""The app's Textual themes (dark, light, high contrast) and its stylesheet.

Users name themes by their short names (`--theme dark`, `theme = "light"` in the config file) or by Textual's
own names (`--theme nord`); the command palette lists the registered names, and the one picked there is kept in
the config file.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.theme import BUILTIN_THEMES, Theme

APP_TCSS = Path(__file__).with_name("app.tcss")

THEMES: dict[str, Theme] = {
    "dark": Theme(
        name="codellama-dark",
        primary="#5fafff",
        secondary="#af87ff",
        accent="#ffaf5f",
        warning="#ffd75f",
        error="#ff5f5f",
        success="#87d787",
        foreground="#e4e4e4",
        background="#121212",
        surface="#1c1c1c",
        panel="#262626",
        dark=True,
    ),
    "light": Theme(
        name="codellama-light",
        primary="#005faf",
        secondary="#5f00af",
        accent="#af5f00",
        warning="#875f00",
        error="#d70000",
        success="#008700",
        foreground="#1c1c1c",
        background="#eeeeee",
        surface="#ffffff",
        panel="#dadada",
        dark=False,
    ),
    "high-contrast": Theme(
        name="codellama-contrast",
        primary="#00ffff",
        secondary="#ffff00",
        accent="#ffff00",
        warning="#ffff00",
        error="#ff0000",
        success="#00ff00",
        foreground="#ffffff",
        background="#000000",
        surface="#000000",
        panel="#000000",
        boost="#303030",
        dark=True,
        variables={"border": "#ffffff", "border-blurred": "#808080", "text-muted": "#d0d0d0"},
    ),
}


def theme_name(name: str) -> str:
    """The registered name for a short name ("dark"), a full one, or one of Textual's own themes (the command
    palette offers those too); ValueError for unknown names."""
    if name in THEMES:
        return THEMES[name].name
    if name in {theme.name for theme in THEMES.values()} or name in BUILTIN_THEMES:
        return name
    raise ValueError(
        f"unknown theme {name!r}; choose one of: {', '.join(THEMES)}, or one of Textual's: {', '.join(BUILTIN_THEMES)}"
    )


def short_name(name: str) -> str:
    """The name a user writes for a registered theme: "dark" for codellama-dark, Textual's names as they are."""
    return next((short for short, theme in THEMES.items() if theme.name == name), name)


def register_themes(app: App[object]) -> None:
    """Make the themes available to `app` (and so to its command palette)."""
    for theme in THEMES.values():
        app.register_theme(theme)
