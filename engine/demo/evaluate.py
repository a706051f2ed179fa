"""Score a saved demo model on the held-out stdlib modules.

Usage: `python -m engine.demo.evaluate MODEL_DIR [--device cuda] [--infills 600]` (writes MODEL_DIR/eval.json
unless `--no-write`). Runs the checkpoint through `transformers` so the numbers do not depend on the
training code. Reports token-level perplexity (and bits per character, which compares across tokenizers),
greedy single-line infilling exact match with the PSM prompt, and how often the predicted lines parse.
`--quant int8,int4,nf4` instead scores the model with its projections quantized as `--quant` quantizes them at
load (round trip through engine.weights; transformers then holds the values the engine computes with), and
`--converted DIR` a `codellama-tui convert` workspace of it (GPTQ) as the engine loads it, next to the unquantized
model: perplexity, line infilling, and how many lines get the unquantized model's own greedy infill.
`--kv int8` instead scores the perplexity through the engine's own model (engine.model) with its KV cache in the
model's dtype and as `--kv` stores it: every window is prefilled through the cache, so each position attends over
the keys and values the cache holds.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from engine.bench_options import kv_list
from engine.config import ModelConfig
from engine.demo.corpus import HELD_OUT
from engine.demo.examples import BOS, EOS, SMILEY, Ids, enc_infilling
from engine.prompts import answer_room, build_prompt, fit_request
from engine.requests import Request
from engine.tokenizer import Tokenizer
from engine.weights import FORMATS

# What every infilling case sends: the prefix's last and the suffix's first characters (at line boundaries),
# and the new tokens it may write (the prompt leaves room for them, as the engine's do).
MAX_PREFIX, MAX_SUFFIX, MAX_NEW = 1800, 700, 64


@dataclass
class InfillCase:
    """One masked line: the file is `prefix + middle + suffix`; `middle` is a whole line without newline."""

    file: str
    line: int
    prefix: str
    middle: str
    suffix: str


def held_out_texts() -> dict[str, str]:
    """The held-out modules of the running interpreter's stdlib, by file name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {n: (stdlib / n).read_text(encoding="utf-8") for n in HELD_OUT if (stdlib / n).exists()}


def _case(name: str, text: str, i: int) -> InfillCase:
    lines = text.split("\n")
    start = sum(len(x) + 1 for x in lines[:i])
    end = start + len(lines[i])
    return InfillCase(name, i + 1, text[:start], text[start:end], text[end:])


def line_cases(texts: dict[str, str], n: int, seed: int) -> list[InfillCase]:
    """`n` random non-blank lines over all held-out files (seeded, without replacement)."""
    pool = [(name, i) for name, t in texts.items() for i, ln in enumerate(t.split("\n")) if ln.strip()]
    picks = random.Random(seed).sample(pool, min(n, len(pool)))
    return [_case(name, texts[name], i) for name, i in picks]


