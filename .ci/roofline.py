"""The H200-at-the-roofline figures (issue 22) of two trees on one GPU in one call: the starting tree (BASE, e.g.
`git archive` of main at the session's start, unpacked under .gpu/base) and this one, each figure on one line as
base, new and new/base. Run by `.ci/gpu-check roofline` (or `roofline-quick`).

    python3 .ci/roofline.py [--base DIR] [--off NAMES ...] [quick | CASE ...]

Cases: 7b (batch 1 and 32, time to first token at 2048 tokens, cold start-up), 7b-warm (start-up again on the same
caches), 7b-16k (batch 1 and 8 with 16384 keys cached), 13b and 34b (batch 1); `quick` is 7b alone, the default
every case. Each case of each tree runs in its own process, in that tree's directory with that tree's code, through
the functions of its `engine.bench` (the same in both trees), with its own Triton cache and cache directory, fresh
for the tree's first case (so `7b` starts cold and `7b-warm` warm). Each `--off NAMES` adds a column: this tree with
$CODELLAMA_TUI_OFF=NAMES (engine/kernels/switches.py), to see what those changes buy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("7b", "7b-warm", "7b-16k", "13b", "34b")
STEPS = 64
POSITION = 128  # as bench decodes
LONG = 16384  # keys cached in the 16k case
TTFT = 2048
DEVICE = "cuda"


def child(case: str, tokenizer: str | None) -> dict[str, float]:
    """One case in this process, on the code of the tree in the working directory; its figures."""
    import torch

    from engine.bench import copy_bandwidth, decode_rate, graph_step_ms, random_engine, time_to_first_token
    from engine.config import DEMO_DIR, shape_config
    from engine.model import KVCache
    from engine.requests import EngineSpec
    from engine.tokenizer import Tokenizer

    shape = case.split("-")[0]
    batches = {"7b": (1, 32), "7b-warm": (1, 32), "7b-16k": (1, 8)}.get(case, (1,))
    position = LONG if case == "7b-16k" else POSITION
    max_seq = max(TTFT if shape == "7b" else 0, position + 2 * STEPS + 16) + 64
    spec = EngineSpec(device=DEVICE, dtype="bfloat16", max_batch=max(batches), max_seq_len=max_seq)
    out: dict[str, float] = {"copy_GBps": copy_bandwidth(torch.device(DEVICE))}
    tok = Tokenizer.from_dir(Path(tokenizer) if tokenizer else DEMO_DIR)
    start = time.perf_counter()
    engine, _ = random_engine(shape_config(shape), spec, tok)
    out["startup_s"] = time.perf_counter() - start
    out["capture_s"] = engine.runner.capture_s
    model = engine.model
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    kv_token = KVCache.bytes_per_token(model.cfg, model.shard, torch.bfloat16)
    for b in batches:
        keys = b * (position + STEPS // 2) * kv_token  # the keys and values a step reads, on average over the run
        out[f"roofline_b{b}_tps"] = b * out["copy_GBps"] * 1e9 / (weights + keys)
        out[f"decode_b{b}_tps"] = decode_rate(engine, b, STEPS, position)
        out[f"graph_b{b}_ms"] = graph_step_ms(engine, b, position, STEPS)
    if case == "7b":
        out[f"ttft_{TTFT}_ms"] = time_to_first_token(engine, TTFT) * 1e3
    engine.close()
    return out


def run_child(tree: Path, case: str, env: dict[str, str], tokenizer: str | None, timeout: float) -> dict | str:
    """A case in a process of its own in `tree`: its figures, or why there are none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case]
    if tokenizer:
        cmd += ["--tokenizer", str(Path(tokenizer).resolve())]
    try:
        proc = subprocess.run(
            cmd, cwd=tree, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit {proc.returncode}: {tail[:200]}"
    return json.loads(lines[-1])


def rows(case: str, results: list[dict]) -> list[tuple[str, list[str], float | None]]:
    """(figure, one cell per tree, new/base) for a case's figures."""
    name = case.split("-")[0].upper()
    first = results[0]
    out = []

    def add(label: str, key: str, fmt: str, roof: str | None = None) -> None:
        if key not in first:
            return
        cells = []
        for r in results:
            cell = fmt.format(r[key])
            if roof is not None:
                cell += f" ({r[key] / r[roof]:.0%})"
            cells.append(cell)
        ratio = results[1][key] / first[key] if len(results) > 1 and first[key] else None
        out.append((label, cells, ratio))

    for b in (1, 8, 32):
        where = " with 16k keys" if case == "7b-16k" else ""
        add(f"{name} roofline b{b}{where} (tok/s)", f"roofline_b{b}_tps", "{:.1f}")
        add(
            f"{name} decode b{b}{where} (tok/s, % of roofline)", f"decode_b{b}_tps", "{:.1f}", roof=f"roofline_b{b}_tps"
        )
        add(f"{name} GPU alone b{b}{where} (ms/step)", f"graph_b{b}_ms", "{:.3f}")
    add(f"{name} time to first token, {TTFT} tokens (ms)", f"ttft_{TTFT}_ms", "{:.1f}")
    if case in ("7b", "7b-warm"):
        when = "warm" if case == "7b-warm" else "cold"
        add(f"{name} start-up, {when} (s)", "startup_s", "{:.2f}")
        add(f"{name}   of which graph capture, {when} (s)", "capture_s", "{:.2f}")
    if case == "7b":
        add("copy bandwidth (GB/s)", "copy_GBps", "{:.0f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"quick, or any of {', '.join(CASES)} (default: all)")
    p.add_argument("--base", default=".gpu/base", help="the starting tree (default .gpu/base)")
    p.add_argument("--off", action="append", default=[], metavar="NAMES",
                   help="also time this tree with $CODELLAMA_TUI_OFF=NAMES (repeatable: a column each)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer directory (default: each tree's demo model's)")
    p.add_argument("--timeout", type=float, default=150, help="seconds per case and tree")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokenizer)), flush=True)
        return 0
    cases = list(CASES) if not args.cases else ["7b"] if args.cases == ["quick"] else args.cases
    unknown = [c for c in cases if c not in CASES]
    base = Path(args.base).resolve()
    if unknown or not (base / "engine" / "bench.py").is_file():
        p.error(f"unknown case {unknown[0]}" if unknown else f"no starting tree at {base} (engine/bench.py)")
    trees = [("base", base, {}), ("new", ROOT, {})]
    trees += [(f"{names} off", ROOT, {"CODELLAMA_TUI_OFF": names}) for names in args.off if names]
    scratch = Path(tempfile.mkdtemp(prefix="roofline-"))
    envs = []
    for i, (_, _, extra) in enumerate(trees):  # fresh caches per tree: its first case starts cold
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CODELLAMA_TUI_OFF")}
        env.update(TRITON_CACHE_DIR=str(scratch / f"triton-{i}"), XDG_CACHE_HOME=str(scratch / f"cache-{i}"), **extra)
        envs.append(env)
    labels = [label for label, _, _ in trees]
    print(f"{'figure':<52} " + " ".join(f"{label:>14}" for label in labels) + f" {'new/base':>9}")
    started = time.perf_counter()
    for case in cases:
        results = []
        for (label, tree, _), env in zip(trees, envs, strict=True):
            r = run_child(tree, case, env, args.tokenizer, args.timeout)
            if isinstance(r, str):
                print(f"{case} on {label}: no figures ({r})", flush=True)
                break
            results.append(r)
        else:
            for label, cells, ratio in rows(case, results):
                ratio_cell = f"{ratio:>9.3f}" if ratio is not None else ""
                print(f"{label:<52} " + " ".join(f"{c:>14}" for c in cells) + f" {ratio_cell}", flush=True)
    print(f"roofline: {len(cases)} cases on {len(trees)} trees in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
