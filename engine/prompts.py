"""Prompt token ids per cap, built exactly as Meta's reference code builds them (CODELLAMA.md).

Ids are assembled piece by piece rather than from a text template, because templates such as
`"<PRE> {prefix} <SUF>"` only approximate the token sequence the models were trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

from engine.errors import CapabilityError, PromptError
from engine.requests import CAPS, FILL, ROLES, ChatMessage, Request
from engine.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")  # Meta's SPECIAL_TAGS, for both formats
Exchange = tuple[str, str]  # a finished chat turn: (user message, answer)


@dataclass(frozen=True)
class Dialog:
    """A chat request's messages in the shape both dialog formats need: an optional system instruction, the
    finished exchanges, and the user's new message."""

    system: str | None
    exchanges: tuple[Exchange, ...]
    user: str

    @classmethod
    def of(cls, messages: Sequence[ChatMessage]) -> Dialog:
        """Check the roles as Meta's `chat_completion` does: an optional system message first, then user and
        assistant alternating, ending with the user's."""
        if not messages:
            raise PromptError("a chat request needs at least one user message")
        system = messages[0].content if messages[0].role == "system" else None
        turns = messages[1:] if system is not None else messages
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role not in ROLES:
                raise PromptError(f"unknown chat role {message.role!r}; expected one of: {', '.join(ROLES)}")
            if message.role != expected:
                raise PromptError(
                    f"chat message {i + 1 + (system is not None)} is from the {message.role}, expected the "
                    f"{expected}: after an optional system message, user and assistant alternate, ending with the user"
                )
        if not turns or turns[-1].role != "user":
            raise PromptError("a chat request must end with a user message")
        pairs = tuple((turns[i].content, turns[i + 1].content) for i in range(0, len(turns) - 1, 2))
        return cls(system, pairs, turns[-1].content)

    def messages(self) -> tuple[ChatMessage, ...]:
        system = (ChatMessage("system", self.system),) if self.system is not None else ()
        pairs = (m for u, a in self.exchanges for m in (ChatMessage("user", u), ChatMessage("assistant", a)))
        return (*system, *pairs, ChatMessage("user", self.user))


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


def chat_ids(tok: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """The chat prompt for a conversation, in the checkpoint's own dialog format: CodeLlama-70B-Instruct's
    `<step>` turns when the tokenizer has the `<step>` piece (Meta's rule), else the `[INST]` format of the
    7B/13B/34B Instruct models."""
    dialog = Dialog.of(messages)
    _refuse_reserved(dialog)
    return step_dialog_ids(tok, dialog) if tok.step_id is not None else inst_dialog_ids(tok, dialog)


def inst_dialog_ids(tok: Tokenizer, dialog: Dialog) -> list[int]:
    """Meta's `chat_completion` prompt (7B/13B/34B Instruct): each finished exchange encoded on its own with bos
    and eos, then the new message. The system instruction joins the first user message, so after dropped turns
    it moves to the oldest exchange kept."""
    users = [u for u, _ in dialog.exchanges] + [dialog.user]
    if dialog.system is not None:
        users[0] = B_SYS + dialog.system + E_SYS + users[0]
    ids: list[int] = []
    for u, (_, answer) in zip(users[:-1], dialog.exchanges, strict=True):
        ids += tok.encode(f"{B_INST} {u.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
    ids += tok.encode(f"{B_INST} {users[-1].strip()} {E_INST}", bos=True)
    return ids


def step_dialog_ids(tok: Tokenizer, dialog: Dialog) -> list[int]:
    """Meta's `dialog_prompt_tokens` (CodeLlama-70B-Instruct): bos, then per message a `Source: role` header and
    its stripped content, each message closed by `<step>`, then the reply's header. A dialog without a system
    message gets an empty one, as Meta's `chat_completion` inserts it (the checkpoint's Hugging Face chat template
    does not: the only difference between the two)."""
    assert tok.step_id is not None
    turns = [("system", dialog.system or "")]
    turns += [t for u, a in dialog.exchanges for t in (("user", u), ("assistant", a))]
    turns.append(("user", dialog.user))
    ids = [tok.bos_id]
    for role, content in turns:
        ids += tok.encode(f" Source: {role}")
        if content:
            ids += tok.encode("\n\n " + content.strip())
        ids.append(tok.step_id)
    return ids + tok.encode(" Source: assistant\nDestination: user") + tok.encode("\n\n ")


def fit_chat(tok: Tokenizer, messages: Sequence[ChatMessage], budget: int) -> tuple[tuple[ChatMessage, ...], int]:
    """The conversation without its oldest exchanges, as few as make its prompt hold at most `budget` ids (all
    but the new message, if even that is too few), and how many went. The system instruction stays."""
    dialog = Dialog.of(messages)
    dropped = 0
    while dialog.exchanges and len(chat_ids(tok, dialog.messages())) > budget:
        dropped += 1
        dialog = replace(dialog, exchanges=dialog.exchanges[1:])
    return dialog.messages(), dropped


def _refuse_reserved(dialog: Dialog) -> None:
    """Meta refuses dialogs that contain the formats' own tags: they would let text forge turns."""
    named = [("system instruction", dialog.system or ""), ("message", dialog.user)]
    for u, a in dialog.exchanges:
        named += [("earlier message", u), ("earlier answer", a)]
    for what, text in named:
        for tag in RESERVED_TAGS:
            if tag in text:
                raise PromptError(f"the {what} contains {tag}, which the chat format reserves")


def build_prompt(tok: Tokenizer, request: Request) -> list[int]:
    """The prompt ids for a request, before any fitting (what `tokenize` prints)."""
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
        return chat_ids(tok, request.messages)
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


def cursor_line(request: Request) -> str:
    """The cursor's line up to the cursor: the last line of a completion's text or of an infilling prefix."""
    text = request.text
    if request.cap == "infilling":
        text = request.prefix if request.prefix is not None and request.suffix is not None else split_fill(text)[0]
    return text.rsplit("\n", 1)[-1]


def turn_stops(tok: Tokenizer, cap: str) -> tuple[str, ...]:
    """Stop strings that end a chat answer where the model starts writing the dialog format itself: small models
    (the demo's) echo `[INST]` and `[/INST]`; the 70B `<step>` format's next turn is its `Source: user` header."""
    if cap != "chat":
        return ()
    if tok.step_id is not None:
        return ("<step>", "Source: user")
    return (B_INST, E_INST)


def stop_ids(tok: Tokenizer, cap: str) -> set[int]:
    """Token ids that end generation: EOT for infilling, `<step>` for a 70B-Instruct chat (as Meta stops it), and
    EOS always."""
    if cap not in CAPS:
        raise PromptError(f"unknown capability {cap!r}; expected one of: {', '.join(CAPS)}")
    if cap == "infilling" and tok.eot_id is not None:
        return {tok.eot_id, tok.eos_id}
    if cap == "chat" and tok.step_id is not None:
        return {tok.step_id, tok.eos_id}
    return {tok.eos_id}
