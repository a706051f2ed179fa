"""Tokenizer training and the demo model's training examples, in CodeLlama's exact token layouts.

The layouts are those of Meta's inference code (see ../shared/CODELLAMA.md), so the engine's prompt
builders work on the demo model unchanged:

- plain:  `[bos] + enc(text) + [eos]`
- PSM:    `[bos, PRE] + enc(prefix) + [SUF] + enc_infilling(suffix) + [MID] + enc_infilling(middle) + [EOT]`
- SPM:    `[bos, PRE, SUF] + enc_infilling(suffix) + [MID] + enc(prefix) + enc_infilling(middle) + [EOT]`
- chat:   `[bos] + enc(f"[INST] {request.strip()} [/INST] {answer.strip()} ") + [eos]`

`enc_infilling(s)` is Meta's `encode("☺" + s)[2:]`; "☺" is a user-defined piece of the tokenizer so
that this trick works exactly as it does with the real vocabulary.
"""

from __future__ import annotations

import ast
import random
import textwrap
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

FIM_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
SMILEY = "☺"
BOS, EOS = 1, 2
PAD = -1  # fills the end of a packed row; never a model input, and no loss is taken on it

SYSTEM_PROMPTS = (
    "Provide answers in Python.",
    "You are a helpful coding assistant. Answer with code.",
    "You write clear, idiomatic Python 3.",
    "Answer with a single Python code block.",
)
REQUEST_TEMPLATES = (
    "Write a Python function `{sig}` that: {doc}",
    "Implement `{sig}` in Python. {doc}",
    "{doc}\nWrite this as a Python function `{sig}`.",
    "Write Python code for `{sig}`: {doc}",
)


def train_tokenizer(lines: Sequence[str], prefix: str, vocab_size: int, threads: int = 16) -> None:
    """Train the SentencePiece BPE model `prefix.model` on source lines (one sentence per line).

    Settings mirror Llama's tokenizer where it matters for code: byte fallback (newline and rare
    characters become `<0x..>` pieces), no whitespace normalisation, indentation pieces, digits split;
    the four FIM pieces and "☺" are user-defined so each is always a single piece.
    """
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        user_defined_symbols=[*FIM_PIECES, SMILEY],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=len(lines),
        shuffle_input_sentence=True,
        max_sentence_length=4096,
        num_threads=threads,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )


@dataclass(frozen=True)
class Ids:
    """The special ids, found by piece name as the engine does."""

    pre: int
    suf: int
    mid: int
    eot: int

    @staticmethod
    def of(sp: object) -> Ids:
        ids = [sp.piece_to_id(p) for p in FIM_PIECES]  # type: ignore[attr-defined]
        return Ids(*ids)


def enc_infilling(sp: object, s: str) -> list[int]:
    """Meta's `encode_infilling`: encode `s` without SentencePiece's implicit leading space."""
    return sp.encode(SMILEY + s)[2:]  # type: ignore[attr-defined]


def fim_tokens(sp: object, ids: Ids, prefix: str, middle: str, suffix: str, spm_mode: bool) -> list[int]:
    """One FIM training example in the PSM or SPM layout (documented in the module docstring)."""
    if spm_mode:
        return (
            [BOS, ids.pre, ids.suf]
            + enc_infilling(sp, suffix)
            + [ids.mid]
            + sp.encode(prefix)  # type: ignore[attr-defined]
            + enc_infilling(sp, middle)
            + [ids.eot]
        )
    return (
        [BOS, ids.pre]
        + sp.encode(prefix)  # type: ignore[attr-defined]
        + [ids.suf]
        + enc_infilling(sp, suffix)
        + [ids.mid]
        + enc_infilling(sp, middle)
        + [ids.eot]
    )


def chat_tokens(sp: object, request: str, answer: str, system: str | None = None) -> list[int]:
    """One finished Instruct exchange, a system prompt merged into the request as Meta does."""
    if system:
        request = f"<<SYS>>\n{system}\n<</SYS>>\n\n{request}"
    return [BOS] + sp.encode(f"[INST] {request.strip()} [/INST] {answer.strip()} ") + [EOS]  # type: ignore[attr-defined]


