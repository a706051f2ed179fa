"""The real `codellama-tui` command, end to end on tiny checkpoints: output, errors, cancellation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.prompts import build_prompt
from engine.requests import ChatMessage, Request
from engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | bytes = "", timeout: float = 120, **popen: object) -> subprocess.CompletedProcess:
    """Run the command; bytes for `stdin` give bytes back (input that is not valid UTF-8)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], input=stdin, capture_output=True, text=not isinstance(stdin, bytes),
        timeout=timeout, env=env, **popen,
    )  # fmt: skip


def error_line(result: subprocess.CompletedProcess) -> str:
    """The failure must be exactly one `codellama-tui: error: ...` line and never a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_help_lists_subcommands_and_import_tui_does_not_import_torch() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for name in ("generate", "tokenize", "chat"):
        assert name in result.stdout
    assert "demo model" in result.stdout
    probe = "import sys, tui, tui.cli, tui.oneshot; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_generate_greedy_writes_only_the_generated_text(tiny_model_dir: Path) -> None:
    args = (
        "generate",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    )
    first = cli(*args, stdin="def add(a, b):\n")
    second = cli(*args, "--prompt", "def add(a, b):\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout and first.stdout == second.stdout
    assert "ready:" in first.stderr and "ready:" not in first.stdout


def test_generate_jsonl_answers_each_line_in_order(tiny_model_dir: Path) -> None:
    lines = [{"text": "import os\n"}, {"text": "Write hello world", "system": "Use Python"}, {"text": "def f(x):"}]
    common = ("--model", str(tiny_model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8")
    result = cli("generate", "--jsonl", *common, stdin="\n".join(json.dumps(x) for x in lines) + "\n")
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    assert len(outputs) == 3
    assert outputs[0] == cli("generate", *common, "--prompt", "import os\n").stdout
    assert outputs[2] == cli("generate", *common, "--prompt", "def f(x):").stdout


def test_generate_jsonl_bad_line_is_reported_and_the_rest_answered(tiny_model_dir: Path) -> None:
    common = ("--model", str(tiny_model_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4")
    result = cli("generate", "--jsonl", *common, stdin='{"text": "a"}\nnot json\n{"text": "b"}\n')
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1
    assert "text" in rows[0] and "error" in rows[1] and "line 2" in rows[1]["error"] and "text" in rows[2]


def request_of(cap: str, text: str, system: str | None = None) -> Request:
    """What `tokenize` builds from one input: for chat, a conversation of the system instruction and the text."""
    if cap != "chat":
        return Request(cap, text=text)
    return Request(cap, messages=(*[ChatMessage("system", system)] * (system is not None), ChatMessage("user", text)))


@pytest.mark.parametrize("cap", ["completion", "infilling", "chat", "python"])
def test_tokenize_prints_what_the_engine_feeds(tiny_model_dir: Path, cap: str) -> None:
    text = "def f(x):\n    <FILL>\n    return y\n" if cap == "infilling" else "def f(x):\n    return x\n"
    result = cli("tokenize", "--model", str(tiny_model_dir), "--cap", cap, "--sys-instruct", "Be brief", stdin=text)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_dir(tiny_model_dir)
    assert json.loads(result.stdout) == build_prompt(tok, request_of(cap, text, "Be brief"))
    lines = json.dumps({"text": text, "system": "Other"}) + "\n" + json.dumps({"text": text}) + "\n"
    result = cli("tokenize", "--jsonl", "--model", str(tiny_model_dir), "--cap", cap, stdin=lines)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [build_prompt(tok, request_of(cap, text, "Other")), build_prompt(tok, request_of(cap, text))]


def test_tokenize_chat_on_a_70b_instruct_checkpoint_uses_its_step_format(tiny_70b_instruct_dir: Path) -> None:
    result = cli("tokenize", "--model", str(tiny_70b_instruct_dir), "--cap", "chat", "--sys-instruct", "Be brief",
                 stdin="Hi")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    assert ids == build_prompt(Tokenizer.from_dir(tiny_70b_instruct_dir), request_of("chat", "Hi", "Be brief"))
    assert ids.count(32015) == 2 and ids[-3:] == [13, 13, 29871]  # two turns closed by <step>, then the reply's header


def test_infilling_writes_only_the_middle(tiny_model_dir: Path) -> None:
    result = cli(
        "generate", "--model", str(tiny_model_dir), "--device", "cpu", "--cap", "infilling", "--max-new-tokens", "6",
        stdin="def f(x):\n    <FILL>\n    return y\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout and "<FILL>" not in result.stdout and "return y" not in result.stdout


def _broken(tmp: Path, source: Path, how: str) -> Path:
    bad = tmp / how
    shutil.copytree(source, bad)
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "not-llama":
        cfg = json.loads((bad / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (bad / "config.json").write_text(json.dumps(cfg))
    elif how == "missing-shard":
        sorted(bad.glob("model-*.safetensors"))[1].unlink()
    elif how == "truncated":
        shard = sorted(bad.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "no-tokenizer":
        for name in ("tokenizer.model", "tokenizer.json"):
            (bad / name).unlink(missing_ok=True)
    elif how == "bad-json":
        (bad / "config.json").write_text("{not json")
    elif how == "unreadable-config":
        config = bad / "config.json"
        if os.geteuid() == 0:  # root reads any mode: a file whose read fails (EIO) instead
            config.unlink()
            config.symlink_to("/proc/self/mem")
        else:
            config.chmod(0)
    return bad


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no-config", "no config.json"),
        ("not-llama", "not Llama"),
        ("missing-shard", "missing weight file"),
        ("truncated", "truncated"),
        ("no-tokenizer", "tokenizer"),
        ("bad-json", "not valid JSON"),
        ("unreadable-config", "config.json: cannot read ("),
    ],
)
def test_broken_checkpoints_give_one_line(tiny_gqa_dir: Path, tmp_path: Path, how: str, expected: str) -> None:
    bad = _broken(tmp_path, tiny_gqa_dir, how)
    line = error_line(cli("generate", "--model", str(bad), "--device", "cpu", "--prompt", "x"))
    assert expected in line


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (("--model", "/no/such/dir"), "x", "no such directory"),
        (("--cap", "infilling"), "def f():\n    return 1\n", "found 0"),
        (("--cap", "infilling"), "<FILL> and <FILL>", "found 2"),
        (("--max-seq-len", "16"), "word " * 40, "too many"),
        (("--cap", "poetry"), "x", "invalid choice"),
        (("--temperature", "-1"), "x", "temperature"),
        (("--top-p", "1.5"), "x", "top-p"),
        (("--max-new-tokens", "0"), "x", "must be >= 1"),
        (("--device", "tpu"), "x", "unknown device"),
    ],
)
def test_bad_input_gives_one_line(tiny_model_dir: Path, args: tuple, stdin: str, expected: str) -> None:
    base = ("--model", str(tiny_model_dir)) if "--model" not in args else ()
    line = error_line(cli("generate", *base, "--device", "cpu", *args, stdin=stdin) if "--device" not in args
                      else cli("generate", *base, *args, stdin=stdin))  # fmt: skip
    assert expected in line


def test_infilling_on_a_model_without_fim_pieces(tiny_base_model_dir: Path) -> None:
    line = error_line(
        cli(
            "generate",
            "--model",
            str(tiny_base_model_dir),
            "--device",
            "cpu",
            "--cap",
            "infilling",
            "--prompt",
            "a<FILL>b",
        )
    )
    assert "cannot infill" in line


def test_cuda_on_a_machine_without_it(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "no CUDA device" in error_line(
        cli("generate", "--model", str(tiny_model_dir), "--device", "cuda", "--prompt", "x")
    )


def test_ctrl_c_cancels_mid_generation(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-new-tokens",
        "480",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", *args, "--prompt", "def f("],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        # As from a terminal: a shell without job control starts background jobs (this test's runner, say) with
        # SIGINT ignored, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    first = proc.stdout.read(1)
    assert first
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130
    assert (
        "Traceback" not in err.decode() and err.decode().strip().splitlines()[-1] == "codellama-tui: error: cancelled"
    )
    assert len(first + out) < 480 * 8  # it stopped early, keeping what was printed


def test_the_config_files_model_is_the_default(tiny_model_dir: Path) -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "codellama-tui" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'model = "{tiny_model_dir}"\n')
    result = cli("generate", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4", "--prompt", "x")
    assert result.returncode == 0, result.stderr
    assert f"ready: {tiny_model_dir.name}" in result.stderr
    config.write_text("model = 3\n")
    assert "model must be a string" in error_line(cli("generate", "--device", "cpu", "--prompt", "x"))


DEMO_GREEDY = ("--device", "cpu", "--temperature", "0", "--max-new-tokens", "4")  # the built-in demo model


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning:" in line]


def test_invalid_utf8_on_stdin_is_replaced_and_reported_by_generate_and_tokenize() -> None:
    """Once, a byte that is not UTF-8 killed the engine thread and `generate` waited forever."""
    got = cli("generate", *DEMO_GREEDY, stdin=b"def f(x):\xff\n", timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout and warnings_of(got.stderr.decode()) == [
        "codellama-tui: warning: 1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD"
    ]
    assert got.stdout == cli("generate", *DEMO_GREEDY, "--prompt", "def f(x):\ufffd\n").stdout.encode()
    ids = cli("tokenize", stdin=b"def f(x):\xff\xfe\n", timeout=60)
    assert ids.returncode == 0 and "2 invalid characters" in ids.stderr.decode()
    assert json.loads(ids.stdout) == json.loads(cli("tokenize", "--prompt", "def f(x):\ufffd\ufffd\n").stdout)


def test_invalid_utf8_in_the_console_chat_is_replaced_and_reported() -> None:
    got = cli("chat", *DEMO_GREEDY, "--cap", "completion", stdin=b"def f(\xff\n!!\ndef g(\n!!\n", timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stderr.decode().count("tokens/s") == 2  # both inputs answered
    assert [line for line in got.stderr.decode().splitlines() if "warning:" in line] == [
        "warning: 1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD"
    ]


def test_a_lone_surrogate_in_jsonl_is_replaced_and_the_later_lines_answered() -> None:
    """Once, the line after a `\\ud800` was never answered and Ctrl+C did not end the command."""
    lines = json.dumps({"text": "x\ud800y"}) + "\n" + json.dumps({"text": "def g("}) + "\n"
    got = cli("generate", "--jsonl", *DEMO_GREEDY, stdin=lines, timeout=60)
    assert got.returncode == 0, got.stderr
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    assert len(rows) == 2 and all("text" in row for row in rows)
    assert rows[0]["text"] == cli("generate", *DEMO_GREEDY, "--prompt", "x\ufffdy").stdout
    assert warnings_of(got.stderr) == [
        "codellama-tui: warning: line 1: 1 invalid character (bad UTF-8 or a lone surrogate) replaced with U+FFFD"
    ]
    ids = cli("tokenize", "--jsonl", stdin=lines, timeout=60)
    assert ids.returncode == 0 and len(warnings_of(ids.stderr)) == 1
    assert json.loads(ids.stdout.splitlines()[0]) == json.loads(cli("tokenize", "--prompt", "x\ufffdy").stdout)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--temperature", "nan"), "argument --temperature: must be a finite number, got 'nan'"),
        (("--temperature", "inf"), "argument --temperature: must be a finite number, got 'inf'"),
        (("--repetition-penalty", "nan"), "argument --repetition-penalty: must be a finite number"),
        (("--top-p=-inf",), "argument --top-p: must be a finite number"),
        (("--seed", str(2**70)), "seed must fit in 64 bits"),
        (("--seed", str(-(2**63) - 1)), "seed must fit in 64 bits"),
        (("--top-k", str(2**40)), "top-k must be >= 0 and < 2**31"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat", "app"])
def test_bad_sampling_values_are_refused_before_anything_loads(command: str, args: tuple, expected: str) -> None:
    """Once, `--repetition-penalty nan` printed nothing with exit 0, `--temperature nan` was greedy, and a huge
    seed failed only after the model had loaded."""
    got = cli(*([] if command == "app" else [command]), "--device", "cpu", *args, stdin="x\n", timeout=60)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    (line,) = got.stderr.splitlines()  # nothing loaded: no progress, just the error
    assert expected in line


def until_the_reader_goes(*args: str, stdin: str, tmp_path: Path) -> tuple[int, str]:
    """Run the command with its stdout read for a few bytes and then closed, as `| head -c 10` does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "in").write_text(stdin)
    with (tmp_path / "in").open() as source, (tmp_path / "err").open("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", *args], stdin=source, stdout=subprocess.PIPE, stderr=err, env=env
        )
        assert proc.stdout.read(10)
        proc.stdout.close()
        code = proc.wait(timeout=60)
        err.seek(0)
        return code, err.read()


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (("generate", *DEMO_GREEDY[:-1], "900"), "def f("),
        (("generate", "--jsonl", *DEMO_GREEDY), '{"text": "def f("}\n' * 200),
        (("tokenize", "--jsonl"), '{"text": "def f(x):"}\n' * 20000),  # more ids than a pipe holds
        (("chat", *DEMO_GREEDY[:-1], "900", "--cap", "completion"), "def f(\n!!\n" * 3),
    ],
    ids=["generate", "jsonl", "tokenize", "chat"],
)
def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(args: tuple, stdin: str, tmp_path: Path) -> None:
    """Exit 141 as SIGPIPE ends `cat` and `yes`: no traceback, no "Exception ignored ... BrokenPipeError"."""
    code, stderr = until_the_reader_goes(*args, stdin=stdin, tmp_path=tmp_path)
    assert code == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_a_reader_of_stdout_and_stderr_together_that_goes_away_ends_the_command(tmp_path: Path) -> None:
    """`generate ... 2>&1 | head -c 10`: the loading lines hit the closed pipe on the engine's thread; once that
    killed the thread and the command waited for its answer forever."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "generate", *DEMO_GREEDY[:-1], "8", "--prompt", "def f("],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("generate", "--device", "cpu"), "stdin is closed"),
        (("generate", "--jsonl", "--device", "cpu"), "stdin is closed"),
        (("tokenize",), "stdin is closed"),
        (("chat", "--device", "cpu"), "stdin is closed"),
    ],
)
def test_a_closed_stdin_is_one_line_before_anything_loads(args: tuple, expected: str) -> None:
    got = cli(*args, timeout=60, stdin=None, preexec_fn=lambda: os.close(0))  # `<&-`
    assert got.returncode == 2 and expected in error_line(got)
    assert "loading" not in got.stderr


def test_a_closed_stdout_is_one_line() -> None:
    got = cli("generate", "--device", "cpu", "--prompt", "x", timeout=60, preexec_fn=lambda: os.close(1))  # `>&-`
    assert got.returncode == 1 and "stdout is closed" in error_line(got)


def demo_copy(tmp_path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """The demo model copied with config.json changes, or with tensors added (None values drop one)."""
    from engine.config import DEMO_DIR

    out = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, out)
    if config:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        from safetensors.torch import load_file, save_file

        state = {**load_file(out / "model.safetensors"), **tensors}
        save_file({k: v for k, v in state.items() if v is not None}, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"num_key_value_heads": 2},
            "model.layers.0.self_attn.k_proj.weight has shape (256, 256), config.json implies (128, 256)",
        ),
        ({"num_hidden_layers": 5}, "model.layers.5.input_layernorm.weight: config.json declares only 5 layers"),
        (
            {"intermediate_size": 640},
            "model.layers.0.mlp.down_proj.weight has shape (256, 896), config.json implies (256, 640)",
        ),
        ({"num_hidden_layers": 7}, "missing weights model.layers.6."),
    ],
    ids=["kv-heads", "fewer-layers", "smaller-ffn", "more-layers"],
)
def test_a_config_that_disagrees_with_the_weights_is_one_line(tmp_path: Path, config: dict, expected: str) -> None:
    """Once, the demo model with 2 key/value heads in config.json loaded the first rows of each k/v projection
    and wrote garbage."""
    got = cli("generate", "--model", str(demo_copy(tmp_path, config)), "--device", "cpu", "--prompt", "x")
    assert expected in error_line(got)


def test_unexpected_tensors_are_refused_and_rotary_buffers_ignored(tmp_path: Path) -> None:
    import torch

    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32)}
    harmless = cli("generate", "--model", str(demo_copy(tmp_path, tensors=inv_freq)), *DEMO_GREEDY, "--prompt", "x")
    assert harmless.returncode == 0, harmless.stderr
    shutil.rmtree(tmp_path / "demo")
    extra = demo_copy(tmp_path, tensors={"model.layers.0.mlp.extra_proj.weight": torch.ones(4, 4)})
    line = error_line(cli("generate", "--model", str(extra), "--device", "cpu", "--prompt", "x"))
    assert "unexpected tensor model.layers.0.mlp.extra_proj.weight" in line


def test_speculate_gives_the_same_greedy_text_and_shows_tokens_per_step() -> None:
    """`--speculate N` on generate and chat: the same greedy text as without; the console's stats line shows tokens
    per decode step; an N past the largest verify step is refused before anything loads."""
    prompt = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"
    greedy = ("--device", "cpu", "--temperature", "0", "--max-new-tokens", "24")
    plain = cli("generate", *greedy, "--speculate", "0", "--prompt", prompt, timeout=60)
    fast = cli("generate", *greedy, "--speculate", "8", "--prompt", prompt, timeout=60)
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert fast.stdout and fast.stdout == plain.stdout
    console = cli("chat", *greedy, "--cap", "completion", "--speculate", "8", stdin=prompt + "!!\n", timeout=60)
    assert console.returncode == 0 and "tokens/step" in console.stderr, console.stderr
    assert "--speculate: must be 0 (off) to 15, got 16" in error_line(cli("generate", "--speculate", "16"))
    remote = error_line(cli("generate", "--url", "http://127.0.0.1:9", "--speculate", "4", "--prompt", "x"))
    assert "--url and --speculate exclude each other" in remote


def test_engine_only_options_with_a_server_are_refused_not_ignored() -> None:
    """An option that only an engine here takes (the KV cache, quantization, the device...) would do nothing with
    --url: one line names them all, before anything connects."""
    remote = ("--url", "http://127.0.0.1:9", "--prompt", "x")
    line = error_line(cli("generate", *remote, "--kv", "int8", "--quant", "int4", "--device", "cpu"))
    assert "--url and --device, --quant, --kv exclude each other" in line
    assert "--url and --tp exclude each other" in error_line(cli("chat", "--url", "http://127.0.0.1:9", "--tp", "2"))
