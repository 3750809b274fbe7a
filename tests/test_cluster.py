"""Many crealia processes on one Redis (started by the test): one order, resume anywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from crealia import Server, open_server

from ._redis import RedisServer, run_redis
from .conftest import Clients, make_config
from .test_protocol import insert, set_op


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def nodes(
    tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[list[Server]]:
    """Three servers in this process (each its own data dir) sharing the test's Redis."""
    chain = request.node.get_closest_marker("chain")
    extra = {"strategy_chain": tuple(chain.args)} if chain else {}
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                open_server(make_config(tmp_path / f"node{i}", redis_url=redis_server.url, **extra))
            )
            for i in range(3)
        ]
        yield servers


@pytest.fixture
async def on(
    nodes: list[Server], nursery: trio.Nursery
) -> AsyncIterator[dict[tuple[int, str], Clients]]:
    """``on[i, endpoint]``: raw clients of node ``i``, closed after the test."""
    opened = {(i, ep): Clients(node, ep, nursery) for i, node in enumerate(nodes)
              for ep in ("ws", "http")}  # fmt: skip
    try:
        yield opened
    finally:
        for clients in opened.values():
            await clients.aclose()


async def test_clients_on_three_nodes_see_one_gap_free_order(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    editors = [await on[i, "ws"].join(f"ed{i}") for i in range(3)]
    await editors[0].request("timeline_change", insert("setup", "clip", n=0))
    per = 30
    seen: dict[int, list[int]] = {}

    async def edit(i: int) -> None:
        for k in range(per):
            reply = await editors[i].request(
                "timeline_change", set_op(f"e{i}-{k}", "clip", f"p{i}", k, None)
            )
            assert reply["data"]["status"] == "applied", reply

    async def collect(i: int) -> None:
        seqs: list[int] = []
        while len(seqs) < 1 + 3 * per:
            env = await editors[i].next()
            if env["type"] == "collaboration_event" and "seq" in env["data"]:
                seqs.append(env["data"]["seq"])
        seen[i] = seqs

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for i in range(3):
                inner.start_soon(edit, i)
        async with trio.open_nursery() as inner:
            for i in range(3):
                inner.start_soon(collect, i)
    for seqs in seen.values():
        assert seqs == list(range(1, 2 + 3 * per))
    snapshots = [await node.hub.backplane.snapshot("p1") for node in nodes]
    assert all(snap == snapshots[0] for snap in snapshots)


@pytest.mark.chain("manual")
async def test_two_nodes_racing_on_one_property_make_exactly_one_conflict(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    a = await on[0, "ws"].join("alice")
    b = await on[1, "http"].join("bob")
    with trio.fail_after(15):
        await a.request("timeline_change", insert("c0", "clip", title="t"))
        replies: dict[str, dict] = {}

        async def write(name: str, client, value: str) -> None:
            replies[name] = await client.request(
                "timeline_change", set_op(f"c-{name}", "clip", "title", value, 1)
            )

        async with trio.open_nursery() as inner:
            inner.start_soon(write, "a", a, "from a")
            inner.start_soon(write, "b", b, "from b")
        statuses = sorted(r["data"]["status"] for r in replies.values())
        # alice wrote seq 1 herself: her stale write is never a conflict with her own insert;
        # whichever of the two comes second conflicts with the other.
        assert statuses in (["applied", "conflict"], ["applied", "applied"])
        conflicts = [c for r in replies.values() for c in r["data"]["conflicts"]]
        pending = await nodes[2].hub.backplane.pending_conflicts("p1")
        assert [c.id for c in pending] == conflicts
        assert len(conflicts) <= 1


@pytest.mark.chain("manual")
async def test_race_between_two_other_users_is_one_conflict(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    owner = await on[2, "ws"].join("olga")
    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("bob")
    with trio.fail_after(15):
        await owner.request("timeline_change", insert("c0", "clip", title="t"))
        replies = []

        async def write(client, name: str) -> None:
            replies.append(
                await client.request(
                    "timeline_change", set_op(f"c-{name}", "clip", "title", name, 1)
                )
            )

        async with trio.open_nursery() as inner:
            inner.start_soon(write, a, "a")
            inner.start_soon(write, b, "b")
        statuses = sorted(r["data"]["status"] for r in replies)
        assert statuses == ["applied", "conflict"]
        pending = await nodes[0].hub.backplane.pending_conflicts("p1")
        assert len(pending) == 1
        detected = await owner.expect_type("conflict_detected")
        assert detected["data"]["conflicts"][0]["id"] == pending[0].id


async def test_resume_on_another_node_replays_exactly_the_missed_events(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    a = await on[0, "ws"].join("alice")
    with trio.fail_after(15):
        await a.request("timeline_change", insert("c0", "clip", v=0))
        for i in range(1, 5):
            await a.request("timeline_change", set_op(f"c{i}", "clip", "v", i, None))
        moved = await on[1, "http"].join("bob", resume=2)
        assert moved.welcome["replayed"] == 3
        got = [await moved.next() for _ in range(3)]
        assert [e["data"]["seq"] for e in got] == [3, 4, 5]
        await a.request("timeline_change", set_op("c9", "clip", "v", 9, None))
        live = await moved.event("timeline_change")
        assert live["data"]["seq"] == 6


async def test_duplicate_change_id_across_nodes(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("alice")
    with trio.fail_after(15):
        first = await a.request("timeline_change", insert("same", "clip", v=0))
        again = await b.request("timeline_change", insert("same", "clip", v=0))
        assert again["data"] == {**first["data"], "status": "duplicate"}
        c1 = await a.request("comment_add", {"comment": {"id": "k", "text": "hi"}})
        c2 = await b.request("comment_add", {"comment": {"id": "k", "text": "hi"}})
        assert c2["data"] == {"seq": c1["data"]["seq"], "status": "duplicate"}


async def test_strategies_settle_once_in_a_cluster(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("bob")
    watcher = await on[2, "ws"].join("watcher", role="viewer")
    with trio.fail_after(15):
        await a.request("timeline_change", insert("c1", "clip", title="The quick fox"))
        await a.request("timeline_change", set_op("c2", "clip", "title", "The slow fox", 1))
        ack = await b.request(
            "timeline_change", set_op("c3", "clip", "title", "The quick red fox", 1)
        )
        (cid,) = ack["data"]["conflicts"]
        resolved = await watcher.expect_type("conflict_resolved", conflict_id=cid)
        assert resolved["data"]["resolution"]["value"] == "The slow red fox"
        await a.request("comment_add", {"comment": {"id": "after", "text": "x"}})
        after = await watcher.event("comment_add")
        assert after["data"]["seq"] == resolved["data"]["seq"] + 1


async def test_ephemeral_presence_crosses_nodes(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("bob")
    with trio.fail_after(10):
        await a.send("cursor_update", {"position": {"x": 5, "y": 6}})
        cursor = await b.event("cursor_update")
        assert cursor["data"]["user_id"] == "alice"
