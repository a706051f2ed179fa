"""Every Triton launch of the interpreted kernel cases, compiled for the H200 (sm_90) on the CPU.

Triton's interpreter runs a kernel as Python, so code that the GPU compiler rejects (two returns of different shapes
in a static branch, a constexpr the code generator cannot fold) passes there and fails only on the GPU. The
interpreted child (tests/interpreted.py) therefore also records each launch as an H200 would get it: the launchers
decide as on the GPU (PDL on, no interpreter workarounds), the interpreter runs the launch with those GPU-only
arguments off (it cannot run `griddepcontrol`, and its 16-bit dot is wrong), and a twin `JITFunction` of the kernel
binds the GPU's arguments exactly as Triton's launch path does, with a fake H200 driver and
`compile_ahead.recording`. Then `python -m tests.compiled` (a process without the interpreter) compiles every
distinct record down to a cubin, as `compile_ahead` does, and a kernel module's test fails a case with the
compiler's message.

A kernel test module gets this by running its cases through `interpreted.child_main` and adding a test per case
that fails unless `results_of(module)[case] == "ok"`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from engine.kernels.compile_ahead import Spec, compile_spec, recording
from tests import interpreted

# Kernel arguments that the launchers set for the GPU and the interpreter cannot take: PDL (pdl.py: the constexpr
# and the launch option) and the native 16-bit dot (triton_gemv.INTERPRETED). The interpreter runs them off.
INTERPRETER_VALUES = {"USE_GDC": False, "launch_pdl": False, "NATIVE_DOT": False}
H200_SHARED_BYTES = 232448  # the most shared memory a block may ask for on sm_90 (227 KiB)


class H200Driver:
    """What Triton's launch path asks the driver before it compiles: the target, a device and a stream."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _launch_as_on_the_gpu() -> None:
    """Make the kernel modules' launchers decide as on an H200: PDL on, no interpreter workaround."""
    import engine.kernels as package
    from engine.kernels import pdl

    pdl.enabled = lambda t: True
    for info in pkgutil.iter_modules(package.__path__, "engine.kernels."):
        if info.name.rsplit(".", 1)[1].startswith("triton_"):
            module = importlib.import_module(info.name)
            if hasattr(module, "INTERPRETED"):
                module.INTERPRETED = False


class Recorder:
    """In the interpreted child: every kernel launch is bound as the GPU would bind it (and recorded inside `case`),
    then interpreted with `INTERPRETER_VALUES`. Patches this process for good: the child runs nothing else."""

    def __init__(self) -> None:
        from triton.runtime import driver
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        _launch_as_on_the_gpu()
        driver.set_active(H200Driver())
        twins: dict[Any, JITFunction] = {}
        interpret = InterpretedFunction.run

        def run(kernel: InterpretedFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            twin = twins.get(kernel.fn)
            if twin is None:
                twin = twins[kernel.fn] = JITFunction(kernel.fn, **kernel.kwargs)
            twin.run(*args, grid=grid, warmup=True, **kwargs)  # only binds: `recording`'s hook stops the compile
            args = tuple(INTERPRETER_VALUES.get(name, arg) for name, arg in zip(kernel.arg_names, args, strict=False))
            kwargs = {name: INTERPRETER_VALUES.get(name, value) for name, value in kwargs.items()}
            return interpret(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    @contextmanager
    def case(self) -> Iterator[list[Spec]]:
        """The distinct launches made inside, filled in at the end."""
        with recording() as specs:
            yield specs
        main = sys.modules["__main__"].__spec__
        for i, spec in enumerate(specs):  # a kernel of the module run as the child is compiled from its real name
            if spec.module == "__main__" and main is not None:
                specs[i] = dataclasses.replace(spec, module=main.name)


def results_of(module: str) -> dict[str, str]:
    """Compile every distinct launch that `module`'s interpreted cases made, in one child process; by case, "ok" or
    the compiler's messages for that case's launches."""
    launches = interpreted.launches_of(module)
    distinct = {repr(spec): spec for specs in launches.values() for spec in specs}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", __name__],
        cwd=interpreted.ROOT,
        env=env,
        input=pickle.dumps(list(distinct.values())),
        capture_output=True,
        timeout=500,
    )
    if proc.returncode != 0:
        pytest.fail(f"the compile check failed (exit {proc.returncode}):\n{proc.stderr.decode()[-4000:]}")
    errors = dict(zip(distinct, json.loads(proc.stdout), strict=True))
    results = {}
    for case, specs in launches.items():
        failed = [errors[repr(spec)] for spec in specs if errors[repr(spec)]]
        results[case] = "\n\n".join(failed) if failed else "ok"
    return results


def describe(spec: Spec) -> str:
    """The kernel and its specialisation, as a reader finds it in the launch: name, constexprs, options."""
    names = list(spec.signature)
    constants = ", ".join(
        f"{names[path[0]]}={getattr(value, 'value', value)}" for path, value in spec.constants.items() if len(path) == 1
    )
    options = ", ".join(f"{k}={v}" for k, v in sorted(spec.options.items()) if k in ("num_warps", "num_stages"))
    return f"{spec.module}.{spec.name}[{constants}; {options}]"


def check(spec: Spec) -> str | None:
    """Compile one launch for the H200: None, or what the compiler (or the first launch) would say."""
    try:
        kernel = compile_spec(spec)
    except Exception as err:
        chain = []
        while err is not None:
            chain.append(str(err) if type(err).__name__ == "CompilationError" else f"{type(err).__name__}: {err}")
            err = err.__cause__
        return f"{describe(spec)} does not compile for sm_90:\n" + "\n".join(chain)
    if kernel.metadata.shared > H200_SHARED_BYTES:
        return f"{describe(spec)} needs {kernel.metadata.shared} bytes of shared memory (an H200: {H200_SHARED_BYTES})"
    return None


def main() -> None:
    """The compile child: read the records from stdin, print one JSON list of None or an error for each."""
    specs: list[Spec] = pickle.load(sys.stdin.buffer)
    workers = max(1, min(len(specs), len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(workers) as pool:
        print(json.dumps(list(pool.map(check, specs))))


if __name__ == "__main__":
    main()
