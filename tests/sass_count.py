"""SASS instructions per weight in the GEMV's main loop, compiled for the H200 (sm_90) on a machine without a GPU.

The quantized GEMV is bound by instructions, so its variants are compared by what ptxas makes of them: each launch
is bound as an H200 would bind it (tests/compiled.py's fake driver, PDL on, bf16, aligned pointers), compiled with
Triton's own ptxas, disassembled with its nvdisasm, and the longest loop (the block a backward branch closes) is
counted per opcode. Per weight means per weight a thread handles in one trip round that loop (BLOCK_N x BLOCK_K / 32
per warp; one group of 128 with `prefetch`).

    python -m tests.sass_count 1 int4 4096 4096 64/256/8/4/3/-/mask 128/256/1/4/2/tc/pairs

A config is GemvConfig's fields joined by "/" ("tc" or "-" for tensor_cores). Prints one line per config: loop
instructions per weight, the opcodes that take most of them, registers, spills, shared memory.
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


def record(m: int, fmt: str, n: int, k: int, config) -> Spec:
    """The launch `triton_gemv.linear` makes for bf16 x [m, k] and an `fmt` weight [n, k], as an H200 gets it."""
    from triton.runtime import driver

    from engine.kernels import triton_gemv

    _launch_as_on_the_gpu()
    driver.set_active(H200Driver())
    w = {"int4": Int4, "int8": Int8}[fmt].from_dense(torch.randn(n, k, dtype=torch.bfloat16) * 0.05)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    with recording() as specs:
        triton_gemv.linear(x, w, config)
    (spec,) = specs
    return spec


def loop_ops(sass: str) -> Counter:
    """Opcodes (predicates and modifiers dropped) of the longest block that a backward branch closes."""
    lines = sass.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.?L\w+:$", line)}
    loops = [(labels[b.group(1)], i) for i, line in enumerate(lines)
             for b in [re.search(r"BRA (\.?L\w+)", line)] if b and labels.get(b.group(1), len(lines)) < i]  # fmt: skip
    start, end = max(loops, key=lambda span: span[1] - span[0])
    ops: Counter = Counter()
    for line in lines[start : end + 1]:
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


def count(m: int, fmt: str, n: int, k: int, config) -> Count:
    from triton.tools.disasm import get_sass

    kernel = compile_spec(record(m, fmt, n, k, config))
    registers, stack = resources(kernel.asm["cubin"])
    ops = loop_ops(get_sass(kernel.asm["cubin"]))
    step = 128 if config.prefetch else config.block_k
    weights = config.block_n * step / (32 * config.num_warps)
    total = sum(ops.values())
    alu = sum(ops[op] for op in ALU)
    return Count(total / weights, alu / weights, ops, registers, stack, kernel.metadata.shared)


def main(argv: list[str]) -> None:
    m, fmt, n, k, *configs = argv
    for text in configs:
        c = count(int(m), fmt, int(n), int(k), parse_config(text))
        top = " ".join(f"{op} {v}" for op, v in c.ops.most_common())
        print(f"{text:<28} m={m:<2} {c.per_weight:5.2f} per weight (ALU {c.alu_per_weight:4.2f}) | {c.registers} "
              f"registers, {c.stack} B stack, {c.shared} B shared | {top}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
