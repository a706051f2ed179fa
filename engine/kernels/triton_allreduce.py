"""A one-shot all-reduce for decode-sized messages in Triton, over PyTorch symmetric memory, with the residual
add (and the next RMSNorm's sums of squares) fused in.

Every rank writes its partial result into its slot in each peer's symmetric buffer (over NVLink), then raises a
flag on each peer; it waits for each peer's flag on its own side, then adds the slots of its
own buffer in rank order, so all ranks get the same bits. Pushing the data and the flag (writes the sender does not
wait for) leaves one NVLink crossing on the critical path; pulling the peers' copies took a round trip more, and so
did a compare-and-swap flag. A flag is a release exchange to 1 after the writes; the receiver takes it back 1 -> 0
with acquire semantics before reading. Each call of a forward pass has its own region of the buffers and its own
flag words (`region`), so a word is raised once a pass and long taken back before the next: a rank that runs ahead
never overwrites a slot, or raises a flag, that a slower peer has not consumed yet.

A peer that died never raises its flag, and a kernel spinning for it would never return: its CUDA stream, and the
thread that waits on it, would hang for good (aborting NCCL does not reach this kernel). So every wait gives up
after `WAIT_S` seconds of the GPU's clock and raises a flag in pinned host memory (`OneShot.stalled`), which the
host reads without touching the stream, and one on the device, which makes every later call skip its waits: the
step finishes at once, its result garbage, and the engine stops with an error. The clock is read by every thread
and reduced over the program, so that all threads leave a wait together (the loop's atomic is one thread's, its
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
    x_ptr, buffers_ptr, flags_ptr, res_ptr, out_ptr, sq_ptr, N, region_offset, flag_offset, slot_stride, rank,
    dead_ptr, stalled_addr, wait_ns,
    WORLD: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    words = flag_offset + (row * tl.num_programs(0) + chunk) * WORLD  # this program's WORLD flags of this call
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offsets = row * N + cols
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        # The next kernel may start now: it streams weights it needs from nobody until its own wait, which holds
        # until this kernel has finished, so its ramp overlaps the wait for the peers below.
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    wait_ns = tl.where(tl.load(dead_ptr) == 0, wait_ns, 0)  # a peer already failed to come: wait no more
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.multiple_of(tl.load(buffers_ptr + peer).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
            slot = rank - (rank > peer)  # a rank's buffer has a slot for each other rank, in rank order
            tl.store(theirs + region_offset + slot * slot_stride + offsets, x, mask=mask)
    tl.debug_barrier()  # every thread's writes before the (one-thread) releases below
    for peer in tl.static_range(WORLD):
        if peer != rank:
            flags = tl.load(flags_ptr + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flags + words + rank, 1, sem="release", scope="sys")  # unused result: nothing waits
    own = tl.load(flags_ptr + rank).to(tl.pointer_type(tl.int32))
    mine = tl.multiple_of(tl.load(buffers_ptr + rank).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
    late = False
    start = _clock_ns(cols)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            was = tl.atomic_cas(own + words + peer, 1, 0, sem="acquire", scope="sys")
            while (was != 1) & (_clock_ns(cols) - start < wait_ns):
                was = tl.atomic_cas(own + words + peer, 1, 0, sem="acquire", scope="sys")
            late = late | (was != 1)
    if late:  # a peer never came: say so here and where the host can read it, and finish (the result is garbage)
        tl.store(dead_ptr, 1)
        tl.store(stalled_addr.to(tl.pointer_type(tl.int32)), 1, cache_modifier=".wt")
    total = tl.zeros([BLOCK], tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            total += x.to(tl.float32)
        else:
            slot = peer - (peer > rank)
            theirs = mine + region_offset + slot * slot_stride + offsets
            total += tl.load(theirs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    out = total.to(out_ptr.dtype.element_ty)
    if ADD_RESIDUAL:  # rounded as the unfused add rounds; the squares of this strip for the next norm
        r = tl.load(res_ptr + offsets, mask=mask, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        h = out.to(tl.float32)
        tl.store(sq_ptr + chunk * tl.num_programs(1) + row, tl.sum(h * h, axis=0))
    tl.store(out_ptr + offsets, out, mask=mask)


class OneShot:
    """The symmetric buffer (`regions` regions of a `numel`-element slot for each other rank) and the flags of one
    process group."""

    ROWS = 512  # flag words per region allow messages of up to this many rows (decode batches; larger go to NCCL)

    def __init__(self, numel: int, regions: int, dtype: torch.dtype, device: torch.device, group: str) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.numel, self.regions, self.dtype = numel, regions, dtype
        self.world = dist.get_world_size()
        self.programs = triton.cdiv(numel, BLOCK) + self.ROWS  # >= cdiv(n, BLOCK) * m for any m <= ROWS, m * n <= numel
        self.buffer = symm_mem.empty(regions * (self.world - 1) * numel, dtype=dtype, device=device)
        self.flags = symm_mem.empty(regions * self.programs * self.world, dtype=torch.int32, device=device).zero_()
        handles = [symm_mem.rendezvous(t, group) for t in (self.buffer, self.flags)]
        self.rank = handles[0].rank
        self.buffers = torch.tensor(handles[0].buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(handles[1].buffer_ptrs, dtype=torch.int64, device=device)
        self.handles = handles  # keep the mappings alive
        torch.cuda.synchronize(device)
        dist.barrier()  # every rank's flags are zero before any rank raises one
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # pinned: the GPU writes it in place
        self._flag = self.flag.numpy()  # the same memory, read in ~0.1 µs every step
        self.dead = torch.zeros(1, dtype=torch.int32, device=device)  # the device's copy, read by every call

    def stalled(self) -> bool:
        """Whether an all-reduce gave up waiting for a peer (a host read: valid after the step's sync)."""
        return bool(self._flag[0])

    def fits(self, x: Tensor, region: int) -> bool:
        """Whether x can go through region `region`: this dtype, contiguous, within a slot, a region left."""
        fits = x.dtype == self.dtype and x.numel() <= self.numel and region < self.regions and x.is_contiguous()
        return fits and x.numel() // x.shape[-1] <= self.ROWS

    def all_reduce(self, x: Tensor, region: int, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The sum over ranks of x [M, N] (plus `residual`, then with the [chunks, M] float32 sums of squares of
        the result) through region `region` of the buffers."""
        m, n = x.shape
        chunks = triton.cdiv(n, BLOCK)
        out = torch.empty_like(x)
        squares = torch.empty((chunks, m), dtype=torch.float32, device=x.device) if residual is not None else None
        gdc = pdl.enabled(x)
        _all_reduce_kernel[(chunks, m)](
            x, self.buffers, self.flag_ptrs, residual if residual is not None else x, out,
            squares if squares is not None else self.buffers, n, region * (self.world - 1) * self.numel,
            region * self.programs * self.world, self.numel, self.rank, self.dead, self.flag.data_ptr(),
            int(WAIT_S * 1e9), WORLD=self.world, ADD_RESIDUAL=residual is not None, BLOCK=BLOCK, USE_GDC=gdc,
            num_warps=4, launch_pdl=gdc,
        )  # fmt: skip
        return out, squares
