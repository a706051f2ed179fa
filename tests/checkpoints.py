"""Tiny random-weight Llama checkpoints saved with `transformers`, for conformance and end-to-end tests."""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    vocab_size=32016,
    tie_word_embeddings=False,
)


def make_tiny_checkpoint(
    out: Path, tokenizer_dir: Path, seed: int = 0, safe: bool = True, shards: int = 1, **overrides: object
) -> Path:
    """Save a random LlamaForCausalLM (float32) plus the tokenizer files into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides}, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init, so that logits vary and greedy tokens differ
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(
        out, safe_serialization=safe, max_shard_size=(total // shards + 1024) if shards > 1 else "50GB"
    )
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
