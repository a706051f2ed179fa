"""Shared pytest fixtures.

Reference data lives in `../shared` (next to the repository, as in CI); tests that need it skip
cleanly where it is absent, as on a user's machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_TOOL = SHARED / "tools" / "codellama_tokenizer.py"
LLAMA2_VOCAB = SHARED / "data" / "llama2-vocab" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path_factory, monkeypatch) -> None:
    """No test reads the developer's own config file (it may name a model, keys or a theme), nor writes recovery
    copies or chat history among the developer's own."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def codellama_tokenizer_tool() -> ModuleType:
    """The shared tokenizer-building tool, imported once: it turns the Llama-2 vocab into tokenizers."""
    if not (TOKENIZER_TOOL.is_file() and LLAMA2_VOCAB.is_file()):
        pytest.skip(f"no reference tokenizer data in {SHARED}")
    for module in ("gguf", "sentencepiece", "google.protobuf"):
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location("codellama_tokenizer_tool", TOKENIZER_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="session")
def codellama_tokenizer_dir(codellama_tokenizer_tool: ModuleType, tmp_path_factory) -> Path:
    """A CodeLlama-7B/13B tokenizer directory (32016 pieces, FIM pieces at 32007-32010)."""
    out = tmp_path_factory.mktemp("codellama-tokenizer")
    codellama_tokenizer_tool.build(out)
    return out


@pytest.fixture(scope="session")
def codellama_base_tokenizer_dir(codellama_tokenizer_tool: ModuleType, tmp_path_factory) -> Path:
    """A 34B / -Python tokenizer directory (32000 pieces, no FIM pieces), from `--base-only`."""
    out = tmp_path_factory.mktemp("codellama-base-tokenizer")
    codellama_tokenizer_tool.build(out, base_only=True)
    return out


@pytest.fixture(scope="session")
def codellama_70b_tokenizer_dir(codellama_tokenizer_tool: ModuleType, tmp_path_factory) -> Path:
    """A CodeLlama-70B-Instruct-like tokenizer: the 7B/13B vocabulary with `<step>` at 32015 and no implicit leading
    space (SentencePiece's add_dummy_prefix off). That is what Meta's 70B dialog code needs to give the ids the model
    card publishes (tests/test_prompts.py checks them): it spells every space out itself."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = tmp_path_factory.mktemp("codellama-70b-tokenizer")
    codellama_tokenizer_tool.build(out)
    model = pb.ModelProto()
    model.ParseFromString((out / "tokenizer.model").read_bytes())
    model.pieces[32015].piece = "<step>"
    model.pieces[32015].type = pb.ModelProto.SentencePiece.USER_DEFINED
    model.normalizer_spec.add_dummy_prefix = False
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)  # the Hugging Face files describe the 7B/13B tokenizer
    (out / "tokenizer.model").write_bytes(model.SerializeToString())
    return out


@pytest.fixture(scope="session")
def sp(codellama_tokenizer_dir: Path):
    """Meta's own tokenizer object (SentencePiece) for the reference constructions."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(codellama_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def tok(codellama_tokenizer_dir: Path):
    """The engine's tokenizer on the real CodeLlama vocabulary."""
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(codellama_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(codellama_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A tiny random-weight CodeLlama-7B-shaped checkpoint (MHA, vocab 32016, rope_theta 1e6), float32."""
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mha"), codellama_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gqa_dir(codellama_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """Like `tiny_model_dir` but with grouped-query attention (8 heads, 2 kv heads), sharded in 3 files."""
    from tests.checkpoints import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny-gqa")
    return make_tiny_checkpoint(out, codellama_tokenizer_dir, seed=1, num_key_value_heads=2, shards=3)


@pytest.fixture(scope="session")
def tiny_base_model_dir(codellama_base_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A 34B/-Python-like checkpoint: vocab 32000 and no infilling pieces."""
    from tests.checkpoints import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny-base")
    return make_tiny_checkpoint(out, codellama_base_tokenizer_dir, seed=2, vocab_size=32000)


@pytest.fixture(scope="session")
def tiny_int4_dir(codellama_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A tiny checkpoint whose every projection takes whole int4 groups of 128 inputs, also split over TP 2."""
    from tests.checkpoints import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny-int4")
    return make_tiny_checkpoint(
        out, codellama_tokenizer_dir, seed=3, hidden_size=256, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, shards=2,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_70b_instruct_dir(codellama_70b_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """`tiny_model_dir`'s shape with the 70B-Instruct-like tokenizer (`<step>` at 32015)."""
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-70b-instruct"), codellama_70b_tokenizer_dir, seed=3)
