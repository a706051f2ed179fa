"""Decode-kernel benchmarks on one CUDA GPU, at CodeLlama 7B/13B/34B (and 70B-shaped) decode shapes.

    python -m engine.kernels.bench_kernels [--models 7b,13b,34b] [--sweep]
    python -m engine.kernels.bench_kernels --quant-sweep [--models 7b,34b,70b]
    python -m engine.kernels.bench_kernels --quant-fused [--models 7b]

Each kernel is first checked against its reference at the benchmarked shape, then timed with
`triton.testing.do_bench` (median, L2 flushed before each run) next to its PyTorch/cuBLAS
counterpart. Memory-bound kernels are reported in GB/s and as a fraction of the measured
device-copy bandwidth (read + write of a 1 GiB copy). "all matmuls" replays every decode matmul
of the model (fused QKV, O, fused gate/up, down per layer, plus the LM head) as one CUDA graph,
as ARCHITECTURE.md's cuBLAS measurement does. "fused" times the GEMV with its RMSNorm prologue (and
SwiGLU epilogue) against the separate kernels, both replayed in CUDA graphs as decode runs them.
`--sweep` times alternative GEMV configs per shape.
`--quant-sweep` (alone: it skips the other sections) times the quantized GEMV's candidate configs (BLOCK_N, BLOCK_K,
split-K, warps, stages) per format, shape and row count (1, 8, 32; one row in the fused form the decode step runs the
shape in, `FUSED_FORMS`) next to its rule's choice, bf16 cuBLAS,
PyTorch's tinygemm int4 and bitsandbytes nf4 and LLM.int8 where they run, then every decode matmul of each model in
one CUDA graph per format with the best configs found, and prints the best configs as one Python literal
(`triton_gemv.TUNED`, which `choose_config` reads first). Every candidate is checked, then timed in a CUDA graph over
enough copies of its weight that none comes from L2 (as decode streams them). The candidates compile in parallel
worker processes first (`compile_ahead`), so one run fits one device call.
`--quant-fused` (alone too) times one row of the quantized GEMV's fused forms as the decode step runs them (the norm
prologue for QKV and the LM head, with the SwiGLU epilogue for gate/up, the residual epilogue for O and down) against
the separate kernels they stand for, with TUNED's configs and int4's nibble pairs.
A failure in one section is printed and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from engine.kernels import graph_time, reference, sampling


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 128

    def matmuls(self) -> dict[str, tuple[int, int]]:
        """(N, K) of each decode matmul with fused QKV and gate/up weights."""
        return {
            "qkv": ((self.heads + 2 * self.kv_heads) * self.head_dim, self.hidden),
            "o": (self.hidden, self.heads * self.head_dim),
            "gate_up": (2 * self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
            "lm_head": (self.vocab, self.hidden),
        }


MODELS = {
    "7b": Shape(4096, 11008, 32, 32, 32, 32016),
    "13b": Shape(5120, 13824, 40, 40, 40, 32016),
    "34b": Shape(8192, 22016, 48, 64, 8, 32000),
    "70b": Shape(8192, 28672, 80, 64, 8, 32016),
}
DTYPE = torch.bfloat16
GRAPH_WEIGHT_BUDGET = 40e9  # bytes of weights the "all matmuls" graph may allocate


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds per call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def section(title: str, body: Callable[[], None]) -> None:
    print(f"\n== {title}", flush=True)
    try:
        body()
    except Exception:
        print("FAILED:\n" + traceback.format_exc(), flush=True)


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1.6e-2, atol: float = 1e-2) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def row(label: str, nbytes: float, ms: float, base_ms: float, copy_gbs: float) -> None:
    gbs, base_gbs = nbytes / ms / 1e6, nbytes / base_ms / 1e6
    print(
        f"{label:<34} {ms * 1e3:9.1f} us {gbs:7.0f} GB/s {gbs / copy_gbs:6.1%} | "
        f"base {base_ms * 1e3:9.1f} us {base_gbs:7.0f} GB/s {base_gbs / copy_gbs:6.1%} | x{base_ms / ms:5.2f}",
        flush=True,
    )


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    print(f"device copy: {gbs:.0f} GB/s (read + write of 1 GiB)")
    return gbs


def bench_linear(models: list[str], copy_gbs: float) -> None:
    from engine.kernels import triton_gemv

    print(f"{'shape':<34} {'triton':>12} | base = F.linear (cuBLAS)")
    for model in models:
        for name, (n, k) in MODELS[model].matmuls().items():
            w = torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
            for m in (1, 8, 32):
                x = torch.randn(m, k, dtype=DTYPE, device="cuda")
                check(f"linear {n}x{k} m={m}", triton_gemv.linear(x, w), F.linear(x, w))
                nbytes = 2 * (n * k + m * k + m * n)
                label = f"{model} {name} {n}x{k} m={m}"
                row(
                    label,
                    nbytes,
                    bench(partial(triton_gemv.linear, x, w)),
                    bench(partial(F.linear, x, w)),
                    copy_gbs,
                )


def bench_fused(models: list[str], copy_gbs: float) -> None:
    from engine.kernels import triton_act, triton_gemv, triton_norm

    print(f"{'shape':<34} {'fused':>12} | base = add_rms_norm, GEMV (, silu_mul)")
    for model in models:
        mats = MODELS[model].matmuls()
        for name in ("qkv", "gate_up", "lm_head"):
            n, k = mats[name]
            silu = name == "gate_up"
            w = torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
            norm_weight = torch.rand(k, dtype=DTYPE, device="cuda") + 0.5
            for m in (1, 8):
                x, res = torch.randn(m, k, dtype=DTYPE, device="cuda"), torch.randn(m, k, dtype=DTYPE, device="cuda")
                fused = partial(triton_gemv.norm_linear, x, res, norm_weight, 1e-5, w, silu_mul=silu)

                def unfused(x=x, res=res, w=w, norm_weight=norm_weight, silu=silu) -> torch.Tensor:
                    normed, _ = triton_norm.add_rms_norm(x, res, norm_weight, 1e-5)
                    out = triton_gemv.linear(normed, w)
                    return triton_act.silu_mul(out) if silu else out

                check(f"norm_linear {n}x{k} m={m}", fused()[0], unfused())
                nbytes = 2 * (n * k + 3 * m * k + m * (n // 2 if silu else n))
                times = graph_time(fused, 10), graph_time(unfused, 10)
                row(f"{model} {name} {n}x{k} m={m}", nbytes, *times, copy_gbs)


def bench_all_matmuls(models: list[str], copy_gbs: float) -> None:
    from engine.kernels import triton_gemv

    for model in models:
        shape = MODELS[model]
        mats = shape.matmuls()
        layer_bytes = 2 * sum(n * k for key, (n, k) in mats.items() if key != "lm_head")
        layers = min(shape.layers, int(GRAPH_WEIGHT_BUDGET // layer_bytes))
        weights = [
            torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
            for _ in range(layers)
            for key, (n, k) in mats.items()
            if key != "lm_head"
        ]
        weights.append(torch.empty(*mats["lm_head"], dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05))
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for m in (1, 8, 32):
            inputs = {k: torch.randn(m, k, dtype=DTYPE, device="cuda") for k in {k for _, k in mats.values()}}
            times = {}
            for label, fn in (("triton", triton_gemv.linear), ("cublas", F.linear)):
                for w in {w.shape: w for w in weights}.values():
                    fn(inputs[w.shape[1]], w)  # compile every shape before capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for w in weights:
                        fn(inputs[w.shape[1]], w)
                times[label] = bench(graph.replay)
                del graph
            note = "" if layers == shape.layers else f" ({layers} of {shape.layers} layers)"
            row(f"{model} all matmuls m={m}{note}", nbytes, times["triton"], times["cublas"], copy_gbs)
            if layers == shape.layers:
                print(f"{'':<34} = {m * 1e3 / times['triton']:.0f} tokens/s (cuBLAS {m * 1e3 / times['cublas']:.0f})")
        del weights
        torch.cuda.empty_cache()


def bench_attention(models: list[str], copy_gbs: float) -> None:
    from engine.kernels import triton_attention

    print("base = SDPA (flash) on the same keys gathered into [B, H, L, D] beforehand; int8 KV rows: base = our bf16")
    for model in models:
        shape = MODELS[model]
        d, hkv = shape.head_dim, shape.kv_heads
        for batch, length in ((1, 1024), (1, 16384), (8, 4096), (32, 1024)):
            k_cache = torch.randn(batch, hkv, length, d, dtype=DTYPE, device="cuda")
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(batch, shape.heads, d, dtype=DTYPE, device="cuda")
            k, v = (torch.randn(batch, hkv, d, dtype=DTYPE, device="cuda") for _ in range(2))
            cos, sin = torch.rand(length, d, device="cuda"), torch.rand(length, d, device="cuda")
            positions = torch.full((batch,), length - 1, device="cuda")
            args = (q, k, v, cos, sin, positions, torch.arange(batch, device="cuda"), k_cache, v_cache, d**-0.5)
            out = triton_attention.rotary_attention(*args)
            check(f"attention {model}", out, reference.rotary_attention(*args))
            nbytes = 2 * k_cache.numel() * k_cache.element_size()
            ms = bench(partial(triton_attention.rotary_attention, *args))
            sdpa = partial(
                F.scaled_dot_product_attention, q[:, :, None], k_cache, v_cache, scale=d**-0.5, enable_gqa=True
            )
            row(f"{model} B={batch} L={length}", nbytes, ms, bench(sdpa), copy_gbs)
            (k8, k_scale), (v8, v_scale) = reference.quantize_kv(k_cache), reference.quantize_kv(v_cache)
            args8 = (*args[:7], k8, v8, d**-0.5)
            out = triton_attention.rotary_attention(*args8, kv_scales=(k_scale, v_scale))
            check(f"attention {model} int8 KV", out, reference.rotary_attention(*args8, (k_scale, v_scale)))
            nbytes = 2 * (k8.numel() + 4 * k_scale.numel())
            ms8 = bench(partial(triton_attention.rotary_attention, *args8, kv_scales=(k_scale, v_scale)))
            row(f"{model} B={batch} L={length} int8 KV", nbytes, ms8, ms, copy_gbs)


def bench_small_ops(models: list[str], copy_gbs: float) -> None:
    from engine.kernels import triton_norm

    print("base = the PyTorch reference, eager")
    for model in models:
        shape = MODELS[model]
        for batch in (1, 32):
            x = torch.randn(batch, shape.hidden, dtype=DTYPE, device="cuda")
            res, weight = torch.randn_like(x), torch.randn(shape.hidden, dtype=DTYPE, device="cuda")
            check(
                "add_rms_norm",
                triton_norm.add_rms_norm(x, res, weight, 1e-5)[0],
                reference.add_rms_norm(x, res, weight, 1e-5)[0],
            )
            row(
                f"{model} add_rms_norm B={batch}",
                4 * x.numel() * x.element_size(),
                bench(partial(triton_norm.add_rms_norm, x, res, weight, 1e-5)),
                bench(partial(reference.add_rms_norm, x, res, weight, 1e-5)),
                copy_gbs,
            )


def bench_sampling() -> None:
    from engine import kernels

    for batch in (1, 8, 32):
        logits = torch.randn(batch, 32016, device="cuda")
        params = {
            "temperature": torch.full((batch,), 0.2, device="cuda"),
            "top_k": torch.full((batch,), 40, dtype=torch.int32, device="cuda"),
            "top_p": torch.full((batch,), 0.9, device="cuda"),
            "seeds": torch.arange(batch, device="cuda"),
            "offsets": torch.zeros(batch, dtype=torch.int64, device="cuda"),
        }
        check("sample", kernels.sample(logits, **params), sampling.sample(logits, **params), rtol=0, atol=0)
        replay = {}
        for label, fn in (("triton", kernels.sample), ("plain ops", sampling.sample)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(logits, **params)
            replay[label] = bench(graph.replay) * 1e3
        print(f"sample B={batch}: graph replay {replay['triton']:.1f} us (plain ops {replay['plain ops']:.1f} us)")


def sweep_gemv(models: list[str], copy_gbs: float) -> None:
    """Time alternative configs per (N, K) and print the best next to the fixed rule's choice."""
    from engine.kernels import triton_gemv

    shapes = sorted({nk for model in models for nk in MODELS[model].matmuls().values()})
    for m in (1, 32):
        if m == 1:
            grid = itertools.product((8, 16, 32, 64), (256, 512, 1024), (1, 2, 4), (4, 8), (1, 3))
        else:
            grid = itertools.product((64, 128), (64, 128), (1, 2, 4), (4,), (3, 4))
        configs = [triton_gemv.GemvConfig(bn, bk, sk, nw, ns) for bn, bk, sk, nw, ns in grid]
        for n, k in shapes:
            w = torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            nbytes = 2 * (n * k + m * k + m * n)
            default = triton_gemv.choose_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            timed = []
            for cfg in [default, *configs]:
                try:
                    timed.append((bench(partial(triton_gemv.linear, x, w, cfg)), cfg))
                except Exception as exc:  # e.g. out of shared memory for a large tile
                    print(f"  {cfg}: {type(exc).__name__}")
            best_ms, best = min(timed, key=lambda t: t[0])
            frac = nbytes / best_ms / 1e6 / copy_gbs
            default_frac = nbytes / timed[0][0] / 1e6 / copy_gbs
            print(f"m={m} {n}x{k}: best {best} {frac:.1%} of copy; rule {default} {default_frac:.1%}", flush=True)


