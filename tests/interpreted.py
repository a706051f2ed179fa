"""Kernel test cases on the CPU through Triton's interpreter, in a child process: TRITON_INTERPRET must be set
before triton is imported, and one child runs all of a module's cases (each case in-process would import twice)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "INTERPRETED-CASE-RESULTS "


def child_main(cases: Iterable[str], run: Callable[[str], None]) -> None:
    """The child's entry (a test module's `__main__`): run every case, print each one's "ok" or traceback."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name in cases:
        try:
            run(name)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print(RESULT_MARK + json.dumps(results), flush=True)


def results_of(module: str) -> dict[str, str]:
    """Run `python -m module` under the interpreter and return its results by case (skips without triton)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    pytest.fail(f"the interpreter run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
