#!/usr/bin/env python3
"""Do project loads and resumes stall other projects' commits?

Builds a project of ``--events`` events on the SQLite backplane, then commits a change of
another project every 4 ms (``--commits`` of them) and times each commit, while, every second,
the big project is loaded from the store (``load``: what a room opening does) or a resume reads
its whole kept history back (``since``: what a client far behind does once memory no longer holds
it), or nothing (``none``). Prints the commit latencies (p50, p99, max, how many over 50 and
100 ms) and how long each load took, as one line per mode.

    python benchmarks/commit_stall.py                  # the three modes
    python benchmarks/commit_stall.py --mode load --events 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from crealia import Config, User  # noqa: E402
from crealia._wire import TimelineChange, structure  # noqa: E402
from crealia.backplanes.sqlite import open_backplane  # noqa: E402


def change(change_id: str, value: object, *, insert: bool = False) -> TimelineChange:
    op: dict[str, object] = (
        {"op": "insert", "element_id": "e", "element_type": "clip", "props": {"v": value}}
        if insert
        else {"op": "set", "element_id": "e", "prop": "v", "value": value}
    )
    return structure({"change_id": change_id, "changes": [op]}, TimelineChange)


async def measure(mode: str, events: int, commits: int) -> str:
    config = Config(data_dir=Path(tempfile.mkdtemp(prefix="crealia-stall-")), jwt_secret="x" * 40)
    big = User(id="bob", name="Bob", role="editor", project_id="big")
    user = User(id="alice", name="Alice", role="editor", project_id="p1")
    async with open_backplane("sqlite:", config) as backplane:
        await backplane.commit_change(big, change("c0", 0, insert=True))
        async with trio.open_nursery() as nursery:
            for i in range(1, events):
                nursery.start_soon(backplane.commit_change, big, change(f"c{i}", i))
                if i % 500 == 0:
                    await trio.sleep(0)
        backplane.release("big")
        await backplane.commit_change(user, change("d0", 0, insert=True))
        loads: list[float] = []

        async def disturb() -> None:
            while True:
                await trio.sleep(1)
                start = time.perf_counter()
                if mode == "load":
                    await backplane._load("big")
                else:
                    kept = (await backplane._project("big")).history.first_kept
                    await backplane.events_since("big", kept - 1)
                    backplane.release("big")
                loads.append((time.perf_counter() - start) * 1000)

        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            if mode != "none":
                nursery.start_soon(disturb)
            for i in range(1, commits + 1):
                start = time.perf_counter()
                await backplane.commit_change(user, change(f"d{i}", i))
                latencies.append((time.perf_counter() - start) * 1000)
                await trio.sleep(0.004)
            nursery.cancel_scope.cancel()
    latencies.sort()
    n = len(latencies)
    took = ", ".join(f"{ms:.0f}" for ms in loads) or "-"
    p50, p99, worst = latencies[n // 2], latencies[int(n * 0.99)], latencies[-1]
    over50, over100 = sum(x > 50 for x in latencies), sum(x > 100 for x in latencies)
    return (f"{mode:>5}: commit ms p50 {p50:.2f} p99 {p99:.2f} max {worst:.2f}; over 50 ms "
            f"{over50}, over 100 ms {over100} of {n}; {mode} took (ms) {took}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("none", "load", "since"), action="append")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--commits", type=int, default=1500)
    args = parser.parse_args()
    for mode in args.mode or ("none", "load", "since"):
        print(trio.run(measure, mode, args.events, args.commits), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