QUANT_ROWS = (1, 8, 32)
L2_BYTES = 60e6  # more than the H200's L2: the sweep's graphs stream this many bytes of distinct weights or more


def quant_candidates(fmt: str, m: int) -> list:
    """The configs the quantized sweep times for `fmt` at m rows (int4 steps are whole groups of 128 inputs; some tiles
    are also timed with UNPACKS' other variants: int4 planes or one row's int8 bytes unpacked by shifts, int4 in nibble
    pairs on the tensor cores)."""
    from engine.kernels.triton_gemv import GemvConfig

    if m == 1:  # int4: the more rows per thread, the less each one spends on x (and its norm) per weight
        tiles = (
            [(32, 256, 2), (64, 128, 2), (64, 256, 2), (64, 256, 4), (128, 128, 2), (128, 128, 4), (128, 256, 4),
             (128, 256, 8), (256, 128, 4), (256, 128, 8)]
            if fmt == "int4"
            else [(8, 512, 4), (16, 512, 4), (32, 512, 4), (16, 1024, 4), (32, 256, 2), (64, 256, 4), (64, 512, 8)]
        )  # fmt: skip
        plain = [GemvConfig(bn, bk, sk, nw, 3) for bn, bk, nw in tiles for sk in (1, 2, 4)]
        if fmt == "int4":  # group by group, the next one in flight
            fetching = [(64, 128, 2), (128, 128, 2), (128, 128, 4), (256, 128, 8)]
            plain += [GemvConfig(bn, bk, sk, nw, 3, prefetch=True) for bn, bk, nw in fetching for sk in (1, 2, 4)]
        dots = [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 256, 8)]  # the row padded to 16: tensor cores
        plain += [GemvConfig(bn, bk, sk, nw, 3, True) for bn, bk, nw in dots for sk in (1, 2, 4)]
    else:
        tiles = [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8), (32, 256, 4)]
        plain = [GemvConfig(bn, bk, sk, nw, ns) for bn, bk, nw in tiles for sk in (1, 2, 4) for ns in (3, 4)]
    if fmt == "int4" or m == 1:  # int8 unpacks by mask for one row only
        plain += [dataclasses.replace(c, unpack="shift") for c in plain
                  if c.split_k == 2 and c.num_stages == 3 and not c.prefetch and not c.tensor_cores]  # fmt: skip
    if fmt == "int4":  # nibble pairs on the tensor cores, any row count (one row padded to 16)
        pairs = [(128, 128, 4, 2), (128, 256, 4, 2), (128, 256, 4, 3), (256, 128, 4, 2), (256, 128, 8, 2),
                 (256, 256, 8, 2)]
        plain += [GemvConfig(bn, bk, sk, nw, ns, True, "pairs") for bn, bk, nw, ns in pairs for sk in (1, 2, 4)]
    return plain