def body_cases(texts: dict[str, str], n: int, seed: int) -> list[InfillCase]:
    """`n` random code lines inside function bodies (not docstrings, comments or the `def` line)."""
    pool: list[tuple[str, int]] = []
    for name, t in texts.items():
        lines = t.split("\n")
        for node in ast.walk(ast.parse(t)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if ast.get_docstring(node) is not None:
                body = body[1:]
            if not body:
                continue
            for ln in range(body[0].lineno, (node.end_lineno or body[0].lineno) + 1):
                s = lines[ln - 1].strip()
                if s and not s.startswith("#"):
                    pool.append((name, ln - 1))
    pool = sorted(set(pool))
    picks = random.Random(seed).sample(pool, min(n, len(pool)))
    return [_case(name, texts[name], i) for name, i in picks]


def _clip(prefix: str, suffix: str, max_prefix: int, max_suffix: int) -> tuple[str, str]:
    """Keep the end of the prefix and the start of the suffix, cut at line boundaries (the context is short)."""
    if len(prefix) > max_prefix:
        cut = prefix.find("\n", len(prefix) - max_prefix)
        prefix = prefix[cut + 1 :] if cut >= 0 else prefix[-max_prefix:]
    if len(suffix) > max_suffix:
        cut = suffix.rfind("\n", 0, max_suffix)
        suffix = suffix[:cut] if cut > 0 else suffix[:max_suffix]
    return prefix, suffix


def fitted_texts(
    model_dir: Path, cases: list[InfillCase], max_prefix: int, max_suffix: int, max_new: int
) -> list[tuple[str, str]]:
    """Each case's (prefix, suffix): clipped to `max_prefix`/`max_suffix` characters at line boundaries, then,
    where the prompt would still outgrow the model's context with `max_new` ids to spare, fitted exactly as the
    engine fits an editor's request (the lines farthest from the hole go), so every prompt is one the app sends."""
    tok = Tokenizer.from_dir(model_dir)
    context = ModelConfig.from_dir(model_dir).max_position
    budget = context - answer_room(max_new, context)
    out = []
    for c in cases:
        prefix, suffix = _clip(c.prefix, c.suffix, max_prefix, max_suffix)
        request = Request(cap="infilling", prefix=prefix, suffix=suffix)
        if len(build_prompt(tok, request)) > budget:
            request = fit_request(tok, request, budget)[0]
        out.append((request.prefix or "", request.suffix or ""))
    return out


def psm_prompt(sp: object, prefix: str, suffix: str) -> list[int]:
    """Meta's PSM infilling prompt (CODELLAMA.md), exactly what the engine builds."""
    ids = Ids.of(sp)
    return [BOS, ids.pre] + sp.encode(prefix) + [ids.suf] + enc_infilling(sp, suffix) + [ids.mid]  # type: ignore[attr-defined]


def decode_infilling(sp: object, ids: list[int]) -> str:
    """Meta's `decode_infilling`: keep a leading space."""
    return sp.decode([sp.piece_to_id(SMILEY)] + ids)[1:]  # type: ignore[attr-defined]


def greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new: int,
    stop_ids: set[int],
    device: torch.device,
    batch: int = 64,
) -> list[list[int]]:
    """Batched greedy decoding with a KV cache (left padding); each row stops at its first stop id."""
    return greedy_with_gaps(model, prompts, max_new, stop_ids, device, batch)[0]


@torch.no_grad()
def greedy_with_gaps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new: int,
    stop_ids: set[int],
    device: torch.device,
    batch: int = 64,
) -> tuple[list[list[int]], list[float]]:
    """`greedy`'s ids, and for each row the smallest gap between its best and second-best logit over the tokens it
    chose (its stop included): a small gap is a near tie, which a tiny change to the weights can flip."""
    outs: list[list[int]] = [[] for _ in prompts]
    gaps: list[float] = [math.inf for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = torch.tensor(sorted(stop_ids), device=device)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p, device=device)
            mask[r, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        gen, gen_gaps = [], []
        logits = out.logits[:, -1].float()
        for _ in range(max_new):
            nxt = logits.argmax(-1)
            top2 = logits.topk(2, -1).values
            gen.append(nxt)
            gen_gaps.append(top2[:, 0] - top2[:, 1])
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], 1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float()
        g, gg = torch.stack(gen, 1).tolist(), torch.stack(gen_gaps, 1).tolist()
        for r, i in enumerate(idx):
            row = []
            for t, gap in zip(g[r], gg[r], strict=True):
                gaps[i] = min(gaps[i], gap)
                if t in stop_ids:
                    break
                row.append(t)
            outs[i] = row
    return outs, gaps


