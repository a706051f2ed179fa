"""The weight type: one object per projection (each layer's wqkv, wo, w13 and w2, and the LM head) holding this
rank's shard `[n, k]` of it (`y = x @ W.T`) in one storage format, so that a format plugs in here without touching
the model, the runner or the scheduler.

Every format has:
- `format` ("dense", "int8", "int4", "nf4"), `n`, `k`, `shape`, and `dtype`: that of x, y and the dequantized
  weight.
- `nbytes()`: the bytes it holds (the memory budget and the roofline add these up: `Llama.nbytes`).
- `load(part, dim, dest, whole)`: fill from a dense checkpoint tensor, quantizing at load. `part` is this rank's
  piece of it, already read: rows `dest .. dest + len(part)` of the (fused) weight for dim 0 (column-parallel QKV
  and gate/up, the LM head's vocabulary rows), the whole weight for dim 1 (the columns of a row-parallel O or down
  shard) and dim -1 (unsplit). `whole()` reads the entire checkpoint tensor: int8 takes a row-parallel shard's
  scales from its whole rows, so every rank holds the weights one GPU would. `fill(w)` loads a whole dense `[n, k]`.
- `LAYOUT` and `load_stored(stored, dest)`: the buffers a format holds, each with the dimension its rows lie along,
  the dimension its inputs lie along (None: whole rows) and how many inputs one element spans; `load_stored` fills
  rows `dest ..` (None: all) from tensors already in that layout, this rank's part (a converted workspace, a
  repacked GPTQ or AWQ checkpoint), so a reader slices any format's shard without knowing it.
- `zero_rows(start)`: rows `start ..` compute 0 (the padding of the last vocabulary shard).
- `dense(dtype=None)`: the dequantized weight `[n, k]` (in `dtype`, default its own), the semantics every kernel
  matches to rounding (the kernels multiply by the float32 values, `dense(torch.float32)`).
- `perm`: None, or the order `[k]` of the inputs its columns are stored in (int4 from an act-order GPTQ checkpoint,
  its groups made contiguous: `Int4.set_perm`): the matrix-vector kernel reads `x[..., perm]`; `dense()` and
  `linear` take x as it is.
- `linear(x)`: `x @ dense().T` where our matrix-vector kernel does not run it: cuBLAS (dense); on the GPU the
  weight dequantized into a scratch buffer, then cuBLAS (quantized: prefill and large batches); the plain-PyTorch
  reference on the CPU.
- `tensors()`: `(data, scales, zeros)` as `engine.kernels.triton_gemv` reads them; it runs every format at 1 to 64
  rows, fused with the norm, the residual add and SwiGLU where that pays. `engine.kernels` dispatches on the object:
  its GEMV or `linear`, chosen per (format, shape, rows) at start-up.

Storage: `Dense.weight [n, k]` (a Parameter). `Int8.q [n, k]` int8 and `Int8.scale [n]` float32. `Int4.qweight
[n, k / 8]` int32, `Int4.scales [k / 128, n]` float16 and `Int4.zeros [k / 128, n]` uint8. `NF4.packed [n, k / 2]`
uint8 and `NF4.absmax [n, k / 64]` float32, bitsandbytes' own (its `matmul_4bit` runs it on the GPU). engine.quant
holds the layouts and the math. Tensor parallelism builds each weight at its shard's shape: column-parallel ones split
along n (any size), row-parallel ones along k, which int4 needs in whole groups of 128 and nf4 in whole blocks of 64
(`Quant.check`, one line).

`Quant` says which type each projection gets (`--quant`, `--quant-head`). A pre-quantized checkpoint (GPTQ, AWQ,
`convert`'s output: engine.prequant) fills int4 weights with `Int4.load_quantized`, repacked from its tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import quant
from engine.config import ModelConfig
from engine.errors import EngineError
from engine.parallel import Shard
from engine.requests import QUANT


class Weight(nn.Module):
    """A projection's weight `[n, k]` (this rank's shard) in one storage format; the module docstring has the API."""

    format: ClassVar[str]
    LAYOUT: ClassVar[dict[str, tuple[int, int | None, int]]]  # buffer: (rows' dim, inputs' dim or None, inputs each)
    dtype: torch.dtype
    perm: Tensor | None

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.n, self.k = n, k
        self.register_buffer("perm", None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def key(self) -> tuple[str, int, int, torch.dtype]:
        """What the kernel choice depends on: format, shape and dtype."""
        return self.format, self.n, self.k, self.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(False), *self.buffers(False)))

    @classmethod
    def from_dense(cls, w: Tensor) -> Weight:
        """This format holding the dense `w [n, k]` (quantized), on w's device, in w's dtype (tests, benchmarks)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(w.dtype)
        try:
            with torch.device(w.device):
                weight = cls(*w.shape)
        finally:
            torch.set_default_dtype(previous)
        weight.fill(w)
        return weight

    def fill(self, w: Tensor) -> None:
        """Load a whole dense `[n, k]` (random weights, tests)."""
        self.load(w, -1, 0, lambda: w)

    def load(self, part: Tensor, dim: int, dest: int, whole: Callable[[], Tensor]) -> None:
        raise NotImplementedError

    def load_stored(self, stored: dict[str, Tensor], dest: int | None) -> None:
        """Fill rows `dest ..` (None: every row) from tensors in this format's layout, one per name in `LAYOUT`."""
        for name, (rows, _, _) in self.LAYOUT.items():
            target, part = getattr(self, name), stored[name]
            if dest is not None:
                target = target.narrow(rows, dest, part.shape[rows])
            if target.shape != part.shape:
                raise EngineError(f"{self.format} {name}: shape {tuple(part.shape)}, expected {tuple(target.shape)}")
            target.copy_(part)

    def zero_rows(self, start: int) -> None:
        raise NotImplementedError

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def linear(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def tensors(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.format}, n={self.n}, k={self.k}"


class Dense(Weight):
    """The weight as it is, in the model's dtype."""

    format = "dense"
    LAYOUT = {"weight": (0, 1, 1)}

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n, k)
        self.weight = nn.Parameter(torch.empty(n, k), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.weight.dtype

    def load(self, part: Tensor, dim: int, dest: int, whole: Callable[[], Tensor]) -> None:
        target = self.weight if dim < 0 else self.weight.narrow(dim, dest if dim == 0 else 0, part.shape[dim])
        target.copy_(part)

    def zero_rows(self, start: int) -> None:
        self.weight[start:].zero_()

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.weight if dtype is None else self.weight.to(dtype)

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def tensors(self) -> tuple[Tensor, None, None]:
        return self.weight, None, None

    def column_major(self) -> None:
        """Hold a float32 weight as the transpose of a row-major `[k, n]` buffer (same values, same shape): MKL's
        float32 matrix-vector product reads it that way faster, and a CPU decode step is mostly that read
        (BENCHMARKS.md). Not bfloat16, which MKL multiplies several times slower in this layout."""
        if self.weight.dtype == torch.float32:
            self.weight.data = self.weight.data.t().contiguous().t()


class _Quantized(Weight):
    """What the quantized formats share: a dtype of their own, quantizing on their device, and the fallback path
    that dequantizes, then multiplies."""

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n, k)
        self.dtype = torch.get_default_dtype()  # `Llama.empty` builds the model under its dtype

    def linear(self, x: Tensor) -> Tensor:
        from engine import kernels

        return F.linear(x, kernels.dequantize(self))

    def _on_device(self, t: Tensor) -> Tensor:
        """A checkpoint tensor where this weight lives: the GPU quantizes a 7B model in a second, the CPU in minutes."""
        return t.to(next(self.buffers(False)).device)


