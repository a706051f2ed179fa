"""Quantization math for the weight types (engine.weights): plain PyTorch, no state.

int8, symmetric per output channel: `w[n, k] ~ q[n, k] * scale[n]`, q in [-127, 127], scale = max|w[n, :]| / 127
(float32 [N]).

int4, asymmetric in groups of GROUP = 128 inputs, the form GPTQ and AWQ checkpoints hold:
`w[n, k] ~ (q[n, k] - zero[g, n]) * scale[g, n]` for k in group g = k // 128, q and zero in [0, 15]. Quantizing
rounds to nearest as AWQ's `pseudo_quantize_tensor` does: scale = max(max - min, 1e-5) / 15 over the group,
zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15), with the scale rounded to float16 first (it is
stored so) and q computed from the stored scale.
- q is packed into int32 `qweight [N, K / 8]`, K-contiguous per output row: in group g, word c (0..15) holds input
  g * 128 + 16 * j + c in bits 4j..4j+3. Each nibble position is a plane of 16 consecutive inputs, so a kernel
  unpacks a plane with one shift and one mask and reads x in runs of 16.
- scales (float16) and zeros (uint8) are `[K / 128, N]`, group-major: a program working on a strip of rows reads one
  group's scales and zeros in one contiguous load each.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP = 128
_ROWS = 4096  # rows quantized at a time: bounds the float32 temporaries of a large weight


def quantize_int8(w: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`(q, scale)` for `w [N, K]`; `scale [N]` given: the rows' scales from elsewhere (a shard of longer rows)."""
    if scale is None:
        scale = int8_scale(w)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for rows, out, s in zip(w.split(_ROWS), q.split(_ROWS), scale.split(_ROWS), strict=True):
        out.copy_((rows.float() / s[:, None]).round_().clamp_(-127, 127))
    return q, scale


def int8_scale(w: Tensor) -> Tensor:
    """float32 `[N]`: each row's largest magnitude over 127 (1 for a row of zeros, whose q are then 0)."""
    amax = torch.cat([rows.abs().amax(dim=1).float() for rows in w.split(_ROWS)])
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`(q * scale)` in `dtype`, `[N, K]`: the weight the int8 kernels compute with, to rounding."""
    return (q.float() * scale[:, None]).to(dtype)


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(qweight, scales, zeros)` for `w [N, K]` with K a multiple of GROUP, in the layout above."""
    n, k = w.shape
    assert k % GROUP == 0, f"int4 groups need K divisible by {GROUP}, got {k}"
    qweight = torch.empty(n, k // 8, dtype=torch.int32, device=w.device)
    scales = torch.empty(k // GROUP, n, dtype=torch.float16, device=w.device)
    zeros = torch.empty(k // GROUP, n, dtype=torch.uint8, device=w.device)
    for start in range(0, n, _ROWS):
        rows = w[start : start + _ROWS].float().view(-1, k // GROUP, GROUP)
        low, high = rows.amin(dim=2), rows.amax(dim=2)
        scale = ((high - low).clamp_(min=1e-5) / 15).half()
        s = scale.float()
        zero = (-low / s).round_().clamp_(0, 15)
        q = (rows / s[..., None]).round_().add_(zero[..., None]).clamp_(0, 15).to(torch.uint8)
        qweight[start : start + _ROWS] = pack_int4(q.view(-1, k))
        scales[:, start : start + _ROWS] = scale.T
        zeros[:, start : start + _ROWS] = zero.to(torch.uint8).T
    return qweight, scales, zeros


def pack_int4(q: Tensor) -> Tensor:
    """int32 `[N, K / 8]` from values `q [N, K]` in [0, 15], in the planar order above."""
    n, k = q.shape
    planes = q.to(torch.int64).view(n, k // GROUP, 8, 16)  # [n, group, j, c]: input 16 j + c of the group
    shifts = (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)
    words = (planes << shifts).sum(dim=2)  # disjoint bits: the sum is the bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).view(n, k // 8)


def unpack_int4(qweight: Tensor) -> Tensor:
    """The values `[N, K]` (uint8, 0..15) packed in `qweight [N, K / 8]`."""
    n, words = qweight.shape
    grouped = qweight.view(n, words // 16, 1, 16)
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int32)).view(1, 1, 8, 1)
    return ((grouped >> shifts) & 15).to(torch.uint8).view(n, words * 8)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """`(q - zero) * scale` in `dtype`, `[N, K]`, computed in float32: the weight the int4 kernels compute with."""
    n = qweight.shape[0]
    q = unpack_int4(qweight).view(n, scales.shape[0], GROUP).float()
    w = (q - zeros.T[..., None].float()) * scales.T[..., None].float()
    return w.view(n, -1).to(dtype)
