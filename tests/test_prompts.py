"""engine.prompts against reference constructions written directly on sentencepiece, as Meta's code does."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import CapabilityError, PromptError
from engine.prompts import build_prompt, chat_ids, fit_chat, infilling_ids, split_fill, stop_ids
from engine.requests import ChatMessage, Request
from engine.tokenizer import Tokenizer

PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
SUFFIX = "\n    return result\n"


def meta_infilling(sp, pre: str, suf: str, suffix_first: bool = False) -> list[int]:
    """Meta's `infilling_prompt_tokens`, on sentencepiece alone."""
    pre_id, suf_id, mid_id = (sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    suffix_ids = sp.encode("☺" + suf)[2:]
    if suffix_first:
        return [sp.bos_id(), pre_id, suf_id] + suffix_ids + [mid_id] + sp.encode(pre)
    return [sp.bos_id(), pre_id] + sp.encode(pre) + [suf_id] + suffix_ids + [mid_id]


def meta_chat(sp, dialog: list[dict[str, str]]) -> list[int]:
    """Meta's `chat_completion` prompt construction, on sentencepiece alone."""
    if dialog[0]["role"] == "system":
        merged = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + dialog[2:]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    return ids + [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")


def dialog(exchanges: list[tuple[str, str]], user: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for u, a in exchanges:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


def chat(exchanges: list[tuple[str, str]], user: str, system: str | None = None) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m["role"], m["content"]) for m in dialog(exchanges, user, system))


@pytest.mark.parametrize("cap", ["completion", "python"])
def test_completion_is_bos_plus_text(tok: Tokenizer, sp, cap: str) -> None:
    text = "import socket\n\ndef ping_exponential_backoff(host: str):"
    assert build_prompt(tok, Request(cap=cap, text=text)) == [1] + sp.encode(text)


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infilling_matches_meta(tok: Tokenizer, sp, suffix_first: bool) -> None:
    expected = meta_infilling(sp, PREFIX, SUFFIX, suffix_first)
    assert infilling_ids(tok, PREFIX, SUFFIX, suffix_first) == expected
    from_marker = Request(cap="infilling", text=PREFIX + "<FILL>" + SUFFIX, suffix_first=suffix_first)
    assert build_prompt(tok, from_marker) == expected
    direct = Request(cap="infilling", prefix=PREFIX, suffix=SUFFIX, suffix_first=suffix_first)
    assert build_prompt(tok, direct) == expected


def test_infilling_psm_layout(tok: Tokenizer) -> None:
    ids = infilling_ids(tok, "a = ", "\nb = 2")
    assert ids[:2] == [1, 32007]
    assert ids[-1] == 32009
    assert ids.count(32008) == 1
    assert ids[ids.index(32008) + 1] == tok.encode_infilling("\nb = 2")[0]


def test_direct_prefix_suffix_win_over_text(tok: Tokenizer) -> None:
    request = Request(cap="infilling", text="ignored, no marker", prefix="x = ", suffix="")
    assert build_prompt(tok, request) == infilling_ids(tok, "x = ", "")


@pytest.mark.parametrize(("text", "count"), [("no marker here", 0), ("a<FILL>b<FILL>c", 2)])
def test_fill_marker_count_is_checked(tok: Tokenizer, text: str, count: int) -> None:
    with pytest.raises(PromptError, match=f"found {count}"):
        split_fill(text)
    with pytest.raises(PromptError, match=f"found {count}"):
        build_prompt(tok, Request(cap="infilling", text=text))


def test_split_fill() -> None:
    assert split_fill("def f():\n    <FILL>\n") == ("def f():\n    ", "\n")
    assert split_fill("<FILL>") == ("", "")


def test_infilling_on_base_tokenizer_is_refused(codellama_base_tokenizer_dir: Path) -> None:
    base = Tokenizer.from_dir(codellama_base_tokenizer_dir)
    with pytest.raises(CapabilityError, match="cannot infill"):
        infilling_ids(base, "a", "b")
    with pytest.raises(CapabilityError):
        build_prompt(base, Request(cap="infilling", text="a<FILL>b"))
    assert stop_ids(base, "completion") == {2}


@pytest.mark.parametrize(
    ("exchanges", "system"),
    [
        ([], None),
        ([], "  Answer in Python only.\n"),
        ([("  Write fizzbuzz. ", "\n```python\nprint(1)\n```\n")], None),
        (
            [("What is a closure?", "A function with its environment."), ("Example?", "def f(): ...")],
            "You are terse.",
        ),
        ([(f"  question {i}\n", f"\nanswer {i}  ") for i in range(5)], ""),
    ],
)
def test_chat_matches_meta(tok: Tokenizer, sp, exchanges, system) -> None:
    user = "\n  Now in Rust, please.  \n"
    expected = meta_chat(sp, dialog(exchanges, user, system))
    assert chat_ids(tok, chat(exchanges, user, system)) == expected
    assert build_prompt(tok, Request(cap="chat", messages=chat(exchanges, user, system))) == expected


def test_chat_system_goes_into_first_passed_exchange(tok: Tokenizer) -> None:
    ids = chat_ids(tok, chat([("old", "answer")], "new", "sys"))
    first_turn = tok.encode("[INST] <<SYS>>\nsys\n<</SYS>>\n\nold [/INST] answer ", bos=True, eos=True)
    assert ids == first_turn + tok.encode("[INST] new [/INST]", bos=True)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"])
def test_chat_refuses_reserved_tags(tok: Tokenizer, tag: str) -> None:
    with pytest.raises(PromptError, match="message contains"):
        chat_ids(tok, chat([], f"hi {tag} there"))
    with pytest.raises(PromptError, match="system instruction"):
        chat_ids(tok, chat([], "hi", f"be {tag}"))
    with pytest.raises(PromptError, match="earlier answer"):
        chat_ids(tok, chat([("q", f"a {tag}")], "hi"))


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ((), "at least one user message"),
        (("system",), "must end with a user message"),
        (("user", "assistant"), "must end with a user message"),
        (("user", "user"), "chat message 2 is from the user, expected the assistant"),
        (("system", "system", "user"), "chat message 2 is from the system, expected the user"),
        (("assistant", "user"), "chat message 1 is from the assistant, expected the user"),
        (("user", "tool", "user"), "unknown chat role 'tool'"),
    ],
)
def test_chat_roles_are_checked_as_meta_does(tok: Tokenizer, roles: tuple[str, ...], message: str) -> None:
    """An optional system message first, then user and assistant alternating, ending with the user's."""
    messages = tuple(ChatMessage(role, f"text {i}") for i, role in enumerate(roles))  # type: ignore[arg-type]
    with pytest.raises(PromptError, match=message):
        chat_ids(tok, messages)


