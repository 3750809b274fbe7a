"""Rate limits: GCRA math on an injected clock, event classes, and limits shared through a real
redis-server. Policy: loopback only, a deadline on every I/O test, no sleeps to synchronize."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from crealia._protocol import CLIENT_MESSAGES
from crealia._ratelimit import (
    CLASSES,
    DEFAULT_LIMITS,
    DEFAULT_SLACK,
    Limit,
    RateLimiter,
    event_class,
)
from crealia._storage import open_store
from crealia.backplanes.redis import RATE_LIMIT_BATCH, open_redis_backplane
from crealia.backplanes.sqlite import SQLiteBackplane

from ._redis import RedisServer, run_redis


class FakeClock:
    """A monotonic clock in seconds that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(count: int, burst: int, window_ms: int = 60_000, **kwargs: object) -> RateLimiter:
    return RateLimiter({"edit": Limit(count=count, burst=burst)}, window_ms, **kwargs)  # type: ignore[arg-type]


# -- GCRA ---------------------------------------------------------------------------------------


def test_check_admits_the_burst_at_once_then_the_steady_rate() -> None:
    clock = FakeClock()
    limits = limiter(60, 3, clock=clock)  # one per second, three at once
    assert [limits.check("u", "edit") for _ in range(3)] == [0, 0, 0]
    assert limits.check("u", "edit") == 1000
    clock.advance(0.999)
    assert limits.check("u", "edit") == 1
    clock.advance(0.001)
    assert limits.check("u", "edit") == 0
    assert limits.check("u", "edit") == 1000
    # Sustained: over 100 s of trying every 10 ms, one per second gets in.
    admitted = 0
    for _ in range(10_000):
        clock.advance(0.01)
        admitted += limits.check("u", "edit") == 0
    assert admitted == 100


def test_check_retry_after_is_exact_to_the_ms_and_then_admitted() -> None:
    clock = FakeClock(12_345.678)
    limits = limiter(7, 2, window_ms=1000, clock=clock)  # one per 142.857… ms
    assert limits.check("u", "edit") == 0
    assert limits.check("u", "edit") == 0
    retry = limits.check("u", "edit")
    assert retry == 143
    clock.advance((retry - 1) / 1000)
    assert limits.check("u", "edit") == 1
    clock.advance(0.001)
    assert limits.check("u", "edit") == 0
    # A refusal recorded nothing: the next one waits one interval, not more.
    assert limits.check("u", "edit") == 143


def test_check_refusal_records_nothing() -> None:
    clock = FakeClock()
    limits = limiter(60, 1, clock=clock)
    assert limits.check("u", "edit") == 0
    for _ in range(50):
        assert limits.check("u", "edit") == 1000
    clock.advance(1.0)
    assert limits.check("u", "edit") == 0


def test_check_cost_above_one() -> None:
    clock = FakeClock()
    limits = limiter(60, 5, clock=clock)
    assert limits.check("u", "edit", 3) == 0
    assert limits.check("u", "edit", 3) == 1000  # 6 intervals against a tolerance of 5
    assert limits.check("u", "edit", 2) == 0
    assert limits.check("u", "edit", 5) == 5000
    clock.advance(5.0)
    assert limits.check("u", "edit", 5) == 0
    with pytest.raises(ValueError, match="cost 6 exceeds the burst of class 'edit'"):
        limits.check("u", "edit", 6)


def test_check_classes_and_keys_are_independent() -> None:
    clock = FakeClock()
    limits = RateLimiter(
        {"edit": Limit(count=60, burst=1), "comment": Limit(count=60, burst=1)}, 60_000, clock=clock
    )
    assert limits.check("a", "edit") == 0
    assert limits.check("a", "edit") == 1000
    assert limits.check("a", "comment") == 0
    assert limits.check("b", "edit") == 0
    assert limits.check("b", "comment") == 0
    assert limits.check("b", "comment") == 1000
    assert limits.size == 4
    # A class without a limit is not limited.
    assert all(limits.check("a", "cursor") == 0 for _ in range(1000))
    assert limits.size == 4


