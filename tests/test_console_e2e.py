"""`codellama-tui chat` end to end on a tiny random-weight checkpoint on the CPU, stdin piped.

One run goes through the installed command in its own process (the completion script: the `!!` protocol with
blank lines, `end`, `exit`); it starts first and runs while the other caps go through the same `tui.cli.main`
in this process, which saves a torch import (most of a run's time) per cap. Answers of a random model are
noise, so the tests check the protocol: how many answers, which messages, exit codes, no colour codes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tui.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STATS = "tokens/s · first token"
COMMON = ["--device", "cpu", "--temperature", "0", "--max-new-tokens", "16"]


def command() -> list[str]:
    """The installed `codellama-tui`, or the same entry point through the interpreter."""
    script = Path(sys.executable).with_name("codellama-tui")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tui.cli"]


@pytest.fixture(scope="module")
def completion_process(tiny_model_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """`codellama-tui chat --cap completion`, started before the in-process runs; it loads while they run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*command(), "chat", "--model", str(tiny_model_dir), "--cap", "completion", *COMMON]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def _start_completion_first(completion_process: subprocess.Popen[str]) -> None:
    """Every test here depends on the subprocess, so that it starts before the first in-process run."""


def chat(monkeypatch, capsys, model: Path, script: str, *options: str) -> tuple[int, str, str]:
    """`codellama-tui chat --model model *options` in this process with `script` on stdin."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(["chat", "--model", str(model), *COMMON, *options])
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err
    return code, out, err


def test_python_cap_answers(monkeypatch, capsys, tiny_model_dir: Path) -> None:
    code, out, err = chat(monkeypatch, capsys, tiny_model_dir, "def fib(n):\n!!\n", "--cap", "python")
    assert code == 0, err
    assert err.count(STATS) == 1 and "error" not in err


def test_infilling_with_a_wrong_marker_count_says_so_and_goes_on(monkeypatch, capsys, tiny_model_dir) -> None:
    script = 'x = 1\n!!\n<FILL> <FILL>\n!!\ndef f():\n    """<FILL>\n\n    return 1\n!!\n'
    code, out, err = chat(monkeypatch, capsys, tiny_model_dir, script, "--cap", "infilling")
    assert code == 0, err
    assert "infilling needs exactly one <FILL> marker, found 0" in err
    assert "infilling needs exactly one <FILL> marker, found 2" in err
    assert err.count(STATS) == 1
    assert "filled in" not in out  # the in-place view is for terminals; piped output is the middle alone


def test_chat_beyond_the_context_warns_then_drops_the_oldest_turns(monkeypatch, capsys, tiny_model_dir) -> None:
    # six turns of 16-token answers in a 96-token context, a reset and one more turn
    script = "".join(f"question {i}\n!!\n" for i in range(6)) + "reset\n!!\nagain\n!!\n"
    options = ["--cap", "chat", "--max-seq-len", "96", "--sys-instruct", "Provide answers in Python"]
    code, out, err = chat(monkeypatch, capsys, tiny_model_dir, script, *options)
    assert code == 0, err
    assert err.count(STATS) == 7 and "error" not in err
    session, after_reset = err.split("(new session)")
    assert session.count("warning: the conversation holds") == 1
    assert session.index("the conversation holds") < session.index("dropped its 1 oldest exchange")
    assert "warning" not in after_reset


def test_completion_through_the_command_keeps_blank_lines_and_obeys_end_and_exit(
    completion_process: subprocess.Popen[str],
) -> None:
    script = "def add(a, b):\n\n\n    # two blank lines above\n!!\nend\n!!\nimport os\n!!\nexit\n!!\nnever sent\n!!\n"
    out, err = completion_process.communicate(script, timeout=120)
    assert completion_process.returncode == 0, err
    assert err.count(STATS) == 2  # the blank lines did not split the first input; "never sent" was not sent
    assert err.count("(new session)") == 1
    assert "\x1b" not in out + err
