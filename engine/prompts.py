"""Prompt token ids per cap, built exactly as Meta's reference code builds them (CODELLAMA.md).

Ids are assembled piece by piece rather than from a text template, because templates such as
`"<PRE> {prefix} <SUF>"` only approximate the token sequence the models were trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import accumulate

from engine.errors import CapabilityError, PromptError
from engine.requests import CAPS, FILL, Request
from engine.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
Exchange = tuple[str, str]  # a finished chat turn: (user message, answer)


def split_fill(text: str) -> tuple[str, str]:
    """Split infilling text at its one `<FILL>` marker into (prefix, suffix)."""
    count = text.count(FILL)
    if count != 1:
        raise PromptError(f"infilling needs exactly one {FILL} marker, found {count}")
    prefix, suffix = text.split(FILL)
    return prefix, suffix


def infilling_ids(tok: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """Meta's `infilling_prompt_tokens`: PSM by default, SPM when `suffix_first`."""
    if not tok.can_infill:
        raise CapabilityError(
            "this model has no infilling pieces (34B and -Python models cannot infill); use completion"
        )
    head = [tok.bos_id, tok.pre_id]
    suf = tok.encode_infilling(suffix)
    if suffix_first:
        return head + [tok.suf_id] + suf + [tok.mid_id] + tok.encode(prefix)
    return head + tok.encode(prefix) + [tok.suf_id] + suf + [tok.mid_id]


def chat_ids(tok: Tokenizer, exchanges: Sequence[Exchange], user: str, system: str | None) -> list[int]:
    """Meta's `chat_completion` prompt (7B/13B/34B Instruct) for finished exchanges plus a new message.

    The system instruction joins the first user message passed, so after dropped turns it moves to
    the oldest exchange kept.
    """
    _refuse_reserved(exchanges, user, system)
    users = [u for u, _ in exchanges] + [user]
    if system is not None:
        users[0] = B_SYS + system + E_SYS + users[0]
    ids: list[int] = []
    for u, (_, answer) in zip(users[:-1], exchanges, strict=True):
        ids += tok.encode(f"{B_INST} {u.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
    ids += tok.encode(f"{B_INST} {users[-1].strip()} {E_INST}", bos=True)
    return ids


def _refuse_reserved(exchanges: Sequence[Exchange], user: str, system: str | None) -> None:
    """Meta refuses dialogs that contain the format's own tags: they would let text forge turns."""
    named = [("system instruction", system or ""), ("message", user)]
    for u, a in exchanges:
        named += [("earlier message", u), ("earlier answer", a)]
    for what, text in named:
        for tag in RESERVED_TAGS:
            if tag in text:
                raise PromptError(f"the {what} contains {tag}, which the chat format reserves")


def build_prompt(tok: Tokenizer, request: Request, exchanges: Sequence[Exchange] = ()) -> list[int]:
    """The prompt ids for a request; `exchanges` are a chat session's finished (user, answer) turns."""
    cap = request.cap
    if cap in ("completion", "python"):
        return tok.encode(request.text, bos=True)
    if cap == "infilling":
        if request.prefix is not None and request.suffix is not None:
            prefix, suffix = request.prefix, request.suffix
        else:
            prefix, suffix = split_fill(request.text)
        return infilling_ids(tok, prefix, suffix, request.suffix_first)
    if cap == "chat":
        return chat_ids(tok, exchanges, request.text, request.system)
    raise PromptError(f"unknown capability {cap!r}; expected one of: {', '.join(CAPS)}")


# A token seldom covers more than this many characters (typical code: 3 or 4), so the search first cuts a huge
# file to the budget times this many and never encodes the rest; text of longer tokens only loses more lines.
_CHARS_PER_ID = 16


def fit_request(tok: Tokenizer, request: Request, budget: int) -> tuple[Request, int, int]:
    """A completion or infilling request whose prompt holds at most `budget` ids, and the lines it left out.

    An editor sends the whole file; like the best completion tools, keep the lines nearest the cursor: whole
    lines go from the start of the text (the prefix) and, while the suffix holds more than a quarter of the
    budget, from its end. Returns (request, lines dropped before the cursor, lines dropped after it).
    """
    if request.cap in ("completion", "python"):
        text, dropped = _keep_near(request.text, lambda t: len(tok.encode(t, bos=True)), budget, at_end=True)
        return replace(request, text=text), dropped, 0
    if request.prefix is not None and request.suffix is not None:
        prefix, suffix = request.prefix, request.suffix
    else:
        prefix, suffix = split_fill(request.text)
    fixed = len(infilling_ids(tok, "", "", request.suffix_first))
    n_prefix = len(tok.encode(prefix[-budget * _CHARS_PER_ID :]))  # never all of a huge file
    suffix_budget = max(budget - fixed - n_prefix, budget // 4)
    suffix, after = _keep_near(suffix, lambda t: len(tok.encode_infilling(t)), suffix_budget, at_end=False)
    prefix_budget = budget - fixed - len(tok.encode_infilling(suffix))
    prefix, before = _keep_near(prefix, lambda t: len(tok.encode(t)), prefix_budget, at_end=True)
    return replace(request, text="", prefix=prefix, suffix=suffix), before, after


def answer_room(max_new_tokens: int, context: int) -> int:
    """Ids a prompt leaves free for the answer: the request's limit, never more than a quarter of the context
    (a long limit must not squeeze the prompt to nothing)."""
    return min(max_new_tokens, context // 4)


def _keep_near(text: str, count: Callable[[str], int], budget: int, at_end: bool) -> tuple[str, int]:
    """The most whole lines nearest the cursor (the end of `text` when `at_end`, else its start) that count at
    most `budget`, and how many lines went."""
    lines = text.splitlines(keepends=True)

    def kept(k: int) -> str:
        return "".join(lines[len(lines) - k :] if at_end else lines[:k])

    sizes = accumulate(len(line) for line in (reversed(lines) if at_end else lines))
    lo, hi = 0, sum(1 for size in sizes if size <= budget * _CHARS_PER_ID)  # the most that fits lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(kept(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return kept(lo), len(lines) - lo


def stop_ids(tok: Tokenizer, cap: str) -> set[int]:
    """Token ids that end generation: EOT for infilling (EOS too, harmless), EOS otherwise."""
    if cap not in CAPS:
        raise PromptError(f"unknown capability {cap!r}; expected one of: {', '.join(CAPS)}")
    if cap == "infilling" and tok.eot_id is not None:
        return {tok.eot_id, tok.eos_id}
    return {tok.eos_id}