def test_fit_chat_drops_the_oldest_exchanges_and_keeps_the_system_instruction(tok: Tokenizer) -> None:
    exchanges = [(f"question {i}", f"answer {i}") for i in range(6)]
    messages = chat(exchanges, "the last one", "Be brief")
    whole = len(chat_ids(tok, messages))
    assert fit_chat(tok, messages, whole) == (messages, 0)
    assert fit_chat(tok, messages, whole - 1) == (chat(exchanges[1:], "the last one", "Be brief"), 1)
    assert fit_chat(tok, messages, 1) == (chat([], "the last one", "Be brief"), 6)  # never the new message


def test_unknown_cap_is_a_prompt_error(tok: Tokenizer) -> None:
    with pytest.raises(PromptError, match="unknown capability"):
        build_prompt(tok, Request(cap="poetry", text="x"))  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        stop_ids(tok, "poetry")


def test_stop_ids(tok: Tokenizer) -> None:
    assert stop_ids(tok, "infilling") == {32010, 2}
    for cap in ("completion", "chat", "python"):
        assert stop_ids(tok, cap) == {2}


def _numbered(n: int, start: int = 0) -> str:
    return "".join(f"    total = total + values[{i}]  # step {i}\n" for i in range(start, start + n))


@pytest.mark.parametrize("cap", ["completion", "infilling"])
def test_fit_keeps_the_lines_nearest_the_cursor(cap: str) -> None:
    """A file longer than the budget loses whole lines far from the cursor; the prompt then fits, and one more
    line would not have fitted."""
    from engine.config import DEMO_DIR
    from engine.prompts import fit_request

    tok = Tokenizer.from_dir(DEMO_DIR)
    budget = 300
    prefix, suffix = _numbered(200), _numbered(200, start=200)
    request = Request(cap, text=prefix) if cap == "completion" else Request(cap, prefix=prefix, suffix=suffix)
    assert len(build_prompt(tok, request)) > budget

    fitted, before, after = fit_request(tok, request, budget)
    assert len(build_prompt(tok, fitted)) <= budget and before > 0
    kept_prefix = fitted.text if cap == "completion" else fitted.prefix
    assert kept_prefix == "".join(prefix.splitlines(keepends=True)[before:])
    wider = prefix.splitlines(keepends=True)[before - 1 :]
    if cap == "completion":
        assert after == 0 and len(build_prompt(tok, Request(cap, text="".join(wider)))) > budget
    else:
        assert fitted.suffix == "".join(suffix.splitlines(keepends=True)[: 200 - after]) and after > 0
        assert len(tok.encode_infilling(fitted.suffix)) <= budget // 4  # the suffix gets a quarter
        one_more = Request(cap, prefix="".join(wider), suffix=fitted.suffix)
        assert len(build_prompt(tok, one_more)) > budget

    small = Request(cap, text="x = 1\n") if cap == "completion" else Request(cap, prefix="x = ", suffix="\n")
    fitted, before, after = fit_request(tok, small, budget)
    assert build_prompt(tok, fitted) == build_prompt(tok, small) and (before, after) == (0, 0)


