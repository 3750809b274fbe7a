"""No background job can end the server: each fails for real in a running server (its store's
connection lost, its file system full, its Redis stopped or holding garbage, a webhook that
cannot even be resolved), and each time the server keeps serving a client, the job's failures
are counted in ``crealia_background_failures_total{job}``, nothing queued is lost, and the job
works again once the fault is gone.

Policy: loopback only, port 0, a deadline on every I/O test, real servers (in-process or a
subprocess), a real redis-server; no sleeps as synchronization (conditions are polled under a
deadline).
"""

from __future__ import annotations

import itertools
import logging
import resource
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from crealia import Config, ConfigurationError, Server, open_server
from crealia._jobs import JOBS, MAX_BACKOFF, JobFailures

from ._process import run_server
from ._redis import RedisServer, run_redis
from ._scrape import fetch_metrics, parse_metrics
from ._wsclient import RawClient, open_raw_client
from .conftest import make_config, opened
from .test_process import SECRET, token

MIB = 1024 * 1024
INSERT = {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {}}


def failures(job: str) -> str:
    return f"crealia_background_failures_total{{job={job}}}"


def failing(job: str) -> str:
    return f"crealia_background_job_failing{{job={job}}}"


async def scrape(base_url: str) -> dict[str, float]:
    """/metrics of a server, parsed: ``{name{label=value,...}: value}``."""
    return parse_metrics((await fetch_metrics(base_url)).text)


