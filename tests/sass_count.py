"""SASS instructions per weight in the GEMV's main loop, compiled for the H200 (sm_90) on a machine without a GPU.

The quantized GEMV is bound by instructions, so its variants are compared by what ptxas makes of them: each launch
is bound as an H200 would bind it (tests/compiled.py's fake driver, PDL on, bf16, aligned pointers), compiled with
Triton's own ptxas, disassembled with its nvdisasm, and the main loop (the longest block a backward branch closes,
with any other at least half as long: one per product) is counted per opcode. Per weight means per weight a thread
handles in one trip round the main loop or loops (BLOCK_N x BLOCK_K / 32 per warp; one group of 128 with
`prefetch`; with `silu`, BLOCK_N / 2 gate rows and as many up rows).

    python -m tests.sass_count 1 int4 4096 4096 64/256/8/4/3/-/mask 128/256/1/4/2/tc/pairs
    python -m tests.sass_count --form plain,norm,silu,residual 1 int4 12288 4096 128/256/4/8/3/-/mask

A config is GemvConfig's fields joined by "/" ("tc" or "-" for tensor_cores). `--form` names the launches (FORMS,
default plain): the fused forms the model runs (`norm_linear` with the RMSNorm prologue, `silu_mul` epilogue,
`linear_residual`) against the plain GEMV. Prints one line per config and form: loop instructions per weight, the
opcodes that take most of them, registers, spills, shared memory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

import torch

from engine.kernels.compile_ahead import Spec, compile_spec, recording
from engine.weights import Int4, Int8
from tests.compiled import H200Driver, _launch_as_on_the_gpu

ALU = ("LOP3", "SHF", "SGXT", "PRMT", "BMSK")  # the half-rate integer pipe


@dataclass(frozen=True)
class Count:
    per_weight: float
    alu_per_weight: float
    ops: Counter
    registers: int
    stack: int
    shared: int


def parse_config(text: str):
    """`64/256/8/4/3/-/mask[/pf]` -> GemvConfig."""
    from engine.kernels.triton_gemv import GemvConfig

    f = text.split("/")
    return GemvConfig(int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5] == "tc", f[6], f[7:] == ["pf"])


# The launches counted, by name: the plain GEMV and its fused forms as engine.model's decode step calls them (the
# norm from the previous projection's partial sums of squares, or, `norm-residual`, with the residual added and the
# squares summed in the prologue; `silu` on the fused gate/up weight [n, k], n/2 outputs).
FORMS = ("plain", "norm", "norm-residual", "silu", "residual")


def record(m: int, fmt: str, n: int, k: int, config, form: str = "plain") -> Spec:
    """The launch `form` makes (FORMS) for bf16 x [m, k] and an `fmt` weight [n, k], as an H200 gets it."""
    from triton.runtime import driver

    from engine.kernels import triton_gemv

    _launch_as_on_the_gpu()
    driver.set_active(H200Driver())
    w = {"int4": Int4, "int8": Int8}[fmt].from_dense(torch.randn(n, k, dtype=torch.bfloat16) * 0.05)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    norm_weight, squares = torch.ones(k, dtype=torch.bfloat16), torch.rand(64, m)
    with recording() as specs:
        if form == "plain":
            triton_gemv.linear(x, w, config)
        elif form in ("norm", "silu"):
            triton_gemv.norm_linear(x, None, norm_weight, 1e-5, w, config, silu_mul=form == "silu", squares=squares)
        elif form == "norm-residual":
            triton_gemv.norm_linear(x, x.clone(), norm_weight, 1e-5, w, config)
        elif form == "residual":
            triton_gemv.linear_residual(x, w, torch.randn(m, n, dtype=torch.bfloat16), config)
        else:
            raise SystemExit(f"sass_count: unknown form {form!r}; the forms are {', '.join(FORMS)}")
    (spec,) = specs
    return spec


def loop_ops(sass: str) -> Counter:
    """Opcodes (predicates and modifiers dropped) of the main loops: the blocks that a backward branch closes, the
    longest and any other of at least half its length that does not overlap it (one loop per product: silu's gate
    and up rows each had their own)."""
    lines = sass.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.?L\w+:$", line)}
    loops = [(labels[b.group(1)], i) for i, line in enumerate(lines)
             for b in [re.search(r"BRA (\.?L\w+)", line)] if b and labels.get(b.group(1), len(lines)) < i]  # fmt: skip
    longest = max(end - start for start, end in loops)
    main: list[tuple[int, int]] = []
    for start, end in sorted(loops, key=lambda span: span[0] - span[1]):
        if 2 * (end - start) >= longest and all(end < s or start > e for s, e in main):
            main.append((start, end))
    ops: Counter = Counter()
    for line in (line for start, end in main for line in lines[start : end + 1]):
        fields = line.split("\t")
        if len(fields) == 2 and fields[1].strip():
            words = fields[1].split()
            op = words[1] if words[0].startswith("@") else words[0]
            ops[op.split(".")[0].rstrip(";")] += 1
    return ops


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes: spills) of a cubin, from `cuobjdump -res-usage` (Triton's own)."""
    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([path_to_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(registers.group(1)) if registers else -1, int(stack.group(1)) if stack else -1


def count(m: int, fmt: str, n: int, k: int, config, form: str = "plain") -> Count:
    from triton.tools.disasm import get_sass

    kernel = compile_spec(record(m, fmt, n, k, config, form))
    registers, stack = resources(kernel.asm["cubin"])
    ops = loop_ops(get_sass(kernel.asm["cubin"]))
    step = 128 if config.prefetch else config.block_k
    weights = config.block_n * step / (32 * config.num_warps)
    total = sum(ops.values())
    alu = sum(ops[op] for op in ALU)
    return Count(total / weights, alu / weights, ops, registers, stack, kernel.metadata.shared)


def main(argv: list[str]) -> None:
    forms = ["plain"]
    if argv[:1] == ["--form"]:
        forms, argv = argv[1].split(","), argv[2:]
    m, fmt, n, k, *configs = argv
    for text, form in ((text, form) for text in configs for form in forms):
        c = count(int(m), fmt, int(n), int(k), parse_config(text), form)
        top = " ".join(f"{op} {v}" for op, v in c.ops.most_common())
        label = text if forms == ["plain"] else f"{text} {form}"
        print(f"{label:<28} m={m:<2} {c.per_weight:5.2f} per weight (ALU {c.alu_per_weight:4.2f}) | {c.registers} "
              f"registers, {c.stack} B stack, {c.shared} B shared | {top}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