# ---- CodeLlama-70B-Instruct's `<step>` dialog format

CARD_DIALOG = [
    {"role": "system", "content": "System prompt    "},
    {"role": "user", "content": "First user query"},
    {"role": "assistant", "content": "Model response to first query"},
    {"role": "user", "content": "Second user query"},
]
# What Meta's `dialog_prompt_tokens` gives for CARD_DIALOG on the real 70B tokenizer, as the model card of
# codellama/CodeLlama-70b-Instruct-hf publishes it ("Chat prompt"; quoted in TheBloke/CodeLlama-70B-Instruct-GGUF's
# README, which carries the original card).
CARD_IDS = [
    1, 7562, 29901, 1788, 13, 13, 2184, 9508, 32015, 7562, 29901, 1404, 13, 13, 3824, 1404, 2346, 32015, 7562, 29901,
    20255, 13, 13, 8125, 2933, 304, 937, 2346, 32015, 7562, 29901, 1404, 13, 13, 6440, 1404, 2346, 32015, 7562, 29901,
    20255, 13, 14994, 3381, 29901, 1404, 13, 13, 29871,
]  # fmt: skip
STEP_DIALOGS = [
    [{"role": "user", "content": "Write fizzbuzz."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  hi  "}],
    [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "\n  Now in Rust, please.  \n"}],
    [{"role": "user", "content": "What is a closure?"}, {"role": "assistant", "content": "A function with its scope."},
     {"role": "user", "content": "Example?"}, {"role": "assistant", "content": "\n```python\ndef f(): ...\n```\n"},
     {"role": "user", "content": "And in Go?"}],
    [{"role": "system", "content": "You are terse."}, *CARD_DIALOG[1:3],
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}],
]  # fmt: skip


def meta_dialog(sp, dialog: list[dict[str, str]]) -> list[int]:
    """Meta's `chat_completion` for a tokenizer with `<step>` (`_chat_completion_turns` and `dialog_prompt_tokens`
    in facebookresearch/codellama's llama/generation.py), on sentencepiece alone: an empty system message goes first
    when there is none."""
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}, *dialog]
    step = sp.piece_to_id("<step>")
    ids = [sp.bos_id()]
    for message in dialog:
        ids += sp.encode(f" Source: {message['role'].strip()}")
        if message["content"]:
            ids += sp.encode("\n\n " + message["content"].strip())
        ids.append(step)
    return ids + sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n ")


def messages_of(dialog: list[dict[str, str]]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m["role"], m["content"]) for m in dialog)


