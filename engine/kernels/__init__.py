"""The decode-path kernels, behind one dispatch: Triton for CUDA tensors, plain PyTorch otherwise.

The model calls these functions and runs unchanged on the CPU (CI, tests) and on the GPU. Every op
is CUDA-graph capturable: no host syncs, shapes fixed by the inputs' shapes, and positions and
slots read from device memory, so one captured decode step serves every position. Triton
compiles each kernel on its first call for a new shape or dtype, so run the decode step once
before capturing it (the usual warm-up run does this). Triton is imported only when a CUDA tensor
reaches a kernel, so `import engine.kernels` works where triton is not installed.

- `rms_norm(x, weight, eps)` and `add_rms_norm(x, residual, weight, eps)`: Llama RMSNorm, the
  second also returning the residual sum.
- `rotary_attention(q, k, v, cos, sin, positions, slots, k_cache, v_cache, scale)`: rotary embedding of
  the new token's q and k, k and v written into the cache, and split-KV attention of the one new query
  per sequence over its keys, GQA aware: one kernel on the GPU. This and the next two take `kv_scales` for an
  int8 cache (`--kv int8`): quantized per (token, kv head) as they write, dequantized in registers as they read.
- `verify_attention(q, k, v, cos, sin, positions, slots, counts, k_cache, v_cache, scale)`: the same for the
  several new tokens per sequence of a speculative verify step, causal among them.
- `prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, positions, slots)`: prefill's rotary embedding of q and k
  and its KV-cache write, each token at its own slot and position (a prefill of several sequences), one kernel on
  the GPU instead of a dozen elementwise passes.
- `silu_mul(gu)`: SwiGLU's `silu(gate) * up` on the fused gate/up output.
- `linear(x, w)`: `x @ W.T` for a weight object `w` (`engine.weights.Weight`: dense, int8, int4 or nf4), a
  weight-streaming matrix-vector kernel for decode-sized x (up to 64 rows) that dequantizes in registers, where
  start-up timing found it faster than the weight's own `linear` (cuBLAS, after dequantizing for the quantized
  formats; bitsandbytes for nf4) for the format, shape and row count. A weight whose columns are stored permuted
  (`w.perm`, act-order GPTQ) gets x gathered into that order first, and no fused norm or residual.
- `dequantize(w)`: a quantized weight as a dense `[n, k]` (what `Weight.linear` multiplies on the GPU).
- `norm_linear(x, residual, norm_weight, eps, w)` and `norm_linear_silu_mul(...)`: residual add and RMSNorm,
  then `linear` (then, on the gate/up weight, `silu_mul`); where the matrix-vector kernel runs the shape for
  one row, the norm is its prologue and the activation its epilogue, one launch instead of two or three, unless
  `tune_fusion` timed the one-row step faster with them as kernels of their own (a quantized format, whose kernel
  is bound by instructions: the prologue's per-weight work can cost more than the launches it saves).
- `linear_residual(x, w, residual)`: the projection that ends a layer's half, returned as the residual stream
  the next `norm_linear` takes; where the matrix-vector kernel runs it for one row, the residual add is its
  epilogue, which also leaves the next norm its sums of squares.
- `sample(...)`, `apply_repetition_penalty(...)`, `mark_seen(...)`: device-side sampling (after the sort, one
  kernel on the GPU); `greedy_pick(...)`: the greedy step's penalty, argmax and seen mark, one kernel on the GPU.
- `accept(...)`: speculative decoding's accept rule for a verify step's proposals (`accept.py`, plain ops); for
  greedy rows one kernel on the GPU (`triton_accept`).

`compile_ahead` compiles the decode step's Triton kernels in worker processes while the weights load
(`engine.runner.compile_ahead` drives it). `triton_allreduce` holds tensor parallelism's one-shot all-reduce (used
by `engine.parallel`, checked against NCCL on two GPUs). `reference` holds the plain PyTorch versions, which define
the semantics. On Hopper the Triton kernels of the decode step launch with programmatic dependent launch (`pdl.py`),
each starting while its predecessor finishes.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import accept as accept_rule
from . import reference, sampling, switches
from .sampling import apply_repetition_penalty, mark_seen

if TYPE_CHECKING:
    from engine.weights import Weight

__all__ = [
    "accept",
    "add_rms_norm",
    "apply_repetition_penalty",
    "dequantize",
    "greedy_pick",
    "linear",
    "linear_residual",
    "mark_seen",
    "norm_linear",
    "norm_linear_silu_mul",
    "prefill_rotary",
    "rms_norm",
    "rotary_attention",
    "sample",
    "silu_mul",
    "verify_attention",
]


@functools.cache
def have_triton() -> bool:
    """Whether Triton is installed (CUDA tensors then take the Triton kernels)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and have_triton()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm over the last dimension: float32 statistics, cast to x's dtype, times weight."""
    if _use_triton(x):
        from . import triton_norm

        return triton_norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(x + residual), x + residual)`, fused on the GPU."""
    if _use_triton(x):
        from . import triton_norm

        return triton_norm.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def silu_mul(gu: Tensor) -> Tensor:
    """SwiGLU activation of the fused gate/up output: `silu(gate) * up`, one kernel on the GPU."""
    if _use_triton(gu):
        from . import triton_act

        return triton_act.silu_mul(gu)
    return reference.silu_mul(gu)


def rotary_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    scale: float,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Rotate q [B, Hq, D] and k [B, Hkv, D] at `positions`, store k and v at `[slots, :, positions]` of the caches
    [n_slots, Hkv, max_seq, D], and return the attention of the rotated q over keys `0 .. positions[b]`. With
    `kv_scales` (`[n_slots, Hkv, max_seq]` float32 each) the caches are int8 (`reference.quantize_kv`)."""
    args = (q, k, v, cos, sin, positions, slots, k_cache, v_cache, scale)
    if _use_triton(q):
        from . import triton_attention

        return triton_attention.rotary_attention(*args, kv_scales=kv_scales)
    return reference.rotary_attention(*args, kv_scales)


def verify_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    counts: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    scale: float,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """`rotary_attention` for T new tokens per sequence, q [B, T, Hq, D] and k/v [B, T, Hkv, D], token t at
    `positions + t`, causal among them; only the first `counts[b]` of row b are real (`reference.verify_attention`)."""
    args = (q, k, v, cos, sin, positions, slots, counts, k_cache, v_cache, scale)
    if _use_triton(q):
        from . import triton_attention

        return triton_attention.verify_attention(*args, kv_scales=kv_scales)
    return reference.verify_attention(*args, kv_scales)


def prefill_rotary(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    slots: Tensor,
    kv_scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (cos/sin [T, D]: the rows of their positions), store k and v at
    `[slots[t], :, positions[t]]` of the caches [n_slots, Hkv, max_seq, D] (int8 with the scales
    [n_slots, Hkv, max_seq] of `kv_scales`), return the rotated q [T, Hq, D]: one kernel on the GPU (switch:
    `prefill_rotary`)."""
    if _use_triton(q) and switches.on("prefill_rotary"):
        from . import triton_rotary

        return triton_rotary.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, positions, slots, kv_scales)
    return reference.prefill_rotary(q, k, v, cos, sin, k_cache, v_cache, positions, slots, kv_scales)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, offsets: Tensor) -> Tensor:
    """One token per row of logits [B, V] (`sampling.sample` says how); on the GPU its tail after the sort is one
    kernel."""
    if _use_triton(logits):
        from . import triton_sample

        return triton_sample.sample(logits, temperature, top_k, top_p, seeds, offsets)
    return sampling.sample(logits, temperature, top_k, top_p, seeds, offsets)


def greedy_pick(logits: Tensor, seen: Tensor, slots: Tensor, penalty: Tensor | None) -> Tensor:
    """Argmax of logits [B, V] after the repetition penalty (None: none), marked in `seen` at each row's slot."""
    if _use_triton(logits):
        from . import triton_pick

        return triton_pick.greedy_pick(logits, seen, slots, penalty)
    return sampling.greedy_pick(logits, seen, slots, penalty)


def accept(
    logits: Tensor,
    tokens: Tensor,
    counts: Tensor,
    seen: Tensor,
    slots: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    penalty: Tensor | None,
    seeds: Tensor,
    offsets: Tensor,
    greedy: bool,
) -> tuple[Tensor, Tensor]:
    """The verify step's new tokens and counts (`accept.accept` says how); greedy on the GPU: one kernel (switch:
    `greedy_accept`)."""
    if greedy and _use_triton(logits) and switches.on("greedy_accept"):
        from . import triton_accept

        return triton_accept.accept_greedy(logits, tokens, counts, seen, slots, penalty)
    return accept_rule.accept(
        logits, tokens, counts, seen, slots, temperature, top_k, top_p, penalty, seeds, offsets, greedy
    )


# (rows, format, N, K, dtype) -> the Triton config that beat the weight's own `linear` there; filled by `tune_linear`.
_TRITON_CONFIG: dict[tuple[int, str, int, int, object], object] = {}
# The one-row forms that fuse ops into the matrix-vector kernel: "norm" (`norm_linear`: the RMSNorm prologue) and
# "norm_silu" (`norm_linear_silu_mul`: the prologue and the SwiGLU epilogue). (form, weight format) pairs held here
# run as separate kernels instead; filled by `tune_fusion`.
FUSED_FORMS = ("norm", "norm_silu")
_SEPARATE: set[tuple[str, str]] = set()
# (form, (rows, format, N, K, dtype)) where a fused form ran faster than the separate kernels at several rows; filled
# by `tune_fusion_rows`, which times only weights small enough that a launch is much of their kernel's time.
_FUSED_ROWS: set[tuple[str, tuple]] = set()
LAUNCH_BOUND_BYTES = 16 << 20  # streamed in ~4 µs at an H200's copy rate: about what the two launches fusing saves


def _gemv_config(x: Tensor, w: Weight) -> object | None:
    """The Triton config `tune_linear` chose for `x @ W.T`'s format and shape; None where the weight's own `linear`
    (or the CPU) runs it."""
    if not _use_triton(x):
        return None
    return _TRITON_CONFIG.get((x.numel() // x.shape[-1], *w.key))


def _fused_config(x: Tensor, w: Weight, form: str | None = None) -> object | None:
    """`_gemv_config` where the norm and the residual add pay as the kernel's prologue and epilogue: for one row,
    unless `tune_fusion` found `form` (one of FUSED_FORMS; None: the residual epilogue, which costs the loop nothing)
    faster separate for the weight's format. With several rows the prologue's per-tile normalisation stalls the
    kernel's pipelined K loop (QKV at 32 rows: 75 µs against 39 for the separate norm and the plain kernel,
    BENCHMARKS.md), so they stay separate kernels, unless `tune_fusion_rows` found `form` faster fused for a small
    weight, whose kernel is mostly its launch (the residual add stays separate there)."""
    if w.perm is not None:
        return None
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        return None if (form, w.format) in _SEPARATE else _gemv_config(x, w)
    return _gemv_config(x, w) if (form, (rows, *w.key)) in _FUSED_ROWS else None


def linear(x: Tensor, w: Weight) -> Tensor:
    """`x @ W.T`: the Triton matrix-vector kernel where `tune_linear` measured it faster, `w.linear` elsewhere."""
    config = _gemv_config(x, w)
    if config is not None:
        from . import triton_gemv

        return triton_gemv.linear(x if w.perm is None else x.index_select(-1, w.perm), w, config)
    return w.linear(x)


def dequantize(w: Weight) -> Tensor:
    """The quantized weight `w` as a dense `[n, k]` in its dtype: one Triton kernel on the GPU (into a fresh buffer,
    which the caching allocator, or a CUDA graph's pool, reuses), `w.dense()` (engine.quant's reference) elsewhere."""
    if _use_triton(w.tensors()[0]):
        from . import triton_dequant

        stored = triton_dequant.dequantize(w)  # columns in the stored order: `w.perm`'s
        return stored if w.perm is None else torch.empty_like(stored).index_copy_(1, w.perm, stored)
    return w.dense()


def linear_residual(x: Tensor, w: Weight, residual: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The residual stream after adding `x @ w.T` to `residual`, as `(x, residual, squares)` for `norm_linear`:
    `(h, None, squares)` where the Triton kernel fuses the add (its epilogue, which also leaves the next norm its
    partial sums of squares), else `(x @ w.T, residual, None)`, the add left to the next norm."""
    config = _fused_config(x, w)
    if config is None:
        return linear(x, w), residual, None
    from . import triton_gemv

    h, squares = triton_gemv.linear_residual(x, w, residual, config)
    return h, None, squares


def _norm(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(h), h)` for `h = x + residual` (x where residual is None)."""
    if residual is None:
        return rms_norm(x, norm_weight, eps), x
    return add_rms_norm(x, residual, norm_weight, eps)


def norm_linear(
    x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w: Weight, squares: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`(linear(rms_norm(h), w), h)` for the residual stream `h = x + residual` (x itself where residual is None):
    one launch where the Triton kernel fuses the norm (its prologue), the two ops elsewhere. `squares`, from
    `linear_residual`, lets the kernel skip summing the squares of x itself."""
    config = _fused_config(x, w, "norm")
    if config is not None:
        from . import triton_gemv

        return triton_gemv.norm_linear(x, residual, norm_weight, eps, w, config, squares=squares)
    normed, h = _norm(x, residual, norm_weight, eps)
    return linear(normed, w), h


