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
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.bench_options import add_kv_option, add_quant_options
from engine.client import Client, EventSink
from engine.config import SHAPES
from engine.requests import CAPS, MAX_SPECULATE, EngineSpec

SUBCOMMANDS = {
    "generate": "generate once from stdin or --prompt; only the generated text goes to stdout",
    "tokenize": "print the prompt's token ids as the engine would feed them",
    "chat": "the console chat of the seed: inputs end with a line '!!'",
    "bench": "time the engine: decode tokens/s, time to first token, memory, start-up, roofline",
    "convert": "quantize a checkpoint once into a workspace every command loads directly (int4: GPTQ with --calib)",
    "serve": "the OpenAI-compatible HTTP server (completions with infilling, chat, llama.cpp's /infill)",
    "bench-serve": "time the server through streaming HTTP clients: tokens/s, time to first token, inter-token",
    "web": "the app in the browser (textual-serve): a tab per app process, one engine for all, access by a token",
}

DEMO_NOTE = (
    "Without --model the built-in demo model runs: a tiny CodeLlama-shaped model trained on Python source, "
    "good for trying the app, not for real work. Point --model at a Hugging Face CodeLlama directory "
    "(e.g. CodeLlama-7b-Instruct-hf) for real answers, or --url at a server (codellama-tui serve on a GPU box, "
    "or any OpenAI-compatible one)."
)
REMOTE = ("app", "generate", "chat", "web")
API_KEY_ENV = "CODELLAMA_TUI_API_KEY"  # the commands that can talk to a server instead of loading a model
ClientFactory = Callable[[EngineSpec, EventSink], Client]


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
    "quant": "--quant",
    "quant_head": "--quant-head",
    "kv": "--kv",
    "url": "--url",
    "api_key": "--api-key",
    "served_model": "--served-model",
    "speculate": "--speculate",
}
# The most tokens a request proposes per step unless --speculate or the config file says: the editor's requests are
# grounded in its file (on by default, and in the server that the app and web tabs may talk to); one-shot and
# console text may not be (off). bench-serve takes --speculate only.
SPECULATE = {"app": 15, "serve": 15, "web": 15, "generate": 0, "chat": 0}


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


def _server_options(p: argparse.ArgumentParser) -> None:
    """--url and its companions: a server's engine instead of one loaded here."""
    g = p.add_argument_group("a server instead of --model (the config file's url is the default)")
    g.add_argument("--url", help="a codellama-tui serve (every cap) or any OpenAI-compatible server, e.g. "
                   "http://localhost:23333")  # fmt: skip
    g.add_argument("--api-key", metavar="KEY", help="the server's key (default: $CODELLAMA_TUI_API_KEY)")
    g.add_argument("--served-model", metavar="NAME", help="which of the server's models (default: its first)")


