"""The int8 KV cache's quantization inside the Triton kernels that write it (`--kv int8`).

Symmetric per row (one token's key or value in one kv head): scale = the row's largest magnitude / 127, values
rounded half away from zero, as `reference.quantize_kv` computes them. The kernels that read the cache multiply
each key's scores, and each value's probabilities, by its scale in registers (`triton_attention`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quantize(x):
    """float32 rows `x [..., D]` -> (int8 `[..., D]`, float32 scales `[...]`); the last axis is the row."""
    amax = tl.max(tl.abs(x), axis=-1)
    return to_int8(x, amax), amax / 127.0


@triton.jit
def to_int8(x, amax):
    """The int8 values of float32 rows `x [..., D]` whose largest magnitudes are `amax [...]` (the scales are
    `amax / 127`): for a row held in pieces, such as the two halves of a rotation."""
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)  # an all-zero row (or a masked one): 0
    scaled = x * tl.expand_dims(inv, -1)
    return tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int8)
