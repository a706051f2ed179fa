"""The CodeLlama tokenizer: Meta's SentencePiece encoding, plus a byte table for streaming decode.

`tokenizer.model` is read with sentencepiece. When only `tokenizer.json` exists, its BPE model is driven
directly with SentencePiece's rules (dummy-prefix space, spaces as `▁`, byte fallback) rather than through
Hugging Face's normalizer/pre-tokenizer/added-token layers, whose settings vary between files and which
split `<s>` out of user text; that way both files encode identically.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from engine.errors import CheckpointError

PRE_PIECE, SUF_PIECE, MID_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
STEP_PIECE = "<step>"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Encode text to ids as Meta's `Tokenizer` does; map ids back to the bytes they add to the text."""

    def __init__(
        self,
        pieces: Sequence[str],
        control: Iterable[int],
        byte_ids: Iterable[int],
        encode_fn: Callable[[str], list[int]],
        bos_id: int,
        eos_id: int,
    ) -> None:
        self._encode = encode_fn
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id = bos_id, eos_id
        index: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            index.setdefault(piece, i)
        self.pre_id = index.get(PRE_PIECE)
        self.suf_id = index.get(SUF_PIECE)
        self.mid_id = index.get(MID_PIECE)
        self.eot_id = index.get(EOT_PIECE)
        self.step_id = index.get(STEP_PIECE)
        fim = (self.pre_id, self.suf_id, self.mid_id, self.eot_id)
        self.can_infill = all(i is not None for i in fim)
        named = {i for i in (*fim, self.step_id) if i is not None}
        special, byte_set = frozenset({*control, bos_id, eos_id, *named}), frozenset(byte_ids)
        self._bytes = tuple(_piece_bytes(p, i in special, i in byte_set) for i, p in enumerate(pieces))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.model` from a checkpoint directory, else `tokenizer.json`."""
        path = Path(path)
        model, json_file = path / "tokenizer.model", path / "tokenizer.json"
        try:
            if model.is_file():
                return _from_sentencepiece(model)
            if json_file.is_file():
                return _from_tokenizers(json_file)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read the tokenizer in {path}: {_first_line(exc)}") from exc
        raise CheckpointError(f"no tokenizer.model or tokenizer.json in {path}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """SentencePiece ids of `text` (with its implicit leading space), optionally framed by bos/eos."""
        ids = self._encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_infilling(self, text: str) -> list[int]:
        """Ids of `text` without the implicit leading space, Meta's way: drop the `▁☺` of `"☺" + text`."""
        return self._encode("☺" + text)[2:]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text; b"" for control pieces and ids outside the vocabulary."""
        if 0 <= token_id < self.vocab_size:
            return self._bytes[token_id]
        return b""

    def decode(self, ids: Iterable[int]) -> str:
        """One-shot decode; keeps the leading space that Meta's `decode` strips."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _piece_bytes(piece: str, special: bool, is_byte: bool) -> bytes:
    if special:
        return b""
    if is_byte:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode("utf-8")


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _from_sentencepiece(file: Path) -> Tokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    n = sp.vocab_size()
    return Tokenizer(
        pieces=[sp.id_to_piece(i) for i in range(n)],
        control=[i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)],
        byte_ids=[i for i in range(n) if sp.is_byte(i)],
        encode_fn=sp.encode,
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
    )


def _from_tokenizers(file: Path) -> Tokenizer:
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(file))
    model = hf.model
    if not isinstance(model, tokenizers.models.BPE):
        raise CheckpointError(f"{file} is not a Llama (BPE) tokenizer: its model is {type(model).__name__}")
    bos_id, eos_id = hf.token_to_id("<s>"), hf.token_to_id("</s>")
    if bos_id is None or eos_id is None:
        raise CheckpointError(f"{file} has no <s>/</s> pieces: not a Llama tokenizer")
    n = hf.get_vocab_size(with_added_tokens=False)
    pieces = [""] * n
    for piece, i in hf.get_vocab(with_added_tokens=False).items():
        if i < n:
            pieces[i] = piece
    control = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    unk_id = hf.token_to_id("<unk>")
    if unk_id is not None:
        control.add(unk_id)

    def encode(text: str) -> list[int]:
        if not text:
            return []
        return [t.id for t in model.tokenize("▁" + text.replace(" ", "▁"))]

    return Tokenizer(
        pieces=pieces,
        control=control,
        byte_ids=[i for i, p in enumerate(pieces) if _BYTE_PIECE.fullmatch(p)],
        encode_fn=encode,
        bos_id=bos_id,
        eos_id=eos_id,
    )