def newline_ids(sp: object) -> set[int]:
    """Ids whose text contains a newline (with byte fallback, normally just `<0x0A>`)."""
    return {i for i in range(sp.get_piece_size()) if "\n" in decode_infilling(sp, [i])}  # type: ignore[attr-defined]


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    sp: object,
    texts: dict[str, str],
    seq_len: int,
    device: torch.device,
    max_chars_per_file: int | None = None,
) -> dict:
    """Token-level perplexity over the held-out files, in non-overlapping windows of `seq_len`."""
    nll, n_tok, n_chars = 0.0, 0, 0
    for text in texts.values():
        text = text[:max_chars_per_file] if max_chars_per_file else text
        toks = [BOS] + sp.encode(text) + [EOS]  # type: ignore[attr-defined]
        n_chars += len(text)
        for s in range(0, len(toks) - 1, seq_len):
            w = torch.tensor(toks[s : s + seq_len + 1], device=device)[None]
            if w.shape[1] < 2:
                continue
            logits = model(input_ids=w[:, :-1]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
            n_tok += w.shape[1] - 1
    return {
        "window": seq_len,
        "tokens": n_tok,
        "chars": n_chars,
        "perplexity": math.exp(nll / n_tok),
        "bits_per_char": nll / n_chars / math.log(2),
    }


def score_infills(
    model: torch.nn.Module,
    sp: object,
    cases: list[InfillCase],
    texts: list[tuple[str, str]],
    device: torch.device,
    max_new: int = MAX_NEW,
    batch: int = 64,
) -> dict:
    """Greedy PSM infilling of each masked line from its (prefix, suffix) in `texts`; exact match (stripped) and
    parse rates."""
    prompts = [psm_prompt(sp, prefix, suffix) for prefix, suffix in texts]
    preds = infills_and_gaps(model, sp, prompts, device, max_new, batch)[0]
    exact = [p.strip() == c.middle.strip() for p, c in zip(preds, cases, strict=False)]
    parses = [_parses(c.prefix + p + c.suffix) for p, c in zip(preds, cases, strict=False)]
    blank = [_parses(c.prefix + c.suffix) for c in cases]
    n = max(len(cases), 1)
    return {
        "n": len(cases),
        "exact_match": sum(exact) / n,
        "parse_rate": sum(parses) / n,
        "parse_rate_if_line_deleted": sum(blank) / n,
        "mean_prompt_tokens": sum(map(len, prompts)) / n,
        "max_prompt_tokens": max(map(len, prompts), default=0),
        "examples": [
            {"file": c.file, "line": c.line, "target": c.middle, "prediction": p, "exact": e}
            for c, p, e in list(zip(cases, preds, exact, strict=False))[:20]
        ],
    }


def infills_and_gaps(
    model: torch.nn.Module, sp: object, prompts: list[list[int]], device: torch.device, max_new: int, batch: int
) -> tuple[list[str], list[float]]:
    """The first line of each PSM prompt's greedy infill, stopped at `▁<EOT>` or a newline, and each line's
    smallest top-2 logit gap (`greedy_with_gaps`)."""
    stops = {Ids.of(sp).eot, EOS} | newline_ids(sp)
    gens, gaps = greedy_with_gaps(model, prompts, max_new, stops, device, batch)
    return [decode_infilling(sp, g).split("\n")[0] for g in gens], gaps


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@torch.no_grad()
def round_trip(model: torch.nn.Module, fmt: str) -> None:
    """Replace every layer's projection weights by what `--quant fmt` holds for them, dequantized (the LM head
    stays, as without `--quant-head`)."""
    for layer in model.model.layers:
        for name in PROJECTIONS:
            weight = layer.get_submodule(name).weight
            weight.copy_(FORMATS[fmt].from_dense(weight.detach()).dense())


def converted_weights(workspace: Path, device: torch.device) -> tuple[str, dict]:
    """A converted workspace's name ("int4 gptq") and its weights as the engine loads them, dequantized, under
    transformers' names, in the dtype `load` gives."""
    from engine.bench import hf_twin
    from engine.engine import Engine
    from engine.requests import EngineSpec

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    engine = Engine.load(EngineSpec(model=str(workspace), device=str(device), dtype=dtype, max_batch=1))
    state = {k: v.clone() for k, v in hf_twin(engine).state_dict().items()}
    engine.close()
    how = json.loads((workspace / "config.json").read_text())["quantization_config"]
    return f"{how['format']} {how['method']}", state


@contextmanager
def bfloat16_gemms(model: torch.nn.Module) -> Iterator[None]:
    """Run a bfloat16 model's linear layers as float32 GEMMs of their bfloat16 values, rounded back to bfloat16.
    That is what a bfloat16 GEMM computes (exact products, float32 sums, one rounding), up to the order of the sums,
    and several times faster on a CPU without bfloat16 instructions (BENCHMARKS.md, 2026-12-04)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        weight, bias = m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()
        m.forward = lambda x, w=weight, b=bias: torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def quantized_scores(
    model_dir: Path,
    device: torch.device,
    formats: list[str],
    n_infills: int = 600,
    seq_len: int = 1024,
    seed: int = 0,
    max_new: int = MAX_NEW,
    max_chars_per_file: int | None = None,
    converted: tuple[Path, ...] = (),
    dtype: torch.dtype | None = None,
) -> dict:
    """Held-out perplexity and single-line infilling of the unquantized model (bf16 on CUDA, float32 on the CPU) and
    of each of `formats`, then of each `converted` workspace of it (`codellama-tui convert`: GPTQ, say) as the
    engine loads it; `same_infill`: the share of lines whose greedy infill equals the unquantized model's.
    "bfloat16" among `formats` is the yardstick: the unquantized model computing in bfloat16; with it each format
    also gets `same_infill_bfloat16`, the share of lines whose infill equals the yardstick's.
    `differing_median_gap`: on the lines where a format's infill differs from the yardstick's (bfloat16, else the
    unquantized model), the median of the yardstick's smallest top-2 logit gap along its own line (`median_gap`:
    over all lines); near ties are where rounding the weights flips a greedy choice. `dtype` overrides the one
    every row computes in (bfloat16 on a CPU computes as on CUDA, through `bfloat16_gemms`)."""
    model, sp = load(model_dir, device, dtype)
    states = dict(converted_weights(path, device) for path in converted)
    texts = held_out_texts()
    cases = line_cases(texts, n_infills, seed)
    prompts = [psm_prompt(sp, p, s) for p, s in fitted_texts(model_dir, cases, MAX_PREFIX, MAX_SUFFIX, max_new)]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    res: dict = {"device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                 "lines": len(cases), "window": seq_len, "formats": {}}  # fmt: skip
    preds: dict[str, list[str]] = {}
    gaps: dict[str, list[float]] = {}
    for fmt in ("unquantized", *formats, *states):
        model.to(original["lm_head.weight"].dtype).load_state_dict(states.get(fmt, original))
        if fmt == "bfloat16":
            model.to(torch.bfloat16)
        elif fmt in formats:
            round_trip(model, fmt)
        emulate = device.type == "cpu" and model.lm_head.weight.dtype == torch.bfloat16
        with bfloat16_gemms(model) if emulate else nullcontext():
            ppl = perplexity(model, sp, texts, seq_len, device, max_chars_per_file)
            batch = 256 if device.type == "cuda" else 16
            preds[fmt], gaps[fmt] = infills_and_gaps(model, sp, prompts, device, max_new, batch)
        res["formats"][fmt] = {
            "perplexity": ppl["perplexity"],
            "bits_per_char": ppl["bits_per_char"],
            "exact_match": _share([p.strip() == c.middle.strip() for p, c in zip(preds[fmt], cases, strict=True)]),
        }
    yardstick = "bfloat16" if "bfloat16" in preds else "unquantized"
    res["yardstick"], res["median_gap"] = yardstick, statistics.median(gaps[yardstick]) if cases else None
    for fmt, row in res["formats"].items():
        row["same_infill"] = _share([p == b for p, b in zip(preds[fmt], preds["unquantized"], strict=True)])
        if yardstick == "bfloat16":
            row["same_infill_bfloat16"] = _share([p == b for p, b in zip(preds[fmt], preds[yardstick], strict=True)])
        differing = [g for p, y, g in zip(preds[fmt], preds[yardstick], gaps[yardstick], strict=True) if p != y]
        row["differing_median_gap"] = statistics.median(differing) if differing else None
    return res


class EnginePrefill:
    """The engine's model as `perplexity` calls a transformers one: each window prefilled into slot 0 from position 0
    (its attention reads the window's keys and values back from the KV cache), every position's logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model.prefill(input_ids[0], 0, 0, all_logits=True)[None])


