"""`codellama-tui bench`: decode speed, time to first token, memory and start-up of the engine, next to
the device's copy-bandwidth roofline and (with --baseline) `transformers` on the same weights, in one run.

On a real checkpoint (`--model DIR`) or on random weights at real CodeLlama shapes (`--shape 7b`), which are
as good as real ones for speed. On a GPU it also checks the engine's bf16 logits and greedy tokens against
`transformers` on the same weights. Prints one table; `--json FILE` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import DEMO_DIR, ModelConfig, model_dir, shape_config
from engine.engine import Engine
from engine.errors import OutOfMemoryError
from engine.events import Finished, ModelInfo
from engine.loader import pick_device, pick_dtype
from engine.model import Llama
from engine.parallel import SINGLE, Parallel, Shard
from engine.requests import EngineSpec, Request, SamplingParams
from engine.runner import Row, compile_ahead
from engine.tokenizer import Tokenizer
from engine.weights import Quant


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device copy, counting bytes read and written (the roofline's memory rate)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start = _now(device)
        dst.copy_(src)
        times.append(_now(device) - start)
    return 2 * n / statistics.median(times) / 1e9


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def greedy_row(token: int, position: int, slot: int, top_k: int = 40) -> Row:
    """A decode step's row that picks greedily, seeded by its slot."""
    return Row(token=token, position=position, slot=slot, top_k=top_k, seed=slot, offset=0, temperature=0.0,
               top_p=1.0, penalty=1.0)  # fmt: skip


def random_engine(cfg: ModelConfig, spec: EngineSpec, tok: Tokenizer, par: Parallel = SINGLE) -> tuple[Engine, float]:
    """An engine on random weights (normal, std 0.02; norms 1) at a real shape, quantized as `spec` says; returns it
    and the init time."""
    device, dtype = pick_device(spec.device), pick_dtype(spec.dtype, pick_device(spec.device))
    quant = Quant.of(spec.quant, spec.quant_head)
    quant.check(cfg, Shard.of(cfg, par.world), par.world)
    start = _now(device)
    ahead = compile_ahead(
        cfg, spec.max_seq_len, spec.max_batch, device, dtype, spec.cuda_graphs, par.world, quant, spec.speculate,
        spec.kv,
    )  # fmt: skip
    with ahead as compiling:
        recorded = _now(device)
        model = Llama.empty(cfg, spec.max_seq_len, par, device, dtype, quant)
        built = _now(device)
        randomize(model, torch.Generator(device=device).manual_seed(0))
        filled = _now(device)
        model.setup_cache(spec.max_batch + 1, spec.max_seq_len, dtype, spec.kv)
        cached = _now(device)
    load_s = _now(device) - start
    print(
        f"random weights: build {built - recorded:.1f}s, fill {filled - built:.1f}s, cache {cached - filled:.1f}s",
        file=sys.stderr,
    )
    info = ModelInfo(name=f"random {cfg.dim}", flavour="base", can_infill=tok.can_infill, device=str(device),
                     dtype=str(dtype), tp=par.world, context=spec.max_seq_len, vocab_size=cfg.vocab_size,
                     quant=spec.quant)  # fmt: skip
    engine = Engine(model, tok, info, spec.max_batch, spec.max_seq_len, device, spec.cuda_graphs, spec.speculate)
    engine.compiled_ahead = compiling
    return engine, load_s


@torch.no_grad()
def randomize(model: Llama, gen: torch.Generator) -> None:
    """Random weights: normal with std 0.02 (quantized from such dense weights, one at a time), norms 1."""
    for p in model.parameters():  # the dense projections among them
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=gen)
    for w in model.weights():
        if w.format != "dense":
            dense = torch.empty(w.shape, device=gen.device, dtype=model.norm.dtype).normal_(0, 0.02, generator=gen)
            w.fill(dense)


