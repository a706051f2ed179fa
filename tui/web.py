"""`codellama-tui web`: the same Textual app in the browser, served by textual-serve.

textual-serve starts its command once per browser tab (one app process per websocket). Every tab here is
`codellama-tui --url URL`: an HTTP client of ONE engine, the server given by `--url` or a `serve` started in this
process for the tabs (on a free port of 127.0.0.1, with a key of its own) — never a model loaded per tab. A tab
gets the key in its environment, never on its command line.

Access needs the token printed at start: `http://HOST:PORT/?token=...` sets a cookie (HttpOnly, SameSite=Strict)
that the page's later requests and its websocket carry; any request without one gets 401, and a websocket opened
from another site's page 403. The app in a tab reads and writes files as this process's user.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import secrets
import shlex
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from textual_serve.server import Server

from engine.requests import EngineSpec
from tui.cli import API_KEY_ENV, overrides_of

if TYPE_CHECKING:
    from tui.server.run import Running

PROG = "codellama-tui web"
COOKIE = "codellama_tui_token"
REFUSED = "401: this page needs its token: open the address that codellama-tui web printed (it ends ?token=...)\n"


class WebServer(Server):
    """textual-serve's server behind a token."""

    def __init__(self, command: str, token: str, *, host: str, port: int) -> None:
        super().__init__(command, host=host, port=port, title="codellama-tui")
        self.token = token

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(self._guard)
        return app

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.query.get("token")
        if not (self._is_token(given) or self._is_token(request.cookies.get(COOKIE))):
            return web.Response(status=401, text=REFUSED)
        origin = request.headers.get("Origin")
        if request.path == "/ws" and origin is not None and origin != f"{request.scheme}://{request.host}":
            return web.Response(status=403, text="403: the app's websocket opens only from its own page\n")
        response = await handler(request)
        if given is not None:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/")
        return response

    def _is_token(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    async def handle_index(self, request: web.Request) -> Any:
        """The page's websocket and static URLs name the host the browser used (a bind to 0.0.0.0 included)."""
        self.public_url = str(request.url.origin())
        return await super().handle_index(request)

    async def on_startup(self, app: web.Application) -> None:
        """textual-serve prints a logo here; the start line is ours."""


def tab_command(args: argparse.Namespace, url: str) -> str:
    """The command each tab runs: the app on `url`, with the app options given to `web`."""
    argv = [sys.executable, "-m", "tui.cli", "--url", url]
    for flag, value in (
        ("--served-model", args.served_model),
        ("--cap", args.cap),
        ("--sys-instruct", args.sys_instruct),
        ("--theme", args.theme),
    ):
        if value is not None:
            argv += [flag, value]
    for name, value in overrides_of(args).items():
        if name == "stop" and value:
            for stop in value:  # type: ignore[union-attr]
                argv += ["--stop", stop]
        elif value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(argv)


def run_web(args: argparse.Namespace, spec: EngineSpec) -> int:
    """`codellama-tui web`: returns the exit status (1 if the port cannot be had or the model cannot load)."""
    from tui.server.run import bind, is_loopback

    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    if not is_loopback(args.host):
        print(
            f"{PROG}: warning: listening on {args.host}: whoever has the token can use the app and this machine's "
            "files as you; without TLS the token crosses the network in clear text",
            file=sys.stderr,
        )
    failed: list[str] = []
    engine: Running | None = None
    if args.url:
        url = args.url
        if args.api_key:
            os.environ[API_KEY_ENV] = args.api_key
    else:
        engine, url = _serve_for_tabs(spec)
    token = secrets.token_urlsafe(18)
    server = WebServer(tab_command(args, url), token, host=args.host, port=args.port)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    engine_text = f"the server at {url}" if args.url else "one engine for every tab (it loads meanwhile)"
    print(f"{PROG}: open http://{where}:{port}/?token={token} ({engine_text})", file=sys.stderr, flush=True)
    loop = asyncio.new_event_loop()
    if engine is not None:

        def load_failed(message: str) -> None:  # on the engine server's thread
            failed.append(message)
            loop.call_soon_threadsafe(server.request_exit)

        engine.bridge.on_load_failed = load_failed
    try:
        web.run_app(server._make_app(), sock=sock, print=None, handle_signals=True, loop=loop)
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
        if engine is not None:
            engine.stop()
    if failed:
        print(f"{PROG}: error: the model could not be loaded: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _serve_for_tabs(spec: EngineSpec) -> tuple[Running, str]:
    """`serve` on a thread of this process, on a free port of 127.0.0.1, with a fresh key in the tabs' environment."""
    from engine.local_client import LocalClient
    from tui.server.run import make_bridge, start_in_thread

    key = secrets.token_urlsafe(24)
    os.environ[API_KEY_ENV] = key
    bridge = make_bridge(lambda sink: LocalClient(spec, on_event=sink), spec.max_batch, max_queue=128)
    running = start_in_thread(bridge, api_key=key)
    return running, running.url
