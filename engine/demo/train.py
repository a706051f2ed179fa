"""Train the built-in demo model end to end in one run: data, tokenizer, model, evaluation, model card.

    python -m engine.demo.train --out OUT_DIR --device cuda   # the shipped model: one GPU, 6.2 minutes
    torchrun --nproc-per-node 2 -m engine.demo.train --out OUT_DIR   # data-parallel on 2 GPUs

1. Data: the running interpreter's stdlib and permissively licensed site-packages (`corpus.py`); a few
   stdlib modules are held out for evaluation.
2. Tokenizer: SentencePiece BPE with byte fallback and CodeLlama's FIM pieces (`examples.py`).
3. Examples in CodeLlama's token layouts: plain files, FIM (rate 0.9, half PSM / half SPM, random-span and
   line-level splits) and Instruct pairs (docstring -> function), packed whole into fixed-length rows (padding
   takes no loss), so every FIM middle is learned with its whole prompt in view. Files are cut into short
   pieces (`--max-chars`) and PSM middles weigh more in the loss (`--middle-weight`): infilling is learned
   only in the middles, and a one-line middle is a small share of its example.
4. A small Llama (`modeling.py`) trained with AdamW, bf16 autocast, `torch.compile` on CUDA, warmup + cosine
   over a wall-clock budget (`--minutes`, counted from the first compiled step), saved in Hugging Face Llama
   format and checked against `transformers`. Under `torchrun` the batch is split over the GPUs: rank 0
   prepares the data and broadcasts it, gradients are averaged, and rank 0 alone saves and evaluates.
5. Held-out evaluation (`evaluate.py`), samples, `README.md` (model card) and `SHA256SUMS`.

Seeded (`--seed`); the data, tokenizer and examples are deterministic for a given Python installation,
training is deterministic up to GPU non-determinism and the wall-clock stopping point. Nothing is
written outside `--out` (and the system temp dir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.demo import corpus as corpus_mod
from engine.demo import evaluate as ev
from engine.demo.examples import (
    BOS,
    EOS,
    FIM_PIECES,
    PAD,
    ExampleSettings,
    Ids,
    build_examples,
    pack,
    sample_lines,
    train_tokenizer,
)
from engine.demo.modeling import DemoConfig, DemoLlama, compare_with_transformers, save_hf

MAX_TOTAL_BYTES = 16 * 1024 * 1024
SHIPPED = (
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "eval.json",
    "training.json",
    "README.md",
)


def log(msg: str, t0: float) -> None:
    """Progress line with elapsed wall time, flushed (the GPU run is watched live)."""
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=6.2, help="wall-clock budget of the training loop")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="smoke test on the CPU: a few files, tiny model")
    ap.add_argument("--corpus-mb", type=float, default=450.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tok-lines", type=int, default=600_000, help="source lines sampled for the tokenizer")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=896)
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per packed training row")
    ap.add_argument(
        "--context",
        type=int,
        default=1024,
        help="the context the model declares (max_position_embeddings): examples of at most --max-chars characters"
        " teach it little about longer prompts",
    )
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument(
        "--max-chars",
        type=int,
        default=ExampleSettings.max_chars,
        help="longest piece of a file per example (short: more FIM middles)",
    )
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--middle-weight", type=float, default=4.0, help="loss weight of PSM middles (what follows <MID>)")
    ap.add_argument(
        "--line-fim-share",
        type=float,
        default=ExampleSettings.line_fim_share,
        help="of FIM examples, the share that masks lines, not random spans",
    )
    ap.add_argument(
        "--whole-line",
        type=float,
        default=ExampleSettings.whole_line,
        help="of line-level FIM examples, the share that masks one whole line",
    )
    ap.add_argument(
        "--over-cap",
        action="store_true",
        help="scaling experiments only: allow a model over the 16 MiB cap (such a model is never shipped)",
    )
    ap.add_argument("--warmup", type=int, default=60, help="warmup steps")
    ap.add_argument("--fim-copies", type=int, default=2, help="encodings of each file (independent FIM draws)")
    ap.add_argument(
        "--stdlib-copies", type=int, default=4, help="encodings of each stdlib file (closest to users' code)"
    )
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)"
    )
    ap.add_argument("--workers", type=int, default=min(30, os.cpu_count() or 1))
    ap.add_argument("--infills", type=int, default=600)
    ap.add_argument("--body-infills", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=25)
    a = ap.parse_args(argv)
    if a.tiny:
        a.corpus_mb, a.vocab, a.tok_lines = 1.0, 1000, 20_000
        a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate = 128, 2, 2, 1, 256
        a.seq_len, a.batch, a.warmup, a.fim_copies, a.stdlib_copies, a.max_chars = 128, 8, 5, 1, 1, 350
        a.max_steps = a.max_steps or 20
        a.infills, a.body_infills, a.log_every = 50, 10, 5
        a.workers = min(a.workers, 2)
    if a.compile is None:
        a.compile = torch.device(a.device).type == "cuda"
    return a


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_hf_tokenizer(out: Path, sp: object) -> str:
    """tokenizer.json/tokenizer_config.json so `AutoTokenizer.from_pretrained(out)` works (as the shared tool does).

    Returns a note for the card. The engine itself reads tokenizer.model with SentencePiece.
    """
    n = sp.get_piece_size()  # type: ignore[attr-defined]
    try:
        import transformers.convert_slow_tokenizer as conv
        from transformers import LlamaTokenizer

        vocab = {sp.id_to_piece(i): i for i in range(n)}  # type: ignore[attr-defined]
        scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}  # type: ignore[attr-defined]
        merges = conv.generate_merges(vocab, scores)
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tmp) / name).exists():
                    shutil.copy(Path(tmp) / name, out / name)
        return "tokenizer.json written with transformers' LlamaTokenizer"
    except Exception as e:  # noqa: BLE001 - fall back to a config that points transformers at tokenizer.model
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "model_max_length": 2048,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return f"tokenizer.json not written ({type(e).__name__}: {e}); tokenizer_config.json only"


def check_hf_tokenizer(out: Path, sp: object, samples: list[str]) -> dict:
    """How many sample texts `AutoTokenizer` encodes exactly as SentencePiece does (reported, not fatal)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        same = sum(tok(s)["input_ids"] == [BOS] + sp.encode(s) for s in samples)  # type: ignore[attr-defined]
        return {"loads": True, "same_ids": same, "samples": len(samples)}
    except Exception as e:  # noqa: BLE001
        return {"loads": False, "error": f"{type(e).__name__}: {e}"}