def split_random(text: str, rng: random.Random) -> tuple[str, str, str]:
    """The paper's character-level split: two cut points uniform over the document."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def split_line(text: str, rng: random.Random, whole_line: float = 0.6) -> tuple[str, str, str] | None:
    """Line-level split: a whole non-blank line (as the evaluation masks it, with probability `whole_line`),
    else a span inside a line or a short block, half each.

    A masked whole line is its content without the newline; the suffix starts at that newline.
    """
    starts = [0]
    for i, c in enumerate(text):
        if c == "\n":
            starts.append(i + 1)
    lines = [(s, text.find("\n", s) if text.find("\n", s) >= 0 else len(text)) for s in starts]
    nonblank = [i for i, (s, e) in enumerate(lines) if text[s:e].strip()]
    if not nonblank:
        return None
    i = rng.choice(nonblank)
    s, e = lines[i]
    r = rng.random()
    if r < whole_line:
        a, b = s, e
    elif r < (1 + whole_line) / 2:
        indent = len(text[s:e]) - len(text[s:e].lstrip())
        a = rng.randint(s + indent, e - 1)
        b = rng.randint(a + 1, e)
    else:
        j = min(len(lines) - 1, i + rng.randint(1, 5))
        a, b = s, lines[j][1]
    return text[:a], text[a:b], text[b:]


def chunks(text: str, max_chars: int, rng: random.Random) -> list[str]:
    """Cut a file at line boundaries into pieces of about `max_chars` (so each FIM example fits a sequence).

    Piece lengths vary (between a sixth and all of `max_chars`), so pieces start at many different lines
    and short ones fill the gaps when whole examples are packed into rows.
    """
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    cur: list[str] = []
    size = 0
    target = rng.randint(max_chars // 6, max_chars)
    for line in lines:
        if size + len(line) > target and cur:
            out.append("".join(cur))
            cur, size = [], 0
            target = rng.randint(max_chars // 6, max_chars)
        cur.append(line[:max_chars])
        size += len(cur[-1])
    if cur:
        out.append("".join(cur))
    return out


def instruction_pairs(text: str, rng: random.Random, limit: int, max_answer: int = 2500) -> Iterator[tuple[str, str]]:
    """Up to `limit` (request, answer) pairs from documented functions: the docstring asks, the code answers."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    nodes: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    stack = list(tree.body)  # module- and class-level functions only (ast.walk visits every expression)
    while stack:
        n = stack.pop()
        if isinstance(n, ast.ClassDef):
            stack.extend(n.body)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("__"):
            nodes.append(n)
    rng.shuffle(nodes)
    lines = text.splitlines(keepends=True)
    made = 0
    for node in nodes:
        if made >= limit:
            break
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20 or node.end_lineno is None:
            continue
        src = "".join(lines[node.lineno - 1 : node.end_lineno])
        if len(src) > max_answer:
            continue
        src = textwrap.dedent(src).rstrip()
        decos = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list)
        args = ast.unparse(node.args)
        doc = doc.strip().split("\n\n")[0] if rng.random() < 0.5 else doc.strip()
        req = rng.choice(REQUEST_TEMPLATES).format(sig=f"{node.name}({args})", doc=doc)
        made += 1
        yield req, f"```python\n{decos}{src}\n```"


@dataclass(frozen=True)
class ExampleSettings:
    """How one file becomes training examples."""

    fim_rate: float = 0.9
    line_fim_share: float = 0.7  # of FIM examples, the share that masks lines rather than random spans
    whole_line: float = 0.7  # of line-level examples, the share that masks one whole line (the evaluation's task)
    max_chars: int = 1400
    max_tokens: int = 2049  # an example longer than this (one packed row) is made from the two halves of its piece
    chat_per_file: int = 3
    chat_system_rate: float = 0.3
    seed: int = 0


_SP = None


def _init_worker(model_file: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_file)