def _quantized(fmt: str, n: int, k: int):
    from engine.weights import Int4, Int8

    dense = torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
    return {"int4": Int4, "int8": Int8}[fmt].from_dense(dense)


def _precompile(launches: list[Callable[[], object]]) -> None:
    """Compile every kernel variant the launches need in worker processes (as start-up does), not one by one."""
    from engine.kernels.compile_ahead import Compiling, can_record, recording

    if not can_record():
        return
    compiling = Compiling()
    with recording() as specs:
        for launch in launches:
            with contextlib.suppress(Exception):  # an impossible config: timed (and reported) as failing later
                launch()
    compiling.submit(specs)
    compiling.wait(timeout=900)
    print(compiling, flush=True)


def _baselines(n: int, k: int, m: int, copies: int) -> dict[str, float]:
    """Milliseconds of the other libraries' kernels for one [n, k] weight at m rows, timed as `_graph_ms` times ours
    (skipped where they fail)."""
    x = torch.randn(m, k, dtype=DTYPE, device="cuda")
    dense = [torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05) for _ in range(max(1, copies // 4))]
    times = {"cublas": _graph_ms([partial(F.linear, x, w) for w in dense])}
    try:
        words = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        packed = [torch.ops.aten._convert_weight_to_int4pack(w, 8) for w in words]
        scales_zeros = torch.randn(k // 128, n, 2, dtype=DTYPE, device="cuda")
        mm = torch.ops.aten._weight_int4pack_mm
        times["tinygemm"] = _graph_ms([partial(mm, x, p, 128, scales_zeros) for p in packed])
    except Exception as exc:
        print(f"  tinygemm {n}x{k}: {type(exc).__name__}: {str(exc)[:100]}")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        nf4 = [bnbf.quantize_4bit(dense[i % len(dense)], blocksize=64, quant_type="nf4") for i in range(copies)]
        times["bnb_nf4"] = _graph_ms([lambda q=q, st=st: bnb.matmul_4bit(x, q.t(), quant_state=st) for q, st in nf4])
    except Exception as exc:
        print(f"  bitsandbytes {n}x{k}: {type(exc).__name__}: {str(exc)[:100]}")
    return times


def _graph_ms(calls: list[Callable[[], object]]) -> float:
    """Milliseconds per call of `calls` (each on its own weight, together more bytes than L2 holds), replayed in a
    CUDA graph as decode runs them: no launch overhead of Python, no weight served from L2."""
    return graph_time(lambda: [call() for call in calls], 2) / len(calls)


def sweep_quant(models: list[str], copy_gbs: float) -> dict:
    """Time every candidate config of the quantized GEMV per format, shape and row count, each in a CUDA graph over
    enough copies of the weight to stream from memory; returns the best ones. One line per format, shape and rows."""
    from engine.kernels import triton_gemv

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    forms = {nk: FUSED_FORMS[name] for model in models for name, nk in MODELS[model].matmuls().items()}
    best: dict = {}
    for fmt in ("int4", "int8"):
        for (n, k), form in sorted(forms.items()):
            w = _quantized(fmt, n, k)
            copies = max(2, min(32, int(L2_BYTES * 2 // w.nbytes()) + 1))
            ws = [w, *(_quantized(fmt, n, k) for _ in range(copies - 1))]
            xs = {m: torch.randn(m, k, dtype=DTYPE, device="cuda") for m in QUANT_ROWS}
            plan = [(m, c) for m in QUANT_ROWS for c in [triton_gemv.choose_config(m, n, k, sm, fmt),
                                                          *quant_candidates(fmt, m)]]  # fmt: skip
            # One row is timed in the fused form the decode step runs the shape in, several rows plain (as it runs
            # them); each launch is checked plain, against the float32 product with the weight's exact values (the
            # kernel's error is then its own: float32 sums, one rounding to bf16), and fused against the separate
            # kernels with the same config (whose plain one-row launch the precompile thereby covers).
            launches = {(m, c): _fused_and_separate(form, xs[m], *_fused_inputs(xs[m], n), c) if m == 1
                        else (partial(triton_gemv.linear, xs[m], config=c), None) for m, c in plan}  # fmt: skip
            _precompile([partial(f, w) for pair in launches.values() for f in pair if f is not None])
            for m in QUANT_ROWS:
                expected = F.linear(xs[m].float(), w.dense(torch.float32))
                timed, failed = [], []
                for c in [cfg for mm, cfg in plan if mm == m]:
                    run, separate = launches[(m, c)]
                    label = f"{fmt} {n}x{k} m={m} {_cfg(c)}"
                    try:
                        check(label, triton_gemv.linear(xs[m], w, c), expected)
                        if separate is not None:
                            check(f"{label} {form}", run(w), separate(w))
                        timed.append((_graph_ms([partial(run, v) for v in ws]), c))
                    except Exception as exc:  # out of registers or shared memory for a large tile, or wrong
                        failed.append(f"{_cfg(c)} {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                more = f" (+{len(failed) - 3} more)" if failed[3:] else ""
                for line in failed[:3]:
                    print(f"  {fmt} {n}x{k} m={m} failed: {line}{more}")
                if not timed:
                    continue
                rule_ms, rule = timed[0]
                ranked = sorted(timed, key=lambda t: t[0])
                best_ms, top = ranked[0]
                base = _baselines(n, k, m, copies) if fmt == "int4" else {}
                nbytes = w.nbytes() + 2 * (m * k + m * n)
                others = "  ".join(f"{name} {t * 1e3:6.1f}" for name, t in base.items())
                runners = " ".join(f"{_cfg(c).replace(' ', '')} {t * 1e3:.1f}" for t, c in ranked[1:3])
                how = f" {form}" if m == 1 else ""
                print(
                    f"{fmt} {n:>5}x{k:<5} m={m:<2}{how} rule {_cfg(rule)} {rule_ms * 1e3:6.1f} us "
                    f"{nbytes / rule_ms / 1e6 / copy_gbs:5.1%} | best {_cfg(top)} {best_ms * 1e3:6.1f} us "
                    f"{nbytes / best_ms / 1e6 / copy_gbs:5.1%} (then {runners}) | {others}",
                    flush=True,
                )
                best[(fmt, m, n, k)] = top
            del w, ws, xs
            torch.cuda.empty_cache()
    return best


def _cfg(c) -> str:
    unpack = "" if c.unpack == "mask" else f"/{c.unpack}"
    tail = ("/tc" if c.tensor_cores else "") + unpack + ("/pf" if c.prefetch else "")
    return f"{c.block_n:>3}/{c.block_k:<4}/s{c.split_k}/w{c.num_warps}/p{c.num_stages}{tail}"


def quant_all_matmuls(models: list[str], best: dict, copy_gbs: float) -> None:
    """Every decode matmul of each model (QKV, O, gate/up, down per layer, the LM head in bf16, as `--quant` runs
    it) in one CUDA graph, per format with the sweep's best configs, next to bf16 cuBLAS on the same shapes."""

    for model in models:
        shape = MODELS[model]
        mats = {key: nk for key, nk in shape.matmuls().items() if key != "lm_head"}
        head = torch.empty(*shape.matmuls()["lm_head"], dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
        inputs = {m: {k: torch.randn(m, k, dtype=DTYPE, device="cuda") for _, k in shape.matmuls().values()}
                  for m in QUANT_ROWS}  # fmt: skip
        for fmt in ("int4", "int8", "bf16"):
            per_layer = sum(n * k for n, k in mats.values()) * {"int4": 0.53, "int8": 1.0, "bf16": 2.0}[fmt]
            layers = min(shape.layers, int(GRAPH_WEIGHT_BUDGET // per_layer))
            if fmt == "bf16":
                weights = [torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-0.05, 0.05)
                           for _ in range(layers) for n, k in mats.values()]  # fmt: skip
            else:
                weights = [_quantized(fmt, n, k) for _ in range(layers) for n, k in mats.values()]
            nbytes = sum(w.nbytes() if fmt != "bf16" else w.numel() * 2 for w in weights) + head.numel() * 2
            for m in QUANT_ROWS:
                run = partial(_matmuls, weights, head, inputs[m], best, fmt, m)
                run()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                ms = bench(graph.replay)
                del graph
                note = "" if layers == shape.layers else f" ({layers} of {shape.layers} layers)"
                rate = m * 1e3 * layers / (ms * shape.layers)  # partial graphs scaled to the whole model
                print(
                    f"{model} {fmt:<4} all matmuls m={m:<2}{note}: {ms * 1e3:8.1f} us, "
                    f"{nbytes / ms / 1e6 / copy_gbs:5.1%} of copy, ~{rate:6.0f} tokens/s",
                    flush=True,
                )
            del weights
            torch.cuda.empty_cache()


def _matmuls(weights: list, head: torch.Tensor, inputs: dict, best: dict, fmt: str, m: int) -> None:
    from engine.kernels import triton_gemv

    for w in weights:
        x = inputs[w.shape[1]]
        if fmt == "bf16":
            F.linear(x, w)
        else:
            triton_gemv.linear(x, w, best.get((fmt, m, *w.shape)))
    F.linear(inputs[head.shape[1]], head)


# The fused form each decode matmul runs at one row (engine.model's Block.decode, kernels.norm_linear and friends).
FUSED_FORMS = {"qkv": "norm", "o": "residual", "gate_up": "silu", "down": "residual", "lm_head": "norm"}


def _fused_and_separate(form: str, x: torch.Tensor, norm_weight: torch.Tensor, squares: torch.Tensor,
                        residual: torch.Tensor, config) -> tuple[Callable, Callable]:  # fmt: skip
    """(fused, separate): one weight's launch of `form` at one row in one kernel, and the kernels it stands for:
    the norm from `linear_residual`'s partial squares against rms_norm then the GEMV (then silu_mul), the residual
    epilogue against the GEMV alone (its add is the next add_rms_norm's, which the fused norm does not run)."""
    from engine.kernels import triton_act, triton_gemv, triton_norm

    if form == "residual":
        return (lambda w: triton_gemv.linear_residual(x, w, residual, config)[0],
                lambda w: triton_gemv.linear(x, w, config) + residual)  # fmt: skip
    silu = form == "silu"

    def fused(w) -> torch.Tensor:
        return triton_gemv.norm_linear(x, None, norm_weight, 1e-5, w, config, silu_mul=silu, squares=squares)[0]

    def separate(w) -> torch.Tensor:
        out = triton_gemv.linear(triton_norm.rms_norm(x, norm_weight, 1e-5), w, config)
        return triton_act.silu_mul(out) if silu else out

    return fused, separate


def _fused_inputs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm weight, partial squares, residual) for `_fused_and_separate` on one row x [1, k] and n outputs."""
    norm_weight = torch.rand(x.shape[1], dtype=DTYPE, device="cuda") + 0.5
    squares = (x.float() ** 2).sum(-1, keepdim=True)  # [1 partial, 1 row], as linear_residual leaves them
    return norm_weight, squares, torch.randn(1, n, dtype=DTYPE, device="cuda")


def quant_fused(models: list[str], copy_gbs: float) -> None:
    """One row of the quantized GEMV's fused forms (FUSED_FORMS) against the separate kernels they stand for, per
    format, shape and config (`choose_config`'s, which is TUNED's on the H200, and for int4 nibble pairs'
    128/256/1/4/2), each in a CUDA graph over enough copies of the weight to stream from memory, as the sweep times
    them. The separate column for the residual form is the GEMV alone (its add costs the next norm nothing)."""
    from engine.kernels import triton_gemv

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    for model in models:
        for fmt in ("int4", "int8"):
            for name, (n, k) in MODELS[model].matmuls().items():
                form = FUSED_FORMS[name]
                w = _quantized(fmt, n, k)
                copies = max(2, min(32, int(L2_BYTES * 2 // w.nbytes()) + 1))
                ws = [w, *(_quantized(fmt, n, k) for _ in range(copies - 1))]
                x = torch.randn(1, k, dtype=DTYPE, device="cuda")
                fused_inputs = _fused_inputs(x, n)
                configs = [triton_gemv.choose_config(1, n, k, sm, fmt)]
                if fmt == "int4":
                    configs.append(triton_gemv.GemvConfig(128, 256, 1, 4, 2, True, "pairs"))
                pairs = [_fused_and_separate(form, x, *fused_inputs, c) for c in configs]
                _precompile([partial(f, w) for pair in pairs for f in pair])
                nbytes = w.nbytes() + 2 * (2 * k + n)
                for c, (fused, separate) in zip(configs, pairs, strict=True):
                    label = f"{model} {fmt} {name} {n}x{k} {form} {_cfg(c)}"
                    try:
                        check(label, fused(w), separate(w))
                        fused_ms = _graph_ms([partial(fused, v) for v in ws])
                        separate_ms = _graph_ms([partial(separate, v) for v in ws])
                    except Exception as exc:  # a config the shape cannot take, or a wrong result: the others still run
                        print(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                        continue
                    print(
                        f"{label:<58} fused {fused_ms * 1e3:6.1f} us {nbytes / fused_ms / 1e6 / copy_gbs:5.1%} | "
                        f"separate {separate_ms * 1e3:6.1f} us | x{separate_ms / fused_ms:4.2f}",
                        flush=True,
                    )
                del w, ws
                torch.cuda.empty_cache()


def print_rules(best: dict) -> None:
    """The best configs as `triton_gemv.TUNED`'s literal: (format, rows, N, K) -> GemvConfig's fields."""
    print("\nbest configs, for triton_gemv.TUNED ((format, rows, N, K) -> BLOCK_N, BLOCK_K, split-K, warps, stages, "
          "tensor cores, unpack):")  # fmt: skip
    entries = "".join(f"    {key!r}: {dataclasses.astuple(c)!r},\n" for key, c in sorted(best.items()))
    print("TUNED = {\n" + entries + "}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="7b,13b,34b", help="comma-separated subset of 7b,13b,34b")
    parser.add_argument("--sweep", action="store_true", help="also time alternative GEMV configs")
    parser.add_argument("--quant-sweep", action="store_true", help="only the int8/int4 GEMV sweep and graphs")
    parser.add_argument("--quant-fused", action="store_true", help="only the int8/int4 fused forms at one row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    models = [m.strip() for m in args.models.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {DTYPE}")
    copy_gbs = copy_bandwidth()
    if args.quant_sweep:
        best: dict = {}
        section("quantized GEMV config sweep", lambda: best.update(sweep_quant(models, copy_gbs)))
        section("all decode matmuls in one CUDA graph, per format", lambda: quant_all_matmuls(models, best, copy_gbs))
        print_rules(best)
        return
    if args.quant_fused:
        section("quantized GEMV's fused forms at one row, against the separate kernels",
                lambda: quant_fused(models, copy_gbs))  # fmt: skip
        return
    section("linear (per matmul)", lambda: bench_linear(models, copy_gbs))
    section("all decode matmuls in one CUDA graph", lambda: bench_all_matmuls(models, copy_gbs))
    section("norm (+ SwiGLU) fused into the GEMV", lambda: bench_fused(models, copy_gbs))
    section("decode attention", lambda: bench_attention(models, copy_gbs))
    section("norm", lambda: bench_small_ops(models, copy_gbs))
    section("sampling (temperature 0.2, top-k 40, top-p 0.9, V=32016)", bench_sampling)
    if args.sweep:
        section("GEMV config sweep", lambda: sweep_gemv(models, copy_gbs))


if __name__ == "__main__":
    main()
