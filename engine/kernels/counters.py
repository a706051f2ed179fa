"""Zeroed int32 counters for kernels whose last program to finish a piece of work does the rest of it (an atomic
count per piece; the last one resets it, so every call leaves them zeroed, CUDA-graph replays included)."""

from __future__ import annotations

import torch
from torch import Tensor

_COUNTERS: dict[torch.device, list[Tensor]] = {}


def zeroed(device: torch.device, n: int) -> Tensor:
    """At least `n` zeroed counters: one buffer per device shared by every kernel and call. Kernels of one stream
    never count at once (a kernel launched early waits for its predecessor before it counts). A larger buffer is
    added when needed; the smaller ones stay alive, as captured graphs may use them."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        buffers.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return buffers[-1]
