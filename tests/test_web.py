"""`codellama-tui web` as a real command, in a real headless browser (Debian's chromium driven by Playwright): the
page loads, typing reaches the editor, F3 fills a marker and the screen shows it; without the token every request
(page, files, websocket) is refused; every tab is an app process without a model of its own, all on one engine.

The screen is what the browser's terminal was sent (the websocket's frames) played into a terminal emulator (pyte).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Web:
    """`codellama-tui web ARGS` in a child process; `address` is the URL it prints, token and all. `home` holds the
    config and state folders of it and its tabs (recovery copies of the tabs' buffers go there)."""

    def __init__(self, *args: str, home: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "web", "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any("?token=" in line for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        self.address = re.search(r"open (\S+)", next(line for line in self.lines if "?token=" in line)).group(1)
        self.base = self.address.split("/?")[0]
        self.token = self.address.split("token=")[1]

    def descendants(self) -> list[int]:
        """Every process below this one (the tabs' app processes, and the shells that start them)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError):
                    continue
        found, frontier = [], [self.proc.pid]
        while frontier:
            kids = [pid for pid, parent in parents.items() if parent in frontier]
            found += kids
            frontier = kids
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    pytest.importorskip("pyte", reason="pyte is not installed (pip install pyte)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # a browser that cannot start here (no sandbox support, missing libraries)
            pytest.skip(f"chromium does not start: {str(err).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """The web UI with its own engine for the tabs: the demo model, on the CPU."""
    running = Web("--device", "cpu", "--max-new-tokens", "24", home=tmp_path_factory.mktemp("web"))
    yield running
    running.stop()


class Tab:
    """A browser tab on the app, and the screen its terminal shows."""

    def __init__(self, browser, address: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 800})
        self.frames: list[bytes] = []
        self.size = (80, 24)

        def watch(ws) -> None:
            query = parse_qs(urlparse(ws.url).query)
            self.size = (int(query["width"][0]), int(query["height"][0]))
            ws.on("framereceived", lambda payload: isinstance(payload, bytes) and self.frames.append(payload))

        self.page.on("websocket", watch)
        self.response = self.page.goto(address)

    def screen(self) -> str:
        import pyte

        screen = pyte.Screen(*self.size)
        pyte.ByteStream(screen).feed(b"".join(self.frames))
        return "\n".join(line.rstrip() for line in screen.display)

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(text := self.screen()):
            assert time.monotonic() < deadline, text
            self.page.wait_for_timeout(100)
        return text


def test_the_app_in_a_browser_tab_types_and_fills_a_marker(browser, web: Web) -> None:
    tab = Tab(browser, web.address)
    assert tab.response.status == 200
    tab.page.wait_for_selector(".textual-terminal.-connected", timeout=30_000)
    tab.wait_for(lambda text: "DEMO model" in text and "ready" in text, timeout=120)  # the engine loaded
    tab.page.locator(".xterm-screen").click()  # the tab takes focus: the footer shows the keys of the focused app
    tab.wait_for(lambda text: "f3 Infill" in text.splitlines()[-1])
    tab.page.keyboard.type("def add(a, b):")
    tab.page.keyboard.press("Enter")
    tab.page.keyboard.type("    <FILL>")
    for _ in range(3):
        tab.page.keyboard.press("Enter")
    tab.page.keyboard.type("def mul(a, b):")
    typed = tab.wait_for(lambda text: "<FILL>" in text and "def mul(a, b):" in text)
    assert "def add(a, b):" in typed  # typing reached the editor
    tab.page.keyboard.press("F3")
    filled = tab.wait_for(lambda text: "<FILL>" not in text and "ready" in text.split("\n")[-2])
    rows = [m.group(1) for line in filled.splitlines() if (m := re.match(r"│\s*\d+  (.*?)\s*│", line))]
    assert rows[0] == "def add(a, b):", filled
    assert rows[1].startswith("    ") and rows[1].strip(), filled  # the fill, where the marker was
    assert "def mul(a, b):" in rows
    tab.page.close()


def test_tabs_are_app_processes_without_a_model_all_on_one_engine(browser, web: Web) -> None:
    tabs = [Tab(browser, web.address) for _ in range(2)]
    for tab in tabs:
        tab.wait_for(lambda text: "127.0.0.1:" in text and "rtt" in text, timeout=120)
    apps = []
    for pid in web.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        if b"tui.cli" in cmdline:
            apps.append(pid)
            assert b"--url" in cmdline and not any(b"key" in arg.lower() for arg in cmdline)
            assert "libtorch" not in maps  # no engine in a tab
    assert len(apps) >= 2
    servers = {re.search(r"127\.0\.0\.1:\d+", tab.screen()).group(0) for tab in tabs}
    assert len(servers) == 1  # the same engine's server for both
    for tab in tabs:
        tab.page.close()


def test_without_the_token_every_request_is_refused(browser, web: Web) -> None:
    tab = Tab(browser, web.base + "/")
    assert tab.response.status == 401 and "needs its token" in tab.page.content()
    tab.page.close()
    for path in ("/", "/static/js/textual.js", "/ws", f"/?token={web.token[:-1]}"):
        assert httpx.get(web.base + path).status_code == 401, path
    with httpx.Client() as client:
        assert client.get(web.address).status_code == 200
        assert client.get(web.base + "/static/js/textual.js").status_code == 200  # the cookie carries the token
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
        upgrade["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
        foreign = client.get(web.base + "/ws", headers={**upgrade, "Origin": "http://evil.example"})
        assert foreign.status_code == 403


def test_a_bind_beyond_this_machine_warns(tmp_path: Path) -> None:
    running = Web("--host", "0.0.0.0", "--url", "http://127.0.0.1:9", home=tmp_path)
    try:
        assert any("warning: listening on 0.0.0.0" in line for line in running.lines)
    finally:
        running.stop()