@torch.inference_mode()
def logits_error(cfg: ModelConfig, formats: list[str], device: torch.device, dtype: torch.dtype, tokens: int = 128):
    """`||logits - reference|| / ||reference||` of a prefill of `tokens` random ids, with the projections of one
    random model quantized to each of `formats` (and, for a float32 reference, the unquantized model in bfloat16),
    against that model unquantized in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(0)
    reference = Llama.empty(cfg, tokens, SINGLE, device, dtype)
    randomize(reference, gen)
    ids = torch.randint(3, cfg.vocab_size - 1, (tokens,), generator=gen, device=device)

    def prefill(model: Llama) -> torch.Tensor:
        model.setup_cache(1, tokens, model.norm.dtype)
        logits = model.prefill(ids, 0, 0, all_logits=True).float()
        model.cache = None
        return logits

    expected = prefill(reference)
    variants = [(fmt, Quant.of(fmt), dtype) for fmt in formats]
    if dtype == torch.float32:
        variants.append(("bfloat16", Quant(), torch.bfloat16))
    errors = {}
    for name, quant, variant_dtype in variants:
        model = Llama.empty(cfg, tokens, SINGLE, device, variant_dtype, quant)
        model.tok_embeddings.copy_(reference.tok_embeddings)
        model.norm.copy_(reference.norm)
        for ours, theirs in zip(model.layers, reference.layers, strict=True):
            ours.attention_norm.copy_(theirs.attention_norm)
            ours.ffn_norm.copy_(theirs.ffn_norm)
        for ours, theirs in zip(model.weights(), reference.weights(), strict=True):
            ours.fill(theirs.dense().to(variant_dtype))
        errors[name] = float((prefill(model) - expected).norm() / expected.norm())
        del model
    return errors


def random_rank(spec: EngineSpec, progress: object, par: Parallel, shape: str, tokenizer: str) -> Engine:
    """One rank's engine for `bench --shape S --tp N` (an engine.tp.Recipe). Every rank draws the same numbers
    for its own shard, so TP N is another random model than TP 1: as good for timing, not for comparing logits."""
    return random_engine(shape_config(shape), spec, Tokenizer.from_dir(Path(tokenizer)), par)[0]


@torch.inference_mode()  # as the engine runs its steps
def decode_rate(engine: Engine, batch: int, steps: int, position: int) -> float:
    """Tokens/s of the decode step as the engine runs it: pipelined, each step launched from the previous
    step's device outputs before the host reads that step's tokens."""
    rows = [greedy_row(3 + i, position, i) for i in range(batch)]
    engine.runner(rows)
    start = _now(engine.device)
    engine.runner.launch(rows)
    for _ in range(steps - 1):
        engine.runner.launch()
        engine.runner.collect()
    engine.runner.collect()
    return batch * steps / (_now(engine.device) - start)


@torch.inference_mode()  # as the engine runs its steps
def time_to_first_token(engine: Engine, length: int, repeats: int = 5) -> float:
    """Seconds from a prompt of `length` tokens to its first sampled token on the host (prefill + sample)."""
    ids = torch.randint(3, engine.model.cfg.vocab_size - 1, (length,), device=engine.device)
    row = [greedy_row(0, length, 0)]
    times = []
    for _ in range(repeats + 1):
        start = _now(engine.device)
        engine.runner.sample(engine.model.prefill(ids, 0, 0)[None], row)
        times.append(_now(engine.device) - start)
    return statistics.median(times[1:])


def profile_step(engine: Engine, batch: int = 1, steps: int = 5, prefill: int = 0) -> list[tuple[str, float]]:
    """Per-kernel GPU time of one decode step (run eagerly under the profiler), or of one prefill of
    `prefill` tokens, largest first, in µs."""
    from torch.profiler import ProfilerActivity, profile

    rows = [greedy_row(3 + i, 128, i) for i in range(batch)]
    ids = torch.randint(3, 1000, (prefill,), device=engine.device)

    def run() -> None:
        engine.model.prefill(ids, 0, 0) if prefill else engine.runner(rows)

    graphs, engine.runner.graphs = engine.runner.graphs, {}
    try:
        run()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run()
    finally:
        engine.runner.graphs = graphs
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name[:60]
            totals[name] = totals.get(name, 0.0) + e.device_time_total / steps
    return sorted(totals.items(), key=lambda kv: -kv[1])


def engine_rate(engine: Engine, tokens: int) -> float:
    """Tokens/s at batch 1 through the whole engine: scheduler, detokenizer and events included."""
    request = Request("completion", text="def quicksort(items):\n", speculate=True,
                      sampling=SamplingParams(temperature=0, max_new_tokens=tokens, stop=()))  # fmt: skip
    engine.add(request)
    finished = None
    while engine.busy:
        for event in engine.step():
            if isinstance(event, Finished):
                finished = event
    return finished.stats.tokens_per_s if finished else 0.0


def hf_twin(engine: Engine):
    """A transformers LlamaForCausalLM holding exactly the engine's weights (unfused; quantized ones dequantized), on
    the same device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m, cfg = engine.model, engine.model.cfg
    hf_cfg = LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
    )  # fmt: skip
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf = hf.to_empty(device=engine.device).to(m.norm.dtype).eval()
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(m.tok_embeddings[: cfg.vocab_size])
        hf.lm_head.weight.copy_(m.output.dense()[: cfg.vocab_size])
        hf.model.norm.weight.copy_(m.norm)
        for ours, theirs in zip(m.layers, hf.model.layers, strict=True):
            wqkv, w13 = ours.attention.wqkv.dense(), ours.feed_forward.w13.dense()
            theirs.self_attn.q_proj.weight.copy_(wqkv[:q])
            theirs.self_attn.k_proj.weight.copy_(wqkv[q : q + kv])
            theirs.self_attn.v_proj.weight.copy_(wqkv[q + kv :])
            theirs.self_attn.o_proj.weight.copy_(ours.attention.wo.dense())
            theirs.mlp.gate_proj.weight.copy_(w13[: cfg.intermediate])
            theirs.mlp.up_proj.weight.copy_(w13[cfg.intermediate :])
            theirs.mlp.down_proj.weight.copy_(ours.feed_forward.w2.dense())
            theirs.input_layernorm.weight.copy_(ours.attention_norm)
            theirs.post_attention_layernorm.weight.copy_(ours.ffn_norm)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(engine.device)  # its tables, not meta's garbage
    return hf


