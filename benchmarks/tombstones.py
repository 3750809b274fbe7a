"""An insert/delete loop of large elements: what the project holds in memory and in snapshots.

    python benchmarks/tombstones.py --loops 1500 --size 60000 --data-dir /tmp/crealia-tomb

inserts an element with one ``--size``-character prop and deletes it again, ``--loops`` times
(a fresh element id each time), through the real in-process backplane and SQLite store with the
default quotas (``document_max_bytes`` 16 MiB). Then it prints, as JSON: the RSS the loop added
(after a garbage collection), how many deleted elements the document keeps and their content's
size, the stored snapshot's size (the ``snapshots`` row the store would reload from) and the wire
snapshot's (what ``welcome`` and ``GET .../snapshot`` send).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sqlite3
from pathlib import Path

import orjson
import psutil
import trio

from crealia import User
from crealia._storage import open_store
from crealia._wire import DeleteOp, InsertOp, TimelineChange
from crealia.backplanes.sqlite import SQLiteBackplane

PROJECT = "bloat"
USER = User(id="mallory", name="mallory", role="editor", project_id=PROJECT)


async def run(data_dir: Path, loops: int, size: int) -> dict[str, float]:
    process = psutil.Process()
    async with open_store(data_dir) as store:
        backplane = SQLiteBackplane(store)
        gc.collect()
        rss = process.memory_info().rss
        for i in range(loops):
            eid = f"e{i}"
            insert = InsertOp(op="insert", element_id=eid, element_type="clip",
                              props={"blob": "x" * size})  # fmt: skip
            await backplane.commit_change(USER, TimelineChange(change_id=f"i{i}", changes=[insert]))
            delete = DeleteOp(op="delete", element_id=eid)
            await backplane.commit_change(USER, TimelineChange(change_id=f"d{i}", changes=[delete]))
        gc.collect()
        added = process.memory_info().rss - rss
        project = backplane._projects[PROJECT]
        doc = project.doc
        wire = len(orjson.dumps(await backplane.snapshot(PROJECT)))
        history = project.history.bytes
    with sqlite3.connect(data_dir / "crealia.sqlite3") as conn:
        seq, stored = conn.execute(
            "SELECT seq, length(document) FROM snapshots WHERE project_id = ?", (PROJECT,)
        ).fetchone()
    return {
        "loops": loops,
        "rss_added_mib": round(added / 2**20, 1),
        "tombstones_kept": len(doc.tombstones),
        "tombstone_content_mib": round(
            sum(len(orjson.dumps(t.element.props)) for t in doc.tombstones.values()) / 2**20, 1
        ),
        "history_mib": round(history / 2**20, 1),
        "stored_snapshot_seq": seq,
        "stored_snapshot_mib": round(stored / 2**20, 1),
        "wire_snapshot_bytes": wire,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=1500)
    parser.add_argument("--size", type=int, default=60_000)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/crealia-tombstones"))
    args = parser.parse_args()
    shutil.rmtree(args.data_dir, ignore_errors=True)
    print(json.dumps(trio.run(run, args.data_dir, args.loops, args.size)))


if __name__ == "__main__":
    main()
