"""`python -m engine.speculate_bench`: what prompt-lookup speculation buys at batch 1, and what it costs.

Workloads, built from the demo model's held-out standard-library modules (engine/demo/corpus.py), fixed by their
source: "rename", functions of each module (with the lines before them) followed by their headers under a new
name, as a completion whose answer is the function's body again; "fill", the same as an infilling request with the
text after the function as the suffix (F3 filling in repetitive code); "fresh", sampled continuations of each
module's opening lines, with less to copy; "noise", sampled continuations of random tokens, where there is nothing
to copy (what speculation must not slow down). Each request runs through the engine without speculation and with
it (`Request.speculate`); outputs are compared (greedy ones, and the seeded sampled ones: the accept rule
draws with the plain step's noise), identical in float32; in bf16 on a GPU a verify step's logits round
differently from a one-token step's (other kernels for several rows), so near-ties may flip and texts differ.
Printed: tokens per decode step, the accepted share of the proposals, and the decode speed-up (the tokens after
the first, whose prefill speculation does not change).
`--verify-cost` (a GPU, random weights at `--shape`) instead times the captured verify step against the plain
decode step for every tokens-per-row bucket at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.bench import greedy_row, random_engine
from engine.config import DEMO_DIR, shape_config
from engine.demo.corpus import HELD_OUT
from engine.engine import Engine
from engine.errors import EngineError
from engine.events import Failed, Finished
from engine.requests import MAX_SPECULATE, EngineSpec, Request, SamplingParams
from engine.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=256)
# The prompt: the function and the lines just before it (a longer stretch of the file made the demo model end the
# copy at once), then the renamed header; for infilling, the text after the function follows as the suffix.
LINES_BEFORE = 10
SUFFIX_TOKENS = 200
FRESH = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=128, seed=0)


@dataclass
class Item:
    """One request of a workload."""

    workload: str
    name: str
    request: Request


def _functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """Top-level functions and methods of 6 to 30 lines, in source order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and 6 <= node.end_lineno - node.lineno + 1 <= 30 and node.body:
            found.append(node)
    return sorted(found, key=lambda f: f.lineno)


def _fit_lines(tok: Tokenizer, lines: list[str], budget: int, from_top: bool) -> str:
    """As many of `lines` as fit `budget` tokens, dropping from the top (or from the bottom)."""
    text = "".join(lines)
    while lines and len(tok.encode(text)) > budget:
        lines = lines[1:] if from_top else lines[:-1]
        text = "".join(lines)
    return text


def edit_workload(tok: Tokenizer, context: int, per_module: int = 2) -> list[Item]:
    """The "rename" and "fill" requests: per held-out module, its first `per_module` functions that fit the context
    twice over (with room for a suffix), each followed by its header under a new name (the renamed copy's body is
    the answer)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for module in HELD_OUT:
        source = (stdlib / module).read_text()
        lines = source.splitlines(keepends=True)
        taken = 0
        for fn in _functions(ast.parse(source)):
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)]) - 1  # the decorators join the header
            header = "".join(lines[first : fn.body[0].lineno - 1]).replace(f"def {fn.name}(", f"def {fn.name}_v2(", 1)
            body = "".join(lines[fn.body[0].lineno - 1 : fn.end_lineno])
            if 2 * len(tok.encode("".join(lines[first : fn.end_lineno]))) + SUFFIX_TOKENS + 64 > context:
                continue
            room = len(tok.encode(body)) + 16
            budget = context - room - len(tok.encode(header)) - SUFFIX_TOKENS - 16
            sampling = SamplingParams(**{**GREEDY.__dict__, "max_new_tokens": room})
            name = f"{module[:-3]}.{fn.name}"
            before = _fit_lines(tok, lines[max(0, first - LINES_BEFORE) : fn.end_lineno], budget, from_top=True)
            items.append(Item("rename", name, Request("completion", text=before + "\n" + header, sampling=sampling)))
            if tok.can_infill:
                suffix = _fit_lines(tok, lines[fn.end_lineno :][:40], SUFFIX_TOKENS, from_top=False)
                prefix = before
                fill = Request("infilling", prefix=prefix + "\n" + header, suffix="\n" + suffix, sampling=sampling)
                items.append(Item("fill", name, fill))
            taken += 1
            if taken == per_module:
                break
    return items


def fresh_workload() -> list[Item]:
    """The "fresh" requests: each module's first 12 lines, continued by sampling."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for module in HELD_OUT:
        text = "".join((stdlib / module).read_text().splitlines(keepends=True)[:12])
        items.append(Item("fresh", module[:-3], Request("completion", text=text, sampling=FRESH)))
    return items


def noise_workload(tok: Tokenizer, n: int = 8) -> list[Item]:
    """The "noise" requests, speculation's worst case: prompts of random tokens, continued by sampling from the
    whole distribution, so that proposals are rarely right."""
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=128, seed=0)
    items = []
    for i in range(n):
        text = tok.decode(torch.randint(3, tok.vocab_size, (256,), generator=gen).tolist())
        items.append(Item("noise", str(i), Request("completion", text=text, sampling=sampling)))
    return items


