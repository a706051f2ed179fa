"""`codellama-tui bench-serve`: the server timed as its clients see it, as vLLM's `benchmark_serving` does.

At each concurrency level, that many streaming HTTP clients (httpx) send random prompts of `--prompt-len` tokens
to `/v1/completions` one after another, greedy, up to `--max-tokens` new tokens each, until `--requests` are done.
Reported: output tokens/s, requests/s, time to first token and inter-token latency (mean, p50, p99). With
`--speculate N` (served here) every request asks to speculate: the random prompts have little to copy, so this
shows what speculation costs a busy server.

Without `--url` the server runs in this process on a free port with the engine options (`--shape 7b` for random
weights), the clients in a child process (so that they do not compete with the server for this one's GIL), and
afterwards `bench`'s decode step is timed on the same engine at the same batch sizes, for comparison: a server
that adds nothing would reach its tokens/s at the same batch, and its inter-token latency at batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from engine.http_wire import sse_lines

PROG = "codellama-tui bench-serve"
# fmt: off
WORDS = (  # what random prompts are made of: common English and code words, most of them one token
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "as", "on", "it", "be", "are", "by", "this",
    "from", "or", "at", "an", "not", "which", "have", "data", "value", "return", "function", "class", "list",
    "index", "error", "file", "name", "type", "string", "number", "result", "object", "state", "user", "time",
    "code", "test", "line", "import", "def", "self", "if", "else", "while", "for", "in", "range", "print", "len",
    "append", "dict", "key", "item", "path", "open", "read", "write", "buffer", "cache", "model", "token", "stream",
    "request", "server", "client", "thread", "queue", "lock", "event", "batch", "slot", "step", "graph", "kernel",
    "layer", "weight"
)
# fmt: on


def add_arguments(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("benchmark")
    b.add_argument("--url", help="a running server's base URL (default: serve the engine options' model here)")
    b.add_argument("--api-key", metavar="KEY", help="the --url server's key")
    b.add_argument("--concurrency", default="1,8,32", help="concurrent streams per level (default 1,8,32)")
    b.add_argument("--requests", type=int, metavar="N", help="requests per level (default 4 x concurrency, >= 8)")
    b.add_argument("--prompt-len", type=int, default=128, metavar="N", help="prompt tokens (default 128)")
    b.add_argument("--max-tokens", type=int, default=256, metavar="N", help="new tokens per request (default 256)")
    b.add_argument("--seed", type=int, default=0, help="of the random prompts")
    b.add_argument("--json", metavar="FILE", help="write every number here too")
    b.add_argument(
        "--step-ms",
        type=float,
        metavar="MS",
        help="serve a stand-in engine instead of a model: its device takes MS ms a decode step (as a GPU's), so "
        "the run times what the server and its clients cost per token (the demo tokenizer's text; no model runs)",
    )
    b.add_argument(
        "--prefill-ms",
        type=float,
        metavar="MS",
        help="with --step-ms: the fixed cost of one prefill pass (default: one step), which runs every waiting "
        "prompt that fits 2048 tokens at once, as the engine's does; a pass costs MS plus --prefill-token-us per "
        "token (7B's 128-token prefill takes about 20 ms on an H200)",
    )
    b.add_argument(
        "--prefill-token-us",
        type=float,
        default=14.0,
        metavar="US",
        help="with --step-ms: what each prompt token adds to a prefill pass (default 14: 7B on an H200)",
    )


@dataclass
class Outcome:
    """One request as its client saw it."""

    ok: bool
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between consecutive pieces of text
    output_tokens: int = 0
    latency_s: float = 0.0
    error: str = ""


@dataclass
class Level:
    concurrency: int
    requests: int
    failed: int
    duration_s: float
    output_tokens: int
    output_tps: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    errors: list[str]
    started: float = 0.0  # time.perf_counter() at the level's start (one clock for every process of a machine)
    bench_decode_tps: float | None = None
    client_cpu_s: float = 0.0  # the clients' process's CPU time over the level
    loop_cpu_s: float | None = None  # the server's event loop thread's, where it runs here
    device_busy: float | None = None  # the stand-in's (--step-ms): the share of the level its device ran work
    ceiling_tps: float | None = None  # the stand-in's rate for this load with a server that costs nothing


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated as numpy's default."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summary_ms(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else 0.0
    return {"mean": mean * 1e3, "p50": percentile(values, 50) * 1e3, "p99": percentile(values, 99) * 1e3}


async def _count(client: httpx.AsyncClient, text: str) -> int:
    response = await client.post("/tokenize", json={"text": text})
    response.raise_for_status()
    return len(response.json()["tokens"])


async def random_prompt(client: httpx.AsyncClient, rng: random.Random, tokens: int) -> str:
    """Random words whose prompt is `tokens` ids long (or a little shorter, where the last word takes several),
    counted by the server's own `/tokenize`."""
    words = [rng.choice(WORDS) for _ in range(max(tokens - 2, 1))]
    n = await _count(client, " ".join(words))
    while n < tokens:
        words += [rng.choice(WORDS) for _ in range(max((tokens - n) // 2, 1))]
        n = await _count(client, " ".join(words))
    while n > tokens and len(words) > 1:
        words.pop()
        n = await _count(client, " ".join(words))
    return " ".join(words)


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, extra: dict | None = None) -> Outcome:
    """One streamed greedy completion; `extra`: this server's own fields (`speculate`), for ours only."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in sse_lines(response.aiter_text()):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome(False, error=str(chunk["error"].get("message")))
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        return Outcome(False, error=f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    if not times:
        return Outcome(True, ttft_s=end - start, output_tokens=tokens, latency_s=end - start)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return Outcome(True, times[0] - start, gaps, tokens, end - start)


async def run_level(
    client: httpx.AsyncClient, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None
) -> Level:
    """`concurrency` clients, each sending the next prompt as soon as its previous answer has ended."""
    pending = list(reversed(prompts))
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while pending:
            outcomes.append(await one_request(client, pending.pop(), max_tokens, extra))

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.output_tokens for o in good)
    return Level(
        concurrency=concurrency,
        requests=len(outcomes),
        failed=len(outcomes) - len(good),
        duration_s=duration,
        output_tokens=tokens,
        output_tps=tokens / duration,
        requests_per_s=len(good) / duration,
        ttft_ms=_summary_ms([o.ttft_s for o in good]),
        itl_ms=_summary_ms([g for o in good for g in o.gaps_s]),
        errors=sorted({o.error for o in outcomes if not o.ok})[:5],
        started=start,
        client_cpu_s=cpu,
    )


async def run_levels(
    url: str, api_key: str | None, levels: list[int], per_level: list[int], prompt_len: int, max_tokens: int, seed: int,
    extra: dict | None = None,
) -> list[Level]:  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as client:
        rng = random.Random(seed)
        prompts = [[await random_prompt(client, rng, prompt_len) for _ in range(n)] for n in per_level]
        await one_request(client, prompts[0][0], 8)  # warm-up: the first request pays for lazy set-up
        return [await run_level(client, p, c, max_tokens, extra) for p, c in zip(prompts, levels, strict=True)]


def _load_in_child(*args: object) -> list[dict]:
    """`run_levels` in a child process; its results as plain data."""
    return [asdict(level) for level in asyncio.run(run_levels(*args))]  # type: ignore[arg-type]


def main(args: argparse.Namespace) -> int:
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        paced = [t for t in (args.step_ms, args.prefill_ms) if t is not None]
        if min(levels) < 1 or args.prompt_len < 2 or args.max_tokens < 1 or any(t <= 0 for t in paced):
            raise ValueError
        if args.prefill_token_us < 0:
            raise ValueError
    except ValueError:
        print(
            f"{PROG}: error: --concurrency takes numbers >= 1 (1,8,32); --prompt-len >= 2, --max-tokens >= 1, "
            "--step-ms and --prefill-ms > 0, --prefill-token-us >= 0",
            file=sys.stderr,
        )
        return 2
    per_level = [args.requests or max(8, 4 * c) for c in levels]
    load = (args.api_key, levels, per_level, args.prompt_len, args.max_tokens, args.seed)
    if args.url:
        try:
            results = [asdict(level) for level in asyncio.run(run_levels(args.url.rstrip("/"), *load))]
        except httpx.HTTPError as err:
            print(f"{PROG}: error: {args.url}: {err}", file=sys.stderr)
            return 1
        model, comparison = args.url, None
    else:
        served = _serve_here(args, levels, load)
        if isinstance(served, int):
            return served
        model, results, comparison = served
    out = {"model": model, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "levels": results}
    if comparison is not None:
        out["bench"] = comparison
        for level in results:
            level["bench_decode_tps"] = comparison["decode_tps"].get(str(level["concurrency"]))
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(level["failed"] == 0 for level in results) else 1


def _serve_here(args: argparse.Namespace, levels: list[int], load: tuple) -> tuple[str, list[dict], dict] | int:
    """Serve the engine options' model on a thread, run the clients in a child process, then time `bench`'s
    decode on the same engine. Returns (model, levels, comparison), or an exit status."""
    from dataclasses import replace

    from engine.client import EventSink
    from engine.errors import EngineError
    from engine.local_client import LocalClient
    from engine.paced import paced_loader
    from tui.cli import spec_of, with_flags
    from tui.server.run import make_bridge, start_in_thread

    spec = spec_of(args, max_batch=max(levels))
    if spec.max_seq_len is None and spec.shape and not spec.model:
        spec = replace(spec, max_seq_len=args.prompt_len + args.max_tokens + 64)
    clients: list[LocalClient] = []

    stand_in = None
    if args.step_ms:
        stand_in = paced_loader(args.step_ms / 1e3, _prefill_ms(args) / 1e3, args.prefill_token_us / 1e6)

    def make_client(sink: EventSink) -> LocalClient:
        clients.append(LocalClient(spec, on_event=sink, load=stand_in))
        return clients[0]

    running = start_in_thread(make_bridge(make_client, spec.max_batch, max(levels)))
    try:
        try:
            info = clients[0].wait_ready()
        except EngineError as err:
            print(f"{PROG}: error: {with_flags(str(err), err.fields)}", file=sys.stderr)
            return 1
        print(f"{PROG}: serving {info.name} on {info.device} at {running.url}", file=sys.stderr, flush=True)
        assert running.bridge.loop is not None
        clock = asyncio.run_coroutine_threadsafe(_loop_clock(), running.bridge.loop)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            speculate = {"speculate": True} if spec.speculate else {}  # --speculate N: every request asks to
            results = pool.submit(_load_in_child, running.url, *load, speculate).result()
        clock.cancel()
        position = args.prompt_len + args.max_tokens // 2
        for level in results:
            start, end = level["started"], level["started"] + level["duration_s"]
            level["loop_cpu_s"] = _LOOP_CPU.between(start, end)
            if args.step_ms:
                busy = clients[0].call(lambda engine, a=start, b=end: engine.paced.busy_between(a, b))
                level["device_busy"] = busy / level["duration_s"]
                level["ceiling_tps"] = _ceiling(level, args)
        comparison = clients[0].call(lambda engine: _bench_decode(engine, levels, position))
    finally:
        running.stop()
    return f"{info.name} on {info.device} ({info.dtype}, tp {info.tp})", results, comparison


class _CpuSamples:
    """(perf_counter, the loop thread's CPU time) pairs, taken on the loop's thread, to read the CPU it spent
    between two instants."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    def between(self, start: float, end: float) -> float | None:
        inside = [cpu for t, cpu in self.samples if start <= t <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else None


_LOOP_CPU = _CpuSamples()
_CLOCK_S = 0.05


async def _loop_clock() -> None:
    while True:
        _LOOP_CPU.samples.append((time.perf_counter(), time.thread_time()))
        await asyncio.sleep(_CLOCK_S)


def _prefill_ms(args: argparse.Namespace) -> float:
    return args.prefill_ms or args.step_ms


def _ceiling(level: dict, args: argparse.Namespace) -> float:
    """The stand-in's output tokens/s for a level's load with a server that costs nothing: the prompts prefilled in
    the fewest passes the scheduler could make (at most `concurrency` prompts are in flight, at most PREFILL_CHUNK
    tokens go in a pass), each pass pausing the decode, and the other tokens `concurrency` a step."""
    from engine.scheduler import PREFILL_CHUNK

    tokens, requests = level["output_tokens"], level["requests"] - level["failed"]
    prompt_tokens = requests * args.prompt_len
    passes = -(-prompt_tokens // min(level["concurrency"] * args.prompt_len, PREFILL_CHUNK))
    prefill_ms = passes * _prefill_ms(args) + prompt_tokens * args.prefill_token_us / 1e3
    seconds = (prefill_ms + (tokens - requests) / level["concurrency"] * args.step_ms) / 1e3
    return tokens / seconds if seconds > 0 else 0.0


def _bench_decode(engine: object, batches: list[int], position: int) -> dict:
    """`bench`'s decode rate at each batch, from the serving run's mean context (on the worker thread)."""
    from engine.bench import decode_rate

    rates = {str(b): decode_rate(engine, b, 64, position) for b in batches}  # type: ignore[arg-type]
    return {"position": position, "decode_tps": rates}


def table(out: dict) -> str:
    lines = [f"{PROG}: {out['model']}, prompts of {out['prompt_len']} tokens, up to {out['max_tokens']} new tokens", ""]
    head = f"{'streams':>7} {'requests':>8} {'failed':>6} {'out tok/s':>10} {'req/s':>7} "
    head += f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    if "bench" in out:
        head += f" {'bench decode':>13} {'served/bench':>12}"
    lines.append(head)
    for lv in out["levels"]:
        row = f"{lv['concurrency']:>7} {lv['requests']:>8} {lv['failed']:>6} {lv['output_tps']:>10.1f} "
        row += f"{lv['requests_per_s']:>7.2f} {lv['ttft_ms']['p50']:>6.1f} ms {lv['ttft_ms']['p99']:>6.1f} ms "
        row += f"{lv['itl_ms']['p50']:>5.2f} ms {lv['itl_ms']['p99']:>5.2f} ms"
        bench = lv.get("bench_decode_tps")
        if bench:
            row += f" {bench:>7.1f} tok/s {lv['output_tps'] / bench:>11.1%}"
        lines.append(row)
    if "bench" in out:
        b1 = out["bench"]["decode_tps"].get("1")
        one = next((lv for lv in out["levels"] if lv["concurrency"] == 1), None)
        if b1 and one:
            step_ms = 1e3 / b1
            lines.append(
                f"\nat 1 stream: inter-token p50 {one['itl_ms']['p50']:.2f} ms against bench's batch-1 step "
                f"{step_ms:.2f} ms ({one['itl_ms']['p50'] / step_ms - 1:+.1%})"
            )
        lines.append(f"(bench's decode timed at position {out['bench']['position']}, the runs' mean context)")
    for lv in out["levels"]:
        per_token = 1e6 / max(lv["output_tokens"], 1)
        line = f"{lv['concurrency']} streams: the clients' CPU {lv['client_cpu_s'] * per_token:.0f} us a token"
        if lv.get("loop_cpu_s") is not None:
            line += f", the server's event loop's {lv['loop_cpu_s'] * per_token:.0f} us"
        if lv.get("device_busy") is not None:
            line += (
                f"; the stand-in's device busy {lv['device_busy']:.0%} of the level, its ceiling for this load "
                f"{lv['ceiling_tps']:.0f} tok/s (served {lv['output_tps'] / lv['ceiling_tps']:.0%} of it)"
            )
        lines.append(line)
    for lv in out["levels"]:
        for error in lv["errors"]:
            lines.append(f"{lv['concurrency']} streams: failed: {error}")
    return "\n".join(lines)
