"""PostgreSQL as the store of record with Redis beside it (``--database`` plus ``--redis``):
presence, cursors and rate limits across processes through Redis, durable events through
PostgreSQL, and a Redis SIGKILL that costs only the ephemeral side while it lasts.

Policy: loopback only, port 0, a deadline on every I/O test, a real PostgreSQL
(tests/_postgres.py) and a real redis-server (tests/_redis.py) per test, no mocks, no sleeps
as synchronization (a recovering cluster is polled, bounded by the test's deadline).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from crealia import Ephemeral, Overloaded, Server, TokenAuthority, open_server
from crealia._ratelimit import Limit, RateLimiter
from crealia.backplanes.postgresql import PostgreSQLBackplane, open_postgresql_backplane
from crealia.testing import check_backplane

from ._postgres import PostgresServer, free_port, run_postgres
from ._process import run_server
from ._redis import RedisServer, run_redis
from ._wsclient import RawClient, open_raw_client
from .conftest import JWT_SECRET, Clients, make_config
from .test_postgres_backplane import _change, _Heard, _percentile, _user
from .test_protocol import insert
from .test_ratelimit import FakeClock


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresServer]:
    async with run_postgres() as server:
        yield server


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def nodes(
    tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer
) -> AsyncIterator[list[Server]]:
    """Two servers in this process (each its own data dir) on one database and one Redis,
    configured as ``--database URL --redis URL`` would."""
    url = await postgres.create_database("nodes")
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                open_server(
                    make_config(
                        tmp_path / f"node{i}",
                        database_url=url,
                        redis_url=redis_server.url,
                        presence_interval=0.2,
                    )
                )
            )
            for i in range(2)
        ]


@pytest.fixture
async def on(nodes: list[Server], nursery: trio.Nursery) -> AsyncIterator[list[Clients]]:
    """``on[i]``: raw WebSocket clients of node ``i``, closed after the test."""
    opened = [Clients(node, "ws", nursery) for node in nodes]
    try:
        yield opened
    finally:
        for clients in opened:
            await clients.aclose()


def _backplane(server: Server) -> PostgreSQLBackplane:
    backplane = server.backplane
    assert isinstance(backplane, PostgreSQLBackplane)
    return backplane


async def _users(client: RawClient) -> set[str]:
    reply = await client.request("users_request", {})
    return {u["user_id"] for u in reply["data"]["users"]}


async def _until_users(client: RawClient, expected: set[str], period: float) -> None:
    """Ask for the users until they are ``expected`` (presence converges within heartbeats)."""
    while await _users(client) != expected:
        await trio.sleep(period)  # polling for the next heartbeat, bounded by the deadline


async def _readyz(server: Server) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        response = await http.get("/readyz")
    return response.status_code, response.json()


# -- the contract ------------------------------------------------------------------------------


async def test_check_backplane_passes_on_postgresql_with_redis(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    url = await postgres.create_database("conformance")

    def factory() -> Any:
        return open_postgresql_backplane(url, history_limit=1000, redis_url=redis_server.url)

    async with factory() as backplane:
        assert backplane.shares_presence and backplane.shares_rate_limits
        assert backplane.degraded() == {"redis": None}
    with trio.fail_after(300):
        await check_backplane(factory)  # presence and cluster checks included


# -- two processes ------------------------------------------------------------------------------


async def test_database_and_redis_open_postgresql_with_redis_beside_it(
    nodes: list[Server],
) -> None:
    with trio.fail_after(30):
        for node in nodes:
            backplane = _backplane(node)
            assert backplane.bus is not None
            assert backplane.shares_presence and backplane.shares_rate_limits
            status, body = await _readyz(node)
            assert status == 200, body
            assert body["checks"]["postgresql"] == "ok" and body["checks"]["redis"] == "ok", body
            assert "degraded" not in body, body


async def test_presence_and_cursors_cross_processes(nodes: list[Server], on: list[Clients]) -> None:
    with trio.fail_after(30):
        alice = await on[0].join("alice")
        bob = await on[1].join("bob", role="viewer")
        assert {u["user_id"] for u in bob.welcome["users"]} == {"alice", "bob"}
        joined = await alice.event("user_joined")
        assert joined["data"]["user_id"] == "bob"
        reply = await alice.request("users_request", {})
        users = {u["user_id"]: u for u in reply["data"]["users"]}
        assert set(users) == {"alice", "bob"} and users["bob"]["role"] == "viewer"
        await alice.send("cursor_update", {"position": {"x": 5, "y": 6}})
        cursor = await bob.event("cursor_update")
        assert cursor["data"]["user_id"] == "alice"
        # Durable events cross too (through PostgreSQL).
        ack = await alice.request("timeline_change", insert("c1", "clip", v=1))
        assert ack["type"] == "ack" and ack["data"]["status"] == "applied", ack
        await bob.event("timeline_change", seq=1)
        await bob.aclose()
        left = await alice.event("user_left")
        assert left["data"]["user_id"] == "bob"
        assert await _users(alice) == {"alice"}


async def test_rate_limits_are_shared_across_processes(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    url = await postgres.create_database("limits")
    clocks = [FakeClock(), FakeClock(5_000_000.0)]  # the processes' clocks disagree: no matter
    with trio.fail_after(60):
        async with (
            open_postgresql_backplane(url, redis_url=redis_server.url) as one,
            open_postgresql_backplane(url, redis_url=redis_server.url) as two,
        ):
            limiters = [
                RateLimiter(
                    {"edit": Limit(count=60, burst=30)}, 60_000, shared=backplane, clock=clock
                )
                for backplane, clock in zip((one, two), clocks, strict=True)
            ]
            admitted = 0
            for _round in range(40):
                for each in limiters:
                    admitted += sum(each.check("p:u", "edit") == 0 for _ in range(3))
                    await each.sync()
            # One burst for the cluster (plus what each admits between two syncs), not two.
            assert 30 <= admitted <= 30 + 3 * len(limiters), admitted
            assert all(each.shared for each in limiters)
        # Without Redis beside it, the same backplane limits per process.
        async with open_postgresql_backplane(url) as alone:
            assert not alone.shares_rate_limits and not alone.shares_presence
            assert await alone.sync_rate_limits([("p:u:edit", 1, 1000.0)]) is None


async def test_a_redis_away_at_start_is_degraded_not_fatal(postgres: PostgresServer) -> None:
    url = await postgres.create_database("away")
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with trio.fail_after(60):
        async with open_postgresql_backplane(url, redis_url=nobody) as backplane:
            assert backplane.shares_presence and not backplane.bus_connected
            why = backplane.degraded()["redis"] or ""
            assert "per process" in why
            assert "Connection refused" in why, why  # the cause, not only "reconnecting"
            outcome = await backplane.commit_change(_user("p", "a"), _change("c1", "e1", v=1))
            assert outcome.status == "applied" and outcome.seq == 1
            assert await backplane.remote_presence("p") == []
            with pytest.raises(Overloaded):
                await backplane.sync_rate_limits([("p:u:edit", 1, 1000.0)])
            await backplane.check()  # writes commit: healthy


class _Ephemerals(_Heard):
    """A listener keeping the ephemeral messages it hears."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Ephemeral] = []

    def on_ephemeral(self, message: Ephemeral) -> None:
        self.messages.append(message)
        self.changed.set()
        self.changed = trio.Event()

    async def until_count(self, count: int) -> None:
        while len(self.messages) < count:
            await self.changed.wait()


