"""engine.detok.BlockEnd: a suggestion ends where the block it started ends (Python, braces, blank lines, tabs),
whatever the chunking, and what it holds back is released when the stream ends first."""

from __future__ import annotations

import random

import pytest

from engine.detok import BlockEnd


def run(cursor_line: str, text: str, chunks: list[str] | None = None) -> tuple[str, bool]:
    """The suggestion `text` through a BlockEnd, in `chunks` (default: character by character), then flushed."""
    block = BlockEnd(cursor_line)
    out, hit = [], False
    for chunk in chunks if chunks is not None else list(text):
        emitted, hit = block.feed(chunk)
        out.append(emitted)
        if hit:
            break
    return "".join(out) + block.flush(), hit


CASES = [
    # (cursor's line, the model's text, what the suggestion keeps, whether the block ended)
    pytest.param(
        "def add(a, b):",
        "\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
        "\n    return a + b",
        True,
        id="python-body-then-next-def",
    ),
    pytest.param(
        "def add(a, b):",
        "\n    c = a + b\n    return c\ndef sub(a, b):\n",
        "\n    c = a + b\n    return c",
        True,
        id="python-next-def-without-a-blank-line",
    ),
    pytest.param(
        "    if x:",
        "\n        y = 1\n    return y\n",
        "\n        y = 1",
        True,
        id="python-statement-after-the-if-body-is-cut",
    ),
    pytest.param(
        "    if x:",
        "\n        y = 1\n    else:\n        y = 2\n    return y\n",
        "\n        y = 1\n    else:\n        y = 2",
        True,
        id="python-else-continues-the-block",
    ),
    pytest.param(
        "    ",
        "total = 0\n    for x in xs:\n        total += x\n    return total\n\n\nprint(1)",
        "total = 0\n    for x in xs:\n        total += x\n    return total",
        True,
        id="python-statements-at-the-cursor-level-until-a-blank-line",
    ),
    pytest.param(
        "        x = 1",
        "\n        y = 2\n    return y\n",
        "\n        y = 2",
        True,
        id="shallower-line-ends-the-block",
    ),
    pytest.param(
        "function add(a, b) {",
        "\n  return a + b;\n}\n\nfunction sub(a, b) {\n",
        "\n  return a + b;\n}",
        True,
        id="braces-closing-line-kept-blank-after-it-cut",
    ),
    pytest.param(
        "function add(a, b) {",
        "\n  return a + b;\n}\nfunction sub(a, b) {\n",
        "\n  return a + b;\n}",
        True,
        id="braces-next-function-right-after-the-brace",
    ),
    pytest.param(
        "  if (x) {",
        "\n    a();\n  } else {\n    b();\n  }\n  c();\n",
        "\n    a();\n  } else {\n    b();\n  }",
        True,
        id="braces-else-reopens",
    ),
    pytest.param(
        "    x = 1;",
        "\n    if (x) {\n      a();\n    }\n    b();\n\n    c();\n",
        "\n    if (x) {\n      a();\n    }\n    b();",
        True,
        id="braces-a-block-the-suggestion-opens-at-the-level-goes-on",
    ),
    pytest.param(
        "def f():",
        "\n    return 1\n\ndef g():\n",
        "\n    return 1",
        True,
        id="blank-line-inside-kept-until-dedent",
    ),
    pytest.param(
        "\tif x:",
        "\n\t\ty = 1\n\t\tz = 2\n\treturn z\n",
        "\n\t\ty = 1\n\t\tz = 2",
        True,
        id="tabs",
    ),
    pytest.param(
        "import os",
        "\n\nimport sys\nimport re\n\ndef main():\n",
        "\n\nimport sys\nimport re",
        True,
        id="leading-blank-line-kept-paragraph-ends-at-blank",
    ),
    pytest.param(
        "def end_of(x):",
        "\n    endpoint = x\n    return endpoint\n",
        "\n    endpoint = x\n    return endpoint\n",
        False,
        id="a-word-that-starts-like-end-is-no-closer; the last newline is flushed",
    ),
    pytest.param("x = foo(", "a, b)\nprint(x)\n", "a, b)\nprint(x)\n", False, id="flat-code-runs-on"),
    pytest.param(
        "    x = 1",
        "\r\n    y = 2\r\nz = 3\r\n",
        "\r\n    y = 2\r",
        True,
        id="crlf-line-ends",
    ),
]


@pytest.mark.parametrize(("cursor_line", "text", "kept", "ended"), CASES)
def test_the_block_ends_where_the_indentation_says(cursor_line: str, text: str, kept: str, ended: bool) -> None:
    assert run(cursor_line, text) == (kept, ended)


@pytest.mark.parametrize(("cursor_line", "text", "kept", "ended"), CASES)
def test_the_end_does_not_depend_on_chunking(cursor_line: str, text: str, kept: str, ended: bool) -> None:
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run(cursor_line, text, chunks) == (kept, ended)


def test_a_line_break_is_held_until_the_next_line_shows_and_flushed_at_the_stream_end() -> None:
    block = BlockEnd("def f():")
    assert block.feed("\n    return 1\n") == ("\n    return 1", False)
    assert block.feed("    ") == ("", False)
    assert block.feed("ret") == ("", False)  # its first word is not whole yet
    assert block.feed("urn") == ("", False)
    assert block.flush() == "\n    return"


def test_nothing_after_the_end() -> None:
    block = BlockEnd("def f():")
    assert block.feed("\n    pass\ndef g():") == ("\n    pass", True)
    assert block.feed("more") == ("", True)
    assert block.flush() == ""


def test_a_first_line_of_only_indentation_takes_the_suggestions_own_indentation() -> None:
    # the cursor at column 0 of an empty line inside a body: the body's level comes from the suggestion
    assert run("", "    y = 2\n    return y\nprint(3)\n") == ("    y = 2\n    return y", True)