def bnb_4bit(hf):
    """Turn the twin's projections into bitsandbytes' `Linear4bit` (nf4, blocksize 64, compute in the model's dtype),
    the modules `from_pretrained(..., load_in_4bit=True)` builds; quantized from its dequantized nf4 weights, which
    gives back the same bytes (each block's largest value is a code of +-1 times its absmax)."""
    import bitsandbytes as bnb

    dtype = hf.model.norm.weight.dtype
    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                four = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                         quant_type="nf4", device="meta")  # fmt: skip
                four.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                blocksize=64, compress_statistics=False,  # load_in_4bit's default
                                                ).to(linear.weight.device)  # fmt: skip
                setattr(parent, name, four)
    return hf


def hf_rate(hf, batch: int, tokens: int, device: torch.device) -> float:
    ids = torch.randint(3, 1000, (batch, 128), device=device)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    hf.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    start = _now(device)
    hf.generate(ids, **kwargs)
    return batch * tokens / (_now(device) - start)


def conformance(engine: Engine, hf, n: int = 32) -> dict[str, float]:
    """The engine's bf16 logits and greedy tokens against transformers on the same weights, in bf16 and in
    float32 (the exact reference): random weights make every bf16 implementation drift, so the bf16-vs-fp32
    error of transformers itself is printed as the yardstick. Frees the KV cache: run it last."""
    ids = torch.randint(3, 1000, (256,), device=engine.device)
    ours = engine.model.prefill(ids, 0, 0, all_logits=True)
    got = [int(engine.runner.sample(ours[-1:], [greedy_row(0, 0, 0, top_k=0)])[0])]
    for i in range(n - 1):
        got += engine.runner([greedy_row(got[-1], len(ids) + i, 0, top_k=0)])
    engine.close()

    def greedy(model) -> list[int]:
        out = model.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids) :].tolist()

    def agree(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        hf_bf16 = hf(ids[None]).logits[0].float()
        hf_tokens = greedy(hf)
        hf.float()
        hf_fp32 = hf(ids[None]).logits[0].float()
        fp32_tokens = greedy(hf)
    return {
        "logits_rel_err": rel(ours, hf_bf16),
        "logits_rel_err_vs_fp32": rel(ours, hf_fp32),
        "hf_bf16_rel_err_vs_fp32": rel(hf_bf16, hf_fp32),
        "greedy_agree": agree(got, hf_tokens),
        "greedy_agree_vs_fp32": agree(got, fp32_tokens),
        "hf_bf16_greedy_agree_vs_fp32": agree(hf_tokens, fp32_tokens),
        "greedy_of": n,
    }


@torch.inference_mode()  # as the engine runs its steps
def graph_step_ms(engine: Engine, batch: int, position: int, steps: int) -> float:
    """Milliseconds of one decode step on the GPU alone: graph replays back to back, no host work between, from
    `position` on as `decode_rate` runs them (each replay advances the positions, so the keys read grow alike)."""
    engine.runner([greedy_row(3 + i, position, i) for i in range(batch)])
    graph = engine.runner.graphs[(engine.runner.bucket(batch), True)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def main(args: argparse.Namespace) -> int:
    """One run per `--quant` format, then the unquantized dtype (unless `--quant-only`), each once per `--kv` cache,
    each with its own table; with several, a table of their ratios. `--json` keeps the numbers, per run when there
    are several."""
    device = pick_device(args.device)
    if args.logits_error:
        cfg = shape_config(args.shape or "7b")
        cfg = replace(cfg, n_layers=min(args.layers or cfg.n_layers, cfg.n_layers))
        dtype = pick_dtype(args.dtype, device)
        errors = logits_error(cfg, args.quant or ["int8", "int4"], device, dtype)
        what = f"random CodeLlama-{args.shape or '7b'}-shaped weights ({cfg.n_layers} layers), 128 tokens, on {device}"
        print(f"logits' relative error against the unquantized model in {str(dtype).removeprefix('torch.')}, {what}:")
        for name, error in errors.items():
            print(f"  {name:<10} {error:.3e}")
        return 0
    if args.baseline and (device.type != "cuda" or args.tp > 1):
        what = "transformers + bitsandbytes load_in_4bit" if "nf4" in (args.quant or []) else "transformers"
        where = "on CUDA" if device.type != "cuda" else "with --tp 1 (it needs the whole model in one process)"
        print(f"--baseline: {what} is timed only {where}; not available in this run", file=sys.stderr)
    copy_gbps = copy_bandwidth(device)
    formats: list[str | None] = [*(args.quant or []), *([None] if not (args.quant and args.quant_only) else [])]
    kvs = args.kv or ["bf16"]
    runs: dict[str, dict] = {}
    for quant in formats:
        for kv in kvs:
            name = quant or str(pick_dtype(args.dtype, device)).removeprefix("torch.")
            name += f", {kv} KV" if kvs != ["bf16"] else ""
            try:
                runs[name] = measure(args, quant, copy_gbps, kv)
            except (OutOfMemoryError, torch.OutOfMemoryError) as err:
                print(f"{name}: does not fit ({str(err).splitlines()[0][:200]})", file=sys.stderr)
                runs[name] = {"does_not_fit": True}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if len(runs) > 1:
        prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
        print("\n" + ratios(runs, [int(b) for b in args.batch.split(",")], prompt_lens))
    if args.json:
        Path(args.json).write_text(json.dumps(runs if len(runs) > 1 else next(iter(runs.values())), indent=2))
    return 0


def measure(args: argparse.Namespace, quant: str | None, copy_gbps: float, kv: str = "bf16") -> dict[str, object]:
    """Build the engine (weights quantized at load to `quant`, None: as they are; the KV cache as `kv` says), time
    it, print its table."""
    batches = [int(b) for b in args.batch.split(",")]
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    position = args.decode_position
    need = max(max(prompt_lens), position + args.steps + 16) + 64
    spec = EngineSpec(
        model=args.model, device=str(device), dtype=str(dtype).removeprefix("torch."), max_batch=max(batches),
        max_seq_len=args.max_seq_len or need, cuda_graphs=not args.no_graphs, tp=args.tp, quant=quant,
        quant_head=args.quant_head and quant is not None, speculate=args.speculate, kv=kv,
    )  # fmt: skip
    out: dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    out["copy_GBps"] = copy_gbps
    out["quant"] = Quant.of(quant, spec.quant_head).name
    out["kv"], out["decode_position"] = kv, position
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    start = time.perf_counter()
    if args.shape and not args.model:
        tok = Tokenizer.from_dir(args.tokenizer or DEMO_DIR)
        if args.tp > 1:
            from engine import tp

            kwargs = {"shape": args.shape, "tokenizer": str(args.tokenizer or DEMO_DIR)}
            engine = tp.launch(spec, None, shape_config(args.shape), tp.Recipe("engine.bench:random_rank", kwargs))
            out["load_s"] = time.perf_counter() - start - engine.runner.capture_s
        else:
            engine, out["load_s"] = random_engine(shape_config(args.shape), spec, tok)
        out["model"] = f"random weights, CodeLlama-{args.shape} shape"
    else:
        engine = Engine.load(spec)
        out["load_s"] = time.perf_counter() - start - engine.runner.capture_s
        out["model"] = str(model_dir(args.model))
        out["quant"] = engine.info.quant or out["quant"]  # a GPTQ, AWQ or converted checkpoint's own
    if engine.compiled_ahead is not None:
        print(engine.compiled_ahead, file=sys.stderr)
    out["capture_s"] = engine.runner.capture_s
    out["tune_s"] = engine.runner.tune_s
    out["startup_s"] = time.perf_counter() - start
    weights = engine.model.nbytes()
    out["weights_GB"] = weights / 1e9
    out["roofline_tps"] = out["copy_GBps"] * 1e9 / weights
    for b in batches:
        out[f"decode_b{b}_tps"] = decode_rate(engine, b, args.steps, position)
        if engine.runner.graphs and args.tp == 1:  # replays rank 0's graph alone: no partner for its collectives
            out[f"graph_b{b}_ms"] = graph_step_ms(engine, b, position, args.steps)
    out["engine_b1_tps"] = engine_rate(engine, args.steps)
    for n in [n for n in prompt_lens if n >= engine.context]:  # the demo model's context is 1024
        print(f"time to first token at {n} tokens left out: the context holds {engine.context}", file=sys.stderr)
    prompt_lens = [n for n in prompt_lens if n < engine.context]
    out["linear_choice_us"] = engine.runner.linear_choice
    out["fusion_us"] = engine.runner.fusion
    out["fusion_rows_us"] = engine.runner.fusion_rows
    if args.profile and device.type == "cuda":
        out["profile_b1_us"] = profile_step(engine)
        out[f"profile_b{max(batches)}_us"] = profile_step(engine, batch=max(batches))
        out["profile_prefill_us"] = profile_step(engine, prefill=max(prompt_lens, default=128), steps=2)
    for n in prompt_lens:
        out[f"ttft_{n}_ms"] = time_to_first_token(engine, n) * 1e3
    if device.type == "cuda":
        out["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.baseline and args.tp == 1:  # the twin needs the whole model in this process
            hf = hf_twin(engine)
            timed = bnb_4bit(hf_twin(engine)) if quant == "nf4" else hf  # nf4: as transformers runs load_in_4bit
            for b in (1, 32) if 32 in batches else (1,):
                out[f"hf_b{b}_tps"] = hf_rate(timed, b, min(args.steps, 32), device)
            out["baseline"] = "transformers + bitsandbytes nf4" if quant == "nf4" else "transformers"
            del timed
            out.update(conformance(engine, hf))
            del hf
    print(table(out, batches, prompt_lens))
    profiles = [("profile_b1_us", "one eager decode step at batch 1"), ("profile_prefill_us", "one prefill")]
    profiles.insert(1, (f"profile_b{max(batches)}_us", f"one eager decode step at batch {max(batches)}"))
    for key, what in profiles:
        if out.get(key):
            print(f"\n{what}, GPU time per kernel (total {sum(t for _, t in out[key]):.0f} us):")
            for name, t in out[key][:16]:
                print(f"  {t:9.1f} us  {name}")
    engine.close()  # with --tp, ends the other ranks
    return out


def table(r: dict, batches: list[int], prompt_lens: list[int]) -> str:
    weights = f", {r['quant']} weights" if r.get("quant", "dense") != "dense" else ""
    weights += f", {r['kv']} KV cache" if r.get("kv", "bf16") != "bf16" else ""
    lines = [f"codellama-tui bench: {r['model']} on {r['device']}{weights}", ""]
    lines.append(f"{'figure':<44} {'value':>12}")
    lines.append(f"{'copy bandwidth (read+write)':<44} {r['copy_GBps']:>9.0f} GB/s")
    lines.append(f"{'weights':<44} {r['weights_GB']:>10.2f} GB")
    lines.append(f"{'roofline, batch 1 (copy rate / weight bytes)':<44} {r['roofline_tps']:>8.1f} tok/s")
    for b in batches:
        v = r[f"decode_b{b}_tps"]
        extra = f"  ({v / r['roofline_tps']:.0%} of roofline)" if b == 1 else ""
        if f"graph_b{b}_ms" in r:
            extra += f"  [GPU alone {r[f'graph_b{b}_ms']:.2f} ms/step = {b * 1e3 / r[f'graph_b{b}_ms']:.0f} tok/s]"
        at = f" at {r['decode_position']}" if r.get("decode_position", 128) != 128 else ""
        lines.append(f"{f'decode, batch {b}{at}':<44} {v:>8.1f} tok/s{extra}")
    lines.append(f"{'engine end to end, batch 1 (detok, events)':<44} {r['engine_b1_tps']:>8.1f} tok/s")
    for n in prompt_lens:
        lines.append(f"{f'time to first token, {n}-token prompt':<44} {r[f'ttft_{n}_ms']:>10.1f} ms")
    lines.append(f"{'start-up (load + graph capture)':<44} {r['startup_s']:>11.2f} s")
    lines.append(f"{'  of which graph capture':<44} {r['capture_s']:>11.2f} s")
    lines.append(f"{'    of which Triton/cuBLAS choice per shape':<44} {r['tune_s']:>11.2f} s")
    for form, t in r.get("fusion_us", {}).items():
        kept = "fused" if t["fused"] <= t["separate"] else "separate"
        label = f"one-row step, {form} fused / separate"
        lines.append(f"{label:<44} {t['fused']:>8.1f} / {t['separate']:.1f} µs ({kept})")
    if r.get("fusion_rows_us"):
        timed = r["fusion_rows_us"].values()
        kept = sum(t["fused"] < t["separate"] for t in timed)
        lines.append(f"{'small weights fused at several rows':<44} {kept:>8} of {len(timed)} timed")
    if "peak_GiB" in r:
        lines.append(f"{'peak GPU memory':<44} {r['peak_GiB']:>9.1f} GiB")
    baseline = r.get("baseline", "transformers")
    for key, label in (("hf_b1_tps", f"{baseline} generate(), batch 1"), ("hf_b32_tps", f"{baseline}, batch 32")):
        if key in r:
            lines.append(f"{label:<44} {r[key]:>8.1f} tok/s")
    if "hf_b1_tps" in r:
        lines.append(f"{f'speed-up over {baseline}, batch 1':<44} {r['decode_b1_tps'] / r['hf_b1_tps']:>10.1f} x")
    if "logits_rel_err" in r:
        lines.append(f"{'logits vs transformers bf16 (relative error)':<44} {r['logits_rel_err']:>12.2e}")
        lines.append(f"{'logits vs transformers fp32':<44} {r['logits_rel_err_vs_fp32']:>12.2e}")
        lines.append(f"{'  (transformers bf16 vs its own fp32)':<44} {r['hf_bf16_rel_err_vs_fp32']:>12.2e}")
        lines.append(
            f"{'greedy tokens agreeing with transformers bf16':<44} {r['greedy_agree']:>7d} / {r['greedy_of']}"
        )
        lines.append(
            f"{'greedy tokens agreeing with transformers fp32':<44} {r['greedy_agree_vs_fp32']:>7d} / {r['greedy_of']}"
        )
        lines.append(
            f"{'  (transformers bf16 vs its own fp32)':<44} {r['hf_bf16_greedy_agree_vs_fp32']:>7d} / {r['greedy_of']}"
        )
    return "\n".join(lines)


def ratios(runs: dict[str, dict], batches: list[int], prompt_lens: list[int]) -> str:
    """Each run's decode rates, times to first token, weight bytes, memory and start-up, and its ratio to the last run
    (the unquantized weights, the bf16 KV cache)."""
    names = list(runs)
    base = runs[names[-1]]
    lines = [f"{'same run':<32}" + "".join(f"{name:>22}" for name in names)]
    rows = [(f"decode, batch {b} (tok/s)", f"decode_b{b}_tps", True) for b in batches]
    rows += [(f"first token, {n} tokens (ms)", f"ttft_{n}_ms", True) for n in prompt_lens]
    rows += [("weights (GB)", "weights_GB", False), ("peak GPU memory (GiB)", "peak_GiB", False)]
    rows += [("start-up (s)", "startup_s", False)]
    for label, key, ratio in rows:
        cells = []
        for name in names:
            value = runs[name].get(key)
            if value is None:
                cells.append(f"{'does not fit' if runs[name].get('does_not_fit') else '-':>22}")
                continue
            times = f" ({value / base[key]:.2f}x)" if ratio and base.get(key) and runs[name] is not base else ""
            digits = 2 if key in ("weights_GB", "peak_GiB") else 1
            cells.append(f"{f'{value:.{digits}f}{times}':>22}")
        lines.append(f"{label:<32}" + "".join(cells))
    return "\n".join(lines)
