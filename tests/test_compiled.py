"""The compile check (tests/compiled.py) on small kernels (tests/compile_check_kernels.py): it reports what only the
GPU compiler rejects, where the interpreter passes, and it compiles a launch as the H200 gets it (PDL on), not as
the interpreter ran it."""

from __future__ import annotations

import pytest
import torch

from tests import compiled, interpreted

CASES = ("finish-one-row", "finish-rows", "scale")


def run_case(name: str) -> None:
    from tests import compile_check_kernels as kernels

    x = torch.arange(16 * 32, dtype=torch.float32).reshape(16, 32)
    if name == "finish-one-row":
        assert torch.equal(kernels.finish(x, 1), x.sum(0, keepdim=True))
    elif name == "finish-rows":
        assert torch.equal(kernels.finish(x[:4], 4), x[:4])
    else:
        assert torch.equal(kernels.scale(x, 0.5), x * 0.5)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str]:
    return interpreted.results_of("tests.test_compiled")


@pytest.fixture(scope="module")
def compiled_results() -> dict[str, str]:
    return compiled.results_of("tests.test_compiled")


def test_the_interpreter_passes_every_case(interpreted_results: dict[str, str]) -> None:
    assert interpreted_results == dict.fromkeys(CASES, "ok")


def test_two_returns_of_different_shapes_fail_to_compile(compiled_results: dict[str, str]) -> None:
    """The one-row specialisation returns [1, 32] and [16, 32] from `_finish`: the compiler's own message, naming
    the kernel and its constexprs; the several-row one compiles."""
    message = compiled_results["finish-one-row"]
    assert "tests.compile_check_kernels._two_returns_kernel[BLOCK_M=1, BLOCK=32; num_stages=3, num_warps=4]" in message
    assert "def _finish(acc, BLOCK_M: tl.constexpr):" in message
    assert "Inconsistent return types: <['1', '32'], fp32> and <['16', '32'], fp32>" in message
    assert compiled_results["finish-rows"] == "ok"


def test_a_launch_compiles_as_the_gpu_launches_it(compiled_results: dict[str, str]) -> None:
    """PDL on, which the interpreter cannot run: it ran the same launch with PDL off (passed by position here), and
    passed."""
    (spec,) = interpreted.launches_of("tests.test_compiled")["scale"]
    names = list(spec.signature)
    assert {names[path[0]]: value for path, value in spec.constants.items()} == {"BLOCK": 16, "USE_GDC": True}
    assert spec.options["launch_pdl"] is True
    assert (spec.target.backend, spec.target.arch) == ("cuda", 90)
    assert spec.signature["x_ptr"] == "*fp32" and spec.signature["factor"] == "fp32"
    assert compiled_results["scale"] == "ok"


if __name__ == "__main__":
    interpreted.child_main(CASES, run_case)
