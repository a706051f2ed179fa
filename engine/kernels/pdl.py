"""Programmatic dependent launch (Hopper and newer) for the decode step's Triton kernels.

In a CUDA graph every kernel normally waits for the previous one to finish and flush before its programs
start: a few µs of ramp-up per launch, over 200 launches per step. Launched with PDL, a kernel's programs
are placed while the previous kernel's last programs finish, and each waits (`griddepcontrol.wait`, the
first thing every participating kernel does) until that kernel's writes are visible; a kernel lets its
successor launch (`griddepcontrol.launch_dependents`) once its main loop is done. `CODELLAMA_TUI_PDL=0`
turns it off (to measure what it gives).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(t: Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL (CUDA, compute capability 9.0 or newer)."""
    return t.is_cuda and os.environ.get("CODELLAMA_TUI_PDL", "1") != "0" and _capable(t.device.index or 0)