async def until(base_url: str, holds: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Scrape until ``holds`` (callers bound it with ``fail_after``)."""
    while True:
        values = await scrape(base_url)
        if holds(values):
            return values
        await trio.sleep(0.1)  # polling a condition, bounded by the caller's deadline


async def edit(client: RawClient, change_id: str, title: str | None = None) -> int:
    """One acknowledged change: inserting the clip, or setting its ``title``; its seq."""
    if title is None:
        changes: list[dict[str, Any]] = [INSERT]
    else:
        changes = [{"op": "set", "element_id": "clip", "prop": "title", "value": title}]
    reply = await client.request("timeline_change", {"change_id": change_id, "changes": changes})
    assert reply["type"] == "ack", reply
    assert reply["data"]["status"] == "applied", reply
    return int(reply["data"]["seq"])


def bearer(server: Server, user: str, role: str = "owner", project: str = "p1") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.issue_token(user, project, role)}"}  # type: ignore[arg-type]


# -- the helper itself ------------------------------------------------------------------------


async def test_jobs_keep_running_retries_with_a_bounded_backoff_and_is_cancellable(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = JobFailures()
    attempts: list[float] = []

    async def step() -> None:
        attempts.append(trio.current_time())
        if len(attempts) <= 12:
            raise OSError(24, "Too many open files")
        await trio.sleep(1)  # the job's own wait for work

    with trio.fail_after(120):  # virtual time
        async with trio.open_nursery() as nursery:
            nursery.start_soon(jobs.keep_running, "sample", step)
            while len(attempts) < 14:
                await trio.sleep(0.5)  # virtual time
            nursery.cancel_scope.cancel()  # Cancelled goes through the job's loop
    assert jobs.counts["sample"] == 12
    assert "sample" not in jobs.failing
    gaps = [b - a for a, b in itertools.pairwise(attempts[:13])]
    assert gaps[0] == pytest.approx(0.05)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(gaps))  # doubling...
    assert max(gaps) == pytest.approx(MAX_BACKOFF)  # ...up to the bound
    # The traceback once, then one short line each; and once when it works again.
    records = [r for r in caplog.records if r.name == "crealia.jobs"]
    assert sum(r.exc_info is not None for r in records) == 1
    assert sum("failed again" in r.getMessage() for r in records) == 11
    assert records[-1].getMessage() == "sample works again"


def test_jobs_every_counter_exists_from_the_start() -> None:
    assert set(JobFailures().counts) == set(JOBS)
    hardened = {"audit_writer", "audit_prune", "ops_size_cap", "security_alerts",
                "rate_limit_sync", "alert_webhook", "wal_checkpoint", "room_ticker", "presence",
                "room"}  # fmt: skip
    assert hardened <= set(JOBS)


def test_jobs_retention_interval_setting_is_checked() -> None:
    assert Config.from_env({}).retention_interval == 3600.0
    assert Config.from_env({"CREALIA_RETENTION_INTERVAL": "60"}).retention_interval == 60.0
    for bad in ("0.5", "86401", "soon"):
        with pytest.raises((ConfigurationError, ValueError), match=r"retention_interval|float"):
            Config.from_env({"CREALIA_RETENTION_INTERVAL": bad})


# -- the operations database: audit writer, its pruning and size cap, security alerts ---------


OPS_JOBS = ("audit_writer", "audit_prune", "ops_size_cap", "security_alerts")


async def test_jobs_a_lost_ops_database_ends_no_job_and_loses_no_audit_event(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", retention_interval=1.0, security_alert_threshold=2,
                         metrics_interval=3600)  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(60):
            alice = await clients.join("alice")
            await edit(alice, "a-0")
            before = await scrape(server.http_url)
            # The operations database's connection is gone (a real close of the real one):
            # every write, pruning and size check of ops.sqlite3 fails from here on.
            await server.ops._thread.close()
            try:
                for i in range(1, 4):
                    await edit(alice, f"a-{i}", f"t{i}")  # the projects' store still serves
                vic = await clients.join("vic", role="viewer")
                for i in range(2):  # refused twice: a permission_escalation alert to store
                    reply = await vic.request("timeline_change", {"change_id": f"v{i}",
                                                                  "changes": [INSERT]})  # fmt: skip
                    assert reply["type"] == "error"
                # The size check runs every 10 s: its next run fails too.
                during = await until(server.http_url, lambda m: all(
                    m[failures(job)] > before[failures(job)] and m[failing(job)] == 1
                    for job in OPS_JOBS))  # fmt: skip
                await edit(alice, "a-4", "t4")
            finally:
                await server.ops._thread.open()
            # Each job works again (retried with its backoff, at most MAX_BACKOFF apart).
            await until(server.http_url, lambda m: all(m[failing(job)] == 0 for job in OPS_JOBS))
            await edit(alice, "a-5", "t5")
            owner = bearer(server, "olga")
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                events = (await http.get("/api/collaboration/audit", params={"action": "edit"},
                                         headers=owner)).json()["events"]  # fmt: skip
                alerts = (await http.get("/api/collaboration/security/alerts",
                                         headers=owner)).json()["alerts"]  # fmt: skip
    assert all(during[failures(job)] >= 1 for job in OPS_JOBS)
    # Nothing queued while the database was gone was lost.
    assert sorted(e["resource"] for e in events) == [f"timeline:a-{i}" for i in range(6)]
    assert [a["type"] for a in alerts] == ["permission_escalation"]


# -- the WAL checkpointer: the database file cannot grow ----------------------------------------


async def test_jobs_the_wal_checkpointer_survives_a_file_that_cannot_grow(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """RLIMIT_FSIZE at the database file's size (set from outside with prlimit): commits still
    fit in the WAL, checkpoints cannot copy them into the database."""
    data = tmp_path / "data"
    db = data / "crealia.sqlite3"
    env = {"CREALIA_WAL_MAX_BYTES": str(MIB), "CREALIA_WAL_CHECKPOINT_BYTES": str(64 * 1024),
           "CREALIA_RATE_LIMIT_EDIT": "off", "CREALIA_METRICS_INTERVAL": "3600"}  # fmt: skip
    async with run_server(data, SECRET, env=env) as proc:
        with trio.fail_after(90):
            client = await open_raw_client(nursery, proc.ws_url)
            await client.hello(token("alice"), "p1")
            await edit(client, "a-0")
            for i in range(1, 600):  # ~1.2 MB into the database file
                await edit(client, f"a-{i}", "x" * 2000)
            before = await until(proc.http_url, lambda m: m[failing("wal_checkpoint")] == 0)
            limit = db.stat().st_size
            resource.prlimit(proc.process.pid, resource.RLIMIT_FSIZE,
                             (limit, resource.RLIM_INFINITY))  # fmt: skip
            try:
                for i in range(100):  # the WAL takes them; the database would have to grow
                    await edit(client, f"b-{i}", "y" * 2000)
                during = await until(proc.http_url, lambda m: (
                    m[failures("wal_checkpoint")] > before[failures("wal_checkpoint")]
                    and m[failing("wal_checkpoint")] == 1))  # fmt: skip
                await edit(client, "b-x", "still served")
                assert proc.process.poll() is None
            finally:
                resource.prlimit(proc.process.pid, resource.RLIMIT_FSIZE,
                                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # fmt: skip
            after = await until(proc.http_url, lambda m: m[failing("wal_checkpoint")] == 0)
            await edit(client, "c-0", "after")
            await client.aclose()
        assert proc.process.poll() is None

    def checkpoints(values: dict[str, float]) -> float:
        return sum(values[f"crealia_sqlite_checkpoints_total{{db=crealia,mode={mode}}}"]
                   for mode in ("passive", "truncate"))  # fmt: skip

    assert during[failures("wal_checkpoint")] >= 1
    assert checkpoints(after) > checkpoints(during)  # checkpoints complete again
    assert db.stat().st_size > limit  # what the WAL held reached the database


# -- Redis: the rate limiter's sync and the presence heartbeat ----------------------------------


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


async def test_jobs_a_stopped_redis_ends_neither_the_rate_limit_sync_nor_presence(
    tmp_path: Path, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    config = make_config(tmp_path / "d", redis_url=redis_server.url, presence_interval=0.2,
                         metrics_interval=3600, health_interval=3600)  # fmt: skip
    assert redis_server.process is not None
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(60):
            alice = await clients.join("alice")
            await edit(alice, "a-0")
            before = await scrape(server.http_url)
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                # Pings need the limiter (their class is synced): the server answers each while
                # the sync behind them times out.
                for i in range(5):
                    reply = await alice.request("ping", {"t": i})
                    assert reply["type"] == "pong", reply
                # Each job's counter is monotonic; the failing gauge is checked on presence
                # only, whose heartbeats keep needing Redis (a sync with nothing to carry
                # succeeds, so the limiter's gauge may be back to 0 by the time of a scrape).
                during = await until(server.http_url, lambda m: all(
                    m[failures(job)] > before[failures(job)]
                    for job in ("rate_limit_sync", "presence")
                ) and m[failing("presence")] == 1)  # fmt: skip
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            for i in range(3):
                assert (await alice.request("ping", {"t": i}))["type"] == "pong"
            await until(server.http_url, lambda m: (
                m[failing("rate_limit_sync")] == 0 and m[failing("presence")] == 0))  # fmt: skip
            await edit(alice, "a-1", "after")
    assert during[failures("rate_limit_sync")] >= 1
    assert during[failures("presence")] >= 1


async def test_jobs_garbage_presence_in_redis_ends_no_heartbeat_nor_join(
    tmp_path: Path,
    nursery: trio.Nursery,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Presence entries written by some other version or a broken node: skipped, logged."""
    raw = redis.Redis.from_url(redis_server.url)
    try:
        for node, share in (("ghost", b"not json"), ("ghost2", b'[{"name": 1}]'),
                            ("ghost3", b'{"user_id": "x"}')):  # fmt: skip
            raw.hset("crealia:{p1}:presence", node, share)
            raw.set(f"crealia:node:{node}", b"1")
    finally:
        raw.close()
    config = make_config(tmp_path / "d", redis_url=redis_server.url, presence_interval=0.2,
                         metrics_interval=3600)  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            alice = await clients.join("alice")
            await edit(alice, "a-0")
            # Several heartbeats read the garbage.
            while sum("malformed presence" in r.getMessage() for r in caplog.records) < 9:
                await trio.sleep(0.05)  # polling the log, bounded above
            bob = await clients.join("bob")
            users = (await bob.request("users_request", {}))["data"]["users"]
            await edit(alice, "a-1", "still served")
            values = await scrape(server.http_url)
    assert sorted(u["user_id"] for u in users) == ["alice", "bob"]
    assert values[failing("presence")] == 0


async def test_jobs_a_room_that_fails_to_open_closes_alone(
    tmp_path: Path, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    """A project whose snapshot in Redis is not JSON (an error no adapter maps): its room
    fails, is counted and closes; other projects go on; it opens once the snapshot is gone."""
    raw = redis.Redis.from_url(redis_server.url)
    config = make_config(tmp_path / "d", redis_url=redis_server.url, metrics_interval=3600)
    try:
        raw.hset("crealia:{p2}:snap", "doc", b"\x00not json")
        async with open_server(config) as server, opened(server, nursery) as clients:
            with trio.fail_after(30):
                alice = await clients.join("alice")
                await edit(alice, "a-0")
                bob = await clients.raw()
                await bob.send("hello", {"token": clients.token("bob", "p2"),
                                         "project_id": "p2"}, ref=1)  # fmt: skip
                assert await bob.closed() == 1013  # try again later
                values = await scrape(server.http_url)
                await edit(alice, "a-1", "still served")
                raw.delete("crealia:{p2}:snap")
                carol = await clients.join("carol", "p2")
                await edit(carol, "c-0")
    finally:
        raw.close()
    assert values[failures("room")] >= 1
    assert carol.welcome["seq"] == 0


# -- webhooks --------------------------------------------------------------------------------


async def test_jobs_a_webhook_that_fails_oddly_ends_no_delivery(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A webhook whose host name cannot even be encoded (a label over 63 characters: the
    resolver raises UnicodeError, not an HTTP error) fails each delivery to it; the other
    webhook gets every alert and the server serves on."""
    from ._http_receiver import start_receiver

    receiver = await start_receiver(nursery)
    odd = f"http://{'a' * 70}.example/hook"
    config = make_config(tmp_path / "d", security_alert_threshold=2, metrics_interval=3600,
                         alert_webhooks=(odd, receiver.url))  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            alice = await clients.join("alice")
            await edit(alice, "a-0")
            for n, viewer in enumerate(("vic", "val"), start=1):
                # Refused twice: one permission_escalation alert per viewer.
                client = await clients.join(viewer, role="viewer")
                for i in range(2):
                    await client.request("timeline_change", {"change_id": f"{viewer}{i}",
                                                             "changes": [INSERT]})  # fmt: skip
                await receiver.wait_received(n)
                await until(server.http_url, lambda m, n=n: m[failures("alert_webhook")] >= n)
            await edit(alice, "a-1", "still served")
    assert [body["alert"]["subject"] for body in receiver.received] == ["user:vic", "user:val"]


@pytest.fixture(autouse=True)
def _jobs_log_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
