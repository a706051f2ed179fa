"""Starting and stopping the server: `codellama-tui serve`, and the same server on a thread (`bench-serve`, tests).

The socket is bound before uvicorn starts, so a busy port fails at once with one line and `--port 0` can name
the port it got. SIGINT or SIGTERM first ends every open generation (streams get an error event, waiting answers a
503), then uvicorn closes the connections, and the app's shutdown stops the engine with its tensor-parallel ranks.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from engine.client import Client, EventSink
from engine.requests import EngineSpec
from tui.server.app import MAX_BODY, create_app
from tui.server.bridge import Bridge
from tui.server.metrics import Metrics

PROG = "codellama-tui serve"
GRACE_S = 5  # how long open connections may take to close once the server stops


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM first ends the bridge's generations: uvicorn would otherwise
    wait for every open stream to finish on its own."""

    def __init__(self, config: uvicorn.Config, bridge: Bridge) -> None:
        super().__init__(config)
        self.bridge = bridge

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.bridge.shutdown_threadsafe()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening; raises OSError with the reason."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        )
    except (OSError, ValueError):
        return False


def make_bridge(make_client: Callable[[EventSink], Client], slots: int, max_queue: int) -> Bridge:
    return Bridge(make_client, slots, max_queue, Metrics())


def _config(app: object, log_level: str) -> uvicorn.Config:
    logs = copy.deepcopy(LOGGING_CONFIG)
    logs["loggers"]["codellama_tui"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    logs["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout stays empty: every log line is stderr's
    return uvicorn.Config(app, log_config=logs, log_level=log_level, timeout_graceful_shutdown=GRACE_S, lifespan="on")


def serve(args: argparse.Namespace, spec: EngineSpec) -> int:
    """`codellama-tui serve`: returns the exit status (1 if the model cannot load or the port cannot be had)."""
    from engine.local_client import LocalClient

    bridge = make_bridge(lambda sink: LocalClient(spec, on_event=sink), spec.max_batch, args.max_queue)
    app = create_app(bridge, api_key=args.api_key)
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    if not is_loopback(args.host) and not args.api_key:
        print(
            f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can reach this machine can "
            "use the model",
            file=sys.stderr,
        )
    server = Server(_config(app, "info"), bridge)
    failed: list[str] = []

    def load_failed(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    bridge.on_load_failed = load_failed
    where = f"[{host}]" if ":" in host else host
    print(
        f"{PROG}: listening on http://{where}:{port} (OpenAI API at /v1; the model loads meanwhile, GET /health "
        f"answers 200 once it is ready)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the SIGINT again once it has stopped
        return 130
    finally:
        sock.close()
    return 1 if failed else 0


@dataclass
class Running:
    """A server on a thread of this process."""

    url: str
    server: Server
    thread: threading.Thread

    @property
    def bridge(self) -> Bridge:
        return self.server.bridge

    def stop(self, timeout: float = 30.0) -> None:
        """As SIGTERM would: end the generations, close the connections, stop the engine."""
        self.bridge.shutdown_threadsafe()
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    bridge: Bridge,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
    log_level: str = "warning",
) -> Running:
    """Serve `bridge` on a thread (without signal handlers: those belong to the main thread); returns once the
    socket accepts connections, while the model may still be loading."""
    app = create_app(bridge, api_key=api_key, max_body=max_body)
    sock = bind(host, port)
    server = Server(_config(app, log_level), bridge)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    if not thread.is_alive():
        raise RuntimeError("the server thread stopped while starting (its log says why)")
    bound_host, bound_port = sock.getsockname()[:2]
    return Running(f"http://{bound_host}:{bound_port}", server, thread)
