"""Servers for the server's tests: `codellama-tui serve`'s app on a thread of the test process, over any client."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from engine.client import Client, EventSink
from tui.server.app import MAX_BODY
from tui.server.run import Running, make_bridge, start_in_thread

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serving(
    make_client: Callable[[EventSink], Client],
    slots: int = 8,
    max_queue: int = 16,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
) -> Iterator[Running]:
    """A server on a free port of 127.0.0.1, once its model is ready; stopped (as SIGTERM would) afterwards."""
    running = start_in_thread(make_bridge(make_client, slots, max_queue), api_key=api_key, max_body=max_body)
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + 120
        while httpx.get(f"{running.url}/health", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the server's model did not load"
            time.sleep(0.05)
        yield running
    finally:
        running.stop()
        assert not running.thread.is_alive()


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The `data:` payloads of a server-sent event stream: JSON objects, or the string "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """One sample of `/metrics` by its full name with labels (`codellama_sequences_finished_total{reason="stop"}`);
    0 when it has none yet."""
    for line in httpx.get(f"{url}/metrics", headers=headers or {}).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class Serve:
    """`codellama-tui serve --port 0 ARGS` in a child process, its stderr collected by a thread."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "serve", "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        self.url = ""

    def listening(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not self.url:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log
            for line in list(self.lines):
                if "listening on http://" in line:
                    self.url = line.split("listening on ")[1].split()[0]
            time.sleep(0.05)
        return self.url

    def ready(self, timeout: float = 240) -> str:
        url = self.listening()
        deadline = time.monotonic() + timeout
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log
            time.sleep(0.2)
        return url

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """Pids of this server's child processes (its tensor-parallel ranks)."""
        kids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    kids.append(int(entry.name))
        return kids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class FakeOpenAI:
    """A foreign OpenAI-compatible server on a real socket of 127.0.0.1, none of our fields: it streams `words` as
    OpenAI's chunks (then usage and [DONE]), refuses `suffix` as vLLM does unless `takes_suffix`, wants `key` if
    given, waits `pause_s` before each chunk, with `hold` waits after the first chunk until `release` is set, and
    with `drop_after` closes the connection after that many chunks, mid-answer. `bodies` holds the JSON of every
    request it got. `port` 0 picks a free one."""

    MODEL = "fake-model"

    def __init__(
        self,
        words: tuple[str, ...] = ("Hello", ",", " world", "!"),
        *,
        port: int = 0,
        key: str | None = None,
        takes_suffix: bool = False,
        pause_s: float = 0.0,
        hold: bool = False,
        drop_after: int | None = None,
        health: bool = True,
    ) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.words, self.key, self.takes_suffix = words, key, takes_suffix
        self.pause_s, self.drop_after, self.health = pause_s, drop_after, health
        self.hold, self.release = hold, threading.Event()
        self.bodies: list[dict] = []
        self.connections: set[socket.socket] = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                fake.connections.add(self.connection)

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health" and fake.health:
                    self._json(200, {"status": "ok"})
                elif not self._authorized():
                    return
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": fake.MODEL, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                fake.bodies.append(body)
                if "suffix" in body and not fake.takes_suffix:
                    self._json(400, {"error": {"message": "suffix is not currently supported", "code": 400}})
                elif not body.get("stream"):
                    self._json(200, {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
                else:
                    self._stream("messages" in body)

            def _authorized(self) -> bool:
                if fake.key is None or self.headers.get("Authorization") == f"Bearer {fake.key}":
                    return True
                self._json(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
                return False

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, chat: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def choice(text: str | None, reason: str | None = None) -> dict:
                    if chat:
                        return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
                    return {"index": 0, "text": text or "", "finish_reason": reason}

                events = [{"choices": [choice(w)]} for w in fake.words]
                events.append({"choices": [choice(None, "stop")]})
                usage = {"prompt_tokens": 5, "completion_tokens": len(fake.words), "total_tokens": 5 + len(fake.words)}
                events.append({"choices": [], "usage": usage})
                for n, event in enumerate([*events, "[DONE]"]):
                    if fake.drop_after is not None and n == fake.drop_after:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    time.sleep(fake.pause_s)
                    if fake.hold and n == 1:
                        fake.release.wait()
                    data = f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
                    try:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    except OSError:  # the client went away
                        return
                self.wfile.write(b"0\r\n\r\n")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client gone mid-answer is no error here
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-openai", daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop as a killed server would: the kept-alive connections close too."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