def norm_linear_silu_mul(
    x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w13: Weight, squares: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`norm_linear` with the fused gate/up weight w13 `[2I, K]` (gate rows first), then `silu_mul`: one launch
    where the Triton kernel fuses the norm (its prologue) and the activation (its epilogue: each program computes
    matching gate and up rows). With several rows the activation stays a kernel of its own too: in its epilogue
    the half-width strips lost 0.7% at batch 32 (BENCHMARKS.md)."""
    config = _fused_config(x, w13, "norm_silu")
    if config is not None:
        from . import triton_gemv

        return triton_gemv.norm_linear(x, residual, norm_weight, eps, w13, config, silu_mul=True, squares=squares)
    normed, h = _norm(x, residual, norm_weight, eps)
    return silu_mul(linear(normed, w13)), h


def graph_time(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of `fn`, replayed back to back in a CUDA graph as the decode step runs it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * calls)


def _candidates(weights: list[Weight], rows: tuple[int, ...]) -> Iterator[tuple[tuple, Tensor, list[Weight], object]]:
    """For each distinct weight format and shape the Triton kernel runs, and each row count up to its limit: the
    config key, an input x, up to eight weights of that key and the Triton config the rule picks for it
    (alternatives were timed on the GPU and lost or tied, BENCHMARKS.md; timing them at start-up would cost seconds
    of compilation)."""
    from . import triton_gemv

    by_key: dict[tuple, list[Weight]] = {}
    for w in weights:
        if w.format in triton_gemv.FORMATS:
            by_key.setdefault(w.key, []).append(w)
    for key, same in by_key.items():
        _, n, k, dtype = key
        device = same[0].tensors()[0].device
        sm = torch.cuda.get_device_properties(device).multi_processor_count
        for m in (m for m in rows if m <= triton_gemv.MAX_ROWS):
            x = torch.randn(m, k, device=device, dtype=dtype)
            yield (m, *key), x, same[:8], triton_gemv.choose_config(m, n, k, sm, key[0])


def tune_linear(weights: list[Weight], rows: tuple[int, ...] = (1,), calls: int = 4) -> dict[str, dict[str, float]]:
    """Time each weight's own `linear` (cuBLAS; after dequantizing, for the quantized formats) and the Triton kernel
    for each format, shape and row count, in a CUDA graph over several layers' weights as decode runs them (one
    weight over and over would time the L2 cache, not memory), and remember the faster. Which wins depends on the
    shape: measuring beats a rule. Run before capture. `norm_linear` and `norm_linear_silu_mul` follow the choice:
    where the plain kernel wins, fusing also saves launches."""
    if not weights or not _use_triton(weights[0].tensors()[0]):
        return {}
    from . import triton_gemv

    report: dict[str, dict[str, float]] = {}
    for key, x, ws, config in _candidates(weights, rows):
        times = {
            "cublas": graph_time(lambda x=x, ws=ws: [w.linear(x) for w in ws], calls) / len(ws),
            "triton": graph_time(lambda x=x, ws=ws, c=config: [triton_gemv.linear(x, w, c) for w in ws], calls)
            / len(ws),
        }
        if times["triton"] < times["cublas"]:
            _TRITON_CONFIG[key] = config
        m, fmt, n, k, _ = key
        report[f"{n}x{k} m={m}" if fmt == "dense" else f"{fmt} {n}x{k} m={m}"] = {
            name: round(t * 1e3, 1) for name, t in times.items()
        }
    return report


def _timed_formats(weights: list[Weight]) -> list[str]:
    """The quantized formats whose one-row matrix-vector kernel `tune_linear` chose: those `tune_fusion` times. The
    dense forms stay fused: the bf16 kernel streams at the copy rate with its prologue (BENCHMARKS.md), so fusing
    only saves launches, and timing it would lengthen every start-up."""
    return sorted({w.format for w in weights if w.format != "dense" and (1, *w.key) in _TRITON_CONFIG})


def tune_fusion(step: Callable[[], None], weights: list[Weight], calls: int = 3) -> dict[str, dict[str, float]]:
    """Time the one-row decode `step` (in a CUDA graph, as it replays) with each quantized format's fused forms
    (FUSED_FORMS) in the matrix-vector kernel and as separate kernels, one form at a time, and keep a form separate
    where the step was faster so. The quantized kernels are bound by instructions, not bytes, so the norm's work per
    weight in their loop can cost more than the launches fusing saves; the whole step is timed, as fusion's gain is
    in the launches around the kernel. Run after `tune_linear`, before capture."""
    report: dict[str, dict[str, float]] = {}
    formats = _timed_formats(weights)
    if not formats:
        return report
    best = graph_time(step, calls)
    for fmt in formats:
        for form in FUSED_FORMS:
            fused = best
            _SEPARATE.add((form, fmt))
            separate = graph_time(step, calls)
            if separate < fused:
                best = separate
            else:
                _SEPARATE.discard((form, fmt))
            report[f"{fmt} {form}"] = {"fused": round(fused * 1e3, 1), "separate": round(separate * 1e3, 1)}
    return report


def _launch_bound(weights: list[Weight]) -> list[Weight]:
    """The weights small enough (LAUNCH_BOUND_BYTES) for fusing at several rows to be worth timing."""
    return [w for w in weights if w.nbytes() <= LAUNCH_BOUND_BYTES and w.perm is None]


def _several_rows(
    x: Tensor, residual: Tensor, norm_weight: Tensor, ws: list[Weight], config: object, silu: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(fused, separate): the norm (and SwiGLU) with each of `ws` at x's rows in one launch, and as the kernels
    the decode step runs instead."""
    from . import triton_gemv

    def fused() -> None:
        for w in ws:
            triton_gemv.norm_linear(x, residual, norm_weight, 1e-5, w, config, silu_mul=silu)

    def separate() -> None:
        for w in ws:
            out = triton_gemv.linear(add_rms_norm(x, residual, norm_weight, 1e-5)[0], w, config)
            if silu:
                silu_mul(out)

    return fused, separate


