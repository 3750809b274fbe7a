"""Opening a project with a long life: time and memory to load it, and what a change costs after.

    python benchmarks/project_open.py --changes 54000 --data-dir /tmp/crealia-open

builds (once, kept in ``--data-dir``) a project with ``--changes`` lifetime changes through the
real backplane, then, in a fresh process per run, opens the store, times loading the project and
measures the RSS it added; then times ``--after`` new changes one at a time (each one's
change-id lookup included) and as many resends (duplicates).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import trio

from crealia import User
from crealia._storage import open_store
from crealia._wire import InsertOp, SetOp, TimelineChange
from crealia.backplanes.sqlite import SQLiteBackplane

PROJECT = "long-lived"
USER = User(id="alice", name="alice", role="editor", project_id=PROJECT)


def _set(change_id: str, value: int) -> TimelineChange:
    op = SetOp(op="set", element_id="clip", prop=f"p{value % 50}", value=value)
    return TimelineChange(change_id=change_id, changes=[op])


async def build(data_dir: Path, changes: int) -> None:
    async with open_store(data_dir) as store:
        backplane = SQLiteBackplane(store)
        insert = InsertOp(op="insert", element_id="clip", element_type="clip", props={})
        await backplane.commit_change(USER, TimelineChange(change_id="seed", changes=[insert]))

        async def writer(start: int) -> None:
            for i in range(start, changes, 64):
                await backplane.commit_change(USER, _set(f"change-{i:08d}", i))

        async with trio.open_nursery() as nursery:
            for start in range(1, 65):
                nursery.start_soon(writer, start)
        done = (await backplane.snapshot(PROJECT))["seq"]
        print(f"built {PROJECT!r} with {done} changes in {data_dir}", file=sys.stderr)


async def measure(data_dir: Path, after: int) -> dict[str, float]:
    process = psutil.Process()
    async with open_store(data_dir) as store:
        backplane = SQLiteBackplane(store)
        gc.collect()
        rss = process.memory_info().rss
        start = time.perf_counter()
        await backplane._project(PROJECT)
        opened = time.perf_counter() - start
        gc.collect()
        added = process.memory_info().rss - rss
        tag = time.time_ns()
        start = time.perf_counter()
        for i in range(after):
            await backplane.commit_change(USER, _set(f"after-{tag}-{i}", i))
        new = (time.perf_counter() - start) / max(after, 1)
        start = time.perf_counter()
        for i in range(after):
            n = i * 7 + 1
            outcome = await backplane.commit_change(USER, _set(f"change-{n:08d}", n))
            assert outcome.status == "duplicate", outcome
        dup = (time.perf_counter() - start) / max(after, 1)
    return {"open_s": round(opened, 3), "open_rss_mib": round(added / 2**20, 1),
            "new_change_ms": round(new * 1000, 3),
            "duplicate_ms": round(dup * 1000, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=54_000)
    parser.add_argument("--after", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/crealia-project-open"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trio.run(measure, args.data_dir, args.after)))
        return
    if not (args.data_dir / "crealia.sqlite3").exists():
        trio.run(build, args.data_dir, args.changes)
    for _run in range(args.runs):
        # A fresh process each time: nothing cached from the last, RSS measured from scratch.
        # Each run adds 2 x --after changes/resends; the resends are of built ones.
        command = [sys.executable, __file__, "--child", "--data-dir", str(args.data_dir),
                   "--after", str(args.after)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        print(out.strip())


if __name__ == "__main__":
    main()
