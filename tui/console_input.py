"""The console chat's input protocol, shared by the terminal and the piped path.

As in the seed (lmdeploy's CodeLlama console), an input may span many lines, blank ones included, since
pasted code has blank lines; a line `!!` ends it. An input that is exactly `exit`, `end` or `reset` is a
command instead of a prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

SENTINEL = "!!"
COMMANDS = {"exit": "exit", "end": "end", "reset": "end"}

Command = Literal["exit", "end"]


@dataclass(frozen=True)
class Prompt:
    """Text for the model."""

    text: str


@dataclass(frozen=True)
class Action:
    """A console command: `exit` quits, `end` (alias `reset`) starts a new session."""

    command: Command


Input = Prompt | Action


def is_sentinel(line: str) -> bool:
    """Whether `line` ends an input; blanks around `!!` (a stray space, a CR from Windows) are allowed."""
    return line.strip() == SENTINEL


def classify(text: str) -> Input | None:
    """Turn the lines of one input into a prompt or a command; None for an input with nothing in it."""
    if not text.strip():
        return None
    command = COMMANDS.get(text.strip())
    return Action(command) if command else Prompt(text)  # type: ignore[arg-type]


def read_inputs(lines: Iterable[str]) -> Iterator[Input]:
    """Group lines (with or without their newlines) into inputs, each ended by a `!!` line.

    Lines left over at the end of the stream, with no `!!` after them, still form a last input:
    a script that forgets the final `!!` is not silently ignored.
    """
    pending: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not is_sentinel(line):
            pending.append(line)
            continue
        item = classify("\n".join(pending))
        pending = []
        if item is not None:
            yield item
    item = classify("\n".join(pending))
    if item is not None:
        yield item
