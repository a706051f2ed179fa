"""GPTQ (Frantar et al., 2022) for our int4 layout: each weight's columns are quantized one at a time, and each
one's rounding error is spread over the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs, so the layer's output on the calibration activations moves as little as possible.

`Hessian` sums `2 X^T X / n` over the calibration inputs X of one projection; `quantize` takes the weight and that
sum and returns engine.quant's int4 tensors. Act order: the columns go in order of decreasing Hessian diagonal (the
inputs that matter most first, while the most columns are left to absorb their error), with static groups: each
group's scale and zero come from the weight as it is, before any error feedback, so the groups stay 128 consecutive
inputs in the weight's own order and our int4 kernels run the result as they run round-to-nearest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine import quant

BLOCK = 128  # columns updated together before their error reaches the rest (the lazy batch update)


class Hessian:
    """`2 X^T X / n` over the rows of every input `x [..., k]` added (float32, on x's device)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.sum = torch.zeros(k, k, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.n + x.shape[0]
        self.sum.mul_(self.n / total).addmm_(x.T, x, alpha=2 / total)
        self.n = total


def _grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """Round-to-nearest's float16 scales and zeros `[k / 128, n]` of `w [n, k]` (engine.quant's rule)."""
    _, scales, zeros = quant.quantize_int4(w)
    return scales, zeros


def quantize(w: Tensor, hessian: Tensor, act_order: bool = True, damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """`(qweight, scales, zeros)` in engine.quant's int4 layout for `w [n, k]`, by GPTQ against `hessian [k, k]`.
    `damp`: the share of the mean diagonal added to it, so that its Cholesky factor exists."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs never seen: nothing to preserve
    h[dead, dead] = 1
    w[:, dead] = 0
    scales, zeros = _grid(w)
    s = scales.float().T.repeat_interleave(quant.GROUP, 1)  # [n, k]: each input's group's scale and zero
    z = zeros.float().T.repeat_interleave(quant.GROUP, 1)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h, s, z = w[:, order], h[order][:, order], s[:, order], z[:, order]
    h.diagonal().add_(damp * torch.diag(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H^-1 = U^T U
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block, errors = w[:, start:end].clone(), torch.empty(n, end - start, device=w.device)
        for i in range(end - start):
            col, c = block[:, i], start + i
            qi = (col / s[:, c]).round_().add_(z[:, c]).clamp_(0, 15)
            q[:, c] = qi.to(torch.uint8)
            error = (col - (qi - z[:, c]) * s[:, c]) / u[c, c]
            block[:, i:].sub_(error[:, None] * u[c, c:end][None, :])
            errors[:, i] = error
        w[:, end:].sub_(errors @ u[start:end, end:])
    unsorted = torch.empty_like(q)
    unsorted[:, order] = q
    return quant.pack_int4(unsorted), scales, zeros
