"""The `codellama-tui` command: the full-screen app by default, and its subcommands.

Nothing here imports torch: the app must paint before the engine loads, and `--help` must be instant.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import sys
from collections.abc import Sequence

from engine.requests import CAPS, MAX_SPECULATE, EngineSpec

SUBCOMMANDS = {
    "generate": "generate once from stdin or --prompt; only the generated text goes to stdout",
    "tokenize": "print the prompt's token ids as the engine would feed them",
    "chat": "the console chat of the seed: inputs end with a line '!!'",
    "bench": "time the engine: decode tokens/s, time to first token, memory, start-up, roofline",
}

DEMO_NOTE = (
    "Without --model the built-in demo model runs: a tiny CodeLlama-shaped model trained on Python source, "
    "good for trying the app, not for real work. Point --model at a Hugging Face CodeLlama directory "
    "(e.g. CodeLlama-7b-Instruct-hf) for real answers."
)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, as every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


FLAGS = {
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "tp": "--tp",
    "max_batch": "--max-batch",
    "max_seq_len": "--max-seq-len",
    "speculate": "--speculate",
}
# The most tokens a request proposes per step unless --speculate or the config file says: the editor's requests are
# grounded in its file (on by default); one-shot and console text may not be (off).
SPECULATE = {"app": 15, "generate": 0, "chat": 0}


def with_flags(message: str, fields: Sequence[str]) -> str:
    """An engine's message (which names no options) with the options of these commands that set what it names."""
    flags = [FLAGS[f] for f in fields if f in FLAGS]
    return f"{message} ({', '.join(flags)})" if flags else message


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _speculate(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SPECULATE:
        raise argparse.ArgumentTypeError(f"must be 0 (off) to {MAX_SPECULATE}, got {value}")
    return value


def _finite(text: str) -> float:
    """A float option: NaN and infinities are refused here, before anything loads."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _engine_options(p: argparse.ArgumentParser, cap_default: str = "completion") -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model", metavar="DIR", help="Hugging Face CodeLlama checkpoint directory (default: the demo model)"
    )
    g.add_argument("--cap", choices=CAPS, default=cap_default, help=f"capability (default: {cap_default})")
    g.add_argument("--sys-instruct", metavar="TEXT", help="system instruction for the chat cap")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--tp", type=_positive, default=1, metavar="N", help="tensor-parallel size (GPUs)")
    g.add_argument("--max-batch", type=_positive, default=None, metavar="N", help="concurrent sequences (KV slots)")
    g.add_argument("--max-seq-len", type=_positive, metavar="N", help="tokens per sequence (default: the model's)")
    g.add_argument(
        "--speculate",
        type=_speculate,
        metavar="N",
        help=f"prompt-lookup speculation: verify up to N tokens per step, proposed from the text itself (0 off, at "
        f"most {MAX_SPECULATE}; the same output, faster where it repeats its prompt; default: the config file's, "
        f"else {SPECULATE['app']} in the app and 0 for generate and chat)",
    )
    s = p.add_argument_group("sampling (defaults per cap)")
    s.add_argument("--temperature", type=_finite, metavar="T", help="0 is greedy")
    s.add_argument("--top-p", type=_finite, metavar="P")
    s.add_argument("--top-k", type=int, metavar="K", help="0 disables it (default 40)")
    s.add_argument("--repetition-penalty", type=_finite, metavar="R")
    s.add_argument("--max-new-tokens", type=_positive, metavar="N", help="default 512")
    s.add_argument("--seed", type=int, metavar="S")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")


def spec_of(args: argparse.Namespace, max_batch: int = 8, speculate: int = 0) -> EngineSpec:
    """The engine options; `max_batch` and `speculate` are the command's defaults."""
    return EngineSpec(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        tp=args.tp,
        max_batch=args.max_batch or max_batch,
        max_seq_len=args.max_seq_len,
        speculate=args.speculate if args.speculate is not None else speculate,
    )


def overrides_of(args: argparse.Namespace) -> dict[str, object]:
    """Sampling options the user gave, for `SamplingParams.for_cap(cap, **overrides)`."""
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "stop": tuple(args.stop) if args.stop else None,
    }


