"""Tensor parallelism: which shard of each weight this rank holds, and the collectives between ranks.

A world of one is the same code with no-op collectives, so the model never branches on TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.errors import EngineError


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the tensor-parallel world; the collectives use the default process group."""

    rank: int = 0
    world: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial results of row-parallel layers (in place)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

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
                raise EngineError(f"--tp {world} does not divide the model's {n} {what}; choose a divisor of {n}")
        return cls(
            n_heads=cfg.n_heads // world,
            n_kv_heads=cfg.n_kv_heads // world,
            intermediate=cfg.intermediate // world,
            vocab=-(-cfg.vocab_size // world),
        )