def test_sweep_forgets_idle_keys_only() -> None:
    clock = FakeClock()
    limits = limiter(60, 10, clock=clock)
    limits.check("short", "edit")
    for _ in range(5):
        limits.check("long", "edit")
    assert (limits.size, limits.sweep(), limits.forgotten) == (2, 0, 0)
    clock.advance(1.0)  # "short" is idle now, "long" owes 4 s more
    assert limits.sweep() == 1
    assert (limits.size, limits.forgotten) == (1, 1)
    assert limits.check("long", "edit", 7) == 1000  # still remembered: 4 + 7 > 10
    clock.advance(4.0)
    assert limits.sweep() == 1
    assert (limits.size, limits.forgotten) == (0, 2)
    # Forgetting an idle key loses nothing: it gets its whole burst again.
    assert [limits.check("long", "edit") for _ in range(11)] == [0] * 10 + [1000]


async def test_run_sweeps_idle_keys(autojump_clock: trio.testing.MockClock) -> None:
    clock = FakeClock()
    limits = limiter(60, 10, clock=clock)
    for key in ("a", "b", "c"):
        limits.check(key, "edit")
    clock.advance(1.0)
    with trio.fail_after(limits.sweep_interval * 3):  # virtual time: the clock jumps
        async with trio.open_nursery() as nursery:
            await nursery.start(limits.run)
            while limits.forgotten < 3:
                await trio.sleep(1)  # virtual time
            nursery.cancel_scope.cancel()
    assert limits.size == 0