async def test_a_bad_pubsub_message_is_counted_and_the_bus_goes_on(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    url = await postgres.create_database("bad")
    project = "p-bad"
    with trio.fail_after(60):
        async with (
            open_postgresql_backplane(url, redis_url=redis_server.url) as one,
            open_postgresql_backplane(url, redis_url=redis_server.url) as two,
        ):
            heard = _Ephemerals()
            async with two.subscribe(project, heard):
                client = redis.Redis.from_url(redis_server.url)
                try:
                    channel = f"crealia:{{{project}}}:eph"
                    for junk in (b"not a node|{", b"node|[]", b"\xff"):
                        await trio.to_thread.run_sync(client.publish, channel, junk)
                finally:
                    client.close()
                message = Ephemeral(project_id=project, encoded=b'{"n":1}', origin="o",
                                    key=("alice", "cursor"))  # fmt: skip
                await one.publish(message)
                await heard.until_count(1)
                assert heard.messages[0].encoded == b'{"n":1}'
                assert heard.messages[0].key == ("alice", "cursor")
                assert two.jobs.counts.get("redis_listener", 0) >= 2, two.jobs.counts
                assert two.bus_connected


async def test_delivery_delay_with_redis_up_and_with_redis_sigkilled(
    postgres: PostgresServer, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Committed events go through LISTEN/NOTIFY: a Redis SIGKILL changes neither the ack nor
    the delivery to another process. 200 sequential edits each way."""
    url = await postgres.create_database("delay")
    project = "p-delay"
    lines = []
    with trio.fail_after(120):
        async with (
            open_postgresql_backplane(url, redis_url=redis_server.url) as one,
            open_postgresql_backplane(url, redis_url=redis_server.url) as two,
        ):
            heard = _Heard()
            async with two.subscribe(project, heard):
                seq = 0
                for phase in ("redis up", "redis SIGKILLed"):
                    if phase == "redis SIGKILLed":
                        await redis_server.kill()
                    acks: list[float] = []
                    delays: list[float] = []
                    for i in range(200):
                        started = trio.current_time()
                        outcome = await one.commit_change(
                            _user(project, "a"), _change(f"{phase}-{i}", f"{phase}-e{i}", v=i)
                        )
                        acked = trio.current_time()
                        seq += 1
                        assert outcome.seq == seq
                        await heard.until(seq)
                        acks.append(acked - started)
                        delays.append(max(0.0, heard.at[seq] - acked))
                    lines.append(
                        f"postgresql+redis, {phase}: edit ack p50 "
                        f"{_percentile(acks, 0.5) * 1000:.2f} ms, p99 "
                        f"{_percentile(acks, 0.99) * 1000:.2f} ms; delivery to another process "
                        f"after the ack p50 {_percentile(delays, 0.5) * 1000:.2f} ms, p99 "
                        f"{_percentile(delays, 0.99) * 1000:.2f} ms"
                    )
                    assert _percentile(delays, 0.99) < 0.5, lines[-1]
                assert heard.seqs == list(range(1, 401))
                # Presence while Redis is away: this process's only, never an error; the
                # backplane says it is degraded and stays healthy (writes commit).
                await two.share_presence(project, [{"user_id": "b", "connections": 1}], ttl=1)
                assert await two.remote_presence(project) == []
                assert two.degraded()["redis"], two.degraded()
                await two.check()
    with capsys.disabled():
        print("\n" + "\n".join(lines))


async def test_a_redis_sigkill_costs_presence_only_until_redis_is_back(
    nodes: list[Server], on: list[Clients], redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Redis SIGKILL: edits still ack on both processes and reach the other one's members,
    /readyz stays 200 naming ``redis`` degraded, presence falls back to each process; Redis
    restarted: presence is shared again."""
    with trio.fail_after(90):
        alice = await on[0].join("alice")
        bob = await on[1].join("bob")
        assert await _users(bob) == {"alice", "bob"}
        await redis_server.kill()
        # Presence degrades to each process: the other process's members leave the list.
        left = await bob.event("user_left")
        assert left["data"]["user_id"] == "alice"
        assert await _users(bob) == {"bob"}
        delays: list[float] = []
        for k in range(20):
            writer, reader = (alice, bob) if k % 2 == 0 else (bob, alice)
            ack = await writer.request("timeline_change", insert(f"c{k}", f"e{k}", v=k))
            acked = trio.current_time()
            assert ack["type"] == "ack" and ack["data"]["status"] == "applied", ack
            await reader.event("timeline_change", seq=ack["data"]["seq"])
            delays.append(trio.current_time() - acked)
            assert ack["data"]["seq"] == k + 1
        for node in nodes:
            status, body = await _readyz(node)
            assert status == 200, body
            assert body["checks"]["postgresql"] == "ok", body
            assert body["checks"]["redis"].startswith("degraded: redis unreachable"), body
            assert "per process" in body["degraded"]["redis"], body
        await redis_server.start()
        for node in nodes:
            with trio.fail_after(15):
                await _backplane(node).wait_bus_connected()
        await _until_users(bob, {"alice", "bob"}, 0.1)
        await _until_users(alice, {"alice", "bob"}, 0.1)
        await alice.send("cursor_update", {"position": {"x": 1, "y": 2}})
        cursor = await bob.event("cursor_update")
        assert cursor["data"]["user_id"] == "alice"
        for node in nodes:
            while "degraded" in (body := (await _readyz(node))[1]):
                await trio.sleep(0.1)  # polling a recovering server, bounded by the deadline
            assert body["checks"]["redis"] == "ok", body
        snapshots = [await node.backplane.snapshot("p1") for node in nodes]
        assert snapshots[0] == snapshots[1] and snapshots[0]["seq"] == 20
    with capsys.disabled():
        print(f"\npostgresql+redis, redis SIGKILLed, through two servers: delivery to the "
              f"other process's client after the ack p50 {_percentile(delays, 0.5) * 1000:.1f} "
              f"ms, p99 {_percentile(delays, 0.99) * 1000:.1f} ms")  # fmt: skip
    assert _percentile(delays, 0.99) < 1.0


async def test_a_crealia_serve_process_with_database_and_redis_shares_presence_and_cursors(
    postgres: PostgresServer, redis_server: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A real second process: ``crealia serve --database URL --redis URL``."""
    url = await postgres.create_database("serve")
    authority = TokenAuthority(JWT_SECRET)
    config = make_config(tmp_path / "here", database_url=url, redis_url=redis_server.url,
                         presence_interval=0.2)  # fmt: skip
    with trio.fail_after(90):
        async with (
            run_server(tmp_path / "there", JWT_SECRET, "--database", url, "--redis",
                       redis_server.url, env={"CREALIA_PRESENCE_INTERVAL": "0.2"}) as process,
            open_server(config) as server,
        ):  # fmt: skip
            clients = Clients(server, "ws", nursery)
            try:
                alice = await clients.join("alice")
                bob = await open_raw_client(nursery, process.ws_url)
                welcome = await bob.hello(
                    authority.issue(user_id="bob", project_id="p1", role="editor"), "p1"
                )
                assert {u["user_id"] for u in welcome["users"]} == {"alice", "bob"}
                await alice.send("cursor_update", {"position": {"x": 3, "y": 4}})
                assert (await bob.event("cursor_update"))["data"]["user_id"] == "alice"
                ack = await bob.request("timeline_change", insert("c1", "clip", v=1))
                assert ack["type"] == "ack", ack
                await alice.event("timeline_change", seq=ack["data"]["seq"])
                async with httpx.AsyncClient(base_url=process.http_url, timeout=10) as http:
                    ready = (await http.get("/readyz")).json()
                assert ready["checks"]["redis"] == "ok" and ready["checks"]["postgresql"] == "ok"
                await bob.aclose()
            finally:
                await clients.aclose()