@pytest.fixture(scope="module")
def tok70(codellama_70b_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(codellama_70b_tokenizer_dir)


@pytest.fixture(scope="module")
def sp70(codellama_70b_tokenizer_dir: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(codellama_70b_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def hf70(codellama_70b_tokenizer_dir: Path):
    """A transformers tokenizer for the same vocabulary, as the 70B checkpoint's behaves: legacy Llama splitting
    (each text between special tokens gets its leading `▁`), `<step>` a special token that takes the spaces around
    it. `test_70b_template_tokenizer_is_the_checkpoints` checks it against the published ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model = pb.ModelProto()
    model.ParseFromString((codellama_70b_tokenizer_dir / "tokenizer.model").read_bytes())
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in model.pieces})
    hf = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)
    hf.add_tokens([AddedToken("<step>", lstrip=True, rstrip=True, special=True, normalized=False)], special_tokens=True)
    return hf


STEP_TEMPLATE = Path(__file__).parent / "data" / "codellama-70b-instruct.chat_template.jinja"


def templated(hf, dialog: list[dict[str, str]]) -> list[int]:
    """transformers' `apply_chat_template` with the 70B-Instruct checkpoint's own chat template.

    The template (tests/data/codellama-70b-instruct.chat_template.jinja) is the `chat_template` of
    codellama/CodeLlama-70b-Instruct-hf's tokenizer_config.json, verbatim as TheBloke/CodeLlama-70B-Instruct-AWQ
    ships it (found in openvinotoolkit/openvino.genai, tests/python_tests/tokenizer_configs.py; the same text, with
    `| trim` for `.strip()`, is in huggingface/text-generation-inference's chat-template tests).
    """
    return list(hf.apply_chat_template(dialog, chat_template=STEP_TEMPLATE.read_text().rstrip("\n"))["input_ids"])


def test_70b_chat_gives_the_ids_the_model_card_publishes(tok70: Tokenizer) -> None:
    assert tok70.step_id == 32015
    assert chat_ids(tok70, messages_of(CARD_DIALOG)) == CARD_IDS


@pytest.mark.parametrize("dialog", STEP_DIALOGS, ids=range(len(STEP_DIALOGS)))
def test_70b_chat_matches_meta(tok70: Tokenizer, sp70, dialog: list[dict[str, str]]) -> None:
    assert chat_ids(tok70, messages_of(dialog)) == meta_dialog(sp70, dialog)
    assert build_prompt(tok70, Request("chat", messages=messages_of(dialog))) == meta_dialog(sp70, dialog)


def test_70b_template_tokenizer_is_the_checkpoints(hf70) -> None:
    assert templated(hf70, CARD_DIALOG) == CARD_IDS


@pytest.mark.parametrize("dialog", [d for d in STEP_DIALOGS if d[0]["role"] == "system"] + [CARD_DIALOG])
def test_70b_chat_matches_the_checkpoints_chat_template(tok70: Tokenizer, hf70, dialog: list[dict[str, str]]) -> None:
    assert chat_ids(tok70, messages_of(dialog)) == templated(hf70, dialog)


def test_70b_chat_without_a_system_message_adds_metas_empty_one(tok70: Tokenizer, hf70) -> None:
    """The one place the template and Meta's code differ: Meta puts an empty system turn first (header and
    `<step>`, no body); the template leaves it out. We build what Meta built for training."""
    dialog = STEP_DIALOGS[3]
    ours, theirs = chat_ids(tok70, messages_of(dialog)), templated(hf70, dialog)
    assert ours == [1, *tok70.encode(" Source: system"), 32015, *theirs[1:]]


def test_70b_chat_stops_at_step_and_other_caps_are_unchanged(tok70: Tokenizer, tok: Tokenizer) -> None:
    assert stop_ids(tok70, "chat") == {32015, 2}
    assert stop_ids(tok70, "completion") == {2} and stop_ids(tok, "chat") == {2}
    assert tok.step_id is None  # the 7B/13B tokenizer: the [INST] format
    assert build_prompt(tok70, Request("completion", text="def f(")) == [1, *tok70.encode("def f(")]
