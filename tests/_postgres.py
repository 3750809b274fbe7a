"""A private PostgreSQL for tests: ``initdb`` into a temp dir, a free port on 127.0.0.1, unix
sockets in the temp dir, stopped or killed by the test.

The binaries are Debian's (``/usr/lib/postgresql/<major>/bin``; ``scripts/bootstrap.sh --test``
installs ``postgresql``); without them a test using :func:`run_postgres` is skipped, saying so.
PostgreSQL refuses to run as root: when the tests do, the cluster belongs to the ``postgres``
user (its temp dir outside pytest's root-only one, chowned) and every binary runs as that user.

The postmaster is this process's child, in a session of its own: :meth:`PostgresServer.stop`
runs ``pg_ctl stop`` (``-m immediate`` is a crash: recovery replays the WAL at the next start),
:meth:`PostgresServer.kill` sends SIGKILL to the postmaster and its backends. Settings are for
tests: no fsync (the machine does not crash under a test, and a killed server's WAL is in the
page cache), small buffers; ``synchronous_commit`` is left on, as the backplane wants it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

#: Seconds a start or a stop of the server may take (initdb included).
PG_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's binaries (``/usr/lib/postgresql/*/bin``), or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _skip_reason() -> str | None:
    if postgres_bindir() is None:
        return (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): "
            "scripts/bootstrap.sh --test installs it, or apt-get install postgresql"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


@attrs.define
class PostgresServer:
    """One PostgreSQL cluster in ``directory`` (``data/``, its sockets, ``postgres.log``)."""

    directory: Path
    port: int
    bindir: Path
    process: trio.Process | None = None
    #: Starts so far (a restart is the second).
    starts: int = 0

    @property
    def url(self) -> str:
        """A libpq URL of the ``postgres`` database over TCP (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def _as_postgres(self) -> dict[str, Any]:
        """Popen arguments running a binary as the ``postgres`` user when we are root."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    async def _run(self, *argv: str) -> None:
        """Run a PostgreSQL binary to completion (bounded by the caller's deadline).

        Raises:
            RuntimeError: it failed; the message has its output.
        """
        done = await trio.run_process(
            [str(self.bindir / argv[0]), *argv[1:]], check=False, capture_stdout=True,
            capture_stderr=True, **self._as_postgres(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')}")  # fmt: skip

    async def init(self) -> None:
        with trio.fail_after(PG_TIMEOUT):
            await self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                            "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip

    async def start(self) -> None:
        """Start the postmaster and wait until it takes connections."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "60",
            "max_wal_size": "256MB",
            "log_min_messages": "warning",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                **self._as_postgres(),
            )  # fmt: skip
        self.starts += 1
        with trio.fail_after(PG_TIMEOUT):
            while True:
                if self.process.returncode is not None or self.process.poll() is not None:
                    raise RuntimeError(f"postgres exited at start: {self.log.read_text()[-2000:]}")
                done = await trio.run_process(
                    [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                     str(self.port), "-d", "postgres", "-t", "1"], check=False,
                )  # fmt: skip
                if done.returncode == 0:
                    return
                await trio.sleep(0.05)  # polling for the server to accept, bounded above

    async def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (smart, fast, immediate) and wait for the postmaster."""
        if self.process is None:
            return
        with trio.CancelScope(shield=True), trio.fail_after(PG_TIMEOUT):
            if self.process.returncode is None:
                with suppress(RuntimeError):  # it may be gone already
                    await self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w",
                                    "-t", str(PG_TIMEOUT // 2))  # fmt: skip
            with trio.move_on_after(PG_TIMEOUT // 2):
                await self.process.wait()
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the postmaster and its backends (its whole session)."""
        process, self.process = self.process, None
        if process is None:
            return
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.fail_after(PG_TIMEOUT):
            await process.wait()

    async def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql over the unix socket; its output (unaligned, tuples only)."""
        with trio.fail_after(PG_TIMEOUT):
            done = await trio.run_process(
                [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                 "-h", str(self.directory), "-p", str(self.port), "-U", "postgres",
                 "-d", database, "-c", sql],
                capture_stdout=True, capture_stderr=True, check=False, **self._as_postgres(),
            )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.decode(errors='replace')}")
        return str(done.stdout.decode())

    async def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        await self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)


@asynccontextmanager
async def run_postgres() -> AsyncIterator[PostgresServer]:
    """A fresh PostgreSQL cluster, started, for the block; stopped (killed if need be) and
    removed after it. Skips the test when PostgreSQL cannot run here."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    bindir = postgres_bindir()
    assert bindir is not None
    # Not under pytest's tmp dir: that one is root's alone, and the server runs as postgres.
    directory = Path(tempfile.mkdtemp(prefix="crealia-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        server = PostgresServer(directory=directory, port=free_port(), bindir=bindir)
        await server.init()
        await server.start()
        try:
            yield server
        finally:
            await server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
