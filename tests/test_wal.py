"""The SQLite write-ahead log stays bounded while clients write flat out, with a reader holding
snapshots all along; its size is a metric. Readiness follows whether a checkpoint can complete.

The normal suite writes for ``CREALIA_WAL_TEST_SECONDS`` (12 s) under a 4 MiB bound; the soak
version (``make soak``: ``CREALIA_SOAK=1 pytest -m soak``) writes for 60 s under the default
64 MiB bound.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from crealia import Config, ConfigurationError, Server, open_server

from ._process import run_server
from ._wsclient import open_raw_client
from .conftest import data_store, make_config, opened
from .test_metrics import scrape
from .test_process import SECRET, token

MIB = 1024 * 1024
SECONDS = float(os.environ.get("CREALIA_WAL_TEST_SECONDS", "12"))
SOAK = os.environ.get("CREALIA_SOAK", "") not in ("", "0")
WRITERS = 4
WINDOW = 32  # changes each writer keeps in flight


def _change(change_id: str, value: Any) -> dict[str, Any]:
    op = {"op": "set", "element_id": "clip", "prop": "v", "value": value}
    return {"change_id": change_id, "changes": [op]}


async def _writer(server: Server, nursery: trio.Nursery, project: str, seconds: float,
                  value: str, acked: dict[str, int]) -> None:  # fmt: skip
    """One client writing to its own project as fast as the server acks, ``WINDOW`` ahead."""
    async with opened(server, nursery) as clients:
        client = await clients.join(f"w-{project}", project)
        insert = {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {}}
        await client.request("timeline_change", {"change_id": "seed", "changes": [insert]})
        deadline = trio.current_time() + seconds
        sent = done = 0
        while trio.current_time() < deadline or done < sent:
            while sent - done < WINDOW and trio.current_time() < deadline:
                await client.send("timeline_change", _change(f"c{sent}", f"{sent}:{value}"),
                                  ref=sent + 1)  # fmt: skip
                sent += 1
            env = await client.next()
            if env["type"] == "ack":
                assert env["data"]["status"] == "applied", env
                done += 1
            elif env["type"] == "error":
                raise AssertionError(env)
        acked[project] = done


async def _reader(server: Server) -> None:
    """A reader that holds a snapshot of the store 0.2 s at a time, back to back."""

    def hold(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT COUNT(*) FROM events").fetchone()
        time.sleep(0.2)  # in the store's reader thread: a long report, not the event loop
        conn.execute("COMMIT")

    while True:
        await data_store(server).read_aside(hold)


async def _write_flat_out(tmp_path: Path, nursery: trio.Nursery, seconds: float,
                          **settings: Any) -> dict[str, Any]:  # fmt: skip
    config = make_config(tmp_path / "data", rate_limits={"edit": "off"}, metrics_interval=0,
                         history_limit=1000, **settings)  # fmt: skip
    bound = config.wal_max_bytes
    wal = trio.Path(config.data_dir / "crealia.sqlite3-wal")
    acked: dict[str, int] = {}
    largest = 0
    value = "x" * 2000
    async with open_server(config) as server:
        with trio.fail_after(seconds + 60):
            async with trio.open_nursery() as inner:
                inner.start_soon(_reader, server)
                async with trio.open_nursery() as writers:
                    for i in range(WRITERS):
                        writers.start_soon(_writer, server, nursery, f"p{i}", seconds, value,
                                           acked)  # fmt: skip
                    start = trio.current_time()
                    while len(acked) < WRITERS:
                        if await wal.exists():
                            largest = max(largest, (await wal.stat()).st_size)
                        await trio.sleep(0.005)  # sampling the file's size, not synchronization
                    elapsed = trio.current_time() - start
                inner.cancel_scope.cancel()
            metrics = await scrape(server)
            heads = [(await server.hub.backplane.snapshot(f"p{i}"))["seq"] for i in range(WRITERS)]
            store = data_store(server)
            figures = {"bound": bound, "largest": largest, "acked": sum(acked.values()),
                       "seconds": round(elapsed, 1), "checkpoints": dict(store.checkpoints),
                       "store_max": store.wal_bytes_max,
                       "failures": store.checkpoint_failures}  # fmt: skip
    print(f"\nWAL under flat-out writes: {figures}", flush=True)
    assert largest > 0
    assert largest <= bound, figures
    assert store.wal_bytes_max <= bound, figures
    assert figures["failures"] == 0
    assert figures["checkpoints"]["truncate"] >= 1, figures  # the bound was reached and held
    # Every acknowledged change is in the document (the seed is seq 1).
    assert heads == [acked[f"p{i}"] + 1 for i in range(WRITERS)]
    assert metrics["crealia_sqlite_wal_bytes{db=crealia}"] <= bound
    assert metrics["crealia_sqlite_wal_max_bytes{db=crealia}"] == bound
    assert metrics["crealia_sqlite_checkpoints_total{db=crealia,mode=truncate}"] >= 1
    return figures


async def test_wal_stays_under_its_bound_while_writing_flat_out(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    await _write_flat_out(tmp_path, nursery, SECONDS, wal_max_bytes=4 * MIB,
                          wal_checkpoint_bytes=512 * 1024)  # fmt: skip


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="the 60 s soak runs with CREALIA_SOAK=1 (make soak)")
async def test_wal_stays_under_its_default_bound_for_a_minute(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    await _write_flat_out(tmp_path, nursery, 60.0)


async def _ready(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/readyz")
    return response.status_code, response.json()


async def test_readyz_fails_while_the_database_file_cannot_grow(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A real filesystem condition: the server's file-size limit (RLIMIT_FSIZE, set from
    outside with prlimit) at the database file's size. Commits still fit in the WAL, but no
    checkpoint can copy them into the database: /readyz says so, then recovers."""
    data = tmp_path / "data"
    db = data / "crealia.sqlite3"
    env = {"CREALIA_WAL_MAX_BYTES": str(MIB), "CREALIA_WAL_CHECKPOINT_BYTES": str(64 * 1024),
           "CREALIA_RATE_LIMIT_EDIT": "off"}  # fmt: skip
    async with run_server(data, SECRET, env=env) as proc:
        http = httpx.AsyncClient(base_url=proc.http_url, timeout=10)
        async with http:
            with trio.fail_after(60):
                client = await open_raw_client(nursery, proc.ws_url)
                await client.hello(token("alice"), "p1")
                insert = {"op": "insert", "element_id": "clip", "element_type": "clip",
                          "props": {}}  # fmt: skip
                await client.request("timeline_change", {"change_id": "i", "changes": [insert]})
                for i in range(600):  # ~2.4 MB into the database file
                    reply = await client.request("timeline_change", _change(f"a{i}", "x" * 2000))
                    assert reply["data"]["status"] == "applied"
                assert await _ready(http) == (200, {"status": "ok", "checks": {
                    "storage": "ok", "event_loop": "ok"}})  # fmt: skip
                limit = db.stat().st_size
                resource.prlimit(proc.process.pid, resource.RLIMIT_FSIZE,
                                 (limit, resource.RLIM_INFINITY))  # fmt: skip
                try:
                    acked = 0
                    for i in range(100):  # the WAL takes them; the database would have to grow
                        reply = await client.request(
                            "timeline_change", _change(f"b{i}", "y" * 2000)
                        )
                        acked += reply["type"] == "ack"
                    status, body = await _ready(http)
                    assert status == 503, body
                    assert body["status"] == "unavailable"
                    assert "WAL checkpoint failed" in body["checks"]["storage"], body
                    assert "crealia.sqlite3" in body["checks"]["storage"]
                finally:
                    resource.prlimit(proc.process.pid, resource.RLIMIT_FSIZE,
                                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # fmt: skip
                while (await _ready(http))[0] != 200:
                    await trio.sleep(0.1)  # polling a recovering server, bounded by fail_after
                assert acked > 0
                # Nothing acknowledged was lost meanwhile.
                again = await open_raw_client(nursery, proc.ws_url)
                welcome = await again.hello(token("bob"), "p1")
                assert welcome["seq"] == 1 + 600 + acked
                await again.aclose()
                await client.aclose()


def test_wal_settings_have_defaults_and_ranges() -> None:
    config = Config.from_env({})
    assert (config.wal_checkpoint_interval, config.wal_checkpoint_bytes, config.wal_max_bytes) == (
        1.0, 4 * MIB, 64 * MIB)  # fmt: skip
    env = {"CREALIA_WAL_MAX_BYTES": str(8 * MIB), "CREALIA_WAL_CHECKPOINT_BYTES": str(MIB),
           "CREALIA_WAL_CHECKPOINT_INTERVAL": "0.5"}  # fmt: skip
    config = Config.from_env(env)
    assert (config.wal_checkpoint_interval, config.wal_checkpoint_bytes, config.wal_max_bytes) == (
        0.5, MIB, 8 * MIB)  # fmt: skip
    for bad in ({"CREALIA_WAL_MAX_BYTES": "1000"}, {"CREALIA_WAL_MAX_BYTES": str(17 * 1024**3)},
                {"CREALIA_WAL_CHECKPOINT_BYTES": "1024"},
                {"CREALIA_WAL_CHECKPOINT_INTERVAL": "0"},
                {"CREALIA_WAL_CHECKPOINT_INTERVAL": "61"},
                {"CREALIA_WAL_MAX_BYTES": str(2 * MIB),
                 "CREALIA_WAL_CHECKPOINT_BYTES": str(4 * MIB)}):  # fmt: skip
        with pytest.raises(ConfigurationError, match="wal_"):
            Config.from_env(bad)


def test_durability_is_normal_or_fsync() -> None:
    assert Config.from_env({}).durability == "normal"
    assert Config.from_env({"CREALIA_DURABILITY": "fsync"}).durability == "fsync"
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({"CREALIA_DURABILITY": "always"})
    assert "CREALIA_DURABILITY" in str(refused.value)
    assert "must be one of normal, fsync" in str(refused.value)


@pytest.mark.parametrize(("durability", "synchronous"), [("normal", 1), ("fsync", 2)])
async def test_durability_sets_how_the_writer_commits(
    tmp_path: Path, nursery: trio.Nursery, durability: str, synchronous: int
) -> None:
    """``fsync`` makes the projects' writer commit with synchronous=FULL (2), each grouped
    commit fsynced before its acks; ``normal`` is synchronous=NORMAL (1)."""
    config = make_config(tmp_path / "d", durability=durability)
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(10):
            store = data_store(server)
            pragma = await store._thread.run(
                lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
            )
            assert pragma == synchronous
            a = await clients.join("alice")
            ack = await a.request("timeline_change", _change("c1", 1) | {
                "changes": [{"op": "insert", "element_id": "clip", "element_type": "clip",
                             "props": {"v": 1}}]})  # fmt: skip
            assert ack["type"] == "ack" and ack["data"]["status"] == "applied", ack
