"""The model's shape, read from a checkpoint's `config.json` — every value from the file, none assumed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "model"

_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    bos_id: int
    eos_id: int

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        """Parse `path/config.json`; a missing or unreadable file, bad JSON or a non-Llama model: CheckpointError."""
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise CheckpointError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{file}: not a JSON object")
        return cls.from_dict(raw, str(file))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> ModelConfig:
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            name = model_type or (archs[0] if archs else "unknown")
            raise CheckpointError(f"{where}: architecture '{name}' is not Llama; only Llama/CodeLlama is supported")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)}")
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"{where}: rope_scaling {scaling} is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: activation '{raw['hidden_act']}' is not supported (Llama uses silu)")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise CheckpointError(f"{where}: biases in attention or MLP are not supported")
        n_heads = int(raw["num_attention_heads"])
        dim = int(raw["hidden_size"])
        return cls(
            dim=dim,
            intermediate=int(raw["intermediate_size"]),
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            vocab_size=int(raw["vocab_size"]),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=float(raw.get("rope_theta") or scaling.get("rope_theta") or 10000.0),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_id=int(raw.get("bos_token_id") or 1),
            eos_id=_first(raw.get("eos_token_id"), 2),
        )

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.intermediate
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + embed + self.dim


def _first(value: object, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)


# Real CodeLlama shapes (CODELLAMA.md), for benchmarks on random weights.
SHAPES: dict[str, dict] = {
    "7b": dict(dim=4096, intermediate=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32016),
    "13b": dict(dim=5120, intermediate=13824, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32016),
    "34b": dict(dim=8192, intermediate=22016, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000),
    "70b": dict(dim=8192, intermediate=28672, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32016),
}


def shape_config(name: str) -> ModelConfig:
    """A CodeLlama-shaped config with random weights in mind (`bench --shape 7b`)."""
    if name not in SHAPES:
        raise CheckpointError(f"unknown shape '{name}'; choose one of {', '.join(SHAPES)}")
    return ModelConfig(
        **SHAPES[name],
        head_dim=128,
        max_position=16384,
        rope_theta=1e6,
        norm_eps=1e-5,
        tie_embeddings=False,
        bos_id=1,
        eos_id=2,
    )


def model_dir(model: str | None) -> Path:
    """The checkpoint directory a user named; `None` is the built-in demo model."""
    if model is None:
        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(
                "the built-in demo model is missing from this installation; give a model directory", fields=("model",)
            )
        return DEMO_DIR
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (pass the model's directory)")
    return path