@pytest.mark.parametrize(
    ("count", "burst", "window_ms", "named"),
    [(0, 1, 1000, "count"), (1, 0, 1000, "burst"), (1, 1, 0, "window_ms"),
     (-5, 1, 1000, "count"), (1, 1, -1, "window_ms")],
)  # fmt: skip
def test_bad_limits_are_refused_naming_them(
    count: int, burst: int, window_ms: int, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        RateLimiter({"edit": Limit(count=count, burst=burst)}, window_ms)


def test_bad_sync_interval_and_limit_types_are_refused() -> None:
    with pytest.raises(ValueError, match="sync_interval"):
        RateLimiter(DEFAULT_LIMITS, 60_000, sync_interval=0)
    with pytest.raises(ValueError, match="count"):
        Limit(count=1.5, burst=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"limits\['edit'\]"):
        RateLimiter({"edit": (1, 1)}, 60_000)  # type: ignore[dict-item]


# -- classes ------------------------------------------------------------------------------------


def test_event_class_covers_every_client_message() -> None:
    for message_type in CLIENT_MESSAGES:
        assert event_class(message_type) in CLASSES
    listed = [t for types in CLASSES.values() for t in types]
    assert len(listed) == len(set(listed)), "a type is in two classes"
    assert set(listed) <= set(CLIENT_MESSAGES), "a class lists a type clients cannot send"
    assert event_class("cursor_update") == "cursor"
    assert event_class("timeline_change") == "edit"
    assert event_class("comment_add") == "comment"
    assert event_class("webrtc_signal") == "signal"
    assert event_class("hello") == "other"
    assert event_class("no_such_type") == "other"
    assert set(DEFAULT_LIMITS) == set(CLASSES)


def test_default_limits_allow_a_60_hz_cursor() -> None:
    clock = FakeClock()
    limits = RateLimiter(DEFAULT_LIMITS, 60_000, clock=clock)
    for _ in range(60 * 60):  # a minute of cursor moves at 60 Hz
        assert limits.check("p:u", event_class("cursor_update")) == 0
        clock.advance(1 / 60)


# -- shared through Redis -----------------------------------------------------------------------


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


async def test_memory_backplane_shares_nothing(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store)
            limits = limiter(60, 2, shared=backplane, clock=FakeClock())
            assert limits.shared
            assert limits.check("u", "edit") == 0
            await limits.sync()
            assert not limits.shared  # one process: it stopped tracking what to share
            assert limits.check("u", "edit") == 0
            assert limits.check("u", "edit") == 1000


async def test_redis_sync_rate_limits_answers_each_tat_ahead_of_redis_now(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(20):
        async with open_redis_backplane(redis_server.url) as backplane:
            assert await backplane.sync_rate_limits([]) == []
            [ahead] = await backplane.sync_rate_limits([("p:u:edit", 3, 1000.0)])
            assert 2900 < ahead <= 3000
            [ahead] = await backplane.sync_rate_limits([("p:u:edit", 2, 1000.0)])
            assert 4900 < ahead <= 5000
            client = redis.Redis.from_url(redis_server.url)
            try:
                assert 4900 < client.pttl("crealia:rl:p:u:edit") <= 5001
            finally:
                client.close()
            # More than one script call's worth, answered in order.
            many = [(f"k{i}:edit", i + 1, 10.0) for i in range(2 * RATE_LIMIT_BATCH + 1)]
            answers = await backplane.sync_rate_limits(many)
            assert len(answers) == len(many)
            assert all((i + 1) * 10 - 100 < a <= (i + 1) * 10 for i, a in enumerate(answers))


async def test_two_processes_share_the_burst(redis_server: RedisServer) -> None:
    # Local clocks stand still; one event per second drains at most a fraction of an event
    # from Redis's real clock while this runs.
    clocks = [FakeClock(), FakeClock(5_000_000.0)]  # the processes' clocks disagree: no matter
    with trio.fail_after(20):
        async with (
            open_redis_backplane(redis_server.url) as one,
            open_redis_backplane(redis_server.url) as two,
        ):
            limiters = [
                limiter(60, 30, shared=backplane, clock=clock)
                for backplane, clock in zip((one, two), clocks, strict=True)
            ]
            admitted = 0
            for _round in range(40):
                for each in limiters:
                    # Three tries between two syncs: each process may overshoot by what it
                    # admits in one sync interval before it hears of the other.
                    admitted += sum(each.check("p:u", "edit") == 0 for _ in range(3))
                    await each.sync()
            assert 30 <= admitted <= 30 + 3 * len(limiters)
            # Both now know the cluster's TAT: each waits about the same.
            waits = [each.check("p:u", "edit") for each in limiters]
            assert all(w > 0 for w in waits)
            assert abs(waits[0] - waits[1]) <= 3 * 1000 + 100


async def test_two_processes_together_admit_about_the_limit(redis_server: RedisServer) -> None:
    # Redis's clock cannot be injected, so this one runs on real time: two processes, each
    # trying 4x the limit for about a second, syncing every 20 ms through their run loops.
    limit = Limit(count=6000, burst=10)  # 100/s, one per 10 ms
    with trio.fail_after(20):
        async with (
            open_redis_backplane(redis_server.url) as one,
            open_redis_backplane(redis_server.url) as two,
        ):
            limiters = [
                RateLimiter({"edit": limit}, 60_000, shared=backplane, sync_interval=0.02)
                for backplane in (one, two)
            ]
            admitted = [0, 0]

            async def load(i: int, until: float) -> None:
                while time.monotonic() < until:
                    admitted[i] += limiters[i].check("p:u", "edit") == 0
                    await trio.sleep(0.0025)  # pacing the load over real time

            async with trio.open_nursery() as nursery:
                for each in limiters:
                    await nursery.start(each.run)
                start = time.monotonic()
                async with trio.open_nursery() as loaders:
                    for i in range(2):
                        loaders.start_soon(load, i, start + 1.0)
                elapsed_ms = (time.monotonic() - start) * 1000
                nursery.cancel_scope.cancel()
    expected = limit.burst + elapsed_ms / 10  # what one process alone would admit
    total = sum(admitted)
    # Within 25% below (late syncs make the shared TAT conservative) to 25% above (each
    # process's overshoot of one sync interval); two unshared limiters would admit 2x.
    assert expected * 0.75 <= total <= expected * 1.25, (total, expected, admitted)
    assert min(admitted) > 0


async def test_a_node_that_never_saw_a_user_grants_only_the_slack(
    redis_server: RedisServer,
) -> None:
    # Issue 10: 47 comments on one node, then 50 more at once on another, against a burst of
    # 50: the second node used to grant its own full burst.
    limit = Limit(count=60, burst=50)  # one a second sustained: nothing drains meanwhile
    with trio.fail_after(20):
        async with (
            open_redis_backplane(redis_server.url) as one,
            open_redis_backplane(redis_server.url) as two,
            trio.open_nursery() as nursery,
        ):
            first, second = (RateLimiter({"comment": limit}, 60_000, shared=b) for b in (one, two))
            for each in (first, second):
                await nursery.start(each.run)
            admitted = [sum([await first.admit("p:u", "comment") == 0 for _ in range(47)])]
            await first.sync()
            admitted.append(sum([await second.admit("p:u", "comment") == 0 for _ in range(50)]))
            # The synchronous check refuses what runs ahead, with a wait of a round trip.
            fresh = [second.check("p:v", "comment") for _ in range(7)]
            nursery.cancel_scope.cancel()
    slack = math.ceil(limit.burst * DEFAULT_SLACK)
    assert admitted[0] == 47
    assert admitted[1] <= limit.burst - 47 + slack, admitted  # was 50
    assert sum(admitted) <= limit.burst + slack
    assert fresh[:slack] == [0] * slack, fresh
    assert all(1 <= wait <= 1000 for wait in fresh[slack:]), fresh


async def test_a_user_bursting_on_two_nodes_gets_the_burst_plus_the_slacks(
    redis_server: RedisServer,
) -> None:
    limit = Limit(count=60, burst=50)
    with trio.fail_after(20):
        async with (
            open_redis_backplane(redis_server.url) as one,
            open_redis_backplane(redis_server.url) as two,
            trio.open_nursery() as nursery,
        ):
            limiters = [RateLimiter({"comment": limit}, 60_000, shared=b) for b in (one, two)]
            for each in limiters:
                await nursery.start(each.run)
            admitted = [0, 0]

            async def burst(i: int) -> None:
                for _ in range(60):  # both at once, as fast as the node lets them
                    admitted[i] += await limiters[i].admit("p:u", "comment") == 0

            async with trio.open_nursery() as bursts:
                for i in range(2):
                    bursts.start_soon(burst, i)
            nursery.cancel_scope.cancel()
    slack = math.ceil(limit.burst * DEFAULT_SLACK)
    assert limit.burst - 2 <= sum(admitted) <= limit.burst + 2 * slack, admitted  # was 100
    assert min(admitted) > 0


async def test_limiter_keeps_limiting_locally_without_redis(redis_server: RedisServer) -> None:
    clock = FakeClock()
    with trio.fail_after(30):
        async with open_redis_backplane(redis_server.url) as backplane:
            limits = limiter(60, 3, shared=backplane, clock=clock)
            assert limits.check("u", "edit") == 0
            await limits.sync()
            assert limits.sync_failures == 0
            await redis_server.kill()
            assert limits.check("u", "edit") == 0
            await limits.sync()  # logged and counted, not raised
            assert limits.sync_failures == 1
            assert limits.shared
            assert limits.check("u", "edit") == 0
            assert limits.check("u", "edit") == 1000
            clock.advance(1.0)
            assert limits.check("u", "edit") == 0
            await limits.sync()
            assert limits.sync_failures == 2
            await redis_server.start()
            assert limits.check("other", "edit") == 0
            await limits.sync()
            assert limits.sync_failures == 2  # back to shared


# -- on live servers ------------------------------------------------------------------------------


async def test_a_flood_is_rate_limited_and_closed_while_another_client_keeps_its_latency(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    import trio_websocket

    from crealia import open_server

    from .conftest import make_config, opened

    # Sustained abuse closes the flood after 3,000 refusals: long enough to measure during it.
    config = make_config(tmp_path / "d", abuse_errors=3000)
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(60):
            flooder = await clients.join("flooder")
            calm = await clients.join("calm")
            flooding = trio.Event()
            flood_over = trio.Event()

            async def rtts(count: int) -> list[float]:
                out = []
                while len(out) < count and not flood_over.is_set():
                    start = time.perf_counter()
                    # A cursor move answered with an ack: within the cursor class's burst.
                    reply = await calm.request("cursor_update", {"position": {"x": 1, "y": 2}})
                    assert reply["type"] == "ack", reply
                    out.append(time.perf_counter() - start)
                return sorted(out)

            async def flood() -> None:
                try:
                    for i in range(100_000):
                        op = {"op": "insert", "element_id": f"x{i}", "element_type": "clip",
                              "props": {}}  # fmt: skip
                        await flooder.send("timeline_change", {"change_id": f"f{i}",
                                           "changes": [op]}, ref=i + 1)  # fmt: skip
                        if i == 200:
                            flooding.set()
                except trio_websocket.ConnectionClosed:
                    pass
                flood_over.set()

            closed: list[int | None] = []

            async def read() -> None:
                closed.append(await flooder.closed())  # keeps what it reads in its inbox

            before = await rtts(50)
            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                inner.start_soon(flood)
                await flooding.wait()
                during = await rtts(50)
            code = closed[0]
            audited = await server.hub.audit.query(action="rate_limited")
    errors = [e["data"] for e in flooder.inbox if e.get("type") == "error"]
    assert len(errors) >= 2900  # the last replies may be cut by the close
    assert {e["code"] for e in errors} == {"rate_limited"}
    assert all(e["retry_after_ms"] >= 1 for e in errors)
    assert code == 4429  # sustained abuse ends the session
    # The audit log got one event per second of flooding, not one per refusal.
    assert 1 <= len(audited) <= 10
    assert sum(e.details["refused"] for e in audited) <= len(errors)
    assert len(during) >= 10, "the flood ended before the calm client could measure"
    p95_before = before[int(0.95 * len(before))]
    p95_during = during[int(0.95 * len(during))]
    assert p95_during < max(0.1, 5 * p95_before), (p95_before, p95_during)


async def test_limits_are_shared_by_two_processes_on_one_redis(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    from contextlib import AsyncExitStack

    from crealia import open_server

    from .conftest import make_config, opened

    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(open_server(make_config(
                tmp_path / f"n{i}", redis_url=redis_server.url, rate_limits={"comment": "20/10"}
            )))
            for i in range(2)
        ]  # fmt: skip
        first, second = [await stack.enter_async_context(opened(n, nursery)) for n in nodes]
        with trio.fail_after(30):
            one = await first.join("mia")
            two = await second.join("mia")
            for i in range(10):  # the whole burst, on the first process
                ack = await one.request("comment_add", {"comment": {"id": f"a{i}", "text": "x"}})
                assert ack["type"] == "ack", ack
            await nodes[0].hub.limiter.sync()  # what the sync task does every 100 ms, now
            # The second process learns of a user's consumption at its first sync after it sees
            # the user (so each process may overshoot by one sync interval's worth)...
            ack = await two.request("comment_add", {"comment": {"id": "b0", "text": "x"}})
            assert ack["type"] == "ack", ack
            await nodes[1].hub.limiter.sync()
            # ...and from then on holds to the cluster's limit: alone it would admit 9 more.
            refused = await two.request("comment_add", {"comment": {"id": "b", "text": "x"}})
            other = await two.request("timeline_change", {"change_id": "c", "changes": []})
    assert refused["data"]["code"] == "rate_limited"
    assert refused["data"]["retry_after_ms"] > 1000  # one comment every 3 s from here on
    assert other["type"] != "error" or other["data"]["code"] != "rate_limited"


async def test_reconnect_loops_and_rest_calls_are_limited_too(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    import httpx

    from crealia import open_server

    from .conftest import make_config, opened

    config = make_config(tmp_path / "d", rate_limits={"other": "3/3", "rest": "2/2"})
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(20):
            for _ in range(3):
                client = await clients.join("loop")
                await client.aclose()
            refused = await clients.raw()
            token = server.issue_token("loop", "p1", "editor")
            await refused.send("hello", {"token": token, "project_id": "p1"}, ref=1)
            reply = await refused.next()
            assert await refused.closed() == 4429
            headers = {"Authorization": f"Bearer {server.issue_token('r', 'p1', 'viewer')}"}
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                statuses = [(await http.get("/api/projects/p1/snapshot", headers=headers))
                            for _ in range(3)]  # fmt: skip
    assert (reply["type"], reply["ref"], reply["data"]["code"]) == ("error", 1, "rate_limited")
    assert [r.status_code for r in statuses] == [200, 200, 429]
    limited = statuses[2]
    wait_ms = limited.json()["error"]["retry_after_ms"]
    assert int(limited.headers["Retry-After"]) == -(-wait_ms // 1000)  # seconds, rounded up