class Int8(_Quantized):
    """Symmetric int8 per output channel (engine.quant)."""

    format = "int8"
    LAYOUT = {"q": (0, 1, 1), "scale": (0, None, 0)}

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n, k)
        self.register_buffer("q", torch.empty(n, k, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(n, dtype=torch.float32))

    def load(self, part: Tensor, dim: int, dest: int, whole: Callable[[], Tensor]) -> None:
        part = self._on_device(part)
        scale = quant.int8_scale(self._on_device(whole())) if dim == 1 else None  # a row-parallel shard: whole rows'
        q, scale = quant.quantize_int8(part, scale)
        rows = slice(dest, dest + part.shape[0]) if dim == 0 else slice(None)
        self.q[rows] = q
        self.scale[rows] = scale

    def zero_rows(self, start: int) -> None:
        self.q[start:].zero_()
        self.scale[start:].zero_()

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return quant.dequantize_int8(self.q, self.scale, dtype or self.dtype)

    def tensors(self) -> tuple[Tensor, Tensor, None]:
        return self.q, self.scale, None


class Int4(_Quantized):
    """Asymmetric int4 in groups of 128 along k (engine.quant), the layout GPTQ and AWQ checkpoints repack into."""

    format = "int4"
    LAYOUT = {"qweight": (0, 1, 8), "scales": (1, 0, quant.GROUP), "zeros": (1, 0, quant.GROUP)}

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n, k)
        if k % quant.GROUP:
            raise EngineError(f"int4 needs whole groups of {quant.GROUP} inputs; a weight has {k}")
        groups = k // quant.GROUP
        self.register_buffer("qweight", torch.empty(n, k // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, n, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(groups, n, dtype=torch.uint8))

    def load(self, part: Tensor, dim: int, dest: int, whole: Callable[[], Tensor]) -> None:
        qweight, scales, zeros = quant.quantize_int4(self._on_device(part))
        rows = slice(dest, dest + part.shape[0]) if dim == 0 else slice(None)
        self.qweight[rows] = qweight
        self.scales[:, rows] = scales
        self.zeros[:, rows] = zeros

    def set_perm(self, perm: Tensor) -> None:
        """Columns stored in the input order `perm [k]` (act-order GPTQ)."""
        self.perm = perm.to(self.tensors()[0].device, torch.long)

    def zero_rows(self, start: int) -> None:
        self.qweight[start:].zero_()
        self.scales[:, start:].zero_()
        self.zeros[:, start:].zero_()

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        w = quant.dequantize_int4(self.qweight, self.scales, self.zeros, dtype or self.dtype)
        if self.perm is None:
            return w
        return torch.empty_like(w).index_copy_(1, self.perm, w)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.qweight, self.scales, self.zeros


class NF4(_Quantized):
    """bitsandbytes' nf4 in blocks of 64 (engine.quant), quantized by its own `quantize_4bit`; on the GPU its
    `matmul_4bit` (its GEMV at one row) multiplies, as under transformers' `load_in_4bit`."""

    format = "nf4"
    LAYOUT = {"packed": (0, 1, 2), "absmax": (0, 1, quant.NF4_BLOCK)}

    def __init__(self, n: int, k: int) -> None:
        super().__init__(n, k)
        if k % quant.NF4_BLOCK:
            raise EngineError(f"nf4 needs whole blocks of {quant.NF4_BLOCK} inputs; a weight has {k}")
        self.register_buffer("packed", torch.empty(n, k // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(n, k // quant.NF4_BLOCK, dtype=torch.float32))
        self._state = None

    def load(self, part: Tensor, dim: int, dest: int, whole: Callable[[], Tensor]) -> None:
        packed, absmax = quant.quantize_nf4(self._on_device(part))
        rows = slice(dest, dest + part.shape[0]) if dim == 0 else slice(None)
        self.packed[rows] = packed
        self.absmax[rows] = absmax

    def zero_rows(self, start: int) -> None:
        self.packed[start:] = 0x77  # level 7 is 0.0
        self.absmax[start:].zero_()

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return quant.dequantize_nf4(self.packed, self.absmax, dtype or self.dtype)

    def linear(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            return super().linear(x)
        import bitsandbytes as bnb

        if self._state is None:  # built once: bitsandbytes' description of these bytes
            code = torch.tensor(quant.NF4_CODE, dtype=torch.float32, device=x.device)
            self._state = bnb.functional.QuantState(
                self.absmax.view(-1), self.shape, code, quant.NF4_BLOCK, "nf4", self.dtype
            )
        return bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), self._state)

    def tensors(self) -> tuple[Tensor, Tensor, None]:
        return self.packed, self.absmax, None


FORMATS: dict[str, type[Weight]] = {"dense": Dense, "int8": Int8, "int4": Int4, "nf4": NF4}


@dataclass(frozen=True)
class Quant:
    """Which weight type the projections get: `layers` for every layer's four, `head` for the LM head."""

    layers: str = "dense"
    head: str = "dense"

    @classmethod
    def of(cls, name: str | None, head: bool = False) -> Quant:
        """`--quant NAME` (None: dense) and `--quant-head`."""
        if name is not None and name not in QUANT:
            raise EngineError(f"unknown quantization '{name}'; choose {' or '.join(QUANT)}", fields=("quant",))
        return cls(name or "dense", name if head and name else "dense")

    def make(self, n: int, k: int, head: bool = False) -> Weight:
        return FORMATS[self.head if head else self.layers](n, k)

    @property
    def name(self) -> str:
        """How reports name it: "dense", "int4", "int8 + int8 head"."""
        return self.layers + (f" + {self.head} head" if self.head != "dense" else "")

    def check(self, cfg: ModelConfig, shard: Shard, world: int) -> None:
        """One line where int4 or nf4 cannot hold the model: inputs not in whole groups (blocks), or a tensor-parallel
        size that splits one."""
        for fmt, group, unit in (("int4", quant.GROUP, "groups"), ("nf4", quant.NF4_BLOCK, "blocks")):
            inputs = [  # (projection, its inputs, this rank's), for every weight of the format
                ("attention QKV", cfg.dim, cfg.dim),
                ("attention output", cfg.n_heads * cfg.head_dim, shard.n_heads * cfg.head_dim),
                ("gate/up", cfg.dim, cfg.dim),
                ("down", cfg.intermediate, shard.intermediate),
            ] * (self.layers == fmt) + [("LM head", cfg.dim, cfg.dim)] * (self.head == fmt)
            for name, full, local in inputs:
                if full % group:
                    raise EngineError(
                        f"{fmt} weights need inputs in whole {unit} of {group}: the {name} projection has {full}; "
                        "choose int8",
                        fields=("quant",),
                    )
                if local % group:
                    raise EngineError(
                        f"{world} GPUs split the {name} projection's {full} inputs into {local} per GPU, not whole "
                        f"{fmt} {unit} of {group}; choose a tensor-parallel size that keeps them whole",
                        fields=("tp",),
                    )


DENSE = Quant()
