"""CodeLlama (the Llama architecture) in plain PyTorch: grouped-query attention, rotary embeddings,
RMSNorm and SwiGLU, written tensor-parallel from the start (a world of one is the same code).

Weights are fused per layer: `wqkv` holds this rank's q, k and v heads, `w13` its gate and up rows;
`wo` and `w2` are row-parallel and followed by an all-reduce; embedding and LM head are split by vocabulary.
The projections are `engine.weights.Weight` objects (dense, int8 or int4, as `Quant` says), which the kernels
dispatch on.
Prefill runs several sequences in one pass (each a `Chunk`: its new tokens, from the position its slot holds up to):
their tokens concatenated through the projections, norms and MLP, each one's attention over its own slot with SDPA,
the LM head on each one's last token; decode runs a batch of one new token per sequence and
reads per-slot positions from device tensors, so it can be captured in a CUDA graph; speculation's verify step is
the same pass over several new tokens per sequence (causal among them). Decode carries the
residual stream as (x, residual, squares): unadded, so that each residual add and RMSNorm can run inside the
projection after it (`kernels.norm_linear`), as SwiGLU's activation does (three launches fewer per layer); or,
with a world of one, added by the projection before it (`kernels.linear_residual`), which also sums the squares
the next norm needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import kernels
from engine.config import ModelConfig
from engine.kernels import switches
from engine.kernels.reference import dequantize_kv
from engine.parallel import SINGLE, Parallel, Shard
from engine.weights import DENSE, Quant, Weight

# Flash first; cuDNN's attention is left out: its per-call host overhead (about 1 ms) made a 128-token prefill
# take as long as a 2048-token one on the H100.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a prefill: `length` new tokens at positions `start ..` of `slot`, whose positions
    before `start` (a cached prefix, the prompt's earlier chunks) the slot holds already."""

    slot: int
    start: int
    length: int


class PrefillBatch(NamedTuple):
    """What every layer of one prefill reads, made once per pass (`Llama.prefill_batch`): the chunks, each new
    token's position and slot (int64 `[N]` on the device), each chunk's last token's row (int64 `[len(chunks)]`: the
    LM head's), the rotary rows of those positions `[N, head_dim]` in the activations' dtype, and each chunk's
    attention mask over its slot's keys (None where it starts at 0: causal)."""

    chunks: Sequence[Chunk]
    positions: Tensor
    slots: Tensor
    last: Tensor
    cos: Tensor
    sin: Tensor
    masks: list[Tensor | None]


