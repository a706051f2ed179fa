"""`codellama-tui chat`: the seed's console chat, rebuilt on prompt_toolkit and rich.

Inputs follow `tui.console_input` (a line `!!` ends one). Answers stream to stdout as they come; on a
terminal they are then redrawn syntax-highlighted, while notes, warnings, errors and the stats line go to
stderr, so that a script piping stdin gets exactly the answers on stdout and no colour codes anywhere.
The engine is reached only through the client contract (`engine.client`), so the console never imports torch
itself; the conversation's history is kept here (`tui.conversation`) and sent whole every turn.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

from pygments.lexers import get_lexer_by_name
from pygments.lexers.python import PythonLexer
from pygments.token import Error
from pygments.util import ClassNotFound
from rich.cells import cell_len
from rich.console import Console
from rich.style import Style
from rich.syntax import Syntax
from rich.text import Text

from engine.client import Client, ForceQuit
from engine.errors import EngineError
from engine.events import Event, Failed, Finished, Loading, ModelInfo, Started, Stats, TextDelta, TurnsDropped
from engine.local_client import LocalClient
from engine.prompts import answer_room
from engine.requests import CAPS, FILL, EngineSpec, Request, SamplingParams, replacement_warning
from tui.cli import ClientFactory, with_flags
from tui.console_input import Action, Input, classify, is_sentinel, read_inputs
from tui.conversation import Conversation

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

THEME = "monokai"
HINT = "end an input with a line !! · end starts a new session · exit or ctrl+d quits · ctrl+c stops an answer"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FENCE = re.compile(r"^(```[ \t]*([\w+#.-]*)[^\n]*\n)(.*?)(^```[ \t]*$|\Z)", re.M | re.S)
_FILLED = Style(bgcolor="grey23")


def run_console(
    spec: EngineSpec,
    cap: str,
    system: str | None,
    overrides: dict[str, object],
    *,
    client_factory: ClientFactory = LocalClient,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the console chat until `exit`, end of input, ctrl+d or ctrl+c at the prompt; return the exit code.

    A prompt_toolkit session reads the terminal when stdin and stdout both are one; otherwise stdin is read
    line by line with the same protocol and nothing is coloured.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin is not None and stdin.isatty() and stdout.isatty()
    out = Output(stdout, stderr, interactive)
    if stdin is None:  # `<&-`
        out.error("error: stdin is closed: there is nothing to read the inputs from")
        return 2
    try:
        if cap not in CAPS:
            raise ValueError(f"unknown cap '{cap}'; choose one of {', '.join(CAPS)}")
        sampling = SamplingParams.for_cap(cap, **overrides)
        sampling.check()
    except (TypeError, ValueError) as err:
        out.error(f"error: {err}")
        return 2
    client = client_factory(spec, out.loading if interactive else _ignore)
    try:
        client.start()
        info = client.wait_ready()
        out.loaded()
        if cap == "infilling" and not info.can_infill:
            why = "no <PRE>/<SUF>/<MID> tokens; use a 7B or 13B model" if info.device else "the server takes no suffix"
            out.error(f"error: {info.name} cannot infill ({why})")  # no device: a foreign server's model
            return 1
        chat = Chat(client, out, info, cap, system, sampling, stdin if interactive else None)
        if interactive:
            where = [f"{info.device} {info.dtype}"] if info.device else []
            weights = [f"{info.quant} weights"] if info.quant else []
            weights += [f"{info.kv} KV cache"] if info.kv else []
            context = [f"context {info.context} tokens"] if info.context else []
            out.note(" · ".join([info.name, f"cap {cap}", *where, *weights, *context]))
            out.note(HINT)
        return chat.run(terminal_inputs(make_prompt_session()) if interactive else read_inputs(stdin))
    except EngineError as err:
        out.error(f"error: {with_flags(str(err), err.fields)}")
        return 1
    except (KeyboardInterrupt, ForceQuit):
        out.break_line()
        return 130
    finally:
        client.close()


def _ignore(event: Event) -> None:
    """Events that arrive without a terminal to show progress on."""


class Chat:
    """One console conversation: turns inputs into requests and their events into output."""

    def __init__(
        self,
        client: Client,
        out: Output,
        info: ModelInfo,
        cap: str,
        system: str | None,
        sampling: SamplingParams,
        terminal: IO[str] | None = None,
    ) -> None:
        self.client, self.out, self.info, self.terminal = client, out, info, terminal
        self.cap, self.system, self.sampling = cap, system, sampling
        self.conversation = Conversation(system)
        self.used = 0  # tokens the chat session holds after its last exchange
        self.warned_full = False

    def run(self, inputs: Iterable[Input]) -> int:
        """Serve inputs until `exit` or their end."""
        for item in inputs:
            if isinstance(item, Action):
                if item.command == "exit":
                    break
                self.new_session()
            else:
                self.ask(item.text)
        return 0

    def new_session(self) -> None:
        """`end`/`reset`: forget the conversation and start another."""
        self.conversation = Conversation(self.system)
        self.used = 0
        self.warned_full = False
        self.out.note("(new session)")

    def ask(self, text: str) -> None:
        """Send one input and show its answer as it streams; ctrl+c cancels it (the client's stream sees to that)
        and keeps the session."""
        chat = self.cap == "chat"
        if chat:
            request = self.conversation.request(text, self.sampling, speculate=True)  # --speculate decides
        else:
            request = Request(cap=self.cap, text=text, sampling=self.sampling, speculate=True)  # type: ignore[arg-type]
        answer = Answer(self.out, self.cap, text)
        context = self.info.context
        with _no_echo(self.terminal):
            for event in self.client.stream(request):
                if isinstance(event, TextDelta):
                    answer.add(event.text)
                elif isinstance(event, Started):
                    context = event.context
                    if event.replaced:
                        self.out.warn(f"warning: {replacement_warning(event.replaced)}")
                elif isinstance(event, TurnsDropped):
                    self.conversation.drop(event.count)
                    answer.interrupt()
                    s = "s" if event.count != 1 else ""
                    self.out.warn(
                        f"warning: the conversation outgrew the context; dropped its {event.count} oldest exchange{s}"
                    )
                elif isinstance(event, Failed):
                    answer.interrupt()
                    self.out.error(event.message)
                elif isinstance(event, Finished):
                    answer.finish()
                    self.out.stats(stats_line(event.reason, event.stats, context))
                    if chat and event.reason != "cancelled":  # a cancelled exchange is not kept
                        self.conversation.answered(request, event.text)
                        self._check_room(event.stats, context)

    def _check_room(self, stats: Stats, context: int | None) -> None:
        """Warn once per session when another exchange like the last one would not fit, as the seed did
        before refusing; the engine then drops the oldest exchanges, keeping room for a full answer. A server
        that does not say its context gets no warning."""
        if context is None:
            return
        message = max(0, stats.prompt_tokens - self.used)
        self.used = stats.prompt_tokens + stats.new_tokens
        reserve = answer_room(self.sampling.max_new_tokens, context)
        if self.warned_full or self.used + message + reserve <= context:
            return
        self.warned_full = True
        self.out.warn(
            f"warning: the conversation holds {self.used} of {context} tokens; the next turns drop the "
            "oldest ones (enter end to start a new session)"
        )


def stats_line(reason: str, stats: Stats, context: int | None) -> str:
    """The line after each answer: how much, how fast, and why it stopped when that is not the natural end."""
    why = {
        "length": " · reached max new tokens",
        "context": f" · reached the context end ({context} tokens)",
        "cancelled": " · stopped",
    }.get(reason, "")
    per_step = f" · {stats.tokens_per_step:.1f} tokens/step" if stats.proposed else ""
    return (
        f"[{stats.new_tokens} tokens · {stats.tokens_per_s:.1f} tokens/s{per_step} · first token {stats.ttft_s:.2f} s"
        f"{why}]"
    )


@contextmanager
def _no_echo(terminal: IO[str] | None) -> Iterator[None]:
    """Stop the terminal echoing keys during an answer: a `^C` or type-ahead would land inside the streamed
    text and throw off its redraw. Typed keys still wait for the next prompt."""
    if terminal is None or sys.platform == "win32":
        yield
        return
    import termios

    try:
        fd = terminal.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):  # not a real terminal after all
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class Output:
    """Where everything is printed: answers to stdout, the rest to stderr; rich styles only on a terminal."""

    def __init__(self, stdout: IO[str], stderr: IO[str], interactive: bool) -> None:
        self.stdout, self.interactive = stdout, interactive
        options = dict(
            force_terminal=interactive,
            color_system="auto" if interactive else None,
            highlight=False,
            markup=False,
            emoji=False,
            soft_wrap=True,
        )
        self.console = Console(file=stdout, **options)  # type: ignore[arg-type]
        self.errors = Console(file=stderr, **options)  # type: ignore[arg-type]
        self.column = 0  # where stdout's cursor is on its line: 0 when a note may start

    def write(self, text: str) -> None:
        """Stream raw answer text."""
        if not text:
            return
        self.stdout.write(text)
        self.stdout.flush()
        self.column = len(text) - text.rfind("\n") - 1 if "\n" in text else self.column + len(text)

    def print(self, text: Text) -> None:
        """Print finished (possibly highlighted) text and end its line, adding no blank line of its own."""
        self.console.print(text, end="" if text.plain.endswith("\n") else "\n")
        self.column = 0

    def break_line(self) -> None:
        """End a partly written line so that what follows starts on its own."""
        if self.column:
            self.write("\n")

    def note(self, message: str) -> None:
        self._say(message, "dim")

    def stats(self, message: str) -> None:
        self._say(message, "dim")

    def warn(self, message: str) -> None:
        self._say(message, "yellow")

    def error(self, message: str) -> None:
        self._say(message, "bold red")

    def _say(self, message: str, style: str) -> None:
        self.break_line()
        self.errors.print(message, style=style)

    def loading(self, event: Event) -> None:
        """Show load progress on the terminal (called on the engine's thread before it is ready)."""
        if isinstance(event, Loading):
            self.errors.file.write(f"\r\x1b[Kloading {event.stage} {event.fraction:.0%}")
            self.errors.file.flush()

    def loaded(self) -> None:
        if self.interactive:
            self.errors.file.write("\r\x1b[K")
            self.errors.file.flush()

    @property
    def size(self) -> tuple[int, int]:
        """The terminal's columns and rows."""
        return self.console.size.width, self.console.size.height


class Answer:
    """One answer on screen: streamed as plain text, then (on a terminal) redrawn highlighted.

    The redraw erases the streamed rows and prints the same characters with colours, so it is exact only
    while nothing else was printed in between and all rows are still on the screen; otherwise the
    highlighted version is printed below instead.
    """

    def __init__(self, out: Output, cap: str, prompt: str) -> None:
        self.out, self.cap = out, cap
        # the code around the answer, lexed with it so that it is coloured in the right context
        self.before, self.after = prompt, ""
        self.fills = cap == "infilling" and prompt.count(FILL) == 1
        if self.fills:
            self.before, self.after = prompt.split(FILL)
        self.streamed = ""
        self.clean = True  # only the answer was printed since it started

    def add(self, text: str) -> None:
        if self.out.interactive:
            text = _CONTROL.sub("", text)
        if not self.streamed:
            self.out.break_line()
        self.streamed += text
        self.out.write(text)

    def interrupt(self) -> None:
        """Something else is about to be printed: the streamed text can no longer be redrawn in place."""
        self.clean = not self.streamed

    def finish(self) -> None:
        """The answer is complete: highlight it (terminal only) and end its line."""
        if not self.out.interactive or not self.streamed:
            self.out.break_line()
            return
        width, height = self.out.size
        rows = rows_used(self.streamed, width)
        if self.clean and rows < height:
            self.out.write("\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "") + "\x1b[J")
        else:
            self.out.break_line()
            self.out.print(Text("─" * min(width, 40), style="dim"))
        self.out.print(self._highlighted())
        if self.fills:
            self.out.print(Text("─" * min(width, 40) + " filled in", style="dim"))
            whole = highlight(self.before + self.streamed + self.after, "python")
            whole.stylize(_FILLED, len(self.before), len(self.before) + len(self.streamed))
            self.out.print(whole)

    def _highlighted(self) -> Text:
        """Chat answers are prose with fenced code; the other caps' answers are code, taken for Python
        (CodeLlama's main language) since nothing names the language."""
        if self.cap == "chat":
            return highlight_markdown_code(self.streamed)
        whole = highlight(self.before + self.streamed + self.after, "python")
        return whole[len(self.before) : len(self.before) + len(self.streamed)]


def rows_used(text: str, width: int) -> int:
    """How many terminal rows `text`, written from column 0, spans (the cursor's row included)."""
    return sum(max(1, math.ceil(cell_len(line.expandtabs(8)) / width)) for line in text.split("\n"))


def highlight(code: str, language: str) -> Text:
    """Colour `code` keeping its characters exactly (no tab expansion, no added newline) on the terminal's
    own background; error tokens stay plain, so a wrong lexer guess does not paint the screen red."""
    try:
        lexer = get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = PythonLexer(stripnl=False, ensurenl=False)
    theme = Syntax.get_theme(THEME)
    text = Text()
    for token, value in lexer.get_tokens(code):
        style = None if token in Error else theme.get_style_for_token(token) + Style(bgcolor="default")
        text.append(value, style)
    return text if text.plain == code else Text(code)


def highlight_markdown_code(answer: str) -> Text:
    """Highlight the fenced code blocks of a chat answer (Python unless the fence names a language) and
    leave the prose as the model wrote it; an unclosed fence (the answer was cut) runs to the end."""
    text = Text()
    pos = 0
    for match in _FENCE.finditer(answer):
        text.append(answer[pos : match.start()])
        text.append(match.group(1), "dim")
        text.append_text(highlight(match.group(3), match.group(2) or "python"))
        text.append(match.group(4), "dim")
        pos = match.end()
    text.append(answer[pos:])
    return text


def make_prompt_session(**kwargs: object) -> PromptSession[str]:
    """A multi-line prompt_toolkit session where Enter on a line `!!` submits and adds a newline otherwise.

    Imported here, not at module level, so that the piped path never needs a terminal library set up;
    `kwargs` (input, output) let tests drive it through a pipe.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        document = buffer.document
        if not is_sentinel(document.current_line):
            buffer.newline(copy_margin=not event.app.paste_mode())
            return
        lines = document.lines
        row = document.cursor_position_row
        rest = "\n".join(lines[:row] + lines[row + 1 :])
        buffer.document = Document(rest, len("\n".join(lines[:row])))
        buffer.validate_and_handle()

    return PromptSession(
        message=">>> ",
        prompt_continuation="... ",
        multiline=True,
        key_bindings=bindings,
        history=InMemoryHistory(),
        **kwargs,
    )


def terminal_inputs(session: PromptSession[str]) -> Iterator[Input]:
    """Read inputs from a prompt_toolkit session; ctrl+d or ctrl+c at the prompt ends them."""
    while True:
        try:
            text = session.prompt()
        except (EOFError, KeyboardInterrupt):
            return
        item = classify(text)
        if item is not None:
            yield item
