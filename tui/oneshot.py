"""`generate` and `tokenize`: the one-shot commands for scripts, editor plugins and evaluation harnesses.

Only generated text (or ids) goes to stdout; logs, progress and one-line errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from engine.client import Client, ForceQuit
from engine.errors import EngineError
from engine.events import Event, Failed, Finished, LoadFailed, Loading, Ready, Started, TextDelta
from engine.requests import Request, SamplingParams, replacement_warning
from tui.cli import SPECULATE, ClientFactory, overrides_of, spec_of, with_flags
from tui.conversation import Conversation

PROG = "codellama-tui"


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _warn_replaced(count: int, n: int, jsonl: bool) -> None:
    if count:
        where = f"line {n}: " if jsonl else ""
        print(f"{PROG}: warning: {where}{replacement_warning(count)}", file=sys.stderr, flush=True)


def _no_input(args: argparse.Namespace) -> str | None:
    """Why there is nothing to read (stdin closed, `<&-`), checked before anything loads; None when input can come."""
    if sys.stdin is None and (args.jsonl or args.prompt is None):
        return "stdin is closed: pipe the input in" + ("" if args.jsonl else " or give --prompt")
    return None


def _inputs(args: argparse.Namespace) -> Iterator[tuple[int, str | None, str | None, str | None]]:
    """(line number, text, system, error) per input: one from --prompt/stdin, or one per JSONL line."""
    if not args.jsonl:
        yield 1, args.prompt if args.prompt is not None else sys.stdin.read(), args.sys_instruct, None
        return
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text = item["text"]
            system = item.get("system", args.sys_instruct)
            if not isinstance(text, str) or not (system is None or isinstance(system, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            yield n, None, None, f'line {n}: expected a JSON object {{"text": "...", "system": "..."}}'
            continue
        yield n, text, system, None


def _request(args: argparse.Namespace, text: str, system: str | None, sampling: SamplingParams) -> Request:
    """One input as a request: for chat, a conversation of the system instruction and this one message. It may
    speculate: `--speculate` (0 by default here) decides."""
    if args.cap == "chat":
        return Conversation(system).request(text, sampling, speculate=True)
    return Request(args.cap, text=text, suffix_first=args.spm, sampling=sampling, speculate=True)


def _progress(event: Event) -> None:
    if isinstance(event, Loading):
        print(f"loading {event.fraction:4.0%} {event.stage}", file=sys.stderr, flush=True)
    elif isinstance(event, Ready):
        info = event.info
        demo = " (the built-in demo model; use --model DIR for real weights)" if info.is_demo else ""
        weights = f", {info.quant} weights" if info.quant else ""
        weights += f", {info.kv} KV cache" if info.kv else ""
        where = f" on {info.device} ({info.dtype}{weights}, tp {info.tp})" if info.device else ""
        context = f", context {info.context} tokens" if info.context else ""
        print(f"ready: {info.name}{demo}{where}{context}, {event.startup_s:.1f}s", file=sys.stderr, flush=True)
    elif isinstance(event, LoadFailed):
        pass  # reported once, by wait_ready()


def generate(args: argparse.Namespace, client_factory: ClientFactory | None = None) -> int:
    """`generate` on the engine here, or on a server through `client_factory`'s client (`--url`)."""
    from engine.local_client import LocalClient

    try:
        sampling = SamplingParams.for_cap(args.cap, **overrides_of(args))
        sampling.check()
    except ValueError as err:
        return _fail(str(err), 2)
    if (why := _no_input(args)) is not None:
        return _fail(why, 2)
    spec = spec_of(args, max_batch=1, speculate=SPECULATE["generate"])
    client = (client_factory or LocalClient)(spec, _progress).start()
    try:
        client.wait_ready()
    except EngineError as err:
        return _fail(with_flags(str(err), err.fields))
    code = 0
    try:
        for n, text, system, error in _inputs(args):
            if error is not None:
                print(json.dumps({"error": error}), flush=True)
                print(f"{PROG}: error: {error}", file=sys.stderr)
                code = 1
                continue
            code = max(code, _run(client, _request(args, text, system, sampling), args.jsonl, n))
            if code == 130:
                break
    except (KeyboardInterrupt, ForceQuit):  # between inputs, or a second Ctrl+C during one
        code = _fail("cancelled", 130)
    finally:
        client.close()
    return code


def _run(client: Client, request: Request, jsonl: bool, n: int) -> int:
    """Stream one request (input line `n`) to stdout. Ctrl+C cancels it (exit 130): the stream then yields no more
    text and ends "cancelled", so what was printed is kept and nothing follows it."""
    for event in client.stream(request):
        if isinstance(event, Started):
            _warn_replaced(event.replaced, n, jsonl)
        elif isinstance(event, TextDelta) and not jsonl:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Failed):
            if jsonl:
                print(json.dumps({"error": event.message}), flush=True)
            return _fail(event.message)
        elif isinstance(event, Finished):
            if jsonl:
                print(json.dumps({"text": event.text}), flush=True)
            elif event.text and not event.text.endswith("\n") and sys.stdout.isatty():
                print()
            return _fail("cancelled", 130) if event.reason == "cancelled" else 0
    raise AssertionError("a stream ends with Finished or Failed")


def tokenize(args: argparse.Namespace) -> int:
    from engine.config import model_dir
    from engine.prompts import build_prompt
    from engine.tokenizer import Tokenizer

    if (why := _no_input(args)) is not None:
        return _fail(why, 2)
    try:
        tok = Tokenizer.from_dir(model_dir(args.model))
    except EngineError as err:
        return _fail(str(err))
    code = 0
    for n, text, system, error in _inputs(args):
        try:
            if error is not None:
                raise EngineError(error)
            request, replaced = _request(args, text, system, SamplingParams()).cleaned()
            _warn_replaced(replaced, n, args.jsonl)
            print(json.dumps(build_prompt(tok, request)), flush=True)
        except EngineError as err:
            if args.jsonl:
                print(json.dumps({"error": str(err)}), flush=True)
            code = _fail(str(err))
    return code
