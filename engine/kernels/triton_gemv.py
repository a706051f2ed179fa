"""`x @ w.T` for decode-sized x (1 to 64 rows) in Triton, streaming the weight at copy bandwidth.

With one to a few dozen tokens per step a linear layer is a pass over its weight and little else, so
the kernel is built to keep the memory system busy: each program owns a strip of BLOCK_N weight
rows and walks K in BLOCK_K-wide steps (16-byte loads along K), there are several programs per SM
to hide latency, and the weight is marked evict-first so it does not push x out of the cache.
A single row (M == 1) is a pure multiply-add into a [BLOCK_N, BLOCK_K] accumulator reduced once
at the end. Several rows use a tensor-core dot with the weight strip as the tile's long side
(`w @ x.T`, 64 or 128 weight rows against the rows padded to 16, 32 or 64), on the 16-bit inputs
themselves, through Triton's pipelined K loop. When N alone gives too few programs, K is split: the
last split of a strip to finish (an atomic count) adds the splits' float32 products in split order,
so results stay deterministic and the epilogues below work on split strips too. Launched early
(programmatic dependent launch, `pdl.py`), a program fetches its first weight tiles before it waits
for the previous kernel: into registers for one row, into L2 for several (registers or shared memory
for them would cost a program per SM there).

The same kernel can also fuse what surrounds a decode projection, since each of those ops is a
separate launch of a few microseconds while the projection itself streams megabytes:
- an RMSNorm prologue (`norm_linear`): a first pass over the (cached) input row sums the squares
  of `x + residual`, then the main loop normalises each K block on the fly; one program also writes
  the new residual `x + residual` to its own buffer, as the other programs are still reading x. One
  row of a quantized weight normalises each input of a block once (`_x_planes`) and moves the block
  to the layout the weight's broadcast needs through shared memory, so the norm costs the loop no
  more than x's loads and conversions of the plain form;
- a SwiGLU epilogue (`silu_mul=True`): each program takes a strip of gate rows of the fused gate/up
  weight and the matching up rows (half the plain strip each, so the same bytes per program), both
  in one loop that computes each x tile once for the two products, and stores `silu(gate) * up`.
- a residual epilogue (`linear_residual`): the projection that ends a layer's half adds the residual
  stream and stores the sum, with each program's partial sum of its squares; the next `norm_linear`
  then reads a few hundred partials instead of the whole row in every program.
All round where the unfused ops round (reference.add_rms_norm, reference.silu_mul). The engine fuses
the norm and the residual add only for one row (`engine.kernels` says why).

The weight comes in one of three formats (`engine.weights`; FORMAT): dense rows; int8 rows, the product scaled once
per row at the end; int4, packed 8 to an int32 word K-contiguous per row, groups of 128 inputs with a scale and zero
point each (engine.quant has the layout). The int4 loop unpacks a group plane by plane (16 consecutive inputs per
nibble position), each nibble masked in place and or-ed into the mantissa of 2^23 in one logic instruction, then one
multiply-add gives the exact integer `q - zero` with no conversion instruction; it multiplies (one row) or dots
(several, the exact integers in x's 16-bit dtype) it with x and scales the group's sum once. One row of int8 reads its
bytes four to a word and unpacks them the same way. These kernels are bound by instructions, not bytes, so the
unpacking is counted in the compiled code (BENCHMARKS.md); UNPACKS keeps the earlier shift-and-extract form for the
sweep, and offers int4 in nibble pairs (`unpack="pairs"`, `_int4_pairs_group`): one logic instruction turns nibbles j
and j + 4 of a word (16 bits apart) into a pair of 16-bit floats, one packed subtraction leaves `q - zero`, and a
group is one tensor-core dot with the unpacked weight as its register operand (x, permuted to match, and the packed
words go through shared memory; the unpacked weight never does), one row padded to 16. Prologue, epilogues and
split-K are the same for every format; the quantized weights' first tiles go to L2 early under PDL.

Configs are chosen by a fixed rule or the table of an earlier sweep (TUNED; no autotuning, so CUDA-graph capture never
benchmarks); `python -m engine.kernels.bench_kernels --sweep` (dense) and `--quant-sweep` time alternatives on the GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import counters, pdl
from .triton_attention import dot_precision

if TYPE_CHECKING:
    from engine.weights import Weight

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 64  # larger batches go to cuBLAS, which is compute-efficient there
DENSE, INT8, INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FORMATS = {"dense": DENSE, "int8": INT8, "int4": INT4}  # the weight formats (engine.weights) this kernel runs
SHIFTED, MASKED, PAIRS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# How int4 planes are unpacked (_int4_plane, _int4_plane_masked, _int4_pairs_group) and int8 bytes for one row
# (_values from bytes, _int8_byte from words). PAIRS is int4's only and always runs on the tensor cores.
UNPACKS = {"shift": SHIFTED, "mask": MASKED, "pairs": PAIRS}
# The bits of 2^23, passed as an argument: as a constant it would take an instruction of its own after the mask, as a
# register the mask and the or are one three-input logic instruction (LOP3 takes one immediate).
MAGIC = 0x4B000000
# `_int4_pair` in each 16-bit dtype: (the bits of a pair of the power of two whose mantissa takes a nibble, that power)
PAIR_MAGIC = {torch.bfloat16: (0x43004300, 128.0), torch.float16: (0x64006400, 1024.0)}
# Both nibbles (bits 0..3 and 16..19) masked and or-ed into the pair (lop3 0xEA: a & b | c), the halves the outputs.
_PAIR_ASM = "{{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, {:#x}, 0xEA; mov.b32 {{$0, $1}}, t; }}"
PAIR_ASM_BF16 = tl.constexpr(_PAIR_ASM.format(PAIR_MAGIC[torch.bfloat16][0]))
PAIR_ASM_FP16 = tl.constexpr(_PAIR_ASM.format(PAIR_MAGIC[torch.float16][0]))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False  # one row too through the several-row path (a dot with the row padded to 16)
    unpack: str = "mask"  # how int4 planes and (one row) int8 bytes are unpacked: UNPACKS ("pairs": tensor cores)
    prefetch: bool = False  # int4 only: the next group's words in flight while one is unpacked (_int4_product)


@triton.jit
def _x_offsets(m, k, k_mask, M, stride_xm, BLOCK_M: tl.constexpr):
    """Offsets and mask of an x tile: a vector for one row, [BLOCK_M, BLOCK_K] for several."""
    if BLOCK_M == 1:
        offsets, mask = k, k_mask
    else:
        offsets, mask = m[:, None] * stride_xm + k[None, :], (m[:, None] < M) & k_mask[None, :]
    return offsets, mask


@triton.jit
def _residual_tile(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """A tile of `x + residual`, rounded to x's dtype as the unfused add rounds."""
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last")
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return h


