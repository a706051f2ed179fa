"""The demo model's training pipeline: exact CodeLlama token layouts, licences, and a tiny end-to-end run.

The end-to-end test runs `python -m engine.demo.train --tiny` on the CPU in a subprocess (a few files, a
2-layer model, 20 steps) and checks what it wrote: FIM pieces are single pieces, the checkpoint loads in
`transformers` with the training module's logits, and SHA256SUMS verifies.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo.corpus import classify_license
from engine.demo.examples import (
    BOS,
    EOS,
    FIM_PIECES,
    Ids,
    chat_tokens,
    chunks,
    enc_infilling,
    fim_tokens,
    split_line,
    split_random,
)

ROOT = Path(__file__).resolve().parents[1]


class FakeSP:
    """A character-level stand-in for SentencePiece with the same dummy-prefix and ☺ behaviour."""

    PIECES = {p: 10 + i for i, p in enumerate(FIM_PIECES)}

    def encode(self, s: str) -> list[int]:
        return [ord(c) + 1000 for c in "▁" + s.replace(" ", "▁")]

    def piece_to_id(self, p: str) -> int:
        return self.PIECES[p]


def E(s: str) -> list[int]:
    return [ord(c) + 1000 for c in s.replace(" ", "▁")]


def test_fim_layouts_are_exactly_codellamas() -> None:
    sp = FakeSP()
    pre, suf, mid, eot = 10, 11, 12, 13
    assert Ids.of(sp) == Ids(pre, suf, mid, eot)
    prefix, middle, suffix = "def f(x):\n", "    return x", "\n\nprint(f(1))\n"
    assert enc_infilling(sp, " a") == E(" a")  # no implicit leading space
    psm = fim_tokens(sp, Ids.of(sp), prefix, middle, suffix, spm_mode=False)
    assert psm == [BOS, pre] + E(" " + prefix) + [suf] + E(suffix) + [mid] + E(middle) + [eot]
    spm = fim_tokens(sp, Ids.of(sp), prefix, middle, suffix, spm_mode=True)
    assert spm == [BOS, pre, suf] + E(suffix) + [mid] + E(" " + prefix) + E(middle) + [eot]
    chat = chat_tokens(sp, "Do it ", "```python\nx\n```", system="Be brief.")
    text = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nDo it [/INST] ```python\nx\n``` "
    assert chat == [BOS] + E(" " + text) + [EOS]


def test_splits_reassemble_and_mask_whole_lines() -> None:
    text = "import os\n\n\ndef f(a, b):\n    return a + b\n\nx = f(1, 2)\n"
    rng = random.Random(0)
    whole = 0
    for _ in range(300):
        p, m, s = split_random(text, rng)
        assert p + m + s == text
        p, m, s = split_line(text, rng)
        assert p + m + s == text and m
        if "\n" not in m and (p == "" or p.endswith("\n")) and s.startswith("\n"):
            whole += 1
    assert whole > 100  # most line-level splits mask exactly one whole line, as the evaluation does
    pieces = chunks(text * 50, 200, rng)
    assert "".join(pieces) == text * 50 and all(len(x) <= 200 for x in pieces)


class Meta(dict):
    def get_all(self, key: str) -> list[str] | None:
        v = self.get(key)
        return v if isinstance(v, list) or v is None else [v]


def test_license_classification() -> None:
    assert classify_license(Meta({"License-Expression": "MIT"})) == "MIT"
    assert classify_license(Meta({"License-Expression": "Apache-2.0 OR GPL-2.0"})) == "Apache-2.0"
    assert classify_license(Meta({"License-Expression": "GPL-3.0-or-later"})) is None
    assert classify_license(Meta({"License-Expression": "LGPL-2.1 AND MIT"})) is None
    osi = "License :: OSI Approved :: "
    assert classify_license(Meta({"Classifier": [osi + "BSD License"]})) == "BSD"
    assert classify_license(Meta({"Classifier": [osi + "Python Software Foundation License"]})) == "PSF"
    assert classify_license(Meta({"Classifier": [osi + "GNU General Public License v3 (GPLv3)"]})) is None
    assert classify_license(Meta({"Classifier": ["License :: Other/Proprietary License"]})) is None
    assert classify_license(Meta({"License": "Permission is hereby granted, free of charge, " * 4})) == "MIT"
    assert classify_license(Meta({"License": "NVIDIA Proprietary Software"})) is None
    assert classify_license(Meta({})) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    cmd = [sys.executable, "-m", "engine.demo.train", "--out", str(out), "--tiny", "--device", "cpu"]
    cmd += ["--line-fim-share", "0.8", "--whole-line", "0.9"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 20 loss" in r.stdout
    return out


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_run: Path) -> None:
    import sentencepiece as spm
    import torch

    from engine.demo.modeling import compare_with_transformers

    out = tiny_run
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for piece in FIM_PIECES:
        i = sp.piece_to_id(piece)
        assert i != sp.unk_id() and sp.id_to_piece(i) == piece
        assert sp.encode("x " + piece[1:])[-1] == i  # the text form is one piece
    assert sp.encode("☺" + "    y = 1")[:2] == [sp.piece_to_id("▁"), sp.piece_to_id("☺")]
    src = "def f(a):\n\treturn {'ü': a}  # [INST] ok [/INST]\n"
    assert sp.decode(sp.encode(src)) == src  # byte fallback, tabs, newlines round-trip

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == 1e6 and cfg["vocab_size"] == sp.get_piece_size()
    ids = torch.tensor([[1] + sp.encode(src * 3)[:100]])
    assert compare_with_transformers(out, ids) < 1e-4

    sums = (out / "SHA256SUMS").read_text().split("\n")
    names = set()
    for line in filter(None, sums):
        digest, name = line.split("  ")
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        names.add(name)
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md"} <= names

    training = json.loads((out / "training.json").read_text())
    assert (training["line_fim_share"], training["whole_line"]) == (0.8, 0.9)  # the example mix as asked
    ev = json.loads((out / "eval.json").read_text())
    assert ev["line_infill"]["n"] == 50 and ev["perplexity"]["perplexity"] > 1
    card = (out / "README.md").read_text()
    assert "| package | version | licence | files |" in card and "Held-out results" in card


@pytest.mark.slow
def test_tiny_pipeline_data_parallel(tmp_path: Path) -> None:
    """Under torchrun (gloo on the CPU) the ranks split every batch, average gradients and end identical; rank 0
    alone writes the model."""
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "engine.demo.train"]
    cmd += ["--out", str(out), "--tiny", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads((out / "training.json").read_text())
    assert info["command"].startswith("torchrun --nproc-per-node 2 -m engine.demo.train")
    assert info["train"]["gpus"] == 2 and info["train"]["steps"] == 20 and info["train"]["ranks_in_sync"] is True
    assert (out / "model.safetensors").exists() and r.stdout.count("step 20 loss") == 1


def test_middle_weighting_covers_what_follows_mid_in_psm() -> None:
    """A PSM middle (after `▁<MID>`, through `▁<EOT>`) gets the weight; its prompt, an SPM example, a plain
    example and padding do not, and a weight of 1 is the plain mean."""
    import torch

    from engine.demo.train import PAD, weighted_loss

    pre, suf, mid, eot = 3, 4, 5, 6
    psm = [BOS, pre, 20, suf, 21, mid, 22, 23, eot]
    spm = [BOS, pre, suf, 24, mid, 25, 26, eot]
    row = psm + spm + [BOS, 27, EOS, PAD, PAD]
    rows = torch.tensor([row])
    n = len(row) - 1
    logits = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(0))
    nll = torch.nn.functional.cross_entropy(logits[0], rows[0, 1:].clamp(min=0), reduction="none")
    real = torch.tensor([t != PAD for t in row[1:]])
    assert torch.allclose(weighted_loss(logits, rows, (pre, suf, mid, eot), 1.0), nll[real].mean())
    w = real.float()
    w[[psm.index(22) - 1, psm.index(23) - 1, len(psm) - 2]] = 4.0  # targets 22, 23 and the PSM example's EOT
    expected = (nll * w).sum() / w.sum()
    assert torch.allclose(weighted_loss(logits, rows, (pre, suf, mid, eot), 4.0), expected)


def test_a_model_over_the_size_cap_is_refused_before_any_work(tmp_path: Path) -> None:
    """Only a scaling experiment (`--over-cap`) may train a model that could not ship in 16 MiB."""
    from engine.demo import train

    with pytest.raises(SystemExit, match="would not fit in 16 MiB"):
        train.main(["--out", str(tmp_path / "big"), "--device", "cpu", "--hidden", "512", "--layers", "8"])
    assert not any((tmp_path / "big").iterdir())
