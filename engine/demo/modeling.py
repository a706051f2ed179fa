"""The small Llama used to train the demo model.

Its module tree mirrors Hugging Face's `LlamaForCausalLM`, so `state_dict()` already has HF's parameter
names and q/k weights are in HF's rotate-half layout: saving is a dtype cast, and the check after
training compares against `transformers` on the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DemoConfig:
    """Llama hyper-parameters, named as in `LlamaConfig`."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 7
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def n_params(self) -> int:
        """Parameter count (untied embeddings and LM head)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * d * f + 2 * d
        return self.num_hidden_layers * layer + 2 * self.vocab_size * d + d

    def hf_dict(self) -> dict:
        """config.json in the classic layout that real CodeLlama checkpoints use (read by every version)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 as HF does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: DemoConfig) -> None:
        super().__init__()
        hd = c.head_dim
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, hd
        self.q_proj = nn.Linear(c.hidden_size, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c: DemoConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: DemoConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DemoLlama(nn.Module):
    """Llama decoder with HF's module names (`model.layers.N...`, `lm_head`); full-sequence forward only."""

    def __init__(self, c: DemoConfig) -> None:
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = (
                    std / math.sqrt(2 * self.config.num_hidden_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else std
                )
                nn.init.normal_(p, 0.0, s)
            else:
                nn.init.ones_(p)

    def rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.model.embed_tokens(ids)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rope(ids.shape[1], ids.device, dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def save_hf(model: DemoLlama, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `config.json` and one `model.safetensors` in Hugging Face Llama format."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.hf_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_demo(out: Path) -> DemoLlama:
    """Load a saved demo checkpoint back into the training module (float32, CPU)."""
    from safetensors.torch import load_file

    raw = json.loads((out / "config.json").read_text())
    fields = DemoConfig.__dataclass_fields__
    c = DemoConfig(**{k: raw[k] for k in fields if k in raw})
    m = DemoLlama(c)
    m.load_state_dict({k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()})
    return m


def compare_with_transformers(out: Path, ids: Tensor) -> float:
    """Max |logit difference| between the training module and `transformers` on the saved weights (fp32)."""
    from transformers import LlamaForCausalLM

    ours = load_demo(out).eval()
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids).logits
    return float((a - b).abs().max())
