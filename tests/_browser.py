"""Browser tests: a real ``crealia serve`` and Debian's headless Chromium driven by Playwright.

The fixtures (registered in ``conftest.py``):

- ``crealia_server``: a ``crealia serve --dev`` subprocess on free ports with its own data dir
  (:class:`BrowserServer`); ``@pytest.mark.crealia_server(args=[...], env={...})`` adds flags
  and environment. Its WebRTC peers listen on 127.0.0.1 only.
- ``browser``: one Chromium for the whole run (headless, fake camera and microphone, loopback
  WebRTC allowed, no network of its own). It skips the test, saying why, when Chromium or
  Playwright is missing or the suite is not in its loopback-only namespace.
- ``pages``: :class:`Pages`, which opens each page in a new browser context and records its
  console errors, uncaught exceptions, failed requests and HTTP error answers; the test fails
  at teardown if any was recorded that it did not :meth:`Pages.allow`.

Playwright's sync API runs here, so these tests are plain ``def`` tests, not Trio ones: the
server is another process, and nothing of Trio's loop runs while the browser is driven.
:func:`screenshot` keeps a picture of a page under ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from crealia import TokenAuthority

from ._netns import loopback_only_reason

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
SECRET = "browser-tests-secret-of-at-least-32-bytes"
#: Seconds a server has to print its listening line.
START_TIMEOUT = 20.0
#: The flags the machine notes ask for, plus fake media and loopback WebRTC.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--auto-select-desktop-capture-source=Entire screen",
]  # fmt: skip


def chromium_path() -> str | None:
    """Debian's Chromium (``CREALIA_CHROMIUM`` overrides), or None."""
    return os.environ.get("CREALIA_CHROMIUM") or shutil.which("chromium")


def browser_skip_reason() -> str | None:
    """Why browser tests cannot run here (None: they can)."""
    if chromium_path() is None:
        return ("browser tests need Debian's chromium (make test installs it when run as root; "
                "else: sudo apt-get install chromium)")  # fmt: skip
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need Playwright for Python (pip install -e '.[test]')"
    return loopback_only_reason()


@attrs.define
class BrowserServer:
    """A ``crealia serve --dev`` process the test may kill and start again on the same ports."""

    data_dir: Path
    args: list[str]
    env: dict[str, str]
    http_port: int = 0
    ws_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log_path = self.data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        """The HTTP app's own WebSocket route, the one pages use."""
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def token(self, user: str, project: str, role: str, name: str | None = None) -> str:
        """A token signed with the server's secret (as ``crealia token`` makes one)."""
        return TokenAuthority(SECRET).issue(user_id=user, project_id=project, role=role,  # type: ignore[arg-type]
                          name=name or user.capitalize())  # fmt: skip

    def page_url(self, path: str, token: str | None = None) -> str:
        """``path`` on this server, with ``#token=`` when a token is given."""
        return self.url + path + (f"#token={token}" if token else "")

    def request(self, method: str, path: str, token: str | None = None,
                body: Any = None) -> tuple[int, Any]:  # fmt: skip
        """A REST call: (status, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def start(self) -> None:
        """Start the server (on its earlier ports if it ran before) and wait for it."""
        assert self.process is None, "already running"
        ports = ["--port", str(self.http_port), "--ws-port", str(self.ws_port)]
        command = [sys.executable, "-m", "crealia", "serve", *ports, "--data-dir",
                   str(self.data_dir), "--dev", *self.args]  # fmt: skip
        env = {**os.environ, "CREALIA_JWT_SECRET": SECRET, "WEBRTC_LISTEN_IPS": "127.0.0.1",
               "CREALIA_LOG_LEVEL": "info", **self.env}  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            log = self.log_path.open("ab")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env)
            log.close()
            line = _read_line(process, deadline, b"crealia listening")
            if line is not None:
                break
            process.kill()
            process.wait(5)
            # A restart may find its old port still held for a moment: try again, bounded.
            if time.monotonic() > deadline or "address already in use" not in self.output():
                raise RuntimeError(f"crealia serve did not start:\n{self.output()[-3000:]}")
        fields = dict(part.split("=") for part in line.decode().split()[2:])
        self.http_port, self.ws_port = int(fields["http"]), int(fields["ws"])
        self.process = process

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (the graceful path) or, with ``kill``, SIGKILL."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout:
            process.stdout.close()

    def restart(self, *, kill: bool = True) -> None:
        """Kill the server (SIGKILL unless ``kill=False``) and start it again on its ports."""
        self.stop(kill=kill)
        self.start()

    def output(self) -> str:
        """What the server wrote to stderr so far (its log)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _read_line(process: subprocess.Popen[bytes], deadline: float, marker: bytes) -> bytes | None:
    """The first stdout line of ``process`` holding ``marker`` (None: it exited, or the
    deadline passed)."""
    assert process.stdout is not None
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                return None
            buffer += chunk
            for line in buffer.splitlines():
                if marker in line:
                    return line
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class Pages:
    """Opens pages, each in its own browser context, and records what went wrong on them."""

    browser: Any
    problems: list[str] = attrs.Factory(list)
    allowed: list[re.Pattern[str]] = attrs.Factory(list)
    contexts: list[Any] = attrs.Factory(list)

    def open(self, url: str, *, viewport: tuple[int, int] = (1366, 768), wait: bool = True) -> Any:
        """A new page in a new context (its own storage: another person), at ``url``."""
        context = self.browser.new_context(
            viewport={"width": viewport[0], "height": viewport[1]},
            permissions=["camera", "microphone"],
        )
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        page = context.new_page()
        label = f"page {len(self.contexts)}"

        def console(message: Any) -> None:
            if message.type == "error":
                self.problems.append(f"{label} console error: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda exc: self.problems.append(f"{label} uncaught: {exc}"))
        page.on("requestfailed", lambda req: self._failed(label, req))
        page.on("response", lambda res: self._answered(label, res))
        if wait:
            page.goto(url)
        return page

    def allow(self, pattern: str) -> None:
        """Do not fail the test for problems matching the regular expression ``pattern``."""
        self.allowed.append(re.compile(pattern))

    def _failed(self, label: str, request: Any) -> None:
        failure = request.failure or ""
        # A page going away aborts its long-lived requests (the live feed): not a failure.
        if "ERR_ABORTED" in failure and request.resource_type in ("fetch", "eventsource"):
            return
        self.problems.append(f"{label} request failed: {request.method} {request.url}: {failure}")

    def _answered(self, label: str, response: Any) -> None:
        if response.status >= 400:
            request = response.request
            self.problems.append(f"{label} HTTP {response.status}: {request.method} {response.url}")

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a.search(p) for a in self.allowed)]

    def close(self) -> None:
        for context in self.contexts:
            try:
                context.close()
            except Exception:
                continue
        self.contexts.clear()