def generate(engine: Engine, item: Item, speculate: bool) -> Finished:
    """One request through the engine (scheduler, detokenizer, stop checks), alone, with or without speculation."""
    events = engine.add(replace(item.request, speculate=speculate, id=f"{item.workload}-{item.name}-{speculate}"))
    while engine.busy:
        events += engine.step()
    failed = [e for e in events if isinstance(e, Failed)]
    if failed:
        raise EngineError(f"{item.workload} {item.name}: {failed[0].message}")
    return next(e for e in events if isinstance(e, Finished))


def compare(engine: Engine, items: list[Item]) -> dict[str, dict]:
    """Every item without and with speculation, one after the other (one warm-up request first); totals per
    workload, of the tokens after the first (the prefill's, and the prefix cache makes the second run's prompt
    free). The outputs are compared: every request is greedy or seeded."""
    generate(engine, items[0], True)
    totals: dict[str, dict] = {}
    for item in items:
        plain, spec = generate(engine, item, False), generate(engine, item, True)
        t = totals.setdefault(item.workload, dict.fromkeys(TOTALS, 0))
        t["requests"] += 1
        for key, run in (("plain", plain), ("speculative", spec)):
            t[f"{key}_tokens"] += run.stats.new_tokens - 1
            t[f"{key}_s"] += run.stats.total_s - run.stats.ttft_s
        t["steps"] += spec.stats.steps
        t["proposed"] += spec.stats.proposed
        t["accepted"] += spec.stats.accepted
        t["identical"] += plain.text == spec.text
    return totals


TOTALS = ("requests", "plain_tokens", "speculative_tokens", "plain_s", "speculative_s", "steps", "proposed",
          "accepted", "identical")  # fmt: skip


@torch.inference_mode()  # as the engine runs its steps
def verify_cost(engine: Engine, steps: int = 50) -> dict[str, float]:
    """Milliseconds per replay of each captured verify step and of the plain step of its batch, on the GPU alone,
    from position 128."""
    runner, out = engine.runner, {}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay(graph: torch.cuda.CUDAGraph) -> float:
        graph.replay()
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps

    for batch in (1, 8):
        rows = [greedy_row(3 + i, 128, i, top_k=0) for i in range(batch)]
        runner(rows)
        out[f"b{batch}_plain_ms"] = replay(runner.graphs[(runner.bucket(batch), True)])
        for b, queries in runner.verify_shapes:
            if b == runner.bucket(batch):
                runner.verify(rows, [[5] * (queries - 1)] * batch)
                out[f"b{batch}_k{queries - 1}_ms"] = replay(runner.verify_graphs[(b, queries, True)])
    return out


def _rates(t: dict) -> str:
    """One workload's line: tokens per step and decode tokens/s without and with speculation."""
    plain_rate, rate = t["plain_tokens"] / t["plain_s"], t["speculative_tokens"] / t["speculative_s"]
    accepted = t["accepted"] / t["proposed"] if t["proposed"] else 0.0
    identical = f"  identical {t['identical']}/{t['requests']}"
    return (
        f"{t['requests']:>3} requests {t['speculative_tokens']:>5} tokens  "
        f"{t['speculative_tokens'] / t['steps']:4.2f} tokens/step ({accepted:.0%} of {t['proposed']} proposed "
        f"accepted)  decode {plain_rate:6.1f} -> {rate:6.1f} tok/s = {rate / plain_rate:4.2f}x" + identical
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.speculate_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--speculate", type=int, default=MAX_SPECULATE, help="most tokens proposed per step")
    parser.add_argument("--per-module", type=int, default=2, help="functions per held-out module (default 2)")
    parser.add_argument("--workloads", default="rename,fill,fresh,noise", help="which (default: all four)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests (one function per module, "
                        "half the fresh and noise ones): a GPU check in about 40 s")  # fmt: skip
    parser.add_argument("--verify-cost", action="store_true", help="time the verify steps instead (GPU)")
    parser.add_argument("--shape", default="7b", help="--verify-cost: random weights at this shape (default 7b)")
    parser.add_argument("--json", metavar="FILE", help="write every number here too")
    args = parser.parse_args(argv)
    spec = EngineSpec(model=args.model, device=args.device, dtype=args.dtype, max_batch=8, speculate=args.speculate)
    if args.verify_cost:
        spec = replace(spec, max_seq_len=512)
        engine, _ = random_engine(shape_config(args.shape), spec, Tokenizer.from_dir(DEMO_DIR))
    else:
        engine = Engine.load(spec)
    name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    print(f"speculate_bench: {engine.info.name} on {name} ({engine.info.dtype}), up to {args.speculate} proposed")
    if args.verify_cost:
        result = verify_cost(engine)
        for key, ms in result.items():
            plain = result[key.split("_")[0] + "_plain_ms"]
            print(f"  {key:<16} {ms:7.3f} ms = {ms / plain:5.2f}x the plain step")
    else:
        per_module, sampled = (1, 4) if args.quick else (args.per_module, 8)
        items = edit_workload(engine.tok, engine.context, per_module) + fresh_workload()[:sampled]
        items += noise_workload(engine.tok, sampled)
        items = [item for item in items if item.workload in args.workloads.split(",")]
        result = compare(engine, items)
        for workload, totals in result.items():
            print(f"  {workload:<7} {_rates(totals)}")
        result["costs"] = costs = engine.runner.costs(1)
        shown = ", ".join(f"k={k} {costs[k]:.2f}" for k in (1, 3, 7, 15) if k < len(costs))
        print(f"  a verify step of k proposals cost, in plain steps (measured at batch 1): {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
