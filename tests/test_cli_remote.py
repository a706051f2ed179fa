"""`chat --url` and `generate --url` (the seed's api_client, done our way): piped, the same text as the engine here
gives with the same greedy settings; the config file names a default server and its key."""

from __future__ import annotations

import io

import pytest

from engine.local_client import LocalClient
from engine.requests import EngineSpec
from tests.servers import metric, serving
from tui import cli

GREEDY = ["--temperature", "0", "--max-new-tokens", "24"]
INPUTS = "def fibonacci(n):\n!!\nNow make it iterative.\n!!\nend\nWrite a stack class.\n!!\n"


@pytest.fixture(scope="module")
def server():
    with serving(
        lambda sink: LocalClient(EngineSpec(device="cpu", max_batch=1), on_event=sink), api_key="k"
    ) as running:
        yield running


def _run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str], stdin: str = "") -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert cli.main(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_chat_url_piped_gives_the_same_text_as_chat(server, capsys, monkeypatch) -> None:
    here = _run(capsys, monkeypatch, ["chat", "--device", "cpu", *GREEDY], INPUTS)
    there = _run(capsys, monkeypatch, ["chat", "--url", server.url, "--api-key", "k", *GREEDY], INPUTS)
    assert there == here and here.count("\n") >= 3


@pytest.mark.parametrize(
    "args",
    [
        ["--prompt", "def fibonacci(n):\n"],
        ["--cap", "infilling", "--prompt", "def add(a, b):\n    <FILL>\n    return c\n"],
        ["--cap", "infilling", "--spm", "--prompt", "def add(a, b):\n    <FILL>\n    return c\n"],
        ["--cap", "chat", "--sys-instruct", "Answer in Python.", "--prompt", "Write a quicksort."],
    ],
)
def test_generate_url_gives_the_same_text_as_generate(server, capsys, monkeypatch, args: list[str]) -> None:
    here = _run(capsys, monkeypatch, ["generate", "--device", "cpu", *GREEDY, *args])
    there = _run(capsys, monkeypatch, ["generate", "--url", server.url, "--api-key", "k", *GREEDY, *args])
    assert there == here and here


def test_the_config_file_names_the_default_server_and_its_key(server, capsys, monkeypatch, tmp_path) -> None:
    config = tmp_path / "codellama-tui" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'url = "{server.url}"\napi_key = "k"\nmodel = "/no/such/model"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    prompt = ["--prompt", "import os\n", *GREEDY]
    key = {"Authorization": "Bearer k"}
    generated = metric(server.url, "codellama_generation_tokens_total", key)
    by_config = _run(capsys, monkeypatch, ["generate", *prompt])
    assert metric(server.url, "codellama_generation_tokens_total", key) > generated  # the server's, not a model here
    assert by_config == _run(capsys, monkeypatch, ["generate", "--url", server.url, "--api-key", "k", *prompt])
    monkeypatch.setenv("CODELLAMA_TUI_API_KEY", "wrong")  # the environment's key wins over the file's
    assert cli.main(["generate", *prompt]) == 1
    assert "the server answered 401" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--url", server.url, "--model", "/m", *prompt])
    assert exit_.value.code == 2 and "--url and --model exclude each other" in capsys.readouterr().err
