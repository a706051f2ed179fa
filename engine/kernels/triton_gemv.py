"""`x @ w.T` for decode-sized x (a few rows) in Triton, streaming the weight at copy bandwidth.

With one to a few tokens per step a linear layer is a pass over its weight and nothing else, so
the kernel is built to keep the memory system busy: each program owns a strip of BLOCK_N weight
rows and walks K in BLOCK_K-wide steps (16-byte loads along K), there are several programs per SM
to hide latency, and the weight is marked evict-first so it does not push x out of the cache.
A single row (M == 1) is a pure multiply-add into a [BLOCK_N, BLOCK_K] accumulator reduced once
at the end; 2..16 rows use a tensor-core dot with the rows padded to 16 (TF32 on float32 copies of
the tiles, exact for 16-bit inputs). When N alone gives too few programs, K is split and the fp32
partials are summed in a fixed order, so results stay deterministic.

Configs are chosen by a fixed rule (no autotuning, so CUDA-graph capture never benchmarks);
`python -m engine.kernels.bench_kernels --sweep` times alternatives on the real GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_attention import dot_precision

MAX_ROWS = 16  # larger batches go to cuBLAS, which is compute-efficient there


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn

    if BLOCK_M == 1:
        acc2d = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            x = tl.load(x_ptr + k, mask=k_mask, other=0.0, eviction_policy="evict_last")
            acc2d += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc2d, axis=1)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & k_mask[None, :],
                        other=0.0, eviction_policy="evict_last")  # fmt: skip
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)

    out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & n_mask[None, :])


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int, n: int, k: int, sm_count: int) -> GemvConfig:
    """A fixed rule: the widest row strip that still gives about three programs per SM.

    Wider strips mean fewer, longer programs (less waste at the tail); narrower ones more
    programs in flight. K is split only when even the narrowest strips leave SMs short of work.
    """
    narrowest = 8 if m == 1 else 16  # the tensor-core dot needs 16 rows of w
    block_n = narrowest
    for candidate in (32, 16) if m == 1 else (64, 32, 16):  # 64 x 512 fp32 accumulators spill registers
        if candidate >= narrowest and triton.cdiv(n, candidate) >= 3 * sm_count:
            block_n = candidate
            break
    block_k = 512 if m == 1 else 128
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < 2 * sm_count and k // (split_k * 2) >= 4 * block_k:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


def linear(x: Tensor, w: Tensor, config: GemvConfig | None = None) -> Tensor:
    """`x @ w.T` for x [..., K] with at most MAX_ROWS rows; more rows go to `F.linear`."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], w.shape[0]
    if m > MAX_ROWS:
        return F.linear(x, w)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    if config is None:
        config = choose_config(m, n, k, _sm_count(x.device.index or 0) if x.is_cuda else 132)
    out_dtype = torch.promote_types(x.dtype, w.dtype)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    if config.split_k == 1:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    else:
        out = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k)](
        x2, w, out, m, n, k, x2.stride(0), w.stride(0),
        out.stride(0) if config.split_k > 1 else 0, out.stride(-2), k_per_split,
        BLOCK_M=1 if m == 1 else 16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PRECISION=dot_precision(w.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if config.split_k > 1:
        out = out.sum(0).to(out_dtype)
    return out.view(*lead, n)
