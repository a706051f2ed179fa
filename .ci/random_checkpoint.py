"""A random CodeLlama-shaped checkpoint saved as transformers saves one (bf16 safetensors), for the start-up timings
of `.ci/gpu-check convert7b` on a machine without real weights.

Usage: python .ci/random_checkpoint.py SHAPE OUT TOKENIZER_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.config import SHAPES


def main(shape: str, out: Path, tokenizer: Path) -> None:
    s = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=s["dim"], intermediate_size=s["intermediate"], num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"], vocab_size=s["vocab_size"],
        max_position_embeddings=16384, rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.no_grad():
        model = LlamaForCausalLM(cfg)
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
