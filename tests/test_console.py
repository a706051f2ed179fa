"""The console chat in-process, against a fake engine client: input protocol, requests, printing."""

from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import replace

import pytest

from engine.requests import ChatMessage, EngineSpec, Request
from tests.fakes import INFO, FakeClient
from tui.console import Answer, Output, highlight, highlight_markdown_code, rows_used, run_console
from tui.console_input import Action, Prompt, read_inputs

SMALL = replace(INFO, name="fake-7b", context=64)  # with a token per character: a chat fills it in a few turns


def console_answer(request: Request) -> str:
    """A recognisable answer per cap: a Python continuation, a docstring middle, a chat reply."""
    return {
        "completion": "    return a + b\n",
        "python": "    return a + b\n",
        "infilling": 'Say hello."""\n    print("hello")',
        "chat": "Here:\n```python\ndef f():\n    return 1\n```\nDone.",
    }[request.cap]


def make_fake(**options: object) -> FakeClient:
    return FakeClient(**{"info": SMALL, "answers": console_answer, "chunk": 4, "chars_per_token": 1, **options})


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(
    text: str,
    cap: str = "completion",
    fake: FakeClient | None = None,
    system: str | None = None,
    stdout: io.StringIO | None = None,
    **overrides: object,
) -> tuple[int, str, str, FakeClient]:
    """Run the piped console on `text`; return the exit code, stdout, stderr and the fake."""
    fake = fake or make_fake()
    stdout, stderr = stdout or io.StringIO(), io.StringIO()
    code = run_console(
        EngineSpec(),
        cap,
        system,
        dict(overrides),
        client_factory=fake.factory,
        stdin=io.StringIO(text),
        stdout=stdout,
        stderr=stderr,
    )
    return code, stdout.getvalue(), stderr.getvalue(), fake


# -- the input protocol


def test_inputs_end_at_bang_bang_and_keep_blank_lines() -> None:
    lines = ["def f():", "", "    pass", "", "!!", "x", "!! \r\n", "!!", "  ", "!!", "tail"]
    assert list(read_inputs(lines)) == [Prompt("def f():\n\n    pass\n"), Prompt("x"), Prompt("tail")]


def test_commands_only_as_a_whole_input() -> None:
    lines = ["exit", "!!", " end ", "!!", "reset", "!!", "exit now", "!!", "exit", "", "!!"]
    assert list(read_inputs(lines)) == [
        Action("exit"),
        Action("end"),
        Action("end"),
        Prompt("exit now"),
        Action("exit"),
    ]


def test_lines_with_newlines_from_a_file() -> None:
    assert list(read_inputs(io.StringIO("a\r\n\nb\n!!\n"))) == [Prompt("a\n\nb")]


# -- piped runs


def test_completion_prints_only_the_continuation_without_colour() -> None:
    code, out, err, fake = run("def add(a, b):\n!!\n")
    assert code == 0
    assert out == "    return a + b\n"
    assert "tokens/s" in err and "first token" in err
    assert "\x1b" not in out + err
    (request,) = fake.submitted
    assert request.cap == "completion" and request.text == "def add(a, b):" and request.messages == ()
    assert request.sampling.temperature == 0.2
    assert fake.started and fake.closed


def test_replaced_characters_are_one_warning_and_the_answer_still_comes() -> None:
    code, out, err, _ = run("def add(a,\udcff b):\n!!\n")
    assert code == 0 and out == "    return a + b\n"
    assert "warning: 1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD" in err.splitlines()


def test_overrides_reach_the_request_and_bad_ones_exit_2() -> None:
    _, _, _, fake = run("x\n!!\n", cap="python", temperature=0.0, max_new_tokens=7, top_k=None)
    assert fake.submitted[0].sampling.temperature == 0.0
    assert fake.submitted[0].sampling.max_new_tokens == 7 and fake.submitted[0].sampling.top_k == 40
    code, out, err, fake = run("x\n!!\n", top_p=2.0)
    assert code == 2 and "error: top-p" in err and not fake.started


def test_infilling_prints_the_middle_and_a_wrong_marker_count_is_not_fatal() -> None:
    text = 'def hi():\n    """ <FILL>\n!!\nno marker\n!!\n<FILL> <FILL>\n!!\ndef g():\n    <FILL>\n!!\n'
    code, out, err, fake = run(text, cap="infilling")
    assert code == 0
    assert out == 'Say hello."""\n    print("hello")\n' * 2
    assert "infilling needs exactly one <FILL> marker, found 0" in err
    assert "found 2" in err
    assert [r.text.count("<FILL>") for r in fake.submitted] == [1, 0, 2, 1]
    assert all(r.cap == "infilling" and r.sampling.temperature == 0 for r in fake.submitted)


