"""engine.detok: UTF-8-safe incremental decoding on the real vocabulary, and stop strings."""

from __future__ import annotations

import random

import pytest

from engine.detok import IncrementalDecoder, StopStrings
from engine.tokenizer import Tokenizer

MULTIBYTE = [
    "emoji 🦙🔥👩‍💻 done",
    "中文字符 テスト 한국어",
    "café naïve façade Ångström",
    "    return \"€\" + 'ß'\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
]


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_incremental_equals_one_shot(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == " " + text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_byte_pieces_are_held_until_the_character_completes(tok: Tokenizer) -> None:
    ids = tok.encode("🦙")
    assert len(ids) > 2, "the llama emoji should need byte-fallback pieces"
    chunks = stream(tok, ids)
    assert chunks[-2:] == ["🦙", ""]
    assert all(chunk in ("", " ") for chunk in chunks[:-2])


def test_leading_space_and_control_tokens(tok: Tokenizer) -> None:
    decoder = IncrementalDecoder(tok)
    assert decoder.push(tok.bos_id) == ""
    assert decoder.push(tok.encode("Hello")[0]) == " Hello"
    assert decoder.push(tok.eot_id) == ""


def test_broken_utf8_matches_one_shot_replacement(tok: Tokenizer, sp) -> None:
    e2, x80 = sp.piece_to_id("<0xE2>"), sp.piece_to_id("<0x80>")
    for ids in ([sp.piece_to_id("▁a"), x80, sp.piece_to_id("b")], [e2, x80], [e2]):
        chunks = stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        assert "\ufffd" in "".join(chunks)


def test_stop_strings_pass_through_when_empty() -> None:
    stops = StopStrings(())
    assert stops.feed("anything\n\n") == ("anything\n\n", False)
    assert stops.flush() == ""


def test_stop_strings_hold_back_a_possible_start() -> None:
    stops = StopStrings(("\n\n",))
    assert stops.feed("def f():\n") == ("def f():", False)
    assert stops.feed("    pass\n") == ("\n    pass", False)
    assert stops.flush() == "\n"


def test_stop_string_hit_across_chunks() -> None:
    stops = StopStrings(("</code>",))
    assert stops.feed("x = 1</c") == ("x = 1", False)
    assert stops.feed("od") == ("", False)
    assert stops.feed("e>tail") == ("", True)
    assert stops.feed("more") == ("", True)
    assert stops.flush() == ""


def test_false_alarm_is_released() -> None:
    stops = StopStrings(("###",))
    assert stops.feed("a #") == ("a ", False)
    assert stops.feed("# b") == ("## b", False)


def test_multiple_stops_first_completed_wins() -> None:
    stops = StopStrings(("\nclass", "\ndef", "if __name__"))
    assert stops.feed("return 1\n") == ("return 1", False)
    assert stops.feed("de") == ("", False)
    assert stops.feed("f g(): pass\nclass") == ("", True)
    other = StopStrings(("abcd", "bc"))
    assert other.feed("xabcd") == ("xa", True)


def test_stop_strings_do_not_depend_on_chunking() -> None:
    text = "print('a')\n# end\nprint('b')\n\nEND tail"
    rng = random.Random(0)
    for stop_set, before in [
        (("# end", "\n\n"), "print('a')\n"),
        (("END", "zzz"), text[: text.index("END")]),
    ]:
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 8)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            stops, out, hit = StopStrings(stop_set), [], False
            for piece in pieces:
                emitted, hit = stops.feed(piece)
                out.append(emitted)
            assert hit
            assert "".join(out) + stops.flush() == before


def test_stop_strings_flush_releases_the_tail_without_a_hit() -> None:
    stops = StopStrings(("STOP",))
    out = [stops.feed(chunk)[0] for chunk in ("abc S", "T", "O")]
    assert "".join(out) == "abc "
    assert stops.flush() == "STO"