def kv_scores(
    model_dir: Path,
    device: torch.device,
    kvs: list[str],
    seq_len: int = 1024,
    dtype: str = "auto",
    max_chars_per_file: int | None = None,
) -> dict:
    """Held-out perplexity through the engine with its KV cache in the model's dtype ("bf16": bfloat16 on CUDA,
    float32 on the CPU) and as each of `kvs` stores it (`--kv`), and each one's change against the first."""
    import sentencepiece as spm

    from engine.engine import Engine
    from engine.requests import EngineSpec

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    texts = held_out_texts()
    res: dict = {"device": str(device), "window": seq_len, "kv": {}}
    for kv in dict.fromkeys(["bf16", *kvs]):
        spec = EngineSpec(model=str(model_dir), device=str(device), dtype=dtype, max_batch=1, max_seq_len=seq_len,
                          cuda_graphs=False, kv=kv)  # fmt: skip
        engine = Engine.load(spec)
        res["dtype"] = engine.info.dtype
        res["kv"][kv] = perplexity(EnginePrefill(engine.model), sp, texts, seq_len, device, max_chars_per_file)
        engine.close()
    base = res["kv"]["bf16"]["perplexity"]
    for row in res["kv"].values():
        row["change"] = row["perplexity"] / base - 1
    return res