def tune_fusion_rows(
    forms: dict[str, list[Weight]], rows: tuple[int, ...], calls: int = 4
) -> dict[str, dict[str, float]]:
    """At each row count above one, time each fused form (`forms`: the weights each multiplies,
    `Llama.fused_weights`) against the separate kernels it stands for (`add_rms_norm`, the plain matrix-vector
    kernel, `silu_mul`), in a CUDA graph over up to eight weights of a key, for the small weights whose kernel
    `tune_linear` chose (LAUNCH_BOUND_BYTES), and keep it fused where it was faster. Speculation's verify steps of
    a small model (several rows each) are bound by their launches, which fusing cuts by two or three a layer. Run
    after `tune_linear`, before capture."""
    report: dict[str, dict[str, float]] = {}
    for form, weights in forms.items():
        by_key: dict[tuple, list[Weight]] = {}
        for w in _launch_bound(weights):
            by_key.setdefault(w.key, []).append(w)
        for key, same in by_key.items():
            fmt, n, k, dtype = key
            ws, device, silu = same[:8], same[0].tensors()[0].device, form == "norm_silu"
            norm_weight = torch.ones(k, dtype=dtype, device=device)
            for m in rows:
                config = _TRITON_CONFIG.get((m, *key))
                if m == 1 or config is None or not _use_triton(same[0].tensors()[0]):
                    continue
                x, residual = (torch.randn(m, k, dtype=dtype, device=device) for _ in range(2))
                fused, separate = _several_rows(x, residual, norm_weight, ws, config, silu)
                times = {"fused": graph_time(fused, calls) / len(ws), "separate": graph_time(separate, calls) / len(ws)}
                if times["fused"] < times["separate"]:
                    _FUSED_ROWS.add((form, (m, *key)))
                report[f"{fmt} {n}x{k} m={m} {form}"] = {name: round(t * 1e3, 1) for name, t in times.items()}
    return report


