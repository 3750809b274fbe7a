"""The runnable examples run and end by themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLES / name), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
    out = result.stdout.decode()
    assert result.returncode == 0, f"{name} failed:\n{out}\n{result.stderr.decode()}"
    return out


async def test_embed_example_runs_server_inside_a_trio_program() -> None:
    out = await run_example("embed.py", "--seconds", "2")
    assert "robot: marker-1 stored at seq 2" in out
    assert "watcher: seq 2: insert marker-1" in out
    assert "the server shut down with the program" in out


async def test_two_clients_example_shows_each_side() -> None:
    out = await run_example("two_clients.py")
    assert "[alice sees]" in out and "[bob sees]" in out
    assert "both at seq" in out


async def test_two_clients_example_takes_a_secret_that_starts_with_a_dash() -> None:
    # Its own secret is random (token_urlsafe: one in 64 starts with "-"); one on the command
    # line would read as an option and the server would not start.
    out = await run_example("two_clients.py", env={"CREALIA_JWT_SECRET": "-" + "s3cret" * 6})
    assert "both at seq" in out