def _kv_summary(res: dict) -> str:
    rows = [f"  {kv} KV cache: perplexity {r['perplexity']:.4f} ({r['change']:+.3%})" for kv, r in res["kv"].items()]
    head = f"held-out perplexity through the engine on {res['device']} ({res['dtype']}), windows of {res['window']}:"
    return "\n".join([head, *rows])


def _share(hits: list[bool]) -> float:
    return sum(hits) / max(len(hits), 1)


def _quant_summary(q: dict) -> str:
    base = q["formats"]["unquantized"]
    bf16 = q["formats"].get("bfloat16")
    names = {"bfloat16": "unquantized in bfloat16 (the yardstick)"}
    parts = []
    for fmt, r in q["formats"].items():
        if fmt == "unquantized":
            continue
        part = (
            f"{names.get(fmt, fmt)}: perplexity {r['perplexity']:.3f} ({r['perplexity'] / base['perplexity'] - 1:+.2%}"
            + (f", {r['perplexity'] / bf16['perplexity'] - 1:+.2%} against bfloat16" if bf16 and r is not bf16 else "")
            + f"), line infill exact match {r['exact_match']:.1%}, the unquantized model's own infill on"
            f" {r['same_infill']:.1%} of the lines"
        )
        if bf16 and r is not bf16:
            part += f", bfloat16's on {r['same_infill_bfloat16']:.1%}"
        if r["differing_median_gap"] is not None:
            part += (
                f" (where not {q['yardstick']}'s, that one's median top-2 logit gap {r['differing_median_gap']:.2f})"
            )
        parts.append(part)
    gap = (
        f"; {q['yardstick']}'s median top-2 logit gap over all lines {q['median_gap']:.2f}"
        if q["median_gap"] is not None
        else ""
    )
    return (
        f"\nweights quantized at load (`--quant`) or converted (`--converted`), LM head unquantized, on {q['device']}"
        f" against the unquantized model in {q['dtype']} (perplexity {base['perplexity']:.3f}, exact match"
        f" {base['exact_match']:.1%}) on {q['lines']} lines{gap}:\n" + "\n".join(f"- {part}" for part in parts)
    )


def through_cli(model_dir: Path, cases: list[InfillCase], device: str) -> dict:
    """The issue's own check: `codellama-tui generate --cap infilling` (greedy, one `--jsonl` process) on each
    masked line, the first line of its answer put back in the file, and how often the file then parses."""
    texts = fitted_texts(model_dir, cases, MAX_PREFIX, MAX_SUFFIX, MAX_NEW)
    lines = [json.dumps({"text": prefix + "<FILL>" + suffix}) for prefix, suffix in texts]
    cmd = [sys.executable, "-m", "tui.cli", "generate", "--model", str(model_dir), "--cap", "infilling", "--jsonl"]
    cmd += ["--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--stop", "\n", "--device", device]
    run = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    preds = [a.get("text", "").split("\n")[0] for a in answers]
    parses = [_parses(c.prefix + p + c.suffix) for p, c in zip(preds, cases, strict=True)]
    exact = [p.strip() == c.middle.strip() for p, c in zip(preds, cases, strict=True)]
    n = max(len(cases), 1)
    return {
        "command": " ".join(cmd[2:]),
        "python": platform.python_version(),
        "n": len(cases),
        "parse_rate": sum(parses) / n,
        "exact_match": sum(exact) / n,
    }


def load(model_dir: Path, device: torch.device, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, object]:
    """The checkpoint through `transformers` (in `dtype`, else bf16 on CUDA and fp32 on CPU) and its SentencePiece
    model."""
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return model, sp


