"""engine.tokenizer against the real CodeLlama vocabulary and sentencepiece itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.tokenizer import Tokenizer

TRICKY = [
    "This is a test",
    "Hi  Hello",
    " leading space",
    "   three leading",
    "trailing  ",
    "    def f(x):\n        return x\n",
    "\n\nblank lines\n\n",
    "\tindent\twith tabs",
    "emoji 🦙🔥 and 👩‍💻",
    "中文字符 テスト 한국어",
    "café naïve façade",
    "<s> </s> <unk> [INST] <PRE>",
    "\r\n\x00\x7f",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]
# Text " <PRE>" encodes to the FIM control piece itself, as with Meta's tokenizer, so it cannot round-trip.
ROUND_TRIP = [text for text in TRICKY if "<PRE>" not in text]


def test_documented_ids(tok: Tokenizer) -> None:
    assert tok.encode("This is a test", bos=True) == [1, 910, 338, 263, 1243]
    assert tok.encode("Hi  Hello", bos=True) == [1, 6324, 29871, 15043]
    assert tok.encode("Hi", bos=True, eos=True) == [1, 6324, 2]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32016)
    assert (tok.pre_id, tok.suf_id, tok.mid_id, tok.eot_id) == (32007, 32008, 32009, 32010)
    assert tok.can_infill
    assert tok.step_id is None


def test_base_only_has_no_fim_pieces(codellama_base_tokenizer_dir: Path) -> None:
    base = Tokenizer.from_dir(codellama_base_tokenizer_dir)
    assert base.vocab_size == 32000
    assert (base.pre_id, base.suf_id, base.mid_id, base.eot_id) == (None, None, None, None)
    assert not base.can_infill
    assert base.encode("This is a test", bos=True) == [1, 910, 338, 263, 1243]


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_sentencepiece(tok: Tokenizer, sp, text: str) -> None:
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1, *sp.encode(text), 2]
    assert tok.encode_infilling(text) == sp.encode("☺" + text)[2:]


def test_encode_infilling_has_no_leading_space(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode("def f():")) == " def f():"
    assert tok.decode(tok.encode_infilling("def f():")) == "def f():"
    assert tok.encode_infilling("def")[0] != tok.encode("def")[0]


def test_fim_piece_text_encodes_to_the_control_piece(tok: Tokenizer) -> None:
    assert tok.encode("x <PRE>")[-1] == tok.pre_id
    assert tok.decode(tok.encode("x <PRE>")) == " x"


def test_token_bytes(tok: Tokenizer, sp) -> None:
    assert tok.token_bytes(sp.piece_to_id("▁")) == b" "
    assert tok.token_bytes(sp.piece_to_id("▁Hello")) == b" Hello"
    assert tok.token_bytes(sp.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_bytes(sp.piece_to_id("<0xE2>")) == b"\xe2"
    for control in (0, 1, 2, 32007, 32008, 32009, 32010):
        assert tok.token_bytes(control) == b""
    assert tok.token_bytes(tok.vocab_size + 5) == b""


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_round_trip_keeps_leading_space(tok: Tokenizer, sp, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    expected = " " + text if text else ""
    assert tok.decode(ids) == expected
    assert tok.decode(ids).lstrip(" ") == sp.decode(ids).lstrip(" ")


def test_tokenizer_json_fallback_encodes_identically(codellama_tokenizer_dir: Path, tok, tmp_path) -> None:
    if not (codellama_tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip("transformers was not importable, so no tokenizer.json was written")
    pytest.importorskip("tokenizers")
    shutil.copy(codellama_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    hf = Tokenizer.from_dir(tmp_path)
    for text in TRICKY:
        assert hf.encode(text, bos=True) == tok.encode(text, bos=True), text
        assert hf.encode_infilling(text) == tok.encode_infilling(text), text
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert (hf.pre_id, hf.suf_id, hf.mid_id, hf.eot_id, hf.step_id) == (
        tok.pre_id,
        tok.suf_id,
        tok.mid_id,
        tok.eot_id,
        tok.step_id,
    )
    ids = range(tok.vocab_size)
    assert [hf.token_bytes(i) for i in ids] == [tok.token_bytes(i) for i in ids]


def test_missing_tokenizer_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer.model or tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_corrupt_tokenizer_is_a_checkpoint_error(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x00not a tokenizer\xff" * 10)
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "\n" not in message