def build_parser() -> dict[str, argparse.ArgumentParser]:
    """One parser for the app and one per subcommand (FILE and subcommand names share the first word)."""
    listing = "\n".join(f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items())
    app = _Parser(
        prog="codellama-tui",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A full-screen terminal coding assistant for CodeLlama.\n\n" + DEMO_NOTE,
        epilog=f"subcommands (codellama-tui SUBCOMMAND --help):\n{listing}",
    )
    app.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="UTF-8 text file to open in the editor (created on the first save); "
        "ctrl+s saves, F12 saves as; unsaved changes are kept in $XDG_STATE_HOME/codellama-tui/recovery/ "
        "(~/.local/state/...) and offered when the file is opened again",
    )
    app.add_argument("--theme", help="dark, light or high-contrast (default: the config file's, else dark)")
    _engine_options(app)
    parsers = {"app": app}

    gen = _Parser(prog="codellama-tui generate", description=SUBCOMMANDS["generate"] + ". " + DEMO_NOTE)
    gen.add_argument("--prompt", help="the prompt (default: read stdin)")
    gen.add_argument("--jsonl", action="store_true", help='stdin lines {"text": ..., "system": ...} -> {"text": ...}')
    gen.add_argument("--spm", action="store_true", help="infilling: suffix-prefix-middle order instead of PSM")
    _engine_options(gen)
    parsers["generate"] = gen

    tok = _Parser(prog="codellama-tui tokenize", description=SUBCOMMANDS["tokenize"])
    tok.add_argument("--prompt", help="the prompt (default: read stdin)")
    tok.add_argument("--jsonl", action="store_true", help='stdin lines {"text": ..., "system": ...} -> id arrays')
    tok.add_argument("--spm", action="store_true", help="infilling: suffix-prefix-middle order instead of PSM")
    tok.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model)")
    tok.add_argument("--cap", choices=CAPS, default="completion")
    tok.add_argument("--sys-instruct", metavar="TEXT")
    parsers["tokenize"] = tok

    chat = _Parser(prog="codellama-tui chat", description=SUBCOMMANDS["chat"] + ". " + DEMO_NOTE)
    _engine_options(chat, cap_default="chat")
    parsers["chat"] = chat

    bench = _Parser(prog="codellama-tui bench", description=SUBCOMMANDS["bench"])
    from engine.bench_options import add_arguments

    add_arguments(bench)
    parsers["bench"] = bench
    return parsers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a reader of stdout that goes away (`| head`) ends it quietly with 141, as SIGPIPE ends
    `cat` or `yes`, and without the interpreter's "Exception ignored ... BrokenPipeError" at exit."""
    try:
        return _main(argv)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout then has somewhere to go
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parser()
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "app"
    args = parsers[command].parse_args(argv[1:] if command != "app" else argv)
    if getattr(args, "model", None) is None and not getattr(args, "shape", None) or command in SPECULATE:
        from tui.config import ConfigError, load_config

        try:  # the config file's model and speculation are every command's defaults, as they are the app's
            config = load_config()
        except ConfigError as err:
            parsers[command].exit(2, f"{parsers[command].prog}: error: {err}\n")
        if getattr(args, "model", None) is None and not getattr(args, "shape", None):
            args.model = config.model
        if command in SPECULATE and args.speculate is None:
            args.speculate = config.speculate
    if sys.stdout is None:  # `>&-`: nothing could be written, as `cat` reports a closed stdout
        print(f"{parsers[command].prog}: error: stdout is closed", file=sys.stderr)
        return 1
    if sys.stdin is not None and isinstance(sys.stdin, io.TextIOWrapper):
        # Invalid UTF-8 on stdin is kept as lone surrogates, which the engine replaces and reports (clean_text)
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    if command == "generate":
        from tui.oneshot import generate

        return generate(args)
    if command == "tokenize":
        from tui.oneshot import tokenize

        return tokenize(args)
    if command == "bench":
        from engine.bench import main as bench
        from engine.errors import EngineError

        try:
            return bench(args)
        except EngineError as err:  # a bad --tp, a dead rank, a broken checkpoint: one line, as everywhere
            print(f"codellama-tui bench: error: {with_flags(str(err), err.fields)}", file=sys.stderr)
            return 1
    if command == "chat":
        from tui.console import run_console

        spec = spec_of(args, max_batch=1, speculate=SPECULATE["chat"])
        return run_console(spec, args.cap, args.sys_instruct, overrides_of(args))
    from tui.app import run_app

    spec = spec_of(args, speculate=SPECULATE["app"])
    return run_app(args.file, spec, args.cap, args.sys_instruct, overrides_of(args), args.theme)


if __name__ == "__main__":
    sys.exit(main())
