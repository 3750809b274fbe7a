"""A real redis-server for tests: started on a free port in a temp dir, AOF on, killable."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class RedisServer:
    port: int
    directory: Path
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.process = await trio.lowlevel.open_process(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)  # polling for the port to open, bounded above
                    continue
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    if (await stream.receive_some(64)).startswith(b"+PONG"):
                        return

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
        self.process = None


@asynccontextmanager
async def run_redis(directory: Path) -> AsyncIterator[RedisServer]:
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port=free_port(), directory=directory)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