def lr_at(step: int, frac: float, a: argparse.Namespace) -> float:
    """Linear warmup over steps, then cosine to 10% over the fraction of the time budget used."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = min(max(frac, 0.0), 1.0)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))


def train_model(
    data: torch.Tensor, fim_ids: tuple[int, int, int, int], cfg: DemoConfig, a: argparse.Namespace, t0: float
) -> tuple[DemoLlama, dict]:
    """The training loop: random rows without replacement per epoch, stops on the time budget or step cap.

    With several ranks each takes its slice of every batch and the gradients are averaged; rank 0 keeps
    the clock and tells the others, every 10 steps, how far through the budget they are and when to stop.
    """
    dev = data.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = DemoLlama(cfg).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=dev.type == "cuda",
    )
    fwd = torch.compile(model) if a.compile else model
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    n = data.shape[0]
    local = a.batch // world
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    budget = a.minutes * 60.0
    start = time.time()
    clock = torch.zeros(2, device=dev)  # [fraction of the budget used, stop]
    step, tokens, losses = 0, 0, []
    use_amp = dev.type == "cuda"
    while True:
        if step == 1 or step % 10 == 0:
            if step == 1:
                start = time.time()  # the budget counts from the first compiled step
            elapsed = time.time() - start
            stop = bool(a.max_steps and step >= a.max_steps) or (elapsed >= budget and step > 1)
            clock[0], clock[1] = elapsed / budget, float(stop)
            if world > 1:
                dist.broadcast(clock, 0)
            frac, stop = float(clock[0]), bool(clock[1])
            if stop:
                break
        if cursor + a.batch > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        mine = perm[cursor + rank * local : cursor + (rank + 1) * local]
        rows = data[mine.to(dev)].long()
        cursor += a.batch
        lr = lr_at(step, frac if step else 0.0, a)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = fwd(rows[:, :-1].clamp(min=0))  # PAD only ever follows a row's last example
        loss = weighted_loss(logits, rows, fim_ids, a.middle_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += rows.numel() * world
        if rank == 0 and (step % a.log_every == 0 or step == 1):
            lv = float(loss.detach())  # syncs
            losses.append((step, round(time.time() - start, 1), round(lv, 4)))
            rate = tokens / max(time.time() - start, 1e-9)
            epoch = tokens / data.numel()
            log(f"step {step} loss {lv:.4f} lr {lr:.2e} tok/s {rate:,.0f} epochs {epoch:.2f}", t0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    final = float(loss.detach())
    in_sync = True
    if world > 1:  # averaged gradients keep every rank's copy identical; a drift means a data-parallel bug
        mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
        copies = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(copies, mine)
        in_sync = all(torch.equal(c, copies[0]) for c in copies)
    stats = {
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.time() - start, 1),
        "final_loss": round(final, 4),
        "epochs": round(tokens / data.numel(), 3),
        "gpus": world,
        "ranks_in_sync": in_sync,
        "compiled": bool(a.compile),
        "loss_log": losses,
    }
    return model.eval(), stats


def weighted_loss(
    logits: torch.Tensor, rows: torch.Tensor, fim_ids: tuple[int, int, int, int], middle_weight: float
) -> torch.Tensor:
    """Mean next-token loss over packed rows, the middle of every PSM example weighted `middle_weight`.

    Only in the middle does the model learn to infill, and a one-line middle is a percent of its example. In
    PSM it is exactly what follows `▁<MID>`, up to and including `▁<EOT>`; an SPM example (`▁<PRE>` then
    `▁<SUF>`) puts its prefix there too, so it keeps the plain weight.
    """
    targets = rows[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    weight = (targets != PAD).float()
    if middle_weight != 1.0:
        pre, suf, mid, eot = fim_ids
        inputs = rows[:, :-1]
        answer = (inputs == mid).int().cumsum(1) - (inputs == eot).int().cumsum(1) > 0  # after a MID, not past EOT
        spm_pre = (inputs == pre) & (targets == suf)
        at = torch.arange(inputs.shape[1], device=rows.device).expand_as(inputs)
        last_pre = torch.where(inputs == pre, at, 0).cummax(1).values  # rows start with BOS, never PRE
        weight = weight * (1 + (middle_weight - 1) * (answer & ~spm_pre.gather(1, last_pre)).float())
    return (nll * weight).sum() / weight.sum()


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Data parallelism's one collective: all gradients averaged over the ranks in a single all-reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def share_rows(prep: Prepared | None, dev: torch.device) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Rank 0's packed rows and FIM ids on every rank (the others never build data)."""
    if not dist.is_initialized():
        assert prep is not None
        return torch.from_numpy(prep.rows).to(dev), tuple(prep.fim_ids)  # type: ignore[return-value]
    header = torch.tensor([*prep.rows.shape, *prep.fim_ids] if prep else [0] * 6, device=dev)
    dist.broadcast(header, 0)
    n, width, *fim = header.tolist()
    data = torch.from_numpy(prep.rows).to(dev) if prep else torch.empty(n, width, dtype=torch.int32, device=dev)
    dist.broadcast(data, 0)
    return data, tuple(fim)  # type: ignore[return-value]


