"""Compile Triton kernels in worker processes, ahead of their first launch.

On a cold Triton cache the decode step's first run compiles ~15 kernel variants one after another, each
holding the GIL: seconds of start-up with the GPU idle. Compiling needs no GPU, only each launch's exact
specialisation (argument types, alignments, constexprs, options), so the engine runs the step once with
every Triton launch recorded instead of compiled or run (`recording`), hands the records to worker
processes (`Compiling`) and loads the weights meanwhile. The workers write Triton's on-disk cache,
compiled kernel and launcher alike, so the real first launch finds both there. A record a worker fails to
compile costs nothing but time: that launch compiles as it always did.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spec:
    """One Triton launch's compilation: the kernel (module and name) and what Triton compiles it with."""

    module: str
    name: str
    signature: dict[str, Any]
    constants: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]
    target: Any  # triton.backends.compiler.GPUTarget


def can_record() -> bool:
    """Whether this Triton has the jit cache hook that `recording` needs (Triton 3.3 and newer)."""
    import triton

    return hasattr(getattr(getattr(triton, "knobs", None), "runtime", None), "jit_cache_hook")


def _tuples(value: Any) -> Any:
    """JSON gives lists where Triton's options held tuples; the cache key hashes the difference."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@contextmanager
def recording() -> Iterator[list[Spec]]:
    """Inside, a Triton launch that would compile is recorded and skipped (its outputs stay unwritten);
    launches of kernels already compiled in this process run as usual. Triton's hook is process-wide, so no other
    thread may launch Triton kernels meanwhile (the engine's worker thread is the only one that does)."""
    from triton import knobs
    from triton.runtime import driver

    target = driver.active.get_current_target()
    specs: dict[str, Spec] = {}

    def hook(*, fn: Any, compile: dict[str, Any], **_: Any) -> bool:
        data = compile["specialization_data"]
        options = {k: _tuples(v) for k, v in json.loads(data)["options"].items()}
        spec = Spec(
            fn.module, fn.name, compile["signature"], compile["constants"], compile["configs"][0], options, target
        )
        specs.setdefault(data, spec)
        return True  # handled: Triton neither compiles nor launches

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    found: list[Spec] = []
    try:
        yield found
    finally:
        knobs.runtime.jit_cache_hook = previous
        found.extend(specs.values())


def compile_spec(spec: Spec) -> Any:
    """Compile one record into Triton's cache (no GPU needed); the compiled kernel, not loaded on any device."""
    import triton
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.name)
    return triton.compile(ASTSource(fn, spec.signature, spec.constants, spec.attrs), spec.target, spec.options)


def build(spec: Spec) -> None:
    """Compile one record into Triton's cache, with its launcher (a worker process runs this; no GPU needed)."""
    from triton.runtime import driver

    kernel = compile_spec(spec)
    driver.active.launcher_cls(kernel.src, kernel.metadata)


class Compiling:
    """A helper process (`python -m engine.kernels.compile_ahead`: a fresh interpreter, so neither the engine's CUDA
    state nor the caller's `__main__` goes along) that imports torch, Triton and the kernel modules as soon as it
    starts, while the caller records, then forks a worker per share of the records (`submit`) to compile them.
    `wait()` before the kernels' first launch."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where `engine` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", __name__]
        self.proc = subprocess.Popen(  # its own process group, so that `cancel` also ends the workers it forked
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.kernels = self.compiled = 0  # recorded; of those, not found in Triton's cache
        self.errors: list[str] = []
        self.recorded_s = self.waited_s = 0.0  # the caller's time recording, and waiting after its own work

    def __str__(self) -> str:
        return (
            f"compile ahead: {self.kernels} Triton kernels recorded in {self.recorded_s:.1f}s, {self.compiled} not in "
            f"Triton's cache compiled by workers (waited {self.waited_s:.1f}s for them), {len(self.errors)} failed"
        )

    def submit(self, specs: list[Spec], workers: int | None = None) -> None:
        """Hand the helper the records not yet in Triton's cache, to compile in `workers` processes (default: the
        cores less two, at most 16); with every record cached (a warm start) stop it, there is nothing to wait for."""
        self.kernels = len(specs)
        todo = [spec for spec in specs if not is_cached(spec)]
        self.compiled = len(todo)
        if not todo:
            self.cancel()
            return
        workers = workers or max(1, min(len(todo), (os.cpu_count() or 2) - 2, 16))
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(pickle.dumps((todo, workers)))
            self.proc.stdin.close()
        except OSError:  # the helper is gone already (`wait` says how it ended); the capture compiles instead
            pass

    def wait(self, timeout: float = 300.0) -> None:
        """Block until the helper is done. A record that failed (its error in `errors`) compiles at its first launch
        instead. The answer is a short JSON list, well inside a pipe's buffer, so waiting before reading is safe."""
        if not self.compiled:
            return
        start = time.perf_counter()
        assert self.proc.stdout is not None
        try:
            self.proc.wait(timeout)
            if self.proc.returncode == 0:
                self.errors = json.loads(self.proc.stdout.read())
            else:
                self.errors = [f"compile helper exited {self.proc.returncode}"] * self.compiled
        except (subprocess.TimeoutExpired, ValueError):
            self.cancel()
            self.errors = ["compile helper timed out or answered garbage"] * self.compiled
        self.waited_s = time.perf_counter() - start

    def cancel(self) -> None:
        """Stop the helper and its workers now (the load failed, or nothing is left to compile)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def is_cached(spec: Spec) -> bool:
    """Whether Triton's cache holds this record's kernel: the first lines of `triton.compile`, which looks it up by
    the same key. False where this Triton computes the key otherwise (the helper then finds it cached itself)."""
    try:
        from triton.compiler import compiler

        fn = getattr(importlib.import_module(spec.module), spec.name)
        src = compiler.ASTSource(fn, spec.signature, spec.constants, spec.attrs)
        backend = compiler.make_backend(spec.target)
        options = backend.parse_options(dict(spec.options, **src.parse_options()))
        key = compiler.get_cache_key(src, backend, options, env_vars=compiler.get_cache_invalidating_env_vars())
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return compiler.get_cache_manager(digest).get_group(f"{src.name[:150]}.json") is not None
    except Exception:
        return False


def _compile_share(specs: list[Spec]) -> list[str]:
    errors = []
    for spec in specs:
        try:
            build(spec)
        except Exception as err:  # reported, and that launch compiles in the engine as before
            errors.append(f"{spec.name}: {type(err).__name__}: {err}"[:500])
    return errors


def main() -> None:
    """The helper: import what compiling needs, read `(records, workers)` from stdin, fork the workers (safe here:
    no CUDA context, no threads), print every error as one JSON list."""
    import pkgutil

    import triton  # noqa: F401

    import engine.kernels as package

    for module in pkgutil.iter_modules(package.__path__, "engine.kernels."):
        if module.name.rsplit(".", 1)[1].startswith("triton_"):
            importlib.import_module(module.name)
    specs, workers = pickle.load(sys.stdin.buffer)
    children = []
    for share in (specs[i::workers] for i in range(workers)):
        if not share:
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            with os.fdopen(write, "w") as out:
                out.write(json.dumps(_compile_share(share)))
            os._exit(0)
        os.close(write)
        children.append((pid, read, len(share)))
    errors: list[str] = []
    for pid, read, n in children:
        with os.fdopen(read) as answer:
            text = answer.read()
        _, status = os.waitpid(pid, 0)
        errors += json.loads(text) if status == 0 and text else [f"worker {pid} died ({status})"] * n
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
