"""``crealia backup`` (online) and ``crealia restore`` (new epochs): a restored older history
reaches every resuming client as a snapshot, never as a replay on top of what it had."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from ._process import run_server
from ._wsclient import RawClient, open_raw_client
from .test_process import SECRET, token


async def crealia(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "crealia", *args], capture_stdout=True, capture_stderr=True,
            check=False,
            env={**os.environ, "CREALIA_JWT_SECRET": SECRET},
        )  # fmt: skip


def _set(change_id: str, value: Any) -> dict[str, Any]:
    op = {"op": "set", "element_id": "clip", "prop": "v", "value": value}
    return {"change_id": change_id, "changes": [op]}


async def _write(client: RawClient, prefix: str, count: int) -> int:
    seq = 0
    for i in range(count):
        ack = await client.request("timeline_change", _set(f"{prefix}{i}", f"{prefix}{i}"))
        assert ack["type"] == "ack", ack
        seq = ack["data"]["seq"]
    return seq


async def test_backup_online_then_restore_gives_resuming_clients_a_snapshot(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    data, backup_file = tmp_path / "data", tmp_path / "monday.sqlite3"
    async with run_server(data, SECRET) as proc:
        with trio.fail_after(60):
            alice = await open_raw_client(nursery, proc.ws_url)
            welcome = await alice.hello(token("alice"), "p1")
            insert = {"change_id": "seed", "changes": [{"op": "insert", "element_id": "clip",
                                                        "element_type": "clip",
                                                        "props": {"v": "start"}}]}  # fmt: skip
            assert (await alice.request("timeline_change", insert))["type"] == "ack"
            await _write(alice, "a", 5)
            other = await open_raw_client(nursery, proc.ws_url)
            await other.hello(token("olga", "p2"), "p2")
            assert (await other.request("timeline_change", insert))["type"] == "ack"

            # The backup runs while alice keeps writing: online, and consistent.
            async with trio.open_nursery() as writing:
                writing.start_soon(_write, alice, "during", 20)
                done = await crealia("backup", "--to", str(backup_file), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
            assert b"backed up 2 projects" in done.stdout, done.stdout
            last = await _write(alice, "b", 5)  # after the backup: these will be lost
            at_backup = sqlite3.connect(backup_file).execute(
                "SELECT MAX(seq) FROM events WHERE project_id = 'p1'").fetchone()[0]  # fmt: skip
            assert 6 <= at_backup < last - 4

            # Not over a running server, and not a file that is no backup or that exists.
            busy = await crealia("restore", "--from", str(backup_file), "--data-dir", str(data))
            assert busy.returncode == 2
            assert b"a server has" in busy.stderr and b"stop it first" in busy.stderr
            again = await crealia("backup", "--to", str(backup_file), "--data-dir", str(data))
            assert again.returncode == 2 and b"the file exists" in again.stderr
            await alice.aclose()
            await other.aclose()
        proc.signal(15)
        with trio.fail_after(20):
            await proc.process.wait()

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    refused = await crealia("restore", "--from", str(junk), "--data-dir", str(data))
    assert refused.returncode == 2 and b"is not a crealia backup" in refused.stderr
    done = await crealia("restore", "--from", str(backup_file), "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert b"restored 2 projects" in done.stdout and b"new epoch" in done.stdout

    async with run_server(data, SECRET) as proc:
        with trio.fail_after(30):
            # alice resumes from where she was, with the epoch she had: a snapshot of the
            # restored history, not a replay of seqs she never had on top of her newer state.
            alice = await open_raw_client(nursery, proc.ws_url)
            resumed = await alice.hello(token("alice"), "p1", resume=last,
                                        epoch=welcome["epoch"])  # fmt: skip
            assert resumed["epoch"] != welcome["epoch"]
            snapshot = resumed["snapshot"]
            assert snapshot["seq"] == at_backup
            assert resumed.get("replayed", 0) == 0
            fresh = await open_raw_client(nursery, proc.ws_url)
            assert (await fresh.hello(token("bob"), "p1"))["snapshot"] == snapshot
            # the history goes on from the restored seq, gap-free
            ack = await alice.request("timeline_change", _set("after", "after"))
            assert ack["data"]["seq"] == at_backup + 1
            # a resume with no epoch from before the backup point replays as usual
            replay = await open_raw_client(nursery, proc.ws_url)
            w = await replay.hello(token("carol"), "p1", resume=at_backup)
            assert w["replayed"] == 1 and "snapshot" not in w
            for client in (alice, fresh, replay):
                await client.aclose()