def file_examples(args: tuple[str, str, int, ExampleSettings]) -> tuple[list[np.ndarray], dict[str, int]]:
    """All training examples of one file (worker function): plain, PSM/SPM FIM, and chat pairs."""
    name, text, copies, st = args
    sp = _SP
    assert sp is not None
    ids = Ids.of(sp)
    rng = random.Random(zlib.crc32(f"{st.seed}:{name}".encode()))
    out: list[np.ndarray] = []
    counts = {"plain": 0, "psm": 0, "spm": 0, "line_fim": 0, "chat": 0}
    for _ in range(copies):
        todo = chunks(text, st.max_chars, rng)
        while todo:
            piece = todo.pop()
            kind, toks = _piece_example(sp, ids, piece, st, rng)
            if len(toks) > st.max_tokens:  # dense text: halve the piece at a line boundary and try again
                lines = piece.splitlines(keepends=True)
                if len(lines) > 1:
                    todo += ["".join(lines[: len(lines) // 2]), "".join(lines[len(lines) // 2 :])]
                continue
            for k in kind:
                counts[k] += 1
            out.append(np.asarray(toks, dtype=np.int32))
    for req, ans in instruction_pairs(text, rng, st.chat_per_file):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < st.chat_system_rate else None
        out.append(np.asarray(chat_tokens(sp, req, ans, system), dtype=np.int32))
        counts["chat"] += 1
    return out, counts


def _piece_example(
    sp: object, ids: Ids, piece: str, st: ExampleSettings, rng: random.Random
) -> tuple[tuple[str, ...], list[int]]:
    """One piece of a file as a FIM (line-level or random-span, PSM or SPM) or plain example; its count keys."""
    if rng.random() >= st.fim_rate:
        return ("plain",), [BOS] + sp.encode(piece) + [EOS]  # type: ignore[attr-defined]
    split = split_line(piece, rng, st.whole_line) if rng.random() < st.line_fim_share else None
    kind: tuple[str, ...] = ("line_fim",) if split is not None else ()
    if split is None:
        split = split_random(piece, rng)
    spm_mode = rng.random() < 0.5
    return (*kind, "spm" if spm_mode else "psm"), fim_tokens(sp, ids, *split, spm_mode=spm_mode)


def build_examples(
    files: Sequence[tuple[str, str, int]], model_file: str, st: ExampleSettings, workers: int
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Encode every file with a process pool; the result order is deterministic (the input order)."""
    jobs = [(n, t, c, st) for n, t, c in files]
    counts: dict[str, int] = {}
    out: list[np.ndarray] = []
    if workers <= 1:
        _init_worker(model_file)
        results: Iterator = map(file_examples, jobs)
        for ex, c in results:
            out.extend(ex)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        return out, counts
    import multiprocessing as mp

    ctx = mp.get_context("fork") if hasattr(__import__("os"), "fork") else mp.get_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_file,)) as pool:
        for ex, c in pool.imap(file_examples, jobs, chunksize=8):
            out.extend(ex)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
    return out, counts


def pack(examples: list[np.ndarray], seq_len: int, seed: int, max_open: int = 64) -> np.ndarray:
    """Shuffle whole examples into `[n, seq_len]` rows, none cut across rows, the rest of a row `PAD`.

    Cutting examples at row boundaries would start most rows mid-example: a FIM middle would then be
    learned without its `▁<PRE>` and prefix. Best fit over `max_open` open rows (when all are open and
    nothing fits, the fullest is closed) wastes only a few percent; examples longer than a row are dropped.
    """
    rows: list[np.ndarray] = []
    open_rows: list[list[np.ndarray]] = []
    free = np.zeros(0, dtype=np.int64)

    def close(r: int) -> None:
        rows.append(np.concatenate([*open_rows[r], np.full(free[r], PAD, dtype=np.int32)]))

    for i in np.random.default_rng(seed).permutation(len(examples)):
        ex = examples[i]
        if len(ex) > seq_len:
            continue
        fits = np.flatnonzero(free >= len(ex))
        if fits.size:
            r = int(fits[np.argmin(free[fits])])
        elif len(open_rows) < max_open:
            open_rows.append([])
            free = np.append(free, seq_len)
            r = len(open_rows) - 1
        else:
            r = int(np.argmin(free))
            close(r)
            open_rows[r], free[r] = [], seq_len
        open_rows[r].append(ex)
        free[r] -= len(ex)
    for r in range(len(open_rows)):
        if open_rows[r]:
            close(r)
    return np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)


def sample_lines(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded sample of non-empty source lines for tokenizer training."""
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    rng = random.Random(seed)
    if len(lines) > n:
        lines = rng.sample(lines, n)
    return lines
