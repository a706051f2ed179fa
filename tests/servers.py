"""Servers for the server's tests: `codellama-tui serve`'s app on a thread of the test process, over any client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from engine.client import Client, EventSink
from tui.server.app import MAX_BODY
from tui.server.run import Running, make_bridge, start_in_thread


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