def _engine_options(p: argparse.ArgumentParser, cap_default: str | None = "completion", sampling: bool = True) -> None:
    """The model and engine options (and, unless `cap_default` is None, the cap's; with `sampling`, its knobs)."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model", metavar="DIR", help="Hugging Face CodeLlama checkpoint directory (default: the demo model)"
    )
    if cap_default is not None:
        g.add_argument("--cap", choices=CAPS, default=cap_default, help=f"capability (default: {cap_default})")
        g.add_argument("--sys-instruct", metavar="TEXT", help="system instruction for the chat cap")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--tp", type=_positive, default=1, metavar="N", help="tensor-parallel size (GPUs)")
    g.add_argument("--max-batch", type=_positive, default=None, metavar="N", help="concurrent sequences (KV slots)")
    g.add_argument("--max-seq-len", type=_positive, metavar="N", help="tokens per sequence (default: the model's)")
    add_quant_options(g)
    add_kv_option(g)
    g.add_argument(
        "--speculate",
        type=_speculate,
        metavar="N",
        help=f"prompt-lookup speculation: verify up to N tokens per step, proposed from the text itself (0 off, at "
        f"most {MAX_SPECULATE}; the same output, faster where it repeats its prompt; default: the config file's, "
        f"else {SPECULATE['app']} in the app, serve and web, 0 for generate, chat and bench-serve)",
    )
    if not sampling:
        g.add_argument("--shape", choices=list(SHAPES), help="random weights at a CodeLlama shape instead of --model")
        g.add_argument("--tokenizer", metavar="DIR", help="tokenizer for --shape (default: the demo model's)")
        return
    s = p.add_argument_group("sampling (defaults per cap)")
    s.add_argument("--temperature", type=_finite, metavar="T", help="0 is greedy")
    s.add_argument("--top-p", type=_finite, metavar="P")
    s.add_argument("--top-k", type=int, metavar="K", help="0 disables it (default 40)")
    s.add_argument("--repetition-penalty", type=_finite, metavar="R")
    s.add_argument(
        "--max-new-tokens",
        type=_positive,
        metavar="N",
        help="default 512 (the app's suggestions: the config's suggest_max_tokens, 64)",
    )
    s.add_argument("--seed", type=int, metavar="S")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")


def client_factory(args: argparse.Namespace, *, retry: bool) -> ClientFactory | None:
    """An HTTP client's factory when the command talks to a server (`--url`), else None: the engine runs here.
    `retry`: keep trying a server that cannot be reached (the app) instead of failing at once (one-shot commands)."""
    if not getattr(args, "url", None):
        return None
    url, api_key, model = args.url, args.api_key, args.served_model

    def make(spec: EngineSpec, on_event: EventSink) -> Client:
        from engine.http_client import HttpClient

        return HttpClient(url, api_key=api_key, model=model, on_event=on_event, retry=retry)

    return make


def spec_of(args: argparse.Namespace, max_batch: int = 8, speculate: int = 0) -> EngineSpec:
    """The engine options; `max_batch` and `speculate` are the command's defaults."""
    return EngineSpec(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        tp=args.tp,
        max_batch=args.max_batch or max_batch,
        max_seq_len=args.max_seq_len,
        quant=args.quant,
        quant_head=args.quant_head,
        kv=args.kv or "bf16",
        speculate=args.speculate if args.speculate is not None else speculate,
        shape=getattr(args, "shape", None),
        tokenizer=getattr(args, "tokenizer", None),
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("codellama-tui")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


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
        "(~/.local/state/...) and offered when the file is opened again; in the app ctrl+o opens more files "
        "(each in a tab), ctrl+t shows the file tree, ctrl+g goes to a line, ctrl+f finds, ctrl+h (ctrl+\\) replaces",
    )
    app.add_argument(
        "--theme",
        help="dark, light, high-contrast or one of Textual's themes, e.g. nord (default: the config file's, "
        "where the theme picked in the command palette is kept; else dark)",
    )
    app.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _engine_options(app)
    _server_options(app)
    parsers = {"app": app}

    gen = _Parser(prog="codellama-tui generate", description=SUBCOMMANDS["generate"] + ". " + DEMO_NOTE)
    gen.add_argument("--prompt", help="the prompt (default: read stdin)")
    gen.add_argument("--jsonl", action="store_true", help='stdin lines {"text": ..., "system": ...} -> {"text": ...}')
    gen.add_argument("--spm", action="store_true", help="infilling: suffix-prefix-middle order instead of PSM")
    _engine_options(gen)
    _server_options(gen)
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
    _server_options(chat)
    parsers["chat"] = chat

    bench = _Parser(prog="codellama-tui bench", description=SUBCOMMANDS["bench"])
    from engine.bench_options import add_arguments

    add_arguments(bench)
    parsers["bench"] = bench

    conv = _Parser(prog="codellama-tui convert", description=SUBCOMMANDS["convert"] + ".")
    conv.add_argument("model", metavar="MODEL", help="the unquantized Hugging Face checkpoint directory")
    conv.add_argument("--out", required=True, type=Path, metavar="DIR", help="the workspace to write (a new folder)")
    conv.add_argument("--quant", choices=["int8", "int4"], default="int4", help="the weights' format (default int4)")
    conv.add_argument("--calib", nargs="+", type=Path, metavar="FILE",
                      help="text (code) like what the model will see: int4 by GPTQ on it (act order, groups of 128) "
                      "instead of round-to-nearest")  # fmt: skip
    conv.add_argument("--device", default="auto", help="where to quantize: cpu, cuda, cuda:N or auto (default)")
    conv.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parsers["convert"] = conv

    serve = _Parser(prog="codellama-tui serve", description=SUBCOMMANDS["serve"] + ". " + DEMO_NOTE)
    n = serve.add_argument_group("server")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    n.add_argument("--port", type=int, default=23333, help="port (default 23333; 0 picks a free one)")
    n.add_argument(
        "--instance-num",
        "--instance_num",
        dest="max_batch",
        type=_positive,
        metavar="N",
        help="requests that decode together, the engine's batch (default 8; the same as --max-batch)",
    )
    n.add_argument(
        "--max-queue",
        type=int,
        default=128,
        metavar="N",
        help="requests that may wait for a slot; more are refused with 429 (default 128)",
    )
    n.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route but /health")
    _engine_options(serve, cap_default=None, sampling=False)
    parsers["serve"] = serve

    bench_serve = _Parser(
        prog="codellama-tui bench-serve",
        description=SUBCOMMANDS["bench-serve"] + ". Without "
        "--url it serves the engine options' model in this process on a free port and also times "
        "`bench`'s decode step at the same batches, for comparison.",
    )
    from tui.server.bench import add_arguments as bench_serve_arguments

    bench_serve_arguments(bench_serve)
    _engine_options(bench_serve, cap_default=None, sampling=False)
    parsers["bench-serve"] = bench_serve

    web = _Parser(
        prog="codellama-tui web",
        description=SUBCOMMANDS["web"] + ". Every tab talks to the server given by --url, or to one engine this "
        "command serves for them (the engine options' model) on a free port of 127.0.0.1. Open the address it "
        "prints: its ?token=... is the access (kept in a cookie); a request without it gets 401.",
    )
    w = web.add_argument_group("web")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    w.add_argument("--theme", help="the tabs' theme: dark, light or high-contrast")
    _engine_options(web)
    _server_options(web)
    parsers["web"] = web
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