def linear_choices(
    weights: list[Weight], rows: tuple[int, ...] = (1,), forms: dict[str, list[Weight]] | None = None
) -> Iterator[tuple[int, ...] | None]:
    """Yield two or three times: with every weight key at `rows` on the Triton kernel (its plain form run once, as
    `tune_linear` runs it), then (with quantized weights) the same with every quantized format's fused forms
    separate (`tune_fusion`'s alternative), then with every key on the weights' own `linear`; the tuned choices are
    restored after. A decode step run at each yield launches every kernel variant that `tune_linear`, `tune_fusion`
    and the captured step could need, which is what compiling ahead records (`engine.runner.compile_ahead`). Each
    yield says which steps differ from the ones before: the row counts whose steps to run, None for all. With
    `forms` (`Llama.fused_weights`) and small weights among them, a yield has them fused at several rows too
    (`tune_fusion_rows`' alternative)."""
    if not weights or not _use_triton(weights[0].tensors()[0]):
        return
    from . import triton_gemv

    tuned, separate, fused_rows = dict(_TRITON_CONFIG), set(_SEPARATE), set(_FUSED_ROWS)
    try:
        for key, x, ws, config in _candidates(weights, rows):
            _TRITON_CONFIG[key] = config
            triton_gemv.linear(x, ws[0], config)
        _SEPARATE.clear()
        _FUSED_ROWS.clear()
        yield None
        timed = _timed_formats(weights)
        if timed:
            _SEPARATE.update((form, fmt) for fmt in timed for form in FUSED_FORMS)
            yield (1,)  # the fused forms are one row's
            _SEPARATE.clear()
        several = tuple(m for m in rows if m > 1)
        small = [(form, w.key) for form, ws in (forms or {}).items() for w in _launch_bound(ws)]
        if small and several:
            _FUSED_ROWS.update((form, (m, *key)) for form, key in small for m in several)
            yield several
            _FUSED_ROWS.clear()
        _TRITON_CONFIG.clear()
        yield None
    finally:
        _TRITON_CONFIG.clear()
        _TRITON_CONFIG.update(tuned)
        _SEPARATE.clear()
        _SEPARATE.update(separate)
        _FUSED_ROWS.clear()
        _FUSED_ROWS.update(fused_rows)
