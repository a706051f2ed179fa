"""Compiling ahead (`engine.kernels.compile_ahead`): what a worker process does with a recorded launch.

Compiling for a GPU needs no GPU, so this runs on the CPU; recording launches and the capture that finds
everything compiled need one (`tests/test_gpu.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.kernels.compile_ahead import Compiling, Spec, build, is_cached

triton = pytest.importorskip("triton")


def silu_mul_spec() -> Spec:
    """What recording `triton_act.silu_mul` on a bfloat16 `[4, 2 * 1024]` CUDA tensor gives, on an H100."""
    from triton.backends.compiler import GPUTarget

    divisible = [["tt.divisibility", 16]]
    return Spec(
        module="engine.kernels.triton_act",
        name="_silu_mul_kernel",
        signature={
            "gu_ptr": "*bf16",
            "out_ptr": "*bf16",
            "n_cols": "i32",
            "BLOCK": "constexpr",
            "USE_GDC": "constexpr",
        },
        constants={(3,): 1024, (4,): True},
        attrs={(0,): divisible, (1,): divisible, (2,): divisible},
        options={"num_warps": 4, "launch_pdl": True},
        target=GPUTarget("cuda", 90, 32),
    )


class FakeDriver:
    """Stands in for Triton's CUDA driver, which a CPU-only machine lacks; records the launchers built."""

    def __init__(self) -> None:
        self.launchers: list[str] = []

    def launcher_cls(self, src: object, metadata: object) -> None:
        self.launchers.append(metadata.name)


def test_build_compiles_a_record_and_its_launcher_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fake = FakeDriver()
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)
    spec = silu_mul_spec()
    assert not is_cached(spec)
    build(spec)
    assert is_cached(spec)  # the key `triton.compile` stores it under, so a warm start needs no workers
    assert fake.launchers == ["_silu_mul_kernel"]
    cubins = list(tmp_path.rglob("_silu_mul_kernel.cubin"))
    assert len(cubins) == 1 and cubins[0].stat().st_size > 0


def test_a_record_that_fails_is_counted_not_raised(tmp_path: Path, monkeypatch) -> None:
    """A worker process reports a record it cannot compile and goes on with the next; `wait` collects the error
    (that launch compiles at start-up as before)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    spec = silu_mul_spec()
    broken = Spec(spec.module, "_no_such_kernel", spec.signature, spec.constants, spec.attrs, spec.options, spec.target)
    compiling = Compiling()
    compiling.submit([broken, spec], workers=1)
    compiling.wait()
    assert compiling.kernels == 2
    assert compiling.errors[0].startswith("_no_such_kernel: AttributeError")
    assert list(tmp_path.rglob("_silu_mul_kernel.cubin"))  # the next record compiled (its launcher needs a GPU)


def test_a_helper_that_cannot_start_costs_nothing_but_its_errors(tmp_path: Path, monkeypatch) -> None:
    """Compiling ahead only saves time: a helper that dies at once must not fail the engine's load."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "executable", "/bin/false")
    compiling = Compiling()
    compiling.proc.wait()  # gone before the records come: writing them finds a closed pipe
    compiling.submit([silu_mul_spec()])
    compiling.wait()
    assert compiling.errors == ["compile helper exited 1"]