class KVCache(nn.Module):
    """Preallocated keys and values: per layer `[n_slots, n_kv_heads, max_seq, head_dim]`, in the model's dtype, or
    with `kv="int8"` in int8 with a float32 scale per (slot, kv head, position) in `k_scale` and `v_scale`
    `[n_layers, n_slots, n_kv_heads, max_seq]` (`kernels.reference.quantize_kv`). Float32 scales: 4 bytes per 128
    values (3%) keep the only rounding the int8 one, and every kernel computes in float32 anyway."""

    def __init__(
        self,
        cfg: ModelConfig,
        shard: Shard,
        n_slots: int,
        max_seq: int,
        dtype: torch.dtype,
        device: torch.device,
        kv: str = "bf16",
    ) -> None:
        """Allocated on `device` directly: tens of GB built in host memory and copied over took 11 s at start-up."""
        super().__init__()
        shape = (cfg.n_layers, n_slots, shard.n_kv_heads, max_seq, cfg.head_dim)  # this rank's kv heads
        int8 = kv == "int8"
        store = torch.int8 if int8 else dtype
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        for name in ("k_scale", "v_scale"):  # None for a cache in the model's dtype
            scale = torch.zeros(shape[:-1], device=device) if int8 else None
            self.register_buffer(name, scale, persistent=False)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, shard: Shard, dtype: torch.dtype, kv: str = "bf16") -> int:
        """Bytes of one token's keys and values in every layer of this rank (with their scales for int8)."""
        per_head = cfg.head_dim + 4 if kv == "int8" else cfg.head_dim * torch.finfo(dtype).bits // 8
        return 2 * cfg.n_layers * shard.n_kv_heads * per_head

    def scales(self, layer: int, slot: int | None = None) -> tuple[Tensor, Tensor] | None:
        """The int8 cache's key and value scales of `layer` `[n_slots, n_kv_heads, max_seq]` (of one `slot`:
        `[n_kv_heads, max_seq]`); None for a cache in the model's dtype."""
        if self.k_scale is None:
            return None
        if slot is None:
            return self.k_scale[layer], self.v_scale[layer]
        return self.k_scale[layer, slot], self.v_scale[layer, slot]

    def prefix(self, layer: int, slot: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of positions `0 .. end-1` of `slot` `[1, n_kv_heads, end, head_dim]` in `dtype`, for
        prefill's attention: views of the cache, or dequantized from int8."""
        keys, values = self.k[layer, slot, None, :, :end], self.v[layer, slot, None, :, :end]
        if self.k_scale is None:
            return keys, values
        k_scale, v_scale = self.k_scale[layer, slot, None, :, :end], self.v_scale[layer, slot, None, :, :end]
        return dequantize_kv(keys, k_scale).to(dtype), dequantize_kv(values, v_scale).to(dtype)


def rope_tables(cfg: ModelConfig, max_seq: int) -> tuple[Tensor, Tensor]:
    """cos and sin `[max_seq, head_dim]` in float32, built as Hugging Face builds them (rotate-half form)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, par: Parallel, quant: Quant) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = shard.n_heads, shard.n_kv_heads, cfg.head_dim
        self.wqkv = quant.make((shard.n_heads + 2 * shard.n_kv_heads) * cfg.head_dim, cfg.dim)
        self.wo = quant.make(cfg.dim, shard.n_heads * cfg.head_dim)
        self.par = par
        self.scale = cfg.head_dim**-0.5

    def _heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v `[N, heads, head_dim]` as views of `qkv [N, ...]`: one view and one split (each costs µs)."""
        heads = qkv.view(-1, self.n_heads + 2 * self.n_kv, self.head_dim)
        return heads.split([self.n_heads, self.n_kv, self.n_kv], 1)

    def prefill(self, x: Tensor, layer: int, cache: KVCache, batch: PrefillBatch) -> Tensor:
        """`x [N, dim]`: the new tokens of `batch`'s chunks, concatenated; each chunk attends over its own slot's
        keys up to its last token (one SDPA call per chunk)."""
        q, k, v = self._heads(kernels.linear(x, self.wqkv))
        k_cache, v_cache, scales = cache.k[layer], cache.v[layer], cache.scales(layer)
        q = kernels.prefill_rotary(
            q, k, v, batch.cos, batch.sin, k_cache, v_cache, batch.positions, batch.slots, scales
        )
        q = q.transpose(0, 1)  # [H, N, D]
        outs, at = [], 0
        for chunk, mask in zip(batch.chunks, batch.masks, strict=True):
            keys, values = cache.prefix(layer, chunk.slot, chunk.start + chunk.length, q.dtype)
            if self.n_kv != self.n_heads:  # the fused flash kernels take equal head counts
                keys = keys.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                values = values.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            queries = q[None, :, at : at + chunk.length]
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scale
            )
            outs.append(out[0])
            at += chunk.length
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.par.all_reduce(kernels.linear(out.transpose(0, 1).reshape(at, -1), self.wo))

    def decode(
        self,
        qkv: Tensor,
        layer: int,
        cache: KVCache,
        slots: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        counts: Tensor | None = None,
    ) -> Tensor:
        """`qkv [B, ...]`: the projection of one new token per sequence (made with the norm, by the caller),
        written at `positions` of `slots` (device tensors); the attention's output `[B, heads * head_dim]`, before
        the output projection (`join`). With `counts` (a verify step), `qkv [B * T, ...]` holds T tokens per
        sequence from `positions` on, the first `counts[b]` of them real."""
        q, k, v = self._heads(qkv)
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # once: every op counts on the CPU
        scales = cache.scales(layer)
        if counts is None:
            out = kernels.rotary_attention(q, k, v, cos, sin, positions, slots, k_cache, v_cache, self.scale, scales)
            return out.flatten(1)
        batch = slots.shape[0]
        q, k, v = (t.unflatten(0, (batch, -1)) for t in (q, k, v))
        out = kernels.verify_attention(
            q, k, v, cos, sin, positions, slots, counts, k_cache, v_cache, self.scale, scales
        )
        return out.flatten(2).flatten(0, 1)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, par: Parallel, quant: Quant) -> None:
        super().__init__()
        self.w13 = quant.make(2 * shard.intermediate, cfg.dim)
        self.w2 = quant.make(cfg.dim, shard.intermediate)
        self.par = par

    def forward(self, x: Tensor) -> Tensor:
        return self.par.all_reduce(kernels.linear(kernels.silu_mul(kernels.linear(x, self.w13)), self.w2))


