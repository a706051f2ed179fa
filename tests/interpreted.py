"""Kernel test cases on the CPU through Triton's interpreter, in a child process: TRITON_INTERPRET must be set
before triton is imported, and one child runs all of a module's cases (each case in-process would import twice).
The child also records every launch as an H200 gets it, for tests/compiled.py to compile."""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "INTERPRETED-CASE-RESULTS "
LAUNCHES_MARK = "INTERPRETED-CASE-LAUNCHES "


def child_main(cases: Iterable[str], run: Callable[[str], None]) -> None:
    """The child's entry (a test module's `__main__`): run every case, print each one's "ok" or traceback, and the
    launches each one made (up to its failure, if it failed)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from tests.compiled import Recorder

    recorder = Recorder()
    results, launches = {}, {}
    for name in cases:
        with recorder.case() as specs:
            try:
                run(name)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
        launches[name] = specs
    print(RESULT_MARK + json.dumps(results), flush=True)
    print(LAUNCHES_MARK + base64.b64encode(pickle.dumps(launches)).decode(), flush=True)


@functools.cache
def _child(module: str) -> tuple[dict[str, str], dict[str, Any]]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    marked = {mark: line[len(mark) :] for line in proc.stdout.splitlines() for mark in (RESULT_MARK, LAUNCHES_MARK)
              if line.startswith(mark)}  # fmt: skip
    if len(marked) < 2:
        pytest.fail(f"the interpreter run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return json.loads(marked[RESULT_MARK]), pickle.loads(base64.b64decode(marked[LAUNCHES_MARK]))


def results_of(module: str) -> dict[str, str]:
    """Run `python -m module` under the interpreter and return its results by case (skips without triton)."""
    return _child(module)[0]


def launches_of(module: str) -> dict[str, Any]:
    """The launches (compile_ahead.Spec records) each case of that same run made, by case."""
    return _child(module)[1]
