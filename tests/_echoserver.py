"""``crealia serve --conformance-echo`` as a subprocess, for the RFC 6455 conformance runs
(tests/test_rfc6455.py, tests/test_autobahn.py): one process serves both endpoints."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

#: Seconds the server has to print its listening line.
START_TIMEOUT = 20.0


@attrs.frozen
class EchoServer:
    http_port: int
    ws_port: int
    log: Path

    def port(self, endpoint: str) -> int:
        """``ws``: the fast path's port; ``http``: the HTTP app's (hypercorn)."""
        return self.ws_port if endpoint == "ws" else self.http_port


@contextmanager
def echo_server(root: Path, max_frame_bytes: int) -> Iterator[EchoServer]:
    """Run the server until the block ends (SIGTERM, the graceful stop), then check its log:
    it must have said the echo is on (in its log and on stderr), and logged no error."""
    log = root / "server.log"
    command = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
               "--data-dir", str(root / "data"), "--conformance-echo"]  # fmt: skip
    env = {**os.environ, "CREALIA_MAX_FRAME_BYTES": str(max_frame_bytes),
           "CREALIA_LOG_LEVEL": "warning",
           "CREALIA_JWT_SECRET": "conformance-tests-secret-of-at-least-32-bytes"}  # fmt: skip
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        line = _listening_line(process)
        assert line is not None, f"crealia serve did not start:\n{log.read_text()[-3000:]}"
        ports = dict(part.split("=") for part in line.split()[2:])
        yield EchoServer(int(ports["http"]), int(ports["ws"]), log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        assert process.stdout is not None
        process.stdout.close()
    text = log.read_text(errors="replace")
    assert "conformance echo on at" in text, text[-2000:]  # the log's warning
    assert "crealia: --conformance-echo: ws://127.0.0.1:" in text, text[-2000:]  # and stderr's
    problems = [line for line in text.splitlines()
                if '"level":"error"' in line or "Traceback" in line]  # fmt: skip
    assert not problems, "the echo server logged errors:\n" + "\n".join(problems[:20])


def _listening_line(process: subprocess.Popen[bytes]) -> str | None:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and selector.select(left):
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                return None
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith("crealia listening"):
                    return line
    return None
