"""engine.prompts against reference constructions written directly on sentencepiece, as Meta's code does."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import CapabilityError, PromptError
from engine.prompts import build_prompt, chat_ids, infilling_ids, split_fill, stop_ids
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
