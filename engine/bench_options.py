"""The options of `codellama-tui bench`, apart from the benchmark so that `--help` does not import torch."""

from __future__ import annotations

import argparse

from engine.config import SHAPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: --shape, else the demo model)")
    p.add_argument("--shape", choices=list(SHAPES), help="random weights at a CodeLlama shape")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer for --shape runs (default: the demo model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--tp", type=int, default=1, metavar="N")
    p.add_argument("--batch", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prompt-lens", default="128,2048", help="time-to-first-token prompt lengths")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default: what the run needs)")
    p.add_argument("--baseline", action="store_true", help="also time transformers generate() on the same weights")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (to see what the graphs buy)")
    p.add_argument(
        "--speculate",
        type=int,
        default=0,
        metavar="N",
        help="with verify steps for up to N proposed tokens (start-up and memory include their graphs; the "
        "end-to-end figure speculates); python -m engine.speculate_bench measures what speculation buys",
    )
    p.add_argument("--profile", action="store_true", help="also print the per-kernel GPU time of one decode step")
    p.add_argument("--json", metavar="FILE", help="write every number here too")
