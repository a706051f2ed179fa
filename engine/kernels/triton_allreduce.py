"""A one-shot all-reduce for decode-sized messages in Triton, over PyTorch symmetric memory, with the residual
add (and the next RMSNorm's sums of squares) fused in.

Every rank copies its partial result into its own symmetric buffer, signals each peer through the peer's signal
pad, waits for each peer's signal on its own pad, then reads every rank's copy over NVLink and adds them in rank
order, so all ranks get the same bits. A signal is a 0 -> 1 compare-and-swap on the receiver's pad, released after
the copy; the receiver takes it back 1 -> 0 with acquire semantics before reading, so the pads are clean for the
next call and a sender never signals twice ahead. Each call of a forward pass has its own region of the buffers
(`region`): a rank that runs ahead never overwrites a copy a slower peer is still reading.

A peer that died never signals, and a kernel spinning for it would never return: its CUDA stream, and the thread
that waits on it, would hang for good (aborting NCCL does not reach this kernel). So every wait gives up after
`WAIT_S` seconds of the GPU's clock and raises a flag in pinned host memory (`OneShot.stalled`), which the host
reads without touching the stream, and one on the device, which makes every later call skip its waits: the step
finishes at once, its result garbage, and the engine stops with an error. The clock is read by every thread and
reduced over the program, so that all threads leave a wait together (the loop's atomic is one thread's, its
result shared through a barrier).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl

BLOCK = 1024
WAIT_S = 5.0  # ranks run in lockstep: a live peer comes within microseconds (a second or so while compiling)


@triton.jit
def _clock_ns(like):
    """The GPU's global clock, the same value in every thread of the program (`like`: any [BLOCK] tensor)."""
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [like], dtype=tl.int64, is_pure=False, pack=1)
    return tl.max(now, axis=0)


@triton.jit
def _all_reduce_kernel(
    x_ptr, buffers_ptr, pads_ptr, res_ptr, out_ptr, sq_ptr, N, region_offset, rank, dead_ptr, stalled_addr, wait_ns,
    WORLD: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    signal = (row * tl.num_programs(0) + chunk) * WORLD  # this program's WORLD words on every pad
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offsets = row * N + cols
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    wait_ns = tl.where(tl.load(dead_ptr) == 0, wait_ns, 0)  # a peer already failed to come: wait no more
    mine = tl.load(buffers_ptr + rank).to(tl.pointer_type(x_ptr.dtype.element_ty))
    tl.store(mine + region_offset + offsets, x, mask=mask)
    tl.debug_barrier()  # every thread's copy before the (one-thread) release below
    late = False
    start = _clock_ns(cols)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            pad = tl.load(pads_ptr + peer).to(tl.pointer_type(tl.int32))
            was = tl.atomic_cas(pad + signal + rank, 0, 1, sem="release", scope="sys")
            while (was != 0) & (_clock_ns(cols) - start < wait_ns):
                was = tl.atomic_cas(pad + signal + rank, 0, 1, sem="release", scope="sys")
            late = late | (was != 0)
    own = tl.load(pads_ptr + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != rank:
            was = tl.atomic_cas(own + signal + peer, 1, 0, sem="acquire", scope="sys")
            while (was != 1) & (_clock_ns(cols) - start < wait_ns):
                was = tl.atomic_cas(own + signal + peer, 1, 0, sem="acquire", scope="sys")
            late = late | (was != 1)
    if late:  # a peer never came: say so here and where the host can read it, and finish (the result is garbage)
        tl.store(dead_ptr, 1)
        tl.store(stalled_addr.to(tl.pointer_type(tl.int32)), 1, cache_modifier=".wt")
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    total = tl.zeros([BLOCK], tl.float32)
    for peer in tl.static_range(WORLD):
        theirs = tl.load(buffers_ptr + peer).to(tl.pointer_type(x_ptr.dtype.element_ty))
        total += tl.load(theirs + region_offset + offsets, mask=mask, other=0.0, volatile=True).to(tl.float32)
    out = total.to(out_ptr.dtype.element_ty)
    if ADD_RESIDUAL:  # rounded as the unfused add rounds; the squares of this strip for the next norm
        r = tl.load(res_ptr + offsets, mask=mask, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        h = out.to(tl.float32)
        tl.store(sq_ptr + chunk * tl.num_programs(1) + row, tl.sum(h * h, axis=0))
    tl.store(out_ptr + offsets, out, mask=mask)


class OneShot:
    """The symmetric buffer (`regions` regions of `numel` elements) and the signal pads of one process group."""

    def __init__(self, numel: int, regions: int, dtype: torch.dtype, device: torch.device, group: str) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.numel, self.regions, self.dtype = numel, regions, dtype
        self.buffer = symm_mem.empty(numel * regions, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(self.buffer, group)
        self.rank, self.world = handle.rank, handle.world_size
        self.buffers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.pads = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        pad = handle.get_signal_pad(handle.rank)
        self.pad_words = pad.numel() * pad.element_size() // 4
        self.handle = handle  # keeps the mapping alive
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # pinned: the GPU writes it in place
        self._flag = self.flag.numpy()  # the same memory, read in ~0.1 µs every step
        self.dead = torch.zeros(1, dtype=torch.int32, device=device)  # the device's copy, read by every call

    def stalled(self) -> bool:
        """Whether an all-reduce gave up waiting for a peer (a host read: valid after the step's sync)."""
        return bool(self._flag[0])

    def fits(self, x: Tensor, region: int) -> bool:
        """Whether x can go through region `region`: this dtype, contiguous, within a region, a region left."""
        return x.dtype == self.dtype and x.numel() <= self.numel and region < self.regions and x.is_contiguous()

    def all_reduce(self, x: Tensor, region: int, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The sum over ranks of x [M, N] (plus `residual`, then with the [chunks, M] float32 sums of squares of
        the result) through region `region` of the buffers."""
        m, n = x.shape
        chunks = triton.cdiv(n, BLOCK)
        assert chunks * m * self.world <= self.pad_words, "the signal pad is too small for this message"
        out = torch.empty_like(x)
        squares = torch.empty((chunks, m), dtype=torch.float32, device=x.device) if residual is not None else None
        gdc = pdl.enabled(x)
        _all_reduce_kernel[(chunks, m)](
            x, self.buffers, self.pads, residual if residual is not None else x, out,
            squares if squares is not None else self.buffers, n, region * self.numel, self.rank, self.dead,
            self.flag.data_ptr(), int(WAIT_S * 1e9), WORLD=self.world, ADD_RESIDUAL=residual is not None, BLOCK=BLOCK,
            USE_GDC=gdc, num_warps=4, launch_pdl=gdc,
        )  # fmt: skip
        return out, squares