def join(par: Parallel, x: Tensor, w: Weight, residual: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A row-parallel projection `x @ w.T` back into the residual stream, as (x, residual, squares) for the next
    norm: the add (and the norm's sums of squares) in the projection's kernel with a world of one, in the
    all-reduce's with several (`Parallel.reduce_into`)."""
    if par.world == 1:
        return kernels.linear_residual(x, w, residual)
    return par.reduce_into(kernels.linear(x, w), residual)


def add_norm(h: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(h + delta), h + delta)` for prefill's residual stream (h itself where delta is None): one kernel
    on the GPU (switch: `prefill_add_norm`; off, the add is a kernel of its own as before)."""
    if delta is None:
        return kernels.rms_norm(h, weight, eps), h
    if not switches.on("prefill_add_norm"):
        h = h + delta
        return kernels.rms_norm(h, weight, eps), h
    return kernels.add_rms_norm(delta, h, weight, eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, par: Parallel, quant: Quant) -> None:
        super().__init__()
        self.attention = Attention(cfg, shard, par, quant)
        self.feed_forward = FeedForward(cfg, shard, par, quant)
        self.attention_norm = nn.Parameter(torch.empty(cfg.dim))
        self.ffn_norm = nn.Parameter(torch.empty(cfg.dim))
        self.eps = cfg.norm_eps

    def decode(
        self,
        stream: tuple[Tensor, Tensor | None, Tensor | None],
        layer: int,
        cache: KVCache,
        slots: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        counts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One layer of a decode step on the residual stream (x, residual, squares) (x alone before the first)."""
        attention, ffn = self.attention, self.feed_forward  # once: a submodule lookup costs µs of host time
        x, residual, squares = stream
        qkv, residual = kernels.norm_linear(x, residual, self.attention_norm, self.eps, attention.wqkv, squares)
        out = attention.decode(qkv, layer, cache, slots, positions, cos, sin, counts)
        x, residual, squares = join(attention.par, out, attention.wo, residual)
        act, residual = kernels.norm_linear_silu_mul(x, residual, self.ffn_norm, self.eps, ffn.w13, squares)
        return join(ffn.par, act, ffn.w2, residual)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq: int, par: Parallel = SINGLE, quant: Quant = DENSE) -> None:
        """A tied LM head (`tie_embeddings`) is a weight of its own, loaded from the embedding."""
        super().__init__()
        self.cfg, self.par, self.quant = cfg, par, quant
        self.shard = Shard.of(cfg, par.world)
        self.tok_embeddings = nn.Parameter(torch.empty(self.shard.vocab, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, self.shard, par, quant) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.empty(cfg.dim))
        self.output = quant.make(self.shard.vocab, cfg.dim, head=True)
        self.cache: KVCache | None = None
        self.init_rope(max_seq)
        self.requires_grad_(False)

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        max_seq: int,
        par: Parallel,
        device: torch.device,
        dtype: torch.dtype,
        quant: Quant = DENSE,
    ) -> Llama:
        """The model with uninitialised weights straight on `device` in `dtype` (`meta`: sizes only): nothing is
        allocated twice."""
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                model = cls(cfg, max_seq, par, quant)
        finally:
            torch.set_default_dtype(torch.float32)
        model = model.to_empty(device=device)
        model.init_rope(max_seq)
        return model

    def init_rope(self, max_seq: int) -> None:
        """(Re)build the rotary tables on the model's device; needed after materialising from `meta`."""
        cos, sin = rope_tables(self.cfg, max_seq)
        device = self.norm.device
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def weights(self) -> list[Weight]:
        """Every projection's weight and the LM head's."""
        return [m for m in self.modules() if isinstance(m, Weight)]

    def fused_weights(self) -> dict[str, list[Weight]]:
        """The weights each of the decode step's fused forms multiplies (`kernels.FUSED_FORMS`): every layer's QKV
        and the LM head after a norm ("norm"), every layer's gate/up after a norm and before SwiGLU ("norm_silu")."""
        return {
            "norm": [b.attention.wqkv for b in self.layers] + [self.output],
            "norm_silu": [b.feed_forward.w13 for b in self.layers],
        }

    def nbytes(self) -> int:
        """Bytes of every weight this rank holds: the projections as stored, the embedding and the norms."""
        weights = self.weights()
        held = {id(p) for w in weights for p in w.parameters()}
        plain = sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in held)
        return plain + sum(w.nbytes() for w in weights)

    def setup_cache(self, n_slots: int, max_seq: int, dtype: torch.dtype, kv: str = "bf16") -> None:
        """A KV cache of `n_slots` sequences of `max_seq` tokens, in `dtype` or (`kv="int8"`) int8."""
        self.cache = KVCache(self.cfg, self.shard, n_slots, max_seq, dtype, self.norm.device, kv)

    def embed(self, tokens: Tensor) -> Tensor:
        """Vocabulary-parallel lookup: each rank fills the rows it holds, the all-reduce adds them up."""
        if self.par.world == 1:
            return F.embedding(tokens, self.tok_embeddings)
        local = tokens - self.par.rank * self.shard.vocab
        inside = (local >= 0) & (local < self.shard.vocab)
        x = F.embedding(local.clamp(0, self.shard.vocab - 1), self.tok_embeddings) * inside.unsqueeze(-1)
        return self.par.all_reduce(x)

    def logits(self, x: Tensor) -> Tensor:
        """Final norm and LM head; float32 logits over the real vocabulary `[N, vocab_size]`."""
        return self.full_vocab(kernels.linear(kernels.rms_norm(x, self.norm, self.cfg.norm_eps), self.output))

    def full_vocab(self, logits: Tensor) -> Tensor:
        """This rank's LM-head output -> float32 logits over the real vocabulary (shards gathered, padding cut)."""
        return self.par.all_gather_last(logits)[..., : self.cfg.vocab_size].float()

    def prefill(self, tokens: Tensor, slot: int, start: int, all_logits: bool = False) -> Tensor:
        """Run `tokens [T]` of the sequence in `slot` from position `start` (`prefill_many` of one chunk); logits of
        the last token `[vocab]` (or of every token `[T, vocab]`)."""
        logits = self.prefill_many(tokens, [Chunk(slot, start, tokens.shape[0])], all_logits)
        return logits if all_logits else logits[0]

    def prefill_many(self, tokens: Tensor, chunks: Sequence[Chunk], all_logits: bool = False) -> Tensor:
        """Run the new tokens of several sequences in one pass, `tokens [N]` holding each chunk's in the chunks'
        order; logits of each chunk's last token `[len(chunks), vocab]` (or of every token `[N, vocab]`)."""
        self.par.start_pass()
        h = self.embed(tokens)
        batch = self.prefill_batch(chunks, h.dtype)
        delta = None  # each half-layer's output, added to h by the next norm
        with sdpa_kernel(PREFILL_BACKENDS):
            for i, block in enumerate(self.layers):
                normed, h = add_norm(h, delta, block.attention_norm, block.eps)
                delta = block.attention.prefill(normed, i, self.cache, batch)
                normed, h = add_norm(h, delta, block.ffn_norm, block.eps)
                delta = block.feed_forward(normed)
        h = h + delta
        return self.logits(h) if all_logits else self.logits(h[batch.last])

    def prefill_batch(self, chunks: Sequence[Chunk], dtype: torch.dtype) -> PrefillBatch:
        """The per-pass inputs of a prefill of `chunks` (`PrefillBatch`): the host's positions, slots and last rows
        in one copy to the device, the rotary rows cast once (not per layer)."""
        room = self.cos.shape[0] if self.cache is None else self.cache.k.shape[3]
        assert all(c.length > 0 and 0 <= c.start <= room - c.length for c in chunks), "a chunk past the cache"
        positions = [p for c in chunks for p in range(c.start, c.start + c.length)]
        slots = [c.slot for c in chunks for _ in range(c.length)]
        last = [end - 1 for end in itertools.accumulate(c.length for c in chunks)]
        ids = torch.tensor(positions + slots + last).to(self.norm.device)
        positions, token_slots, last = ids.split([len(slots), len(slots), len(chunks)])
        masks: list[Tensor | None] = [None] * len(chunks)
        if any(c.start for c in chunks):
            keys = torch.arange(max(c.start + c.length for c in chunks), device=ids.device)
            at = 0
            for i, c in enumerate(chunks):  # a chunk past position 0 sees its cached keys and its own up to each token
                if c.start:
                    masks[i] = keys[None, : c.start + c.length] <= positions[at : at + c.length, None]
                at += c.length
        cos, sin = (t[positions].to(dtype) for t in (self.cos, self.sin))
        return PrefillBatch(chunks, positions, token_slots, last, cos, sin, masks)

    def decode(self, tokens: Tensor, positions: Tensor, slots: Tensor, counts: Tensor | None = None) -> Tensor:
        """One step for a batch: `tokens [B]` at `positions [B]` of `slots [B]`; logits `[B, vocab]`. With `counts`
        (a speculative verify step), `tokens [B * T]` are T tokens per sequence at `positions[b] + t`, of which the
        first `counts[b]` are real; logits `[B * T, vocab]`, each predicting the token after its own."""
        self.par.start_pass()
        stream = self.embed(tokens), None, None
        cache, cos, sin = self.cache, self.cos, self.sin  # once, not per layer: module attributes cost µs each
        for i, block in enumerate(self.layers):
            stream = block.decode(stream, i, cache, slots, positions, cos, sin, counts)
        x, residual, squares = stream
        return self.full_vocab(kernels.norm_linear(x, residual, self.norm, self.cfg.norm_eps, self.output, squares)[0])