def evaluate(page: Any, script: str, arg: Any = None, *, timeout: float = 15.0) -> Any:
    """``page.evaluate(script, arg)``, bounded: Playwright waits for a returned promise without
    any deadline, so a promise that never settles would hang the test. ``script`` is a function
    expression or an expression (which may be a promise)."""
    source = script.strip()
    call = f"({source})(arg)" if source.startswith(("(", "async", "function")) else f"({source})"
    bounded = (
        "async ({arg, ms}) => { let timer; const deadline = new Promise((_, reject) => { "
        "timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms); }); "
        f"try {{ return await Promise.race([Promise.resolve({call}), deadline]); }} "
        "finally { clearTimeout(timer); } }"
    )
    return page.evaluate(bounded, {"arg": arg, "ms": int(timeout * 1000)})


def screenshot(page: Any, name: str) -> Path:
    """Keep a picture of ``page`` as ``test-artifacts/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- fixtures (conftest.py imports these) ------------------------------------------------------


class _Stop:
    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def close(self) -> None:
        self.manager.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = browser_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an asyncio loop of its own, made by the event-loop policy;
    # trio-asyncio (imported by the WebRTC adapter) installs one whose loops must not be
    # left running between Trio tests. Playwright gets a plain asyncio loop.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        manager = sync_playwright()
        playwright = manager.__enter__()
    finally:
        asyncio.set_event_loop_policy(policy)
    with contextlib.closing(_Stop(manager)):
        chromium = playwright.chromium.launch(executable_path=chromium_path(),
                                              args=CHROMIUM_ARGS, timeout=30_000)  # fmt: skip
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def crealia_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrowserServer]:
    marker = request.node.get_closest_marker("crealia_server")
    options = marker.kwargs if marker else {}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = BrowserServer(data_dir, list(options.get("args", [])), dict(options.get("env", {})))
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def pages(browser: Any) -> Iterator[Pages]:
    opened = Pages(browser)
    try:
        yield opened
    finally:
        opened.close()
    unexpected = opened.unexpected()
    if unexpected:
        pytest.fail("problems on the pages:\n" + "\n".join(unexpected[:30]), pytrace=False)