@triton.jit
def _x_tile(
    x_ptr, res_ptr, norm_ptr, offsets, mask, k, k_mask, rstd,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr,
):  # fmt: skip
    """The float32 input tile of the product: x, or RMSNorm(x + residual) rounded as reference.rms_norm rounds."""
    if NORM:
        h = _residual_tile(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL)
        weight = tl.load(norm_ptr + k, mask=k_mask, other=0.0, eviction_policy="evict_last")
        x = (h.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * weight.to(tl.float32)
        if ROUND_NORMED:
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return x


@triton.jit
def _dot(w, x, acc, x_ptr, PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """`acc + w @ x.T` for a weight tile [BLOCK_N, BLOCK_K] and float32 rows [BLOCK_M, BLOCK_K]: the weight strip
    is the tensor-core tile's long side, so a handful of rows needs no padding to 64. NATIVE_DOT: x holds values
    of its 16-bit dtype, and so does w (the weight itself, or integers a quantized format holds exactly), so the
    dot runs on 16-bit inputs exactly; otherwise on float32 copies at PRECISION. int8 weights come as they are:
    the plain conversion is exact for -128..127 (the compiled dot mishandled `_values`' bit tricks on int8 tiles)."""
    if NATIVE_DOT:
        return tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x.to(x_ptr.dtype.element_ty)), acc)
    return tl.dot(w.to(tl.float32), tl.trans(x), acc, input_precision=PRECISION)


@triton.jit
def _values(w, FORMAT: tl.constexpr):
    """A weight tile as float32. int8 takes no int-to-float conversion (a quarter-rate instruction that alone would
    cap the kernel below the copy rate): the byte with its sign bit flipped (q + 128) is or-ed into the mantissa of
    2^23, and 2^23 + 128 subtracted, exactly."""
    if FORMAT == INT8:
        biased = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | 0x4B000000
        return biased.to(tl.float32, bitcast=True) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def _int8_byte(words, high, b: tl.constexpr, magic):
    """q in float32 for byte b of int8 weights packed four to an int32 word (bytes 2 and 3 from `high`, the words
    shifted once by 16): the byte is masked in place and its sign bit flipped in one logic instruction, which leaves
    2^23 + (q + 128) 2^(8 (b % 2)) as a float (`magic`: 2^23's bits, see MAGIC); one multiply-add undoes the bias
    exactly. The plain conversion costs a byte extraction and a quarter-rate instruction per weight."""
    shift: tl.constexpr = 8 * (b % 2)
    src = words if b < 2 else high
    flip = magic + (0x80 << shift)  # an add, not an or: the compiler splits an or of the two into a second xor
    biased = ((src & (0xFF << shift)) ^ flip).to(tl.float32, bitcast=True)
    return biased * (1.0 / (1 << shift)) - (8388608.0 / (1 << shift) + 128.0)