def samples(model_dir: Path, device: torch.device, max_new: int) -> dict:
    """A completion, an infill and a chat answer, greedy, for the model card."""
    model, sp = ev.load(model_dir, device)
    ids = Ids.of(sp)
    comp = "import os\n\n\ndef list_python_files(root):\n"
    pre = "def mean(values):\n    total = 0\n    for v in values:\n"
    suf = "\n    return total / len(values)\n"
    chat = "Write a Python function `is_palindrome(s)` that returns True if the string reads the same backwards."
    chat_prompt = [BOS] + sp.encode(f"[INST] {chat.strip()} [/INST]")  # type: ignore[attr-defined]
    prompts = [[BOS] + sp.encode(comp), ev.psm_prompt(sp, pre, suf), chat_prompt]  # type: ignore[attr-defined]
    g = [
        ev.greedy(model, [prompts[0]], max_new, {EOS}, device)[0],
        ev.greedy(model, [prompts[1]], max_new, {ids.eot, EOS}, device)[0],
        ev.greedy(model, [prompts[2]], 2 * max_new, {EOS}, device)[0],
    ]
    return {
        "completion": {"prompt": comp, "output": ev.decode_infilling(sp, g[0])},  # keeps the first indent
        "infill": {"prefix": pre, "suffix": suf, "output": ev.decode_infilling(sp, g[1])},
        "chat": {"request": chat, "output": sp.decode(g[2]).strip()},  # type: ignore[attr-defined]
    }


