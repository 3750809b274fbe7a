"""Cancelling a store from outside ends it at once, whatever is queued for its writer.

The scenario runs in a child process so that a shutdown that hangs (a caller waiting, shielded,
for a writer that was cancelled with its write still queued) fails the test on its deadline
instead of hanging the suite.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import trio

SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from crealia._errors import StorageError
    from crealia._storage import open_store

    async def main(data_dir):
        outcomes = {"ok": 0, "failed": 0}
        busy = trio.Event()
        async with trio.open_nursery() as callers:
            with trio.CancelScope() as scope:
                async with open_store(Path(data_dir)) as store:
                    await store.write([("CREATE TABLE t (n INTEGER)", ())])

                    async def keep_writing():
                        # Callers outside the store's scope: they outlive its cancellation.
                        while True:
                            try:
                                await store.write([("INSERT INTO t VALUES (?)", (1,))])
                            except StorageError:
                                outcomes["failed"] += 1
                                return
                            outcomes["ok"] += 1
                            if outcomes["ok"] >= 100:
                                busy.set()

                    for _ in range(20):
                        callers.start_soon(keep_writing)
                    await busy.wait()
                    scope.cancel()  # while writes are in flight and queued
        print("closed", outcomes["failed"], flush=True)

    trio.run(main, sys.argv[1])
    """
)


async def _kill(process: trio.Process) -> None:
    process.kill()
    await process.wait()


async def test_store_cancelled_with_queued_writes_fails_them_instead_of_hanging(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=_kill,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    word, failed = done.stdout.decode().split()
    assert word == "closed"
    assert int(failed) == 20  # every caller learned its write failed; none waits forever
