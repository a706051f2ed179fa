"""The console chat in-process, against a fake engine client: input protocol, requests, printing."""

from __future__ import annotations

import io
import os
import signal

import pytest

from engine.requests import EngineSpec, Request
from tests.fakes_console import INFO, FakeClient
from tui.console import Answer, Output, highlight, highlight_markdown_code, rows_used, run_console
from tui.console_input import Action, Prompt, read_inputs


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(
    text: str, cap: str = "completion", fake: FakeClient | None = None, system: str | None = None, **overrides: object
) -> tuple[int, str, str, FakeClient]:
    """Run the piped console on `text`; return the exit code, stdout, stderr and the fake."""
    fake = fake or FakeClient()
    stdout, stderr = io.StringIO(), io.StringIO()
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
    (request,) = fake.requests
    assert request.cap == "completion" and request.text == "def add(a, b):" and request.session is None
    assert request.sampling.temperature == 0.2
    assert fake.started and fake.closed


def test_replaced_characters_are_one_warning_and_the_answer_still_comes() -> None:
    code, out, err, _ = run("def add(a,\udcff b):\n!!\n")
    assert code == 0 and out == "    return a + b\n"
    assert "warning: 1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD" in err.splitlines()


def test_overrides_reach_the_request_and_bad_ones_exit_2() -> None:
    _, _, _, fake = run("x\n!!\n", cap="python", temperature=0.0, max_new_tokens=7, top_k=None)
    assert fake.requests[0].sampling.temperature == 0.0
    assert fake.requests[0].sampling.max_new_tokens == 7 and fake.requests[0].sampling.top_k == 40
    code, out, err, fake = run("x\n!!\n", top_p=2.0)
    assert code == 2 and "error: top-p" in err and not fake.started


def test_infilling_prints_the_middle_and_a_wrong_marker_count_is_not_fatal() -> None:
    text = 'def hi():\n    """ <FILL>\n!!\nno marker\n!!\n<FILL> <FILL>\n!!\ndef g():\n    <FILL>\n!!\n'
    code, out, err, fake = run(text, cap="infilling")
    assert code == 0
    assert out == 'Say hello."""\n    print("hello")\n' * 2
    assert "exactly one <FILL> marker in the input, found 0" in err
    assert "found 2" in err
    assert [r.text.count("<FILL>") for r in fake.requests] == [1, 0, 2, 1]
    assert all(r.cap == "infilling" and r.sampling.temperature == 0 for r in fake.requests)


def test_infilling_on_a_model_that_cannot_infill_exits_1() -> None:
    from dataclasses import replace

    code, out, err, fake = run("<FILL>\n!!\n", cap="infilling", fake=FakeClient(info=replace(INFO, can_infill=False)))
    assert code == 1 and "cannot infill" in err and not fake.requests and fake.closed


def test_chat_keeps_one_session_until_end() -> None:
    text = "hi\n!!\nmore\n!!\nend\n!!\nagain\n!!\nreset\n!!\n"
    code, out, err, fake = run(text, cap="chat", system="Provide answers in Python")
    assert code == 0
    first, second, third = fake.requests
    assert first.session == second.session != third.session
    assert all(r.system == "Provide answers in Python" and r.cap == "chat" for r in fake.requests)
    assert fake.ended == [first.session, third.session]
    assert err.count("(new session)") == 2
    assert out.count("Done.\n") == 3


def test_exit_stops_reading() -> None:
    code, out, err, fake = run("a\n!!\nexit\n!!\nb\n!!\n")
    assert code == 0 and [r.text for r in fake.requests] == ["a"] and fake.closed


def test_load_failure_is_one_line_and_exit_1() -> None:
    code, out, err, fake = run("a\n!!\n", fake=FakeClient(load_error="model dir /x: no config.json"))
    assert code == 1 and err == "error: model dir /x: no config.json\n" and out == "" and fake.closed


def test_failed_request_goes_to_stderr_and_the_session_goes_on() -> None:
    def answer(request: Request) -> str:
        return "ok"

    fake = FakeClient(answer=answer)
    real_stream = fake.stream

    def stream(request: Request):
        if request.text == "bad":
            from engine.events import Failed

            yield Failed(request.id, "the prompt contains [INST], which is reserved")
            return
        yield from real_stream(request)

    fake.stream = stream  # type: ignore[method-assign]
    code, out, err, _ = run("bad\n!!\ngood\n!!\n", cap="chat", fake=fake)
    assert code == 0 and out == "ok\n" and "the prompt contains [INST], which is reserved\n" in err


def test_long_chat_warns_near_the_end_then_reports_dropped_turns() -> None:
    # the fake's context is 64 tokens (characters); each exchange is 10 + 20 characters
    fake = FakeClient(answer=lambda r: "a" * 20)
    turns = "".join(f"question{i:02d}\n!!\n" for i in range(4))
    code, out, err, _ = run(turns, cap="chat", fake=fake)
    assert code == 0
    assert err.count("warning: the conversation holds") == 1
    assert "the next turns drop the oldest ones" in err
    assert "dropped its 1 oldest exchange\n" in err
    assert err.index("the conversation holds") < err.index("dropped its")
    assert out == ("a" * 20 + "\n") * 4


def test_ctrl_c_cancels_the_answer_and_keeps_the_session() -> None:
    def press_ctrl_c(client: FakeClient, request: Request, index: int) -> None:
        if request.text == "long" and index == 1:
            os.kill(os.getpid(), signal.SIGINT)

    fake = FakeClient(answer=lambda r: "x" * 40, on_delta=press_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    code, out, err, _ = run("long\n!!\nnext\n!!\n", cap="chat", fake=fake)
    assert code == 0
    assert fake.cancelled == [fake.requests[0].id]
    assert out == "xxxx\n" + "x" * 40 + "\n"
    assert "stopped]" in err
    assert fake.requests[0].session == fake.requests[1].session and not fake.ended
    assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_quits_with_130() -> None:
    def press_twice(client: FakeClient, request: Request, index: int) -> None:
        if index in (1, 2):
            os.kill(os.getpid(), signal.SIGINT)

    fake = FakeClient(answer=lambda r: "x" * 40, on_delta=press_twice)
    fake.cancel = lambda request_id: None  # type: ignore[method-assign] # an engine that does not stop
    code, out, err, _ = run("long\n!!\nnext\n!!\n", fake=fake)
    assert code == 130 and len(fake.requests) == 1 and fake.closed


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
