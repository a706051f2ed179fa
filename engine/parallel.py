"""Tensor parallelism: which shard of each weight this rank holds, and the collectives between ranks.

A world of one is the same code with no-op collectives, so the model never branches on TP size.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.errors import EngineError

# Recent torch deprecates all_gather_into_tensor, whose replacement older releases lack; every rank imports this
# module, so this one filter keeps exactly that FutureWarning off every rank's stderr
warnings.filterwarnings(
    "ignore", message=re.escape("`torch.distributed.all_gather_into_tensor` is deprecated"), category=FutureWarning
)


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the tensor-parallel world; the collectives use the default process group."""

    rank: int = 0
    world: int = 1
    _one_shot: dict[str, object] = field(default_factory=dict, compare=False, repr=False)  # dtype -> OneShot
    _calls: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)  # one-shot calls this pass

    def start_pass(self) -> None:
        """A forward pass begins: its one-shot all-reduces take the buffer's regions from the first again, each its
        own, so that a rank running ahead never writes a region a peer is still reading."""
        self._calls[0] = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial results of row-parallel layers.

        Decode-sized messages (a few KB) go through the one-shot all-reduce when `enable_one_shot` set it
        up: every rank writes its part straight into the others' buffers over NVLink and each adds them in rank
        order, with the same bits on every rank, in a few µs against NCCL's 20. Larger ones go to NCCL.
        """
        if self.world == 1:
            return x
        one_shot = self._one_shot_for(x)
        if one_shot is not None:
            return one_shot.all_reduce(x.view(-1, x.shape[-1]), self._next_region())[0].view_as(x)
        dist.all_reduce(x)
        return x

    def reduce_into(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A row-parallel layer's partial result x summed over ranks and added to the residual stream, as
        (x, residual, squares) for the next `kernels.norm_linear`: through the one-shot all-reduce, the add and the
        next norm's sums of squares in the same kernel; else the sum, the add left to the norm."""
        one_shot = self._one_shot_for(x)
        if one_shot is not None and residual.is_contiguous():
            h, squares = one_shot.all_reduce(x.view(-1, x.shape[-1]), self._next_region(), residual)
            return h.view_as(x), None, squares
        return self.all_reduce(x), residual, None

    def _one_shot_for(self, x: torch.Tensor):  # -> engine.kernels.triton_allreduce.OneShot | None
        one_shot = self._one_shot.get(str(x.dtype))
        return one_shot if one_shot is not None and one_shot.fits(x, self._calls[0]) else None

    def _next_region(self) -> int:
        self._calls[0] += 1
        return self._calls[0] - 1

    def enable_one_shot(self, numel: int, calls: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Set up the one-shot all-reduce for messages of up to `numel` elements, `calls` of them per pass.

        Collective: every rank calls it with the same arguments before the decode graphs are captured, and
        all use it or none do (it needs CUDA, NCCL, triton and PyTorch's symmetric memory with peer access).
        """
        if self.world == 1 or device.type != "cuda" or dist.get_backend() != "nccl":
            return False
        have = all(importlib.util.find_spec(m) for m in ("triton", "torch.distributed._symmetric_memory"))
        ok = torch.tensor([have], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok.item()):
            return False
        from engine.kernels.triton_allreduce import OneShot

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # peer-to-peer writes; no multicast needed
        self._one_shot[str(dtype)] = OneShot(numel, calls, dtype, device, _group_name())
        return True

    def stalled(self) -> bool:
        """Whether a one-shot all-reduce gave up waiting for another rank (one died): the steps since are garbage."""
        return any(one_shot.stalled() for one_shot in self._one_shot.values())  # type: ignore[attr-defined]

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate vocabulary shards of the logits along the last dimension (one gather, one copy)."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = x.new_empty((self.world * x.shape[0], *x.shape[1:]))  # shards one after another along dim 0
        dist.all_gather_into_tensor(parts, x)
        return parts.view(self.world, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], -1)

    def smallest(self, value: int) -> int:
        """The minimum of `value` over all ranks: every rank must size its KV cache alike."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = Parallel()


def _group_name() -> str:
    return dist.group.WORLD.group_name  # type: ignore[union-attr]


@dataclass(frozen=True)
class Shard:
    """Per-rank sizes of every split dimension."""

    n_heads: int
    n_kv_heads: int
    intermediate: int
    vocab: int  # rows of the embedding / LM head on this rank (vocabulary padded to a multiple of world)

    @classmethod
    def of(cls, cfg: ModelConfig, world: int) -> Shard:
        for what, n in (
            ("attention heads", cfg.n_heads),
            ("key/value heads", cfg.n_kv_heads),
            ("intermediate size", cfg.intermediate),
        ):
            if n % world:
                raise EngineError(
                    f"tensor-parallel size {world} does not divide the model's {n} {what}; choose a divisor of {n}",
                    fields=("tp",),
                )
        return cls(
            n_heads=cfg.n_heads // world,
            n_kv_heads=cfg.n_kv_heads // world,
            intermediate=cfg.intermediate // world,
            vocab=-(-cfg.vocab_size // world),
        )
