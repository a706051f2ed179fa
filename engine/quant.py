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

nf4 is bitsandbytes' format (`quantize_4bit(w, blocksize=64, quant_type="nf4")`, what `load_in_4bit` makes): each
block of NF4_BLOCK = 64 consecutive values of the row-major weight holds `code[q] * absmax`, q in [0, 15], NF4_CODE
its 16 levels, absmax the block's largest magnitude (float32); two q to a byte, the first in the high nibble. Held as
`packed [N, K / 2]` uint8 and `absmax [N, K / 64]` (the same bytes as bitsandbytes' flat tensors, rows whole).

Pre-quantized checkpoints (`unpack_gptq`, `unpack_awq`) hold the int4 math above with other packings:
- GPTQ: `qweight [K / 8, N]` int32 packs 8 inputs per word along K (input 8 r + j in bits 4j of row r), `qzeros
  [G, N / 8]` int32 8 outputs per word the same way, `scales [G, N]` float16, `g_idx [K]` the group of each input
  (act-order: not k // group). The classic format stores zero - 1 (`zero_offset` 1; gptq_v2 stores the zero).
- AWQ (GEMM): `qweight [K, N / 8]` and `qzeros [G, N / 8]` pack 8 outputs per word with nibble j holding output
  8 c + AWQ_ORDER[j]; `scales [G, N]`; groups are contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.errors import EngineError

GROUP = 128
NF4_BLOCK = 64
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
"""The 16 NF4 levels: the quantiles of a standard normal scaled to [-1, 1], as bitsandbytes documents them (QLoRA)."""
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
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


def quantize_nf4(w: Tensor) -> tuple[Tensor, Tensor]:
    """`(packed, absmax)` for `w [N, K]` (K a multiple of NF4_BLOCK) through bitsandbytes' own `quantize_4bit`, on
    w's device (its CPU backend on the CPU)."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        raise EngineError("nf4 weights need bitsandbytes (pip install bitsandbytes)", fields=("quant",)) from None
    n, k = w.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n, k // NF4_BLOCK, dtype=torch.float32, device=w.device)
    for start in range(0, n, _ROWS):
        q, state = bnb.quantize_4bit(w[start : start + _ROWS].contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        packed[start : start + _ROWS] = q.view(-1, k // 2)
        absmax[start : start + _ROWS] = state.absmax.view(-1, k // NF4_BLOCK)
    return packed, absmax


def dequantize_nf4(packed: Tensor, absmax: Tensor, dtype: torch.dtype) -> Tensor:
    """`code[q] * absmax` in `dtype`, `[N, K]`, computed in float32: bitsandbytes' `dequantize_4bit` in plain
    PyTorch."""
    n = packed.shape[0]
    q = torch.stack((packed >> 4, packed & 15), dim=-1).view(n, -1, NF4_BLOCK).long()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    return (code[q] * absmax[..., None]).view(n, -1).to(dtype)


def _unpack_words(words: Tensor, dim: int) -> Tensor:
    """The 8 nibbles of each int32 word (low bits first) laid out along `dim`, as uint8."""
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 15  # [..., words, 8]
    if dim == 0:
        return nibbles.transpose(1, 2).reshape(-1, words.shape[1]).to(torch.uint8)
    return nibbles.reshape(words.shape[0], -1).to(torch.uint8)


def unpack_gptq(qweight: Tensor, qzeros: Tensor, zero_offset: int) -> tuple[Tensor, Tensor]:
    """`(q [N, K], zeros [G, N])` (uint8) from a GPTQ checkpoint's `qweight [K / 8, N]` and `qzeros [G, N / 8]`;
    the stored zero plus `zero_offset` (1 in the classic format: a stored 15 is a zero of 16, as its kernels read)."""
    q = _unpack_words(qweight, 0)  # [K, N]: row 8 r + j from bits 4 j of row r
    return q.T.contiguous(), _unpack_words(qzeros, 1) + zero_offset


def unpack_awq(qweight: Tensor, qzeros: Tensor) -> tuple[Tensor, Tensor]:
    """`(q [N, K], zeros [G, N])` (uint8) from an AWQ GEMM checkpoint's `qweight [K, N / 8]` and `qzeros
    [G, N / 8]`, undoing the interleaved nibble order."""
    order = torch.tensor(AWQ_ORDER, device=qweight.device)
    where = torch.empty_like(order)
    where[order] = torch.arange(8, device=qweight.device)  # output 8 c + m sits in nibble where[m]

    def outputs(words: Tensor) -> Tensor:
        nibbles = _unpack_words(words, 1).view(words.shape[0], -1, 8)
        return nibbles[..., where].reshape(words.shape[0], -1)

    return outputs(qweight).T.contiguous(), outputs(qzeros)
