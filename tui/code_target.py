"""Where a chat's code block goes when it is applied (F7): the selection, else the code around the cursor.

Around the cursor means, in Python, the enclosing `def` or `class` found by indentation (with its decorators; the
one the block defines by name when the cursor is inside several), and otherwise the paragraph (the run of non-blank
lines). A cursor on a blank line outside any definition has nothing around it: the block is inserted there.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

Location = tuple[int, int]

_HEADER_RE = re.compile(r"^[ \t]*(?:async[ \t]+def|def|class)[ \t]+(\w+)")
_CLOSING = (")", "]", "}")  # a signature's closing line stands at the header's own indentation


@dataclass(frozen=True)
class Target:
    """The text a code block would replace (`start` to `end`; empty at the cursor), a name for it, and the rest of
    the lines it starts and ends in (`head`, `tail`), which a diff shows around it."""

    start: Location
    end: Location
    text: str
    what: str
    head: str = ""
    tail: str = ""

    @property
    def whole_lines(self) -> bool:
        return self.start[1] == 0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def defined_name(code: str) -> str | None:
    """The name of the first `def` or `class` in `code`."""
    for line in code.split("\n"):
        if match := _HEADER_RE.match(line):
            return match.group(1)
    return None


def enclosing_definitions(lines: list[str], row: int) -> list[tuple[int, str]]:
    """The (row, name) of every `def`/`class` header whose body holds `row` (or that stands on it), innermost first."""
    while row > 0 and not lines[row].strip():
        row -= 1  # a blank line belongs to the code above it
    found: list[tuple[int, str]] = []
    below = None  # the least indentation of the non-blank lines from a header's next line down to `row`
    for r in range(row, -1, -1):
        line = lines[r]
        if not line.strip() or line.lstrip().startswith(_CLOSING):
            continue
        indent = _indent(line)
        if (match := _HEADER_RE.match(line)) and (below is None or indent < below):
            found.append((r, match.group(1)))
        below = indent if below is None else min(below, indent)
        if below == 0:
            break
    return found


def definition_rows(lines: list[str], header: int) -> tuple[int, int]:
    """The first and last rows of the definition whose header is on row `header` (decorators included)."""
    indent = _indent(lines[header])
    first = header
    while first > 0 and lines[first - 1].strip().startswith("@") and _indent(lines[first - 1]) == indent:
        first -= 1
    last = header
    for r in range(header + 1, len(lines)):
        line = lines[r]
        if not line.strip():
            continue
        if _indent(line) > indent or line.lstrip().startswith(_CLOSING):
            last = r
        else:
            break
    return first, last


def paragraph_rows(lines: list[str], row: int) -> tuple[int, int] | None:
    """The first and last rows of the run of non-blank lines holding `row`, or None on a blank line."""
    if not lines[row].strip():
        return None
    first, last = row, row
    while first > 0 and lines[first - 1].strip():
        first -= 1
    while last + 1 < len(lines) and lines[last + 1].strip():
        last += 1
    return first, last


def target_around(lines: list[str], cursor: Location, python: bool, code: str) -> Target:
    """What `code` would replace with nothing selected (see the module docstring)."""
    row = cursor[0]
    if python and (definitions := enclosing_definitions(lines, row)):
        name = defined_name(code)
        header, found = next(((r, n) for r, n in definitions if n == name), definitions[0])
        first, last = definition_rows(lines, header)
        what = f"{found} (lines {first + 1}-{last + 1})"
    elif rows := paragraph_rows(lines, row):
        first, last = rows
        what = f"the paragraph (lines {first + 1}-{last + 1})"
    else:
        return Target(cursor, cursor, "", f"nothing: insert at line {row + 1}")
    end = (last, len(lines[last]))
    return Target((first, 0), end, "\n".join(lines[first : last + 1]), what)


def fitted(code: str, target: Target) -> str:
    """`code` indented as the target's first line is, when the target is whole lines (a method dedented in an
    answer goes back into its class); any other target takes the code as it is."""
    if not target.whole_lines or not target.text.strip():
        return code
    first = next(line for line in target.text.split("\n") if line.strip())
    return textwrap.indent(textwrap.dedent(code), first[: _indent(first)])
