"""The decode-path kernels, behind one dispatch: Triton for CUDA tensors, plain PyTorch otherwise.

The model calls these functions and runs unchanged on the CPU (CI, tests) and on the GPU. Every op
is CUDA-graph capturable: no host syncs, shapes fixed by the inputs' shapes, and positions, slots
and lengths read from device memory, so one captured decode step serves every position. Triton
compiles each kernel on its first call for a new shape or dtype, so run the decode step once
before capturing it (the usual warm-up run does this). Triton is imported only when a CUDA tensor
reaches a kernel, so `import engine.kernels` works where triton is not installed.

- `rms_norm(x, weight, eps)` and `add_rms_norm(x, residual, weight, eps)`: Llama RMSNorm, the
  second also returning the residual sum.
- `rotary_kv_write(q, k, v, cos, sin, positions, slots, k_cache, v_cache)`: rotary embedding of
  the new token's q and k, with k and v written into the cache.
- `decode_attention(q, k_cache, v_cache, slots, lengths, scale)`: split-KV attention of one new
  query per sequence, GQA aware.
- `linear(x, w)`: `x @ w.T`, a weight-streaming matrix-vector kernel for decode-sized x.
- `sample(...)`, `apply_repetition_penalty(...)`, `mark_seen(...)`: device-side sampling.

`reference` holds the plain PyTorch versions, which define the semantics.
"""

from __future__ import annotations

import functools
import importlib.util

import torch.nn.functional as F
from torch import Tensor

from . import reference
from .sampling import apply_repetition_penalty, mark_seen, sample

__all__ = [
    "add_rms_norm",
    "apply_repetition_penalty",
    "decode_attention",
    "linear",
    "mark_seen",
    "rms_norm",
    "rotary_kv_write",
    "sample",
]


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and _have_triton()


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


def rotary_kv_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
) -> Tensor:
    """Rotate q [B, Hq, D] and k [B, Hkv, D] at `positions`, store k and v at `[slots, :, positions]`
    of the caches [n_slots, Hkv, max_seq, D], and return the rotated q."""
    if _use_triton(q):
        from . import triton_rotary

        return triton_rotary.rotary_kv_write(q, k, v, cos, sin, positions, slots, k_cache, v_cache)
    return reference.rotary_kv_write(q, k, v, cos, sin, positions, slots, k_cache, v_cache)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """Attention of q [B, Hq, D] over keys `0 .. lengths[b]-1` of cache slot `slots[b]`."""
    if _use_triton(q):
        from . import triton_attention

        return triton_attention.decode_attention(q, k_cache, v_cache, slots, lengths, scale)
    return reference.decode_attention(q, k_cache, v_cache, slots, lengths, scale)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """`x @ w.T`; decode-sized x on CUDA uses the Triton matrix-vector kernel."""
    if _use_triton(x):
        from . import triton_gemv

        return triton_gemv.linear(x, w)
    return F.linear(x, w)
