"""Run ``crealia serve`` as a real subprocess for tests that kill or signal it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio


@attrs.define
class ServerProcess:
    process: trio.Process
    http_port: int
    ws_port: int
    output: list[str]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        self.process.kill()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def run_server(
    data_dir: Path,
    jwt_secret: str | None,
    *extra: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    drain: bool = False,
    wrap: Sequence[str] = (),
) -> AsyncIterator[ServerProcess]:
    """Start ``crealia serve`` on free ports; yields once it prints its listening line.

    ``output[0]`` is what it printed up to that line. The rest is left in the pipe for the test
    to read, unless ``drain``: then it is read all along (the latest 200 chunks are kept after
    ``output[0]``), so that a server which logs more than a pipe holds (64 KiB: a Redis outage
    logs every refused write) does not block writing its log.

    ``jwt_secret=None`` leaves the secret to the server (the one kept in the data dir); a secret
    is passed as ``CREALIA_JWT_SECRET``, the way that keeps it out of ``ps``. ``preexec_fn``
    runs in the child before it starts (e.g. to lower its ``RLIMIT_NOFILE``). ``wrap`` is a
    command that ends by exec'ing the server's (appended to it), e.g. :func:`on_tmpfs`'s.

    On exit the process is SIGKILLed if it still runs.
    """
    command = [*wrap, sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
               "--data-dir", str(data_dir), *extra]  # fmt: skip
    secret = {} if jwt_secret is None else {"CREALIA_JWT_SECRET": jwt_secret}
    process = await trio.lowlevel.open_process(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **secret, **(env or {})},
        preexec_fn=preexec_fn,
    )
    output: list[str] = []
    assert process.stdout is not None
    buffer = b""
    try:
        with trio.fail_after(15):
            while b"crealia listening" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"server exited early: {buffer.decode(errors='replace')}")
                buffer += chunk
        line = next(ln for ln in buffer.decode().splitlines() if ln.startswith("crealia listening"))
        fields = dict(part.split("=") for part in line.split()[2:])
        output.append(buffer.decode(errors="replace"))
        if drain:
            trio.lowlevel.spawn_system_task(_drain, process.stdout, output)
        yield ServerProcess(process, int(fields["http"]), int(fields["ws"]), output)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def on_tmpfs(mountpoint: Path, size_bytes: int) -> list[str]:
    """A ``wrap`` for :func:`run_server`: the server runs in a mount namespace of its own in
    which ``mountpoint`` is a tmpfs of ``size_bytes`` (a disk that can fill up without filling
    the machine's). Outside, the tmpfs is seen at :func:`seen_from_outside`. Needs root:
    :func:`tmpfs_refused` says why not."""
    script = 'mount -t tmpfs -o "size=$1" crealia-test "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            str(size_bytes), str(mountpoint)]  # fmt: skip


def seen_from_outside(proc: ServerProcess, path: Path) -> Path:
    """Where ``path`` of a server started :func:`on_tmpfs` is, for this process (through
    ``/proc/<pid>/root``, which resolves paths in the server's mount namespace)."""
    return Path(f"/proc/{proc.process.pid}/root") / path.resolve().relative_to("/")


async def tmpfs_refused(scratch: Path) -> str | None:
    """Why :func:`on_tmpfs` cannot work here (None: it can), tried on ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with trio.fail_after(10):
            await trio.run_process([*on_tmpfs(scratch, 1 << 20), "true"], capture_stdout=True,
                                   capture_stderr=True)  # fmt: skip
    except FileNotFoundError:
        return "unshare is not installed (util-linux): a disk that fills needs a private tmpfs"
    except subprocess.CalledProcessError as exc:
        error = exc.stderr.decode(errors="replace").strip()
        return f"cannot mount a tmpfs in a mount namespace of its own (run as root): {error}"
    except trio.TooSlowError:
        return "unshare --mount did not answer within 10 s"
    return None


async def _drain(stream: trio.abc.ReceiveStream, output: list[str]) -> None:
    try:
        while chunk := await stream.receive_some(65536):
            output.append(chunk.decode(errors="replace"))
            del output[1:-200]
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


__all__ = [
    "ServerProcess",
    "on_tmpfs",
    "run_server",
    "seen_from_outside",
    "signal",
    "tmpfs_refused",
]