# Options that only an engine in this process takes: with a server (--url) they would be ignored, so they are refused.
ENGINE_ONLY = ("device", "dtype", "tp", "max_batch", "max_seq_len", "quant", "quant_head", "kv", "speculate")


def _engine_options_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The engine-only options set on the command line (those whose value is not the parser's default)."""
    return [FLAGS[d] for d in ENGINE_ONLY if hasattr(args, d) and getattr(args, d) != parser.get_default(d)]


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parser()
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "app"
    args = parsers[command].parse_args(argv[1:] if command != "app" else argv)
    if getattr(args, "url", None) and args.model:
        parsers[command].error("--url and --model exclude each other: the server has its own model")
    here_only = _engine_options_given(parsers[command], args)
    pick_model = (
        getattr(args, "model", None) is None and not getattr(args, "shape", None) and not getattr(args, "url", None)
    )
    if pick_model or command in SPECULATE:
        from tui.config import ConfigError, load_config

        try:  # the config file's server or model, and its speculation, are every command's defaults, as the app's
            config = load_config()
        except ConfigError as err:
            parsers[command].exit(2, f"{parsers[command].prog}: error: {err}\n")
        if pick_model and command in REMOTE and config.url:
            args.url = config.url
            args.served_model = args.served_model or config.served_model
        elif pick_model:
            args.model = config.model
        if command in SPECULATE and args.speculate is None:
            args.speculate = config.speculate
        if command in SPECULATE and args.kv is None:
            args.kv = config.kv
    if getattr(args, "url", None) and here_only:
        parsers[command].error(
            f"--url and {', '.join(here_only)} exclude each other: the server's own options decide (the server: --url "
            "or the config file's url)"
        )
    if getattr(args, "url", None) and args.api_key is None:
        args.api_key = _api_key()
    if sys.stdout is None:  # `>&-`: nothing could be written, as `cat` reports a closed stdout
        print(f"{parsers[command].prog}: error: stdout is closed", file=sys.stderr)
        return 1
    if sys.stdin is not None and isinstance(sys.stdin, io.TextIOWrapper):
        # Invalid UTF-8 on stdin is kept as lone surrogates, which the engine replaces and reports (clean_text)
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    if command == "generate":
        from tui.oneshot import generate

        return generate(args, client_factory(args, retry=False))
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
    if command == "convert":
        return _convert(args)
    if command == "serve":
        from tui.server.run import serve

        if args.max_queue < 0:
            parsers[command].exit(2, f"{parsers[command].prog}: error: --max-queue must be >= 0\n")
        return serve(args, spec_of(args, speculate=SPECULATE["serve"]))
    if command == "bench-serve":
        from tui.server.bench import main as bench_serve

        return bench_serve(args)
    if command == "web":
        from tui.web import run_web

        return run_web(args, spec_of(args, speculate=SPECULATE["web"]))
    if command == "chat":
        from tui.console import run_console

        factory = client_factory(args, retry=False)
        return run_console(
            spec_of(args, max_batch=1, speculate=SPECULATE["chat"]),
            args.cap,
            args.sys_instruct,
            overrides_of(args),
            **({"client_factory": factory} if factory else {}),
        )
    from tui.app import run_app

    return run_app(
        args.file,
        spec_of(args, speculate=SPECULATE["app"]),
        args.cap,
        args.sys_instruct,
        overrides_of(args),
        args.theme,
        client_factory=client_factory(args, retry=True),
    )


def _api_key() -> str | None:
    """The key for --url when the command line gives none: $CODELLAMA_TUI_API_KEY, else the config file's."""
    import os

    from tui.config import ConfigError, load_config

    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    try:
        return load_config().api_key
    except ConfigError:
        return None


def _convert(args: argparse.Namespace) -> int:
    from engine.convert import convert
    from engine.errors import EngineError

    try:
        how = convert(args.model, args.out, args.quant, args.calib, args.device, args.force)
    except EngineError as err:
        print(f"codellama-tui convert: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("codellama-tui convert: interrupted; nothing was written to the workspace", file=sys.stderr)
        return 130
    print(f"{args.out}: {how['format']} weights ({how['method']}); run it with --model {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