def test_infilling_on_a_model_that_cannot_infill_exits_1() -> None:
    code, out, err, client = run("<FILL>\n!!\n", cap="infilling", fake=make_fake(info=replace(SMALL, can_infill=False)))
    assert code == 1 and "cannot infill" in err and not client.submitted and client.closed


def test_chat_sends_the_whole_conversation_until_end() -> None:
    text = "hi\n!!\nmore\n!!\nend\n!!\nagain\n!!\nreset\n!!\n"
    code, out, err, fake = run(text, cap="chat", system="Provide answers in Python")
    assert code == 0
    first, second, third = fake.submitted
    system = ChatMessage("system", "Provide answers in Python")
    answer = ChatMessage("assistant", console_answer(first))
    assert first.messages == (system, user("hi"))
    assert second.messages == (system, user("hi"), answer, user("more"))
    assert third.messages == (system, user("again"))  # `end` forgot the conversation, not the system instruction
    assert all(r.cap == "chat" and r.fit for r in fake.submitted)
    assert err.count("(new session)") == 2
    assert out.count("Done.\n") == 3


def test_exit_stops_reading() -> None:
    code, out, err, fake = run("a\n!!\nexit\n!!\nb\n!!\n")
    assert code == 0 and [r.text for r in fake.submitted] == ["a"] and fake.closed


def test_load_failure_is_one_line_and_exit_1() -> None:
    code, out, err, fake = run("a\n!!\n", fake=make_fake(load_error="model dir /x: no config.json"))
    assert code == 1 and err == "error: model dir /x: no config.json\n" and out == "" and fake.closed


def test_failed_request_goes_to_stderr_and_the_session_goes_on() -> None:
    def fail(request: Request) -> str | None:
        return (
            "the message contains [INST], which the chat format reserves"
            if request.messages[-1] == user("bad")
            else None
        )

    client = make_fake(answers=lambda request: "ok", fail=fail)
    code, out, err, _ = run("bad\n!!\ngood\n!!\n", cap="chat", fake=client)
    assert code == 0 and out == "ok\n" and "the message contains [INST], which the chat format reserves\n" in err
    assert client.submitted[1].messages == (user("good"),)  # the failed exchange is not kept


def test_long_chat_warns_near_the_end_then_reports_dropped_turns() -> None:
    # the fake's context is 64 tokens (characters), 16 of them kept for the answer; each exchange is 10 + 20
    client = make_fake(answers=lambda r: "a" * 20)
    turns = "".join(f"question{i:02d}\n!!\n" for i in range(4))
    code, out, err, _ = run(turns, cap="chat", fake=client)
    assert code == 0
    assert err.count("warning: the conversation holds") == 1
    assert "the next turns drop the oldest ones" in err
    assert "dropped its 1 oldest exchange\n" in err
    assert err.index("the conversation holds") < err.index("dropped its")
    assert out == ("a" * 20 + "\n") * 4
    assert client.submitted[3].messages[0] == user("question01")  # the console forgot what the engine dropped