def sha256sums(out: Path) -> str:
    """`sha256sum -c`-compatible listing of the shipped files (written last)."""
    lines = []
    for name in SHIPPED:
        p = out / name
        if p.exists():
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}")
    text = "\n".join(lines) + "\n"
    (out / "SHA256SUMS").write_text(text)
    return text


def model_card(out: Path, info: dict) -> None:
    """README.md beside the weights: data, licences, tokenizer, architecture, training, results, samples."""
    c, t, e, s = info["config"], info["train"], info.get("eval"), info.get("samples")
    pk = info["data"]["packages"]
    lines = [
        "# codellama-tui demo model",
        "",
        "A tiny Llama-architecture model that behaves like a (very small) CodeLlama: it completes Python, fills",
        "`<FILL>` holes with CodeLlama's infilling tokens and answers Instruct-format chat with code. It exists so",
        "the app works on any machine without downloading weights; it is **not** a useful coding model. Point the",
        "app at real CodeLlama weights (a Hugging Face checkpoint directory) for real work.",
        "",
        "## Files",
        "",
        f"Hugging Face Llama format: `config.json`, `model.safetensors` ({info['dtype']}), `tokenizer.model`"
        " (SentencePiece), `tokenizer.json`/`tokenizer_config.json`, `eval.json`, `training.json`, `SHA256SUMS`.",
        f"Total size: {info['size_bytes'] / 2**20:.2f} MiB.",
        "",
        "## Architecture",
        "",
        f"Llama: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads"
        f" (head_dim {c['head_dim']}), {c['num_key_value_heads']} KV heads, SwiGLU intermediate"
        f" {c['intermediate_size']}, RMSNorm eps {c['rms_norm_eps']}, rope_theta {c['rope_theta']:g},"
        f" untied embeddings, vocab {c['vocab_size']}, trained in rows of {info['seq_len']} tokens on examples of at"
        f" most {info['max_chars']} characters; it declares a context of {c['max_position_embeddings']} tokens"
        f" (max_position_embeddings). {info['n_params']:,} parameters.",
        "",
        "## Tokenizer",
        "",
        f"SentencePiece BPE, {c['vocab_size']} pieces, byte fallback, identity normalisation, no whitespace"
        " collapsing, whitespace-only pieces allowed, digits split; `<unk>`=0, `<s>`=1, `</s>`=2, no pad."
        f" User-defined pieces {', '.join('`' + p + '`' for p in FIM_PIECES)} (ids {info['fim_ids']}) and `☺`"
        " (so Meta's `encode_infilling` trick, `encode('☺' + s)[2:]`, works unchanged). Trained on"
        f" {info['tok_lines']:,} sampled source lines. {info['hf_tokenizer']}; HF parity: {info['hf_check']}.",
        "",
        "## Data",
        "",
        f"Python {info['data']['stdlib_version']} standard library ({info['data']['stats'].get('stdlib_files', 0)}"
        " files, with whatever test folders the installation has; idlelib, lib2to3, encodings, pydoc_data skipped)"
        " and the Python files"
        " of the permissively licensed distributions below (licence from each distribution's metadata; unknown or"
        " non-permissive licences and vendored folders skipped; test suites used, but never the held-out modules'"
        " own tests; every package gets the same byte cap,"
        f" {info['data']['stats'].get('per_package_cap', 0) / 1e6:.1f} MB, so none crowds out the rest),"
        " deduplicated by content:"
        f" {info['data']['stats']['files']} files, {info['data']['stats']['bytes'] / 1e6:.1f} MB.",
        f"Held out for evaluation (never trained on): {', '.join(info['data']['held_out'])}.",
        "",
        "| package | version | licence | files |",
        "| --- | --- | --- | --- |",
        *[f"| {p['name']} | {p['version']} | {p['license']} | {p['files']} |" for p in pk],
        "",
        "Examples (CodeLlama token layouts, see `engine/demo/examples.py`): each file cut at line boundaries into"
        f" pieces of {info['max_chars'] // 6} to {info['max_chars']} characters, encoded {info['fim_copies']}x (stdlib"
        f" files {info['stdlib_copies']}x) with independent draws; FIM at rate {info['fim_rate']} (half PSM, half SPM;"
        f" {1 - info['line_fim_share']:.0%}"
        f" random character spans as in the paper, {info['line_fim_share']:.0%} line-level: a whole line"
        f" ({info['whole_line']:.0%}, the evaluation's task), a span inside a line or a short block), plain otherwise;"
        " plus Instruct pairs (a function's docstring as the request, its code in a ```python block as the answer;"
        f" 30% with a `<<SYS>>` system prompt). Counts: {info['example_counts']}. Packed whole (never cut across"
        f" rows; best fit, padding without loss) into {info['rows']:,} rows of {info['seq_len'] + 1} tokens,"
        f" {info['pad_share']:.1%} padding.",
        "",
        "## Training",
        "",
        f"`{info['command']}`",
        "",
        f"{t['steps']} steps of {info['batch']} x {info['seq_len']} tokens ({t['tokens'] / 1e6:.0f}M tokens,"
        f" {t['epochs']} epochs) in {t['seconds']} s on {t['gpus']} x {info['device_name']}"
        f"{' (data parallel)' if t['gpus'] > 1 else ''}{', torch.compile' if t['compiled'] else ''};"
        " AdamW (0.9, 0.95), weight decay"
        f" 0.1, lr {info['lr']} with {info['warmup']} warmup steps and cosine decay to 10% over the time budget,"
        f" bf16 autocast, gradient clip 1.0, seed {info['seed']}; the loss on PSM middles weighted"
        f" {info['middle_weight']:g}x. Final training loss {t['final_loss']} (weighted)."
        f" Whole run: {info['total_seconds']:.0f} s. Max |logit diff| vs transformers: {info['logit_diff']:.2e}.",
        "",
    ]
    if e:
        lines += [
            "## Held-out results",
            "",
            f"On {', '.join(e['held_out_modules'])} (`python -m engine.demo.evaluate DIR`):",
            "",
            "```",
            ev.summary(e),
            "```",
            "",
            "Single-line infilling: a random non-blank line masked (its content without the newline), PSM prompt"
            f" with the prefix clipped to its last {e['prompt_clip_chars']['prefix']} and the suffix to its first"
            f" {e['prompt_clip_chars']['suffix']} characters at line boundaries (and where the prompt would still"
            f" outgrow the model's context with {ev.MAX_NEW} tokens to spare, fitted as the app fits an editor's file:"
            " the lines farthest from the hole go), greedy, stopped at `▁<EOT>` or a newline, compared after stripping."
            " Parses: `ast.parse` of the whole file with the predicted line in place (for comparison, how often it"
            " still parses with the line deleted).",
            "",
        ]
        if "quantized" in e:
            lines += [
                "Quantized weights (`python -m engine.demo.evaluate DIR --quant int8,int4,bfloat16`): every layer's"
                " projections replaced by what `--quant` holds for them, dequantized (the values the engine computes"
                ' with), scored on the same lines next to the unquantized model; "own infill" is the share of lines'
                " whose greedy infill is exactly the unquantized model's, and bfloat16 (unquantized weights computing"
                " in bfloat16) shows how much of that any rounding moves.",
                "",
            ]
    if s:
        lines += [
            "## Samples (greedy)",
            "",
            "Completion of:",
            "```python",
            s["completion"]["prompt"].rstrip("\n"),
            "```",
            "gives:",
            "```python",
            s["completion"]["prompt"] + s["completion"]["output"],
            "```",
            "",
            "Infilling `<FILL>` in:",
            "```python",
            s["infill"]["prefix"] + "<FILL>" + s["infill"]["suffix"].rstrip("\n"),
            "```",
            f"gives `{s['infill']['output']!r}`.",
            "",
            f"Chat: *{s['chat']['request']}*",
            "",
            "````",
            s["chat"]["output"],
            "````",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Run the whole pipeline; see the module docstring."""
    a = parse_args(argv)
    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node {world}" if world > 1 else "python"
    a.command = f"{launcher} -m engine.demo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if world > 1:  # started by torchrun: one process per GPU (gloo processes on the CPU, for tests)
        if torch.device(a.device).type == "cuda":
            a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(a.device)
            dist.init_process_group("nccl", timeout=timedelta(minutes=30), device_id=torch.device(a.device))
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank() if world > 1 else 0
    seed_all(a.seed)
    out: Path = a.out.resolve()
    dev = torch.device(a.device)
    cfg = DemoConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.context,
    )
    prep = prepare(a, cfg, out, t0) if rank == 0 else None
    data, fim_ids = share_rows(prep, dev)

    # 4. training
    if rank == 0:
        log(
            f"training on {world} x {dev.type} for {a.minutes} min"
            + (f" / {a.max_steps} steps" if a.max_steps else ""),
            t0,
        )
    model, tstats = train_model(data, fim_ids, cfg, a, t0)
    del data
    if world > 1:  # together: a rank that tears gloo down while another still talks to it can abort
        dist.barrier()
        dist.destroy_process_group()
    if prep is None:
        return
    finish(a, cfg, out, prep, model, tstats, t0)


@dataclass
class Prepared:
    """What rank 0 built before training and the model card reports."""

    corp: corpus_mod.Corpus
    sp: object
    fim_ids: list[int]
    tok_lines: int
    hf_note: str
    hf_check: dict
    probe: list[str]
    settings: ExampleSettings
    counts: dict[str, int]
    rows: np.ndarray
    pad_share: float


def prepare(a: argparse.Namespace, cfg: DemoConfig, out: Path, t0: float) -> Prepared:
    """Steps 1-3: corpus, tokenizer and packed training rows."""
    out.mkdir(parents=True, exist_ok=True)
    est = 2 * cfg.n_params() + 600_000
    log(f"model {cfg.n_params():,} params, about {est / 2**20:.2f} MiB shipped", t0)
    if est > MAX_TOTAL_BYTES and not (a.tiny or a.over_cap):
        sys.exit(f"the model would not fit in 16 MiB ({est} bytes): make it smaller")

    # 1. data
    corp = corpus_mod.collect(int(a.corpus_mb * 1e6), max_files=40 if a.tiny else None, seed=a.seed)
    log(
        f"corpus: {len(corp.train)} files, {corp.stats['bytes'] / 1e6:.1f} MB "
        f"(stdlib {corp.stats['stdlib_bytes'] / 1e6:.1f} MB), {len(corp.packages)} packages, "
        f"held out {len(corp.held_out)}",
        t0,
    )

    # 2. tokenizer
    lines = sample_lines([f.text for f in corp.train], a.tok_lines, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(lines, str(Path(tmp) / "tok"), a.vocab, threads=max(a.workers, 1))
        shutil.copy(Path(tmp) / "tok.model", out / "tokenizer.model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fim_ids = [sp.piece_to_id(p) for p in FIM_PIECES]
    hf_note = write_hf_tokenizer(out, sp)
    probe = [corp.held_out[0].text[:2000] if corp.held_out else "def f(x):\n    return x\n", "[INST] hi [/INST]"]
    hf_check = check_hf_tokenizer(out, sp, probe)
    log(f"tokenizer: {sp.get_piece_size()} pieces, FIM ids {fim_ids}; {hf_note}; HF check {hf_check}", t0)

    # 3. examples
    st = ExampleSettings(
        line_fim_share=a.line_fim_share,
        whole_line=a.whole_line,
        max_chars=a.max_chars,
        max_tokens=a.seq_len + 1,
        seed=a.seed,
    )
    files = [
        (hashlib.sha1(f.text.encode()).hexdigest(), f.text, a.stdlib_copies if f.origin == "stdlib" else a.fim_copies)
        for f in corp.train
    ]
    exs, counts = build_examples(files, str(out / "tokenizer.model"), st, a.workers)
    rows = pack(exs, a.seq_len + 1, a.seed)
    pad_share = float((rows == PAD).mean()) if rows.size else 0.0
    log(
        f"examples: {len(exs)} ({counts}), {rows.shape[0]} rows x {a.seq_len + 1} = {rows.size / 1e6:.1f}M tokens"
        f" ({pad_share:.1%} padding)",
        t0,
    )
    return Prepared(corp, sp, fim_ids, len(lines), hf_note, hf_check, probe, st, counts, rows, pad_share)


def finish(
    a: argparse.Namespace, cfg: DemoConfig, out: Path, prep: Prepared, model: DemoLlama, tstats: dict, t0: float
) -> None:
    """Steps 5-6 on rank 0: save, check against transformers, evaluate, write the card and checksums."""
    dev = torch.device(a.device)
    sp, corp, st = prep.sp, prep.corp, prep.settings
    save_hf(model.cpu().float(), out)
    sample_ids = torch.tensor([[BOS] + sp.encode(prep.probe[0])[:127]])
    diff = float("nan")
    e: dict | None = None
    smp: dict | None = None
    try:  # from here on a failure must not lose the trained model: log it and still write the card
        diff = compare_with_transformers(out, sample_ids)
        log(f"saved; max |logit diff| training module vs transformers: {diff:.3e}", t0)
        if not diff < 1e-3:
            log("WARNING: the saved checkpoint does not match the training module", t0)

        # 5. evaluation and samples
        small = {"max_prefix": 300, "max_suffix": 100, "max_new": 8, "max_chars_per_file": 1500} if a.tiny else {}
        e = ev.run_eval(out, dev, a.infills, a.body_infills, a.context, seed=a.seed, **small)
        if not a.tiny:
            cases = ev.body_cases(ev.held_out_texts(), a.body_infills, a.seed + 1)
            e["body_line_infill_cli"] = ev.through_cli(out, cases, str(dev))
            (out / "eval.json").write_text(json.dumps(e, indent=2) + "\n")
        log("held-out:\n" + ev.summary(e), t0)
        smp = samples(out, dev, 8 if a.tiny else 96)
        log(f"samples: {json.dumps(smp)[:600]}", t0)
    except Exception:
        log(
            "ERROR after training (model saved; rerun python -m engine.demo.evaluate OUT):\n" + traceback.format_exc(),
            t0,
        )

    # 6. card and checksums
    info = {
        "config": model.config.hf_dict(),
        "n_params": cfg.n_params(),
        "dtype": "bfloat16",
        "seq_len": a.seq_len,
        "batch": a.batch,
        "lr": a.lr,
        "warmup": a.warmup,
        "seed": a.seed,
        "fim_ids": prep.fim_ids,
        "tok_lines": prep.tok_lines,
        "hf_tokenizer": prep.hf_note,
        "hf_check": prep.hf_check,
        "max_chars": st.max_chars,
        "fim_rate": st.fim_rate,
        "line_fim_share": st.line_fim_share,
        "whole_line": st.whole_line,
        "pad_share": prep.pad_share,
        "middle_weight": a.middle_weight,
        "fim_copies": a.fim_copies,
        "stdlib_copies": a.stdlib_copies,
        "example_counts": prep.counts,
        "rows": int(prep.rows.shape[0]),
        "train": tstats,
        "eval": e,
        "samples": smp,
        "logit_diff": diff,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "command": a.command,
        "data": {
            "stdlib_version": corp.stdlib_version,
            "packages": corp.packages,
            "stats": corp.stats,
            "held_out": [f.path.name for f in corp.held_out],
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    info["config"]["head_dim"] = cfg.head_dim
    (out / "training.json").write_text(json.dumps({k: v for k, v in info.items() if k != "eval"}, indent=1) + "\n")
    info["total_seconds"] = time.time() - t0
    info["size_bytes"] = 0
    model_card(out, info)
    info["size_bytes"] = sum((out / n).stat().st_size for n in SHIPPED if (out / n).exists())
    model_card(out, info)  # again, with the final size
    for name in SHIPPED:
        if (out / name).exists():
            (out / name).chmod(0o644)
    sha256sums(out)
    size = sum((out / n).stat().st_size for n in (*SHIPPED, "SHA256SUMS") if (out / n).exists())
    log(f"done: {out} ({size / 2**20:.2f} MiB)", t0)
    if size > MAX_TOTAL_BYTES and not a.tiny:
        log("WARNING: over 16 MiB", t0)


if __name__ == "__main__":
    main()
