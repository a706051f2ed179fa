"""SwiGLU's `silu(gate) * up` in one Triton pass over the fused gate/up output.

Unfused it is three kernels (silu, multiply, and a copy for the strided halves) per layer per step;
in a decode graph each launch costs about as much as the arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:  # launched early (pdl.py); the next kernel may start now, as it too waits before reading
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    # Round silu to the input dtype before the product, as the unfused PyTorch ops do; the product of two
    # 16-bit values is exact in float32, so one rounding at the store matches a 16-bit multiply.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu: Tensor) -> Tensor:
    """`gu [..., 2I]` (gate then up) -> `silu(gate) * up [..., I]`."""
    n_cols = gu.shape[-1] // 2
    gu2 = gu.reshape(-1, 2 * n_cols).contiguous()
    out = torch.empty((gu2.shape[0], n_cols), dtype=gu.dtype, device=gu.device)
    gdc = pdl.enabled(gu2)
    _silu_mul_kernel[(gu2.shape[0], triton.cdiv(n_cols, BLOCK))](
        gu2, out, n_cols, BLOCK=BLOCK, USE_GDC=gdc, num_warps=4, launch_pdl=gdc
    )
    return out.view(*gu.shape[:-1], n_cols)