def test_ctrl_c_cancels_the_answer_and_keeps_the_session() -> None:
    stdout = io.StringIO()

    def press_ctrl_c(client: FakeClient, request: Request, index: int) -> None:
        if request.messages[-1] == user("long") and index == 1:
            deadline = time.monotonic() + 5
            while not stdout.getvalue().endswith("xxxx") and time.monotonic() < deadline:
                time.sleep(0.001)  # the first piece is shown: the press comes after it
            os.kill(os.getpid(), signal.SIGINT)
            assert client.cancel_seen.wait(5)  # the stream saw it and cancelled before another piece went out

    client = make_fake(info=INFO, answers=lambda r: "x" * 40, on_delta=press_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    code, out, err, _ = run("first\n!!\nlong\n!!\nnext\n!!\n", cap="chat", fake=client, stdout=stdout)
    assert code == 0
    first, long, after = client.submitted
    assert client.cancelled == [long.id]
    assert out == "x" * 40 + "\n" + "xxxx\n" + "x" * 40 + "\n"
    assert "stopped]" in err
    assert after.messages == (user("first"), ChatMessage("assistant", "x" * 40), user("next"))
    assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_quits_with_130() -> None:
    def press_twice(client: FakeClient, request: Request, index: int) -> None:
        if index in (1, 2):
            os.kill(os.getpid(), signal.SIGINT)
            assert index == 2 or client.cancel_seen.wait(5)  # two presses, not one pending signal

    client = make_fake(answers=lambda r: "x" * 40, on_delta=press_twice, ignore_cancel=True)  # the engine does not stop
    code, out, err, _ = run("long\n!!\nnext\n!!\n", fake=client)
    assert code == 130 and len(client.submitted) == 1 and client.closed


# -- terminal rendering


def test_rows_used_counts_wrapped_lines_and_tabs() -> None:
    assert rows_used("", 80) == 1
    assert rows_used("abc\n", 80) == 2
    assert rows_used("x" * 80, 80) == 1
    assert rows_used("x" * 81 + "\nb", 80) == 3
    assert rows_used("\tx", 8) == 2
    assert rows_used("漢" * 41, 80) == 2


def test_highlight_keeps_the_characters_exactly() -> None:
    code = "\n\n\tdef f():\n  return 1  \n\n"
    text = highlight(code, "python")
    assert text.plain == code and text.spans
    assert highlight("int main() { return !x; }", "no-such-language").plain == "int main() { return !x; }"


def test_markdown_code_blocks_are_highlighted_and_prose_kept() -> None:
    answer = "Use this:\n```cpp\nint x = 1;\n```\nand ```\nunclosed = True"
    text = highlight_markdown_code(answer)
    assert text.plain == answer
    styled = {answer[s.start : s.end] for s in text.spans}
    assert "Use this:\n" not in styled and any("int" in s for s in styled)


def test_terminal_answer_is_redrawn_in_place_with_colour() -> None:
    stdout, stderr = Tty(), Tty()
    out = Output(stdout, stderr, interactive=True)
    answer = Answer(out, "completion", "def add(a, b):")
    for piece in ["    return", " a + b\x1b[2J", "\n"]:
        answer.add(piece)
    answer.finish()
    raw = stdout.getvalue()
    streamed, redrawn = raw.split("\r\x1b[1A\x1b[J")
    assert streamed == "    return a + b[2J\n"  # the model cannot send escape sequences
    assert "\x1b[" in redrawn and "return" in redrawn


@pytest.mark.parametrize("suffix", ["\n    return", ""])
def test_terminal_infilling_shows_the_whole_code_with_the_middle(suffix: str) -> None:
    stdout = Tty()
    answer = Answer(Output(stdout, Tty(), interactive=True), "infilling", 'def hi():\n    """ <FILL>' + suffix)
    answer.add('Say hi."""')
    answer.finish()
    whole = stdout.getvalue().split("filled in")[1]
    assert "def" in whole and "Say" in whole and "\x1b[" in whole


def test_prompt_session_submits_on_a_bang_bang_line_only() -> None:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from tui.console import make_prompt_session

    with create_pipe_input() as pipe:
        session = make_prompt_session(input=pipe, output=DummyOutput())
        pipe.send_text("def f():\r\r    pass\r!!\r")
        assert session.prompt() == "def f():\n\n    pass"
        pipe.send_text("\x1b[200~a\n!!\nb\x1b[201~\r!!\r")  # a pasted !! line does not submit
        assert session.prompt() == "a\n!!\nb"


@pytest.mark.parametrize("keys", ["\x04", "\x03"])
def test_ctrl_d_or_ctrl_c_at_the_prompt_quits(keys: str) -> None:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from tui.console import make_prompt_session, terminal_inputs

    with create_pipe_input() as pipe:
        session = make_prompt_session(input=pipe, output=DummyOutput())
        pipe.send_text("end\r!!\r" + keys)
        assert list(terminal_inputs(session)) == [Action("end")]


def test_an_answer_taller_than_the_screen_is_highlighted_below_it() -> None:
    stdout = Tty()
    answer = Answer(Output(stdout, Tty(), interactive=True), "python", "")  # rich's default screen: 25 rows
    answer.add("x = 1\n" * 30)
    answer.finish()
    raw = stdout.getvalue()
    assert "\x1b[J" not in raw
    streamed, below = raw.split("─" * 40)
    assert streamed.startswith("x = 1\n" * 30) and below.count("x") == 30 and "\x1b[" in below


def test_importing_the_console_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, tui.console; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__))).returncode == 0