def run_eval(
    model_dir: Path,
    device: torch.device,
    n_infills: int = 600,
    n_body: int = 200,
    seq_len: int = 1024,
    max_prefix: int = MAX_PREFIX,
    max_suffix: int = MAX_SUFFIX,
    seed: int = 0,
    write: bool = True,
    max_new: int = MAX_NEW,
    max_chars_per_file: int | None = None,
) -> dict:
    """All held-out metrics for a saved model; written to `model_dir/eval.json` when `write`.

    `max_new`, `max_chars_per_file` and the clip sizes exist to keep CPU smoke tests short.
    """
    t0 = time.time()
    model, sp = load(model_dir, device)
    batch = 256 if device.type == "cuda" else 16  # a few long batched decodes beat many short ones on a GPU
    texts = held_out_texts()
    res: dict = {"held_out_modules": sorted(texts), "device": str(device)}
    res["perplexity"] = perplexity(model, sp, texts, seq_len, device, max_chars_per_file)
    for key, cases in (
        ("line_infill", line_cases(texts, n_infills, seed)),
        ("body_line_infill", body_cases(texts, n_body, seed + 1)),
    ):
        fitted = fitted_texts(model_dir, cases, max_prefix, max_suffix, max_new)
        res[key] = score_infills(model, sp, cases, fitted, device, max_new, batch)
    res["prompt_clip_chars"] = {"prefix": max_prefix, "suffix": max_suffix}
    res["seconds"] = round(time.time() - t0, 1)
    if write:
        (model_dir / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def merge_into_eval(model_dir: Path, key: str, res: dict) -> None:
    """Add one comparison's results to `model_dir/eval.json` under `key`, keeping what the file already holds."""
    path = model_dir / "eval.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**saved, key: res}, indent=2) + "\n")


def summary(res: dict) -> str:
    """One short human-readable block for logs and the model card."""
    p, li, bo = res["perplexity"], res["line_infill"], res["body_line_infill"]
    tail = _cli_summary(res["body_line_infill_cli"]) if "body_line_infill_cli" in res else ""
    tail += _quant_summary(res["quantized"]) if "quantized" in res else ""
    return (
        f"perplexity {p['perplexity']:.3f} ({p['bits_per_char']:.3f} bits/char over {p['tokens']} tokens"
        f" in windows of {p['window']})\n"
        f"single-line infill exact match {li['exact_match']:.1%} of {li['n']}, parses {li['parse_rate']:.1%} "
        f"(line deleted: {li['parse_rate_if_line_deleted']:.1%})\n"
        f"function-body line infill exact match {bo['exact_match']:.1%} of {bo['n']}, parses {bo['parse_rate']:.1%} "
        f"(line deleted: {bo['parse_rate_if_line_deleted']:.1%})"
    ) + tail


def _cli_summary(cli: dict) -> str:
    return (
        f"\n{cli['n']} function-body lines of Python {cli['python']}'s held-out modules through"
        f" `codellama-tui generate --cap infilling`: parses {cli['parse_rate']:.1%},"
        f" exact match {cli['exact_match']:.1%}"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: evaluate a saved model directory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--infills", type=int, default=600)
    ap.add_argument("--body-infills", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--cli", action="store_true", help="only the function-body check through `codellama-tui generate`")
    ap.add_argument(
        "--quant", metavar="LIST", help="only the quantized comparison, e.g. int8,int4,nf4 (bfloat16: a yardstick)"
    )
    ap.add_argument("--converted", nargs="+", type=Path, default=(), metavar="DIR",
                    help="with --quant: also `codellama-tui convert` workspaces of the model (int4 GPTQ)")  # fmt: skip
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="with --quant or --kv: what all rows compute in (default bfloat16 on CUDA, else "
                    "float32)")  # fmt: skip
    ap.add_argument("--kv", type=kv_list, metavar="LIST",
                    help="only the KV cache comparison through the engine: int8 against the model's dtype")  # fmt: skip
    a = ap.parse_args(argv)
    if a.kv:
        res = kv_scores(a.model_dir, torch.device(a.device), a.kv, a.seq_len, a.dtype or "auto")
        print(json.dumps(res), _kv_summary(res), sep="\n", flush=True)
        if not a.no_write:
            merge_into_eval(a.model_dir, "kv_cache", res)
        return
    if a.quant:
        formats = [f for f in a.quant.split(",") if f]
        res = quantized_scores(a.model_dir, torch.device(a.device), formats, a.infills, a.seq_len, a.seed,
                               converted=tuple(a.converted), dtype=a.dtype and getattr(torch, a.dtype))  # fmt: skip
        print(json.dumps(res), _quant_summary(res), sep="\n", flush=True)
        if not a.no_write:
            merge_into_eval(a.model_dir, "quantized", res)
        return
    if a.cli:
        cases = body_cases(held_out_texts(), a.body_infills, a.seed + 1)
        res = through_cli(a.model_dir, cases, a.device)
        print(json.dumps(res), flush=True)
        if not a.no_write:
            merge_into_eval(a.model_dir, "body_line_infill_cli", res)
        return
    res = run_eval(
        a.model_dir, torch.device(a.device), a.infills, a.body_infills, a.seq_len, seed=a.seed, write=not a.no_write
    )
    print(summary(res), flush=True)


if __name__ == "__main__":
    main()