@triton.jit
def _int8_words_product(
    x_ptr, res_ptr, norm_ptr, w_rows, up_rows, n_mask, k_start, k_end, rstd, magic,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ROUND_NORMED: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """The unscaled products [1, BLOCK_N] of one row of x with int8 weight rows read as int32 words (`w_rows` in
    words) and, with SILU_MUL, with the up rows (`up_rows`; else the second product is the first), inputs k_start ..
    k_end: byte b of word w is input 4 w + b, so x comes in four strided planes, each computed once for both. With
    NORM a step's inputs are normalised once each and moved to the planes' layout in one pass through shared memory
    (as `_x_planes`)."""
    c = tl.arange(0, BLOCK_K // 4)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K // 4], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kw = k0 // 4 + c
        live = n_mask[:, None] & (kw < k_end // 4)[None, :]
        words = tl.load(w_rows + kw[None, :], mask=live, other=0, eviction_policy="evict_first")
        high = words >> 16
        up_words, up_high = words, high
        if SILU_MUL:
            up_words = tl.load(up_rows + kw[None, :], mask=live, other=0, eviction_policy="evict_first")
            up_high = up_words >> 16
        if NORM:
            k = k0 + tl.arange(0, BLOCK_K)
            x = _x_tile(x_ptr, res_ptr, norm_ptr, k, k < k_end, k, k < k_end, rstd, True, HAS_RESIDUAL, ROUND_NORMED)
            even, odd = tl.split(tl.reshape(x, [BLOCK_K // 4, 2, 2]))  # [w, b // 2, b % 2]
            x0, x2 = tl.split(even)
            x1, x3 = tl.split(odd)
            planes = (x0, x1, x2, x3)
        for b in tl.static_range(4):
            if NORM:
                x = planes[b]
            else:
                k = 4 * kw + b
                x = tl.load(x_ptr + k, mask=k < k_end, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc += _int8_byte(words, high, b, magic) * x[None, :]
            if SILU_MUL:
                up += _int8_byte(up_words, up_high, b, magic) * x[None, :]
    return tl.sum(acc, axis=1)[None, :], tl.sum(up, axis=1)[None, :]


@triton.jit
def _int4_plane(words, j: tl.constexpr, zero):
    """`q - zero` in float32 for plane j of packed int4 words [BLOCK_N, 16] (inputs 16 j .. 16 j + 15 of their
    group): the nibble is or-ed into the mantissa of 2^23 and `zero` carries the same 2^23, so the subtraction is
    exact and no integer-to-float conversion runs."""
    nibble = (words >> (4 * j)) & 0xF
    return (nibble | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, None]


@triton.jit
def _int4_plane_masked(words, high, j: tl.constexpr, zero, magic):
    """`_int4_plane` in two instructions per nibble, not four (shift, extract, or, subtract): the nibble is masked in
    place (planes 4..7 from `high`, the words shifted once by 16), so it sits at bit 4 (j % 4) of the mantissa of
    2^23, and one multiply-add by 2^-4(j % 4) with -(2^(23 - 4 (j % 4)) + zero) (per row, shared by planes j and
    j + 4) leaves `q - zero`; every step is exact. `zero` is the plain float32 zero point."""
    shift: tl.constexpr = 4 * j if j < 4 else 4 * (j - 3)
    src = words if j < 4 else high
    biased = ((src & (0xF << shift)) | magic).to(tl.float32, bitcast=True)
    offset = -(8388608.0 / (1 << shift)) - zero
    return biased * (1.0 / (1 << shift)) + offset[:, None]


@triton.jit
def _int4_pair(words, j: tl.constexpr, x_ptr, NATIVE_DOT: tl.constexpr):
    """Nibbles j and j + 4 of each packed int4 word [BLOCK_N, 16], as [BLOCK_N, 16, 2]. NATIVE_DOT: in x's 16-bit
    dtype, PAIR_MAGIC's power of two plus q, exactly: one logic instruction masks both nibbles, 16 bits apart, into
    the mantissas of a pair of that power of two, and the pair's halves are the two outputs (register halves: no
    instruction). Else q itself in float32."""
    dtype = x_ptr.dtype.element_ty
    shifted = words >> (4 * j)
    if NATIVE_DOT:
        asm: tl.constexpr = PAIR_ASM_BF16 if dtype == tl.bfloat16 else PAIR_ASM_FP16
        lo, hi = tl.inline_asm_elementwise(asm, "=h,=h,r", [shifted], dtype=(dtype, dtype), is_pure=True, pack=1)
    else:
        lo, hi = (shifted & 0xF).to(tl.float32), ((shifted >> 16) & 0xF).to(tl.float32)
    return tl.join(lo, hi)


@triton.jit
def _int4_pairs_x(
    x_ptr, res_ptr, norm_ptr, g, m, M, stride_xm, k_end, rstd,
    BLOCK_M: tl.constexpr, ONE_ROW: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
):  # fmt: skip
    """Group g's x [BLOCK_M, 128] for `_int4_pairs_dot`: x's two halves, interleaved, put input 64 t + h at column
    2 h + t. Unmasked, which spares a compare and a select per value: rows past M read row M - 1 (their columns are
    never stored), and a group past k_end (the weight zero there) reads the split's last group. ONE_ROW with NORM:
    every row is row 0, normalised once per input (by one thread, then broadcast), not once per padded row."""
    at = 128 * tl.minimum(g, k_end // 128 - 1)
    if ONE_ROW and NORM:
        h = at + tl.arange(0, 128)
        every = tl.full([128], 1, tl.int1)
        row = _x_tile(x_ptr, res_ptr, norm_ptr, h, every, h, every, rstd, NORM, HAS_RESIDUAL, ROUND_NORMED)
        row = tl.reshape(tl.trans(tl.reshape(row, [2, 64])), [128])  # [t, h] -> [h, t]
        x = tl.broadcast_to(row[None, :], [BLOCK_M, 128])
    else:
        rows = tl.minimum(m, M - 1)
        h = at + tl.arange(0, 64)
        every = tl.full([64], 1, tl.int1)
        low = _x_tile(x_ptr, res_ptr, norm_ptr, rows[:, None] * stride_xm + h[None, :], every[None, :], h, every,
                      rstd, NORM, HAS_RESIDUAL, ROUND_NORMED)  # fmt: skip
        high = _x_tile(x_ptr, res_ptr, norm_ptr, rows[:, None] * stride_xm + 64 + h[None, :], every[None, :], 64 + h,
                       every, rstd, NORM, HAS_RESIDUAL, ROUND_NORMED)  # fmt: skip
        x = tl.reshape(tl.join(low, high), [BLOCK_M, 128])
    return x


@triton.jit
def _int4_pairs_dot(
    words, zero, x, x_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):  # fmt: skip
    """A group's unscaled product [BLOCK_N, BLOCK_M] in one tensor-core dot over its 128 inputs (x from
    `_int4_pairs_x`), the unpacked weight the dot's register operand (never in shared memory): `_int4_pair` gives the
    nibble pairs (j, j + 4) of a word, so the dot's input column 32 j + 2 c + t is input 16 (j + 4 t) + c of the group
    (word c, nibble j + 4 t), as x's column 2 h + t is input 64 t + h. `q - zero` is exact in 16 bits."""
    dtype = x_ptr.dtype.element_ty
    even = tl.join(_int4_pair(words, 0, x_ptr, NATIVE_DOT), _int4_pair(words, 2, x_ptr, NATIVE_DOT))
    odd = tl.join(_int4_pair(words, 1, x_ptr, NATIVE_DOT), _int4_pair(words, 3, x_ptr, NATIVE_DOT))
    pairs = tl.join(even, odd)
    w = tl.reshape(tl.permute(pairs, (0, 3, 4, 1, 2)), [BLOCK_N, 128])  # [n, c, t, j // 2, j % 2] -> [n, j, c, t]
    if NATIVE_DOT:
        bias: tl.constexpr = 128.0 if dtype == tl.bfloat16 else 1024.0  # PAIR_MAGIC's
        w -= (zero + bias).to(dtype)[:, None]
    else:
        w -= zero[:, None]
    return _dot(w, x, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), x_ptr, PRECISION, NATIVE_DOT)


@triton.jit
def _int4_load(w_rows, s_ptr, z_ptr, n, n_mask, g, k_end, stride_sg, UNPACK: tl.constexpr):
    """Group g's packed words [BLOCK_N, 16], float32 scales and zeros (all zero past k_end: a step may run past its
    split's end). PAIRS, whose x is unmasked: past k_end the split's last words and zeros, loaded with no mask on K
    (a select fewer per word), and a zero scale."""
    live = n_mask & (tl.full(n.shape, 128 * g, tl.int32) < k_end)
    c = tl.arange(0, 16)
    read, at = live, g  # the words' and zeros' mask and group
    if UNPACK == PAIRS:
        read, at = n_mask, tl.minimum(g, k_end // 128 - 1)
    words = tl.load(w_rows + (16 * at + c)[None, :], mask=read[:, None], other=0, eviction_policy="evict_first")
    scale = tl.load(s_ptr + g * stride_sg + n, mask=live, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + at * stride_sg + n, mask=read, other=0).to(tl.float32)
    return words, scale, zero


@triton.jit
def _x_planes(x_ptr, res_ptr, norm_ptr, g, k_end, rstd, HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr):
    """Group g's 128 inputs of one row, normalised, as its 8 planes of 16 (plane j: inputs 16 j .. 16 j + 15). Each
    input is normalised once, by one thread, and the planes reach the layout the weight's broadcast needs in one move
    through shared memory: computed in that layout, the values would be recomputed by every thread that holds their
    words' column (32 per thread and group, with their conversions, against 64 weights at 2 rows a thread)."""
    k = 128 * g + tl.arange(0, 128)
    x = _x_tile(x_ptr, res_ptr, norm_ptr, k, k < k_end, k, k < k_end, rstd, True, HAS_RESIDUAL, ROUND_NORMED)
    x = tl.reshape(tl.trans(tl.reshape(x, [8, 16])), [16, 2, 2, 2])  # [c, j // 4, j // 2 % 2, j % 2]
    even, odd = tl.split(x)
    p04, p26 = tl.split(even)
    p15, p37 = tl.split(odd)
    p0, p4 = tl.split(p04)
    p2, p6 = tl.split(p26)
    p1, p5 = tl.split(p15)
    p3, p7 = tl.split(p37)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _int4_plane_product(
    group, words, high, j: tl.constexpr, zero, magic, x, x_ptr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr, UNPACK: tl.constexpr,
):  # fmt: skip
    """`group` plus plane j's product with x's plane (a vector for one row, [BLOCK_M, 16] for several)."""
    if UNPACK == MASKED:
        plane = _int4_plane_masked(words, high, j, zero, magic)
    else:
        plane = _int4_plane(words, j, zero + 8388608.0)
    if BLOCK_M == 1:
        group += plane * x[None, :]
    else:
        group = _dot(plane, x, group, x_ptr, PRECISION, NATIVE_DOT)
    return group


@triton.jit
def _int4_group(
    acc, up, gate_group, up_group, g, x_ptr, res_ptr, norm_ptr, m, M, stride_xm, k_end, rstd, magic,
    BLOCK_M: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    NATIVE_DOT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUND_NORMED: tl.constexpr,
    UNPACK: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """`acc` plus group g's product with the rows whose (words, scales, zeros) are `gate_group` (`_int4_load`), and
    with SILU_MUL `up` plus the up rows' (`up_group`), each x tile computed once for both: unpacked plane by plane
    (16 inputs each), a multiply-add for one row, a tensor-core dot for several, of the exact integers `q - zero`,
    scaled once; or in pairs (`_int4_pairs_dot`)."""
    words, scale, zero = gate_group
    up_words, up_scale, up_zero = up_group
    if UNPACK == PAIRS:
        x = _int4_pairs_x(x_ptr, res_ptr, norm_ptr, g, m, M, stride_xm, k_end, rstd, BLOCK_M, ONE_ROW, NORM,
                          HAS_RESIDUAL, ROUND_NORMED)  # fmt: skip
        product = _int4_pairs_dot(words, zero, x, x_ptr, BLOCK_M, BLOCK_N, PRECISION, NATIVE_DOT)
        if SILU_MUL:
            up_product = _int4_pairs_dot(up_words, up_zero, x, x_ptr, BLOCK_M, BLOCK_N, PRECISION, NATIVE_DOT)
    else:
        c = tl.arange(0, 16)
        width: tl.constexpr = 16 if BLOCK_M == 1 else BLOCK_M
        high = words >> 12
        up_high = up_words >> 12
        product = tl.zeros([BLOCK_N, width], tl.float32)
        up_product = tl.zeros([BLOCK_N, width], tl.float32)
        if NORM and ONE_ROW:
            planes = _x_planes(x_ptr, res_ptr, norm_ptr, g, k_end, rstd, HAS_RESIDUAL, ROUND_NORMED)
        for j in tl.static_range(8):
            if NORM and ONE_ROW:
                x = planes[j]
                if BLOCK_M > 1:  # the tensor cores' padded rows: row 0's plane (the padding's columns are not stored)
                    x = tl.broadcast_to(x[None, :], [BLOCK_M, 16])
            else:
                k = 128 * g + 16 * j + c
                offsets, mask = _x_offsets(m, k, k < k_end, M, stride_xm, BLOCK_M)
                x = _x_tile(x_ptr, res_ptr, norm_ptr, offsets, mask, k, k < k_end, rstd, NORM, HAS_RESIDUAL,
                            ROUND_NORMED)  # fmt: skip
            product = _int4_plane_product(product, words, high, j, zero, magic, x, x_ptr, BLOCK_M, PRECISION,
                                          NATIVE_DOT, UNPACK)  # fmt: skip
            if SILU_MUL:
                up_product = _int4_plane_product(up_product, up_words, up_high, j, up_zero, magic, x, x_ptr,
                                                 BLOCK_M, PRECISION, NATIVE_DOT, UNPACK)  # fmt: skip
    acc += product * scale[:, None]
    if SILU_MUL:
        up += up_product * up_scale[:, None]
    return acc, up


@triton.jit
def _int4_product(
    x_ptr, res_ptr, norm_ptr, w_rows, up_rows, s_ptr, z_ptr, n, N, n_mask, m, M, stride_xm, stride_sg, k_start,
    k_end, rstd, magic,
    BLOCK_M: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ROUND_NORMED: tl.constexpr, UNPACK: tl.constexpr, PREFETCH: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """The products [BLOCK_M, BLOCK_N] of the rows of x with the int4 weight rows `n` (packed words at `w_rows`,
    scales and zeros at column n of the group-major [groups, N] tables) and, with SILU_MUL, with the up rows n + N
    (at `up_rows`; else the second product is the first), over inputs k_start .. k_end, whole groups of 128
    (engine.quant has the layout), `_int4_group` by group. PREFETCH: group by group, the next group's words loaded
    before this one's are unpacked (the compiler pipelines no load that feeds only registers), else BLOCK_K // 128
    groups per step."""
    width: tl.constexpr = 16 if BLOCK_M == 1 else BLOCK_M  # one row: products summed over the plane at the end
    acc = tl.zeros([BLOCK_N, width], tl.float32)
    up = tl.zeros([BLOCK_N, width], tl.float32)
    if PREFETCH:
        gate_group = _int4_load(w_rows, s_ptr, z_ptr, n, n_mask, k_start // 128, k_end, stride_sg, UNPACK)
        up_group = gate_group
        if SILU_MUL:
            up_group = _int4_load(up_rows, s_ptr, z_ptr, n + N, n_mask, k_start // 128, k_end, stride_sg, UNPACK)
        for g in range(k_start // 128, k_end // 128):
            gate_next = _int4_load(w_rows, s_ptr, z_ptr, n, n_mask, g + 1, k_end, stride_sg, UNPACK)
            up_next = gate_next
            if SILU_MUL:
                up_next = _int4_load(up_rows, s_ptr, z_ptr, n + N, n_mask, g + 1, k_end, stride_sg, UNPACK)
            acc, up = _int4_group(acc, up, gate_group, up_group, g, x_ptr, res_ptr, norm_ptr, m, M, stride_xm, k_end,
                                  rstd, magic, BLOCK_M, ONE_ROW, BLOCK_N, PRECISION, NATIVE_DOT, NORM, HAS_RESIDUAL,
                                  ROUND_NORMED, UNPACK, SILU_MUL)  # fmt: skip
            gate_group, up_group = gate_next, up_next
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            for t in tl.static_range(BLOCK_K // 128):
                g = k0 // 128 + t
                gate_group = _int4_load(w_rows, s_ptr, z_ptr, n, n_mask, g, k_end, stride_sg, UNPACK)
                up_group = gate_group
                if SILU_MUL:
                    up_group = _int4_load(up_rows, s_ptr, z_ptr, n + N, n_mask, g, k_end, stride_sg, UNPACK)
                acc, up = _int4_group(acc, up, gate_group, up_group, g, x_ptr, res_ptr, norm_ptr, m, M, stride_xm,
                                      k_end, rstd, magic, BLOCK_M, ONE_ROW, BLOCK_N, PRECISION, NATIVE_DOT, NORM,
                                      HAS_RESIDUAL, ROUND_NORMED, UNPACK, SILU_MUL)  # fmt: skip
    if BLOCK_M == 1:
        product, up_product = tl.sum(acc, axis=1)[None, :], tl.sum(up, axis=1)[None, :]
    else:
        product, up_product = tl.trans(acc), tl.trans(up)
    return product, up_product


@triton.jit
def _prefetch_l2(w_ptr, rows, n_mask, k_start, k_end, BLOCK_K: tl.constexpr):
    """Ask L2 for the strip's first two weight tiles, one 128-byte line per request (masked-off lines become
    requests for the weight's first line)."""
    per_line: tl.constexpr = 128 // (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    span: tl.constexpr = 2 * BLOCK_K if per_line < 2 * BLOCK_K else per_line  # at least one line (int8, narrow K)
    k = k_start + tl.arange(0, span // per_line) * per_line
    lines = tl.where(n_mask[:, None] & (k[None, :] < k_end), rows + k[None, :], w_ptr)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _rstd(sums, m, K, eps, ONE_ROW: tl.constexpr):
    """RMSNorm's 1 / rms from the rows' sums of squares [BLOCK_M]: a column [BLOCK_M, 1], or a scalar for one row
    (ONE_ROW, also padded to BLOCK_M rows): a [1] vector would carry the reduction's layout into every x tile, each
    then converted through shared memory to the layout the weight's broadcast needs."""
    rstd = tl.math.rsqrt(sums / K + eps)
    if ONE_ROW:  # noqa: SIM108 (one return: Triton types every return alike, even in a branch never compiled)
        rstd = tl.sum(tl.where(m == 0, rstd, 0.0), axis=0)
    else:
        rstd = rstd[:, None]
    return rstd


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    res_ptr,
    norm_ptr,
    h_ptr,
    sq_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sg,
    stride_om,
    k_per_split,
    eps,
    n_sq,
    magic,
    BLOCK_M: tl.constexpr,
    ONE_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SQ: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PARTIALS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_GDC: tl.constexpr,
    FORMAT: tl.constexpr,
    UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """w_ptr, s_ptr, z_ptr: the weight as its FORMAT holds it (`Weight.tensors()`: DENSE rows, INT8 rows and a scale
    per row, INT4 packed rows and [groups, N] scales and zeros, stride_sg apart); res_ptr: the residual added in the
    norm prologue (HAS_RESIDUAL) or the epilogue (ADD_RESIDUAL); sq_ptr: the [n_sq, M] partial sums of squares the
    prologue reads (PARTIALS) or the [programs, M] ones the epilogue writes; part_ptr, count_ptr: with SPLIT_K, the
    float32 [SPLIT_K, 1 or 2, M, N] products of each split and a zeroed counter per strip. ONE_ROW: M == 1, also
    where the tensor cores pad it to BLOCK_M rows."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    INT8_WORDS: tl.constexpr = FORMAT == INT8 and BLOCK_M == 1 and UNPACK == MASKED  # _int8_words_product
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    up_rows = w_ptr + (n + N).to(tl.int64)[:, None] * stride_wn  # with SILU_MUL: up row j follows the N gate rows

    k_first = k_start + tl.arange(0, BLOCK_K)  # own names: a reassigned name would become loop-carried below
    mask_first = k_first < k_end
    # The first weight tiles depend on no other kernel: in flight before the wait below. One row holds them in
    # registers; several rows would need shared memory for them too (a program fewer per SM), so fetch into L2, as
    # for int4, whose loop unpacks group by group.
    if FORMAT == INT4:
        if USE_GDC:
            _prefetch_l2(w_ptr, w_rows, n_mask, k_start // 8, k_end // 8, BLOCK_K // 8)
            if SILU_MUL:
                _prefetch_l2(w_ptr, up_rows, n_mask, k_start // 8, k_end // 8, BLOCK_K // 8)
    elif INT8_WORDS:
        if USE_GDC:
            _prefetch_l2(w_ptr, w_rows, n_mask, k_start // 4, k_end // 4, BLOCK_K // 4)
            if SILU_MUL:
                _prefetch_l2(w_ptr, up_rows, n_mask, k_start // 4, k_end // 4, BLOCK_K // 4)
    elif BLOCK_M == 1:
        w_first = tl.load(w_rows + k_first[None, :], mask=n_mask[:, None] & mask_first[None, :], other=0.0,
                          eviction_policy="evict_first")  # fmt: skip
        if SILU_MUL:
            u_first = tl.load(up_rows + k_first[None, :], mask=n_mask[:, None] & mask_first[None, :], other=0.0,
                              eviction_policy="evict_first")  # fmt: skip
    elif USE_GDC:
        _prefetch_l2(w_ptr, w_rows, n_mask, k_start, k_end, BLOCK_K)
        if SILU_MUL:
            _prefetch_l2(w_ptr, up_rows, n_mask, k_start, k_end, BLOCK_K)
    if USE_GDC:  # launched early (pdl.py): wait for the previous kernel's writes before reading its outputs
        tl.extra.cuda.gdc_wait()
    rstd = 1.0
    if NORM and PARTIALS:  # the producer of x summed the squares: add up its programs' partials, in a fixed order
        p = tl.arange(0, BLOCK_P)
        partials = tl.load(sq_ptr + p[None, :] * M + m[:, None], mask=(p[None, :] < n_sq) & (m[:, None] < M), other=0.0)
        rstd = _rstd(tl.sum(partials, axis=1), m, K, eps, ONE_ROW)
    elif NORM:  # first pass, over the whole row whatever this program's K split: the sum of squares
        squares = tl.zeros([BLOCK_M, BLOCK_SQ], tl.float32)  # a single row's vector broadcasts to [1, BLOCK_SQ]
        h_end = tl.where(pid_n + split == 0, K, 0)  # the first program writes x + residual out
        for k0 in range(0, K, BLOCK_SQ):
            k = k0 + tl.arange(0, BLOCK_SQ)
            offsets, mask = _x_offsets(m, k, k < K, M, stride_xm, BLOCK_M)
            h = _residual_tile(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(h_ptr + offsets, h, mask=mask & (k < h_end))
            h = h.to(tl.float32)
            squares += h * h
        rstd = _rstd(tl.sum(squares, axis=1), m, K, eps, ONE_ROW)

    if FORMAT == INT4:
        acc, up = _int4_product(x_ptr, res_ptr, norm_ptr, w_rows, up_rows, s_ptr, z_ptr, n, N, n_mask, m, M,
                                stride_xm, stride_sg, k_start, k_end, rstd, magic, BLOCK_M, ONE_ROW, BLOCK_N, BLOCK_K,
                                PRECISION, NATIVE_DOT, NORM, HAS_RESIDUAL, ROUND_NORMED, UNPACK, PREFETCH,
                                SILU_MUL)  # fmt: skip
    elif INT8_WORDS:
        acc, up = _int8_words_product(x_ptr, res_ptr, norm_ptr, w_rows, up_rows, n_mask, k_start, k_end, rstd, magic,
                                      BLOCK_N, BLOCK_K, NORM, HAS_RESIDUAL, ROUND_NORMED, SILU_MUL)  # fmt: skip
        acc *= tl.load(s_ptr + n, mask=n_mask, other=0.0)[None, :]
        if SILU_MUL:
            up *= tl.load(s_ptr + n + N, mask=n_mask, other=0.0)[None, :]
    elif BLOCK_M == 1:
        x_first = _x_tile(x_ptr, res_ptr, norm_ptr, k_first, mask_first, k_first, mask_first, rstd, NORM,
                          HAS_RESIDUAL, ROUND_NORMED)  # fmt: skip
        acc2d = _values(w_first, FORMAT) * x_first[None, :]
        if SILU_MUL:
            up2d = _values(u_first, FORMAT) * x_first[None, :]
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            x = _x_tile(x_ptr, res_ptr, norm_ptr, k, k_mask, k, k_mask, rstd, NORM, HAS_RESIDUAL, ROUND_NORMED)
            acc2d += _values(w, FORMAT) * x[None, :]
            if SILU_MUL:
                u = tl.load(up_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")  # fmt: skip
                up2d += _values(u, FORMAT) * x[None, :]
        acc = tl.sum(acc2d, axis=1)[None, :]
        if SILU_MUL:
            up = tl.sum(up2d, axis=1)[None, :]
        if FORMAT == INT8:  # per output row: one multiply at the end
            acc *= tl.load(s_ptr + n, mask=n_mask, other=0.0)[None, :]
            if SILU_MUL:
                up *= tl.load(s_ptr + n + N, mask=n_mask, other=0.0)[None, :]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # transposed: see _dot
        if SILU_MUL:
            up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            offsets, mask = _x_offsets(m, k, k_mask, M, stride_xm, BLOCK_M)
            x = _x_tile(x_ptr, res_ptr, norm_ptr, offsets, mask, k, k_mask, rstd, NORM, HAS_RESIDUAL, ROUND_NORMED)
            acc = _dot(w, x, acc, x_ptr, PRECISION, NATIVE_DOT)  # int8 converts plainly there (exact, see _dot)
            if SILU_MUL:
                u = tl.load(up_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")  # fmt: skip
                up = _dot(u, x, up, x_ptr, PRECISION, NATIVE_DOT)
        if FORMAT == INT8:
            acc *= tl.load(s_ptr + n, mask=n_mask, other=0.0)[:, None]
            if SILU_MUL:
                up *= tl.load(s_ptr + n + N, mask=n_mask, other=0.0)[:, None]
        acc = tl.trans(acc)
        if SILU_MUL:
            up = tl.trans(up)

    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    if not SILU_MUL:
        up = acc  # unused
    out_mask = (m[:, None] < M) & n_mask[None, :]
    if SPLIT_K == 1:
        _epilogue(acc, up, m, n, out_mask, pid_n, M, stride_om, out_ptr, res_ptr, sq_ptr,
                  SILU_MUL, ADD_RESIDUAL)  # fmt: skip
    else:  # the last split of a strip to finish adds up every split's product, in split order, and finishes it
        part = part_ptr + m[:, None] * N + n[None, :]
        plane = M * N
        planes = 2 if SILU_MUL else 1  # gate and up
        tl.store(part + planes * split * plane, acc, mask=out_mask)
        if SILU_MUL:
            tl.store(part + (2 * split + 1) * plane, up, mask=out_mask)
        # Every thread's stores before the (one-thread) release; the acquire makes the others' visible to the last.
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for i in tl.static_range(SPLIT_K):
                acc += tl.load(part + planes * i * plane, mask=out_mask, other=0.0, cache_modifier=".cg")
                if SILU_MUL:
                    up += tl.load(part + (2 * i + 1) * plane, mask=out_mask, other=0.0, cache_modifier=".cg")
            _epilogue(acc, up, m, n, out_mask, pid_n, M, stride_om, out_ptr, res_ptr, sq_ptr, SILU_MUL,
                      ADD_RESIDUAL)  # fmt: skip
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _epilogue(
    acc, up, m, n, out_mask, pid_n, M, stride_om, out_ptr, res_ptr, sq_ptr,
    SILU_MUL: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Store the finished product [BLOCK_M, BLOCK_N] of a strip: `silu(gate) * up`, or `residual + product` with
    the strip's sums of squares (ADD_RESIDUAL), or the product itself."""
    if SILU_MUL:  # round gate, silu and up as the unfused linear and silu_mul do; the last product rounds at the store
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = act * up.to(out_ptr.dtype.element_ty).to(tl.float32)
    if ADD_RESIDUAL:  # h = residual + product, rounded as the unfused linear and add round; squares of this strip
        r = tl.load(res_ptr + m[:, None] * stride_om + n[None, :], mask=out_mask, other=0.0)
        acc = (acc.to(out_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        h32 = acc.to(tl.float32)
        tl.store(sq_ptr + pid_n * M + m, tl.sum(h32 * h32, axis=1), mask=m < M)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (format, rows, N, K) -> GemvConfig's fields: the fastest config `bench_kernels --quant-sweep` timed on an H200
# (TUNED_SMS multiprocessors) at rows 1, 8 and 32, pasted from its output; BENCHMARKS.md has the timings.
TUNED: dict[tuple[str, int, int, int], tuple] = {
    ("int4", 1, 4096, 4096): (64, 256, 8, 4, 3, False, "mask", False),
    ("int4", 1, 4096, 11008): (64, 256, 8, 4, 3, False, "mask", False),
    ("int4", 1, 12288, 4096): (128, 256, 4, 8, 3, False, "mask", False),
    ("int4", 1, 22016, 4096): (64, 256, 4, 4, 3, False, "mask", False),
    ("int4", 1, 32016, 4096): (128, 128, 2, 2, 3, False, "mask", False),
    ("int4", 8, 4096, 4096): (64, 128, 4, 4, 3, False, "mask", False),
    ("int4", 8, 4096, 11008): (64, 256, 4, 4, 3, False, "mask", False),
    ("int4", 8, 12288, 4096): (64, 128, 4, 4, 3, False, "mask", False),
    ("int4", 8, 22016, 4096): (64, 128, 4, 4, 3, False, "mask", False),
    ("int4", 8, 32016, 4096): (128, 128, 2, 4, 3, False, "mask", False),
    ("int4", 32, 4096, 4096): (128, 256, 4, 8, 4, False, "mask", False),
    ("int4", 32, 4096, 11008): (128, 256, 4, 8, 4, False, "mask", False),
    ("int4", 32, 12288, 4096): (128, 128, 4, 4, 3, False, "mask", False),
    ("int4", 32, 22016, 4096): (128, 128, 2, 4, 3, False, "mask", False),
    ("int4", 32, 32016, 4096): (128, 128, 2, 4, 3, False, "shift", False),
    ("int8", 1, 4096, 4096): (8, 512, 2, 4, 3, False, "shift", False),
    ("int8", 1, 4096, 11008): (32, 512, 4, 4, 3, False, "mask", False),
    ("int8", 1, 12288, 4096): (32, 512, 1, 4, 3, False, "mask", False),
    ("int8", 1, 22016, 4096): (16, 1024, 1, 4, 3, False, "mask", False),
    ("int8", 1, 32016, 4096): (32, 256, 1, 2, 3, False, "mask", False),
    ("int8", 8, 4096, 4096): (32, 256, 4, 4, 4, False, "mask", False),
    ("int8", 8, 4096, 11008): (32, 256, 4, 4, 4, False, "mask", False),
    ("int8", 8, 12288, 4096): (32, 256, 1, 4, 3, False, "mask", False),
    ("int8", 8, 22016, 4096): (32, 256, 2, 4, 3, False, "mask", False),
    ("int8", 8, 32016, 4096): (32, 256, 1, 4, 3, False, "mask", False),
    ("int8", 32, 4096, 4096): (64, 256, 4, 4, 3, False, "mask", False),
    ("int8", 32, 4096, 11008): (64, 256, 4, 4, 3, False, "mask", False),
    ("int8", 32, 12288, 4096): (64, 256, 2, 4, 3, False, "mask", False),
    ("int8", 32, 22016, 4096): (64, 128, 1, 4, 3, False, "mask", False),
    ("int8", 32, 32016, 4096): (64, 128, 1, 4, 3, False, "mask", False),
}
TUNED_SMS = 132


def choose_config(m: int, n: int, k: int, sm_count: int, fmt: str = "dense") -> GemvConfig:
    """The config for `fmt`'s weight [n, k] at m rows: the sweep's (`_tuned`) where it timed the shape on this GPU,
    else `_int4_config` for int4, `_dense_config` for dense and int8 (the same loop, its scale applied once per row)."""
    tuned = _tuned(m, n, k, fmt) if sm_count == TUNED_SMS else None
    if tuned is not None:
        return tuned
    if fmt == "int4":
        return _int4_config(m, n, k, sm_count)
    return _dense_config(m, n, k, sm_count)


def _tuned(m: int, n: int, k: int, fmt: str) -> GemvConfig | None:
    """TUNED's config for the shape: one row's for one row; several rows take the entry of the smallest swept row
    count at least m (the largest past them), as the tile's padded rows grow with m."""
    rows = sorted(r for f, r, nn, kk in TUNED if (f, nn, kk) == (fmt, n, k) and (r == 1) == (m == 1))
    if not rows:
        return None
    return GemvConfig(*TUNED[(fmt, next((r for r in rows if r >= m), rows[-1]), n, k)])


def _int4_config(m: int, n: int, k: int, sm_count: int) -> GemvConfig:
    """A fixed rule until a sweep on the GPU (`bench_kernels --quant-sweep`) sets it: two groups of 128 inputs per
    step (128 bytes per weight row). One row: strips of 128 rows where that still gives a strip per SM, else 64 (each
    thread holds several rows, so the x values it computes, norm included, serve several weights), K split until
    there are two programs per SM or a split would hold fewer than four groups. Several rows: the tensor-core tile's
    64 rows, K split where the strips leave SMs idle and K is long."""
    block_k = 256
    if m == 1:
        block_n = 128 if triton.cdiv(n, 128) >= sm_count else 64
        enough, long_k = 2 * sm_count, 2 * block_k
    else:
        block_n, enough, long_k = 64, sm_count, 8 * block_k
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < enough and k // (split_k * 2) >= long_k:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


def _dense_config(m: int, n: int, k: int, sm_count: int) -> GemvConfig:
    """A fixed rule (timed on the H100 against the alternatives, BENCHMARKS.md). One row: the widest row strip
    that still gives about three programs per SM (wider strips mean fewer, longer programs, less waste at the
    tail; narrower ones more programs in flight), K split only when even the narrowest strips leave SMs short of
    work. Several rows: strips of 64 or 128 weight rows, a tensor-core tile's long side (128 where that still gives
    1.5 programs per SM); K split only where the strips leave half the SMs idle and K is long; a deeper pipeline
    where programs are fewer than SMs."""
    if m == 1:
        block_n, block_k = 8, 512
        for candidate in (32, 16):  # 64 x 512 fp32 accumulators spill registers
            if triton.cdiv(n, candidate) >= 3 * sm_count:
                block_n = candidate
                break
        split_k = 1
        while triton.cdiv(n, block_n) * split_k < 2 * sm_count and k // (split_k * 2) >= 4 * block_k:
            split_k *= 2
        return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)
    block_n, block_k, split_k = 128 if 2 * triton.cdiv(n, 128) >= 3 * sm_count else 64, 128, 1
    while 2 * triton.cdiv(n, block_n) * split_k <= sm_count and k // (split_k * 2) >= 32 * block_k:
        split_k *= 2
    stages = 4 if triton.cdiv(n, block_n) * split_k < sm_count else 3
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=stages)


def _rule_config(x2: Tensor, w: Tensor | Weight) -> GemvConfig:
    fmt = "dense" if isinstance(w, Tensor) else w.format
    return choose_config(x2.shape[0], *w.shape, _sm_count(x2.device.index or 0) if x2.is_cuda else 132, fmt)


def _launch(
    x2: Tensor,
    w: Tensor | Weight,
    config: GemvConfig,
    norm: tuple[Tensor | None, Tensor, float, Tensor, Tensor | None] | None = None,
    silu_mul: bool = False,
    add: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run the kernel on x2 [M, K]. `norm` is (residual or None, norm weight, eps, buffer for x + residual, the
    partial sums of squares of x or None); `add` is (residual [M, N], buffer for the [programs, M] squares)."""
    m, k = x2.shape
    assert m <= MAX_ROWS, f"{m} rows: the GEMV takes at most {MAX_ROWS}"
    fmt = "dense" if isinstance(w, Tensor) else w.format
    data, scales, zeros = (w, None, None) if isinstance(w, Tensor) else w.tensors()
    assert fmt != "int4" or config.block_k % 128 == 0, f"int4 takes whole groups of 128: BLOCK_K {config.block_k}"
    if data.stride(1) != 1:
        data = data.contiguous()
    unpack = config.unpack
    assert unpack != "pairs" or fmt == "int4", f"unpack='pairs' is int4's, not {fmt}'s"
    tensor_cores = config.tensor_cores or unpack == "pairs"
    block_m = 1 if m == 1 and not tensor_cores else max(16, triton.next_power_of_2(m))
    if fmt == "int8" and block_m == 1 and unpack == "mask":  # _int8_words_product: four weights to a word
        if k % 4 == 0 and data.storage_offset() % 4 == 0:
            data = data.view(torch.int32)
        else:
            unpack = "shift"
    residual, norm_weight, eps, h, squares = norm if norm is not None else (None, x2, 0.0, x2, None)  # x2: unused
    if add is not None:
        residual, squares = add
    normed_dtype = torch.promote_types(x2.dtype, norm_weight.dtype)
    out_dtype = torch.promote_types(normed_dtype, w.dtype)
    n, block_n = data.shape[0], config.block_n
    if silu_mul:  # gate and up strips of half the width: the same weight bytes per program as the plain GEMV
        n, block_n = n // 2, max(block_n // 2, 1 if block_m == 1 else 16)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    gdc = pdl.enabled(x2)
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    strips = triton.cdiv(n, block_n)
    if config.split_k > 1:
        parts = torch.empty((config.split_k, 2 if silu_mul else 1, m, n), dtype=torch.float32, device=x2.device)
        counts = counters.zeroed(x2.device, strips)
    else:
        parts = counts = out  # unused
    partials = squares is not None and add is None
    # Quantized weights enter the dot as small integers (int4: q - zero), exact in x's 16-bit dtype.
    native_dot = x2.dtype in (torch.float16, torch.bfloat16) and x2.dtype == w.dtype and normed_dtype == x2.dtype
    native_dot &= not INTERPRETED  # the interpreter's bfloat16 dot returns garbage; float32 copies give the same sums
    precision = dot_precision(data.dtype if fmt == "dense" else x2.dtype)
    _gemv_kernel[(strips, config.split_k)](
        x2, data, scales if scales is not None else data, zeros if zeros is not None else data, out,
        residual if residual is not None else x2, norm_weight, h, squares if squares is not None else x2,
        parts, counts, m, n, k, x2.stride(0), data.stride(0), scales.stride(0) if fmt == "int4" else 0, out.stride(0),
        k_per_split, eps, squares.shape[0] if partials else 0, MAGIC,
        BLOCK_M=block_m, ONE_ROW=m == 1, BLOCK_N=block_n, BLOCK_K=config.block_k,
        BLOCK_SQ=4 * config.block_k if block_m == 1 else config.block_k, PRECISION=precision,
        NATIVE_DOT=native_dot, NORM=norm is not None, HAS_RESIDUAL=norm is not None and residual is not None,
        ROUND_NORMED=normed_dtype == x2.dtype, SILU_MUL=silu_mul, PARTIALS=partials,
        BLOCK_P=triton.next_power_of_2(squares.shape[0]) if partials else 1, ADD_RESIDUAL=add is not None,
        SPLIT_K=config.split_k, USE_GDC=gdc, FORMAT=FORMATS[fmt], UNPACK=UNPACKS[unpack],
        PREFETCH=config.prefetch,
        num_warps=config.num_warps,
        num_stages=config.num_stages, launch_pdl=gdc,
    )  # fmt: skip
    return out


def linear(x: Tensor, w: Tensor | Weight, config: GemvConfig | None = None) -> Tensor:
    """`x @ w.T` for x [..., K] with at most MAX_ROWS rows; more rows go to `F.linear`."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] > MAX_ROWS:
        return F.linear(x, w) if isinstance(w, Tensor) else w.linear(x)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return _launch(x2, w, config or _rule_config(x2, w)).view(*lead, -1)


def linear_residual(x: Tensor, w: Tensor | Weight, residual: Tensor, config: GemvConfig) -> tuple[Tensor, Tensor]:
    """`(residual + x @ w.T, squares)` in one launch, for x [M, K] and residual [M, N] of one dtype: `squares`
    [strips, M] holds each strip's float32 sum of the squares of its part of the sum."""
    assert residual.dtype == x.dtype
    x2 = x.contiguous()
    squares = torch.empty((triton.cdiv(w.shape[0], config.block_n), x2.shape[0]), dtype=torch.float32, device=x.device)
    return _launch(x2, w, config, add=(residual.contiguous(), squares)), squares


def norm_linear(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    w: Tensor | Weight,
    config: GemvConfig | None = None,
    silu_mul: bool = False,
    squares: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`(linear(rms_norm(h), w), h)` with `h = x + residual` (x if residual is None) in one launch, for x
    [..., K] with at most MAX_ROWS rows; with `silu_mul`, w is the fused gate/up weight and the output
    `silu(gate) * up`. x and residual share a dtype. `squares` (with no residual): `linear_residual`'s partial
    sums of squares of x, which spare every program the pass over the row."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k).contiguous()
    res2 = residual.reshape(-1, k).contiguous() if residual is not None else None
    h = torch.empty_like(x2) if residual is not None else x2
    config = config or _rule_config(x2, w)
    out = _launch(x2, w, config, (res2, norm_weight.contiguous(), eps, h, squares if res2 is None else None), silu_mul)
    return out.view(*lead, -1), (h.view(x.shape) if residual is not None else x)
