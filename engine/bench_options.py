"""The options of `codellama-tui bench` and the engine's `--quant` and `--kv`, apart from the engine so that `--help`
does not import torch."""

from __future__ import annotations

import argparse

from engine.config import SHAPES
from engine.requests import KV, QUANT


def add_quant_options(g: argparse._ActionsContainer, several: bool = False) -> None:
    """`--quant` and `--quant-head`, for every command that runs the engine (bench takes a list)."""
    if several:
        g.add_argument(
            "--quant", type=_quant_list, metavar="LIST",
            help="quantize the weights at load, one run each: int8, int4, nf4 (e.g. int4,int8); the unquantized dtype "
            "runs too, for the ratio",
        )  # fmt: skip
    else:
        g.add_argument(
            "--quant", choices=QUANT,
            help="quantize the weights at load: int8 (per output channel), int4 (groups of 128) or nf4 (bitsandbytes, "
            "blocks of 64); default: as stored",
        )  # fmt: skip
    g.add_argument(
        "--quant-head", action="store_true", help="quantize the LM head too (otherwise it stays unquantized)"
    )


def add_kv_option(g: argparse._ActionsContainer, several: bool = False) -> None:
    """`--kv`, for every command that runs the engine (bench takes a list)."""
    if several:
        g.add_argument(
            "--kv", type=kv_list, metavar="LIST",
            help="the KV cache, one run each (bf16 last, for the ratios): bf16 (the model's dtype) or int8, e.g. "
            "int8,bf16 (default bf16)",
        )  # fmt: skip
    else:
        g.add_argument(
            "--kv", type=kv_name, metavar="{" + ",".join(KV) + "}",
            help="the KV cache: bf16 (the model's dtype) or int8 (per token and head, half the bytes: about twice "
            "the context or batch in the same memory); default: the config file's kv, else bf16",
        )  # fmt: skip


def kv_name(text: str) -> str:
    """A `--kv` value (and the config file's `kv`): one of `KV`, else a one-line error naming them."""
    if text not in KV:
        raise argparse.ArgumentTypeError(f"'{text}': choose {' or '.join(KV)}")
    return text


def kv_list(text: str) -> list[str]:
    """bench's `--kv LIST`, with bf16 (when given) last: the run the ratios compare against."""
    return sorted(dict.fromkeys(_names(text, KV)), key=lambda name: name == "bf16")


def _quant_list(text: str) -> list[str]:
    return _names(text, QUANT)


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of `allowed` names, else a one-line error naming them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in allowed for name in names):
        raise argparse.ArgumentTypeError(f"'{text}': choose from {', '.join(allowed)}, comma-separated")
    return names


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
    p.add_argument(
        "--decode-position", type=int, default=128, metavar="N",
        help="the timed decode steps start at position N: the keys each step reads (default 128)",
    )  # fmt: skip
    add_quant_options(p, several=True)
    add_kv_option(p, several=True)
    p.add_argument("--quant-only", action="store_true", help="with --quant: leave out the unquantized run")
    p.add_argument(
        "--logits-error", action="store_true",
        help="only the logits' relative error of each --quant format (default int8,int4) on random --shape weights",
    )  # fmt: skip
    p.add_argument("--layers", type=int, metavar="N", help="with --logits-error: the first N layers of the shape")
