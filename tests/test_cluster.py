"""Many crealia processes on one Redis (started by the test): one order, resume anywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

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
    extra: dict[str, Any] = {"strategy_chain": tuple(chain.args)} if chain else {}
    settings = request.node.get_closest_marker("settings")
    if settings is not None:
        extra.update(settings.kwargs)
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


async def test_every_node_names_the_same_epoch_and_a_new_key_means_a_snapshot(
    nodes: list[Server], on: dict[tuple[int, str], Clients], redis_server: RedisServer
) -> None:
    import redis

    a = await on[0, "ws"].join("alice")
    with trio.fail_after(15):
        epoch = a.welcome["epoch"]
        await a.request("timeline_change", insert("c0", "clip", v=0))
        await a.request("timeline_change", set_op("c1", "clip", "v", 1, None))
        elsewhere = await on[2, "http"].join("bob", resume=1, epoch=epoch)
        assert (elsewhere.welcome["epoch"], elsewhere.welcome["replayed"]) == (epoch, 1)
        # The history is replaced (as a restore would): its key names another epoch.
        client = redis.Redis.from_url(redis_server.url)
        client.set("crealia:{p1}:epoch", "restored")
        client.close()
        back = await on[1, "ws"].join("carol", resume=2, epoch=epoch)
    assert back.welcome["epoch"] == "restored"
    assert back.welcome["snapshot"]["seq"] == 2


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


async def test_users_list_shows_members_on_every_node(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    with trio.fail_after(10):
        a = await on[0, "ws"].join("alice")
        b = await on[1, "http"].join("bob", role="viewer")
        assert {u["user_id"] for u in b.welcome["users"]} == {"alice", "bob"}
        joined = await a.event("user_joined")
        assert joined["data"]["user_id"] == "bob"
        reply = await a.request("users_request", {})
        users = {u["user_id"]: u for u in reply["data"]["users"]}
        assert set(users) == {"alice", "bob"}
        assert users["bob"]["role"] == "viewer"
        await b.aclose()
        left = await a.event("user_left")
        assert left["data"]["user_id"] == "bob"
        reply = await a.request("users_request", {})
        assert [u["user_id"] for u in reply["data"]["users"]] == ["alice"]


async def test_redis_restart_loses_no_acknowledged_change(
    nodes: list[Server], on: dict[tuple[int, str], Clients], redis_server: RedisServer
) -> None:
    writers = [await on[i, "ws"].join(f"w{i}") for i in range(3)]
    acked: dict[str, int] = {}
    with trio.fail_after(30):
        first = await writers[0].request("timeline_change", insert("c0", "clip"))
        acked["c0"] = first["data"]["seq"]
        for k in range(10):
            reply = await writers[k % 3].request(
                "timeline_change", set_op(f"a{k}", "clip", f"p{k}", k, None)
            )
            acked[f"a{k}"] = reply["data"]["seq"]
        await redis_server.kill()
        refused = await writers[1].request("timeline_change", set_op("x", "clip", "x", 1, None))
        assert refused["type"] == "error" and refused["data"]["code"] == "overloaded"
        ready = await trio.to_thread.run_sync(_readyz, nodes[1].http_url)
        assert ready == 503
        await redis_server.start()
        for node in nodes:
            await node.hub.backplane.wait_connected()  # type: ignore[attr-defined]
        # The sessions stayed open; writes work again and every node converges. A node may
        # still answer overloaded once, from a pooled connection that died with Redis.
        for k in range(10, 20):
            for _attempt in range(3):
                reply = await writers[k % 3].request(
                    "timeline_change", set_op(f"a{k}", "clip", f"p{k}", k, None)
                )
                if reply["type"] == "ack":
                    break
                assert reply["data"]["code"] == "overloaded"
            assert reply["type"] == "ack", reply
            acked[f"a{k}"] = reply["data"]["seq"]
        assert await trio.to_thread.run_sync(_readyz, nodes[1].http_url) == 200
        head = max(acked.values())
        seqs = sorted(acked.values())
        assert seqs == list(range(1, head + 1)), "acked seqs must be gap-free"
        snapshots = [await node.hub.backplane.snapshot("p1") for node in nodes]
        for snap in snapshots:
            assert snap == snapshots[0]
            assert snap["seq"] == head
            props = snap["elements"]["clip"]["props"]
            assert all(props[f"p{k}"] == k for k in range(20))
        # Every member saw every acked event, in order, with nothing missing.
        for writer in writers:
            got: list[int] = []
            while len(got) < head:
                env = await writer.next()
                if env["type"] == "collaboration_event" and "seq" in env["data"]:
                    got.append(env["data"]["seq"])
            assert got == list(range(1, head + 1))


def _readyz(base: str) -> int:
    import httpx

    with httpx.Client(base_url=base, timeout=5) as http:
        return http.get("/readyz").status_code


async def test_three_processes_sigkill_one_users_leave_and_resume_elsewhere(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    from crealia import TokenAuthority

    from ._process import run_server
    from ._wsclient import open_raw_client

    secret = "cluster-test-secret-0123456789abcdef"
    authority = TokenAuthority(secret)
    env = {"CREALIA_PRESENCE_INTERVAL": "0.3"}
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                run_server(tmp_path / f"p{i}", secret, "--redis", redis_server.url, env=env)
            )
            for i in range(3)
        ]
        with trio.fail_after(30):
            clients = []
            for i, proc in enumerate(procs):
                client = await open_raw_client(nursery, proc.ws_url)
                await client.hello(authority.issue(user_id=f"u{i}", project_id="p1",
                                                   role="editor"), "p1")  # fmt: skip
                clients.append(client)
            await clients[0].request("timeline_change", insert("c0", "clip", title="t"))

            async def edits(i: int) -> None:
                for k in range(2):
                    reply = await clients[i].request(
                        "timeline_change", set_op(f"c{i}-{k}", "clip", f"p{i}", k, None)
                    )
                    assert reply["data"]["status"] == "applied"

            async with trio.open_nursery() as inner:
                for i in range(3):
                    inner.start_soon(edits, i)
            # Every client, on every process, saw one gap-free order.
            for client in clients:
                got = []
                while len(got) < 7:
                    env = await client.next()
                    if env["type"] == "collaboration_event" and "seq" in env["data"]:
                        got.append(env["data"]["seq"])
                assert got == list(range(1, 8))
            users = await clients[0].request("users_request", {})
            assert {u["user_id"] for u in users["data"]["users"]} == {"u0", "u1", "u2"}
            procs[2].kill()
            left = await clients[0].event("user_left", user_id="u2")
            assert left["data"]["payload"]["user_id"] == "u2"
            users = await clients[1].request("users_request", {})
            assert {u["user_id"] for u in users["data"]["users"]} == {"u0", "u1"}
            # u2 resumes on another process and misses nothing.
            await clients[0].request("timeline_change", set_op("late", "clip", "v", 99, None))
            moved = await open_raw_client(nursery, procs[1].ws_url)
            welcome = await moved.hello(
                authority.issue(user_id="u2", project_id="p1", role="editor"), "p1", resume=3
            )
            assert welcome["replayed"] == welcome["seq"] - 3 == 5
            got = [(await moved.next())["data"]["seq"] for _ in range(5)]
            assert got == [4, 5, 6, 7, 8]
            # Two processes racing on one property from the same base: exactly one conflict.
            replies = []

            async def race(client: Any, name: str) -> None:
                replies.append(
                    await client.request(
                        "timeline_change", set_op(f"race-{name}", "clip", "title", name, 1)
                    )
                )

            async with trio.open_nursery() as inner:
                inner.start_soon(race, clients[1], "b")
                inner.start_soon(race, moved, "c")
            assert sorted(r["data"]["status"] for r in replies) == ["applied", "conflict"]
            assert sum(len(r["data"]["conflicts"]) for r in replies) == 1
            for client in [*clients[:2], moved]:
                await client.aclose()
            await clients[2].aclose()


async def test_a_bad_pubsub_message_does_not_stop_the_backplane(
    nodes: list[Server], on: dict[tuple[int, str], Clients], redis_server: RedisServer
) -> None:
    import redis as redis_py

    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("bob")
    with trio.fail_after(10):
        client = redis_py.Redis.from_url(redis_server.url)
        await trio.to_thread.run_sync(client.publish, "crealia:{p1}:events", b"not json")
        await trio.to_thread.run_sync(client.publish, "crealia:{p1}:eph", b"x|{]")
        client.close()
        await a.request("timeline_change", insert("c1", "clip"))
        ev = await b.event("timeline_change")
        assert ev["data"]["seq"] == 1


async def test_gdpr_erasure_is_refused_on_redis_without_closing_the_room(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    import httpx

    member = await on[0, "ws"].join("mia")
    token = nodes[0].issue_token("olga", "p1", "owner")
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=nodes[0].http_url, timeout=10) as http:
            response = await http.post("/api/collaboration/gdpr/erase", json={"userId": "mia"},
                                       headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert response.status_code == 501
        assert response.json()["error"]["code"] == "unsupported"
        assert (await member.request("ping", {}))["type"] == "pong"  # still connected


@pytest.mark.chain("manual")
@pytest.mark.settings(document_max_bytes=64 * 1024, snapshot_every=10, rate_limits={"edit": "off"})
async def test_deleted_elements_are_forgotten_alike_on_every_node(
    nodes: list[Server], on: dict[tuple[int, str], Clients], redis_server: RedisServer
) -> None:
    """The insert/delete loop of test_limits over Redis: every node's copy of the document
    keeps the same few deleted elements, within the quota, and so does the stored snapshot."""
    with trio.fail_after(60):
        a = await on[0, "ws"].join("alice")
        b = await on[1, "ws"].join("bob")
        for i in range(20):
            ok = await a.request("timeline_change", insert(f"i{i}", f"e{i}", blob="x" * 20_000))
            assert ok["data"]["status"] == "applied", ok
            gone = {"change_id": f"d{i}", "changes": [{"op": "delete", "element_id": f"e{i}"}]}
            assert (await a.request("timeline_change", gone))["data"]["status"] == "applied"
            a.inbox.clear()
            b.inbox.clear()
        await b.event("timeline_change", seq=40)
        docs = [node.hub.backplane._mirrors["p1"].doc for node in nodes[:2]]  # type: ignore[attr-defined]
        assert list(docs[0].tombstones) == list(docs[1].tombstones) == ["e17", "e18", "e19"]
        assert all(doc.held_bytes <= 64 * 1024 for doc in docs)
        import redis as redis_py

        client = redis_py.Redis.from_url(redis_server.url)
        stored = await trio.to_thread.run_sync(client.hget, "crealia:{p1}:snap", "doc")
        client.close()
        assert stored is not None and len(stored) < 80 * 1024
        # A node that loads the project now (snapshot and log) keeps the same ones.
        c = await on[2, "ws"].join("carol")
        assert c.welcome["seq"] == 40
        fresh = nodes[2].hub.backplane._mirrors["p1"].doc  # type: ignore[attr-defined]
        assert list(fresh.tombstones) == ["e17", "e18", "e19"]
        recent = await c.request("timeline_change", set_op("c1", "e19", "blob", "mine", 39))
        assert recent["data"]["status"] == "conflict", recent
        old = await b.request("timeline_change", set_op("b1", "e0", "blob", "mine", 1))
        assert old["data"]["code"] == "not_found", old


@pytest.mark.settings(max_members_per_project=2)
async def test_members_per_project_are_counted_across_nodes(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    with trio.fail_after(20):
        await on[0, "ws"].join("alice")
        await on[1, "ws"].join("bob")
        # Presence reaches Redis from each node's publisher a moment after the welcome: the
        # limit counts what is there when carol joins (on CI, under load, it was not yet).
        while len(await nodes[2].hub.backplane.remote_presence("p1")) < 2:
            await trio.sleep(0.02)  # polling Redis for the two members, bounded above
        carol = await on[2, "ws"].raw()
        await carol.send("hello", {"token": on[2, "ws"].token("carol"), "project_id": "p1"}, 1)
        refused = await carol.next()
        assert refused["data"]["code"] == "overloaded", refused
        assert await carol.closed() == 1013
        again = await on[2, "ws"].join("bob")
        assert {u["user_id"] for u in again.welcome["users"]} == {"alice", "bob"}


@pytest.mark.chain("manual")
@pytest.mark.settings(max_pending_conflicts=2, rate_limits={"edit": "off"})
async def test_pending_conflicts_are_capped_across_nodes(
    nodes: list[Server], on: dict[tuple[int, str], Clients], redis_server: RedisServer
) -> None:
    """Stale sets from two nodes share one count in Redis; the next is refused whole on a
    third; conflicts stored before the count (its key gone) are counted again; a dismissal
    makes room."""
    import redis as redis_py

    with trio.fail_after(30):
        a = await on[0, "ws"].join("alice")
        b = await on[1, "http"].join("bob")
        c = await on[2, "ws"].join("carol")
        await a.request("timeline_change", insert("a1", "clip", title="t"))
        await a.request("timeline_change", set_op("a2", "clip", "title", "alice's", 1))
        ids = []
        for i, who in enumerate((b, c)):
            ack = await who.request("timeline_change", set_op(f"s{i}", "clip", "title", i, 1))
            assert ack["data"]["status"] == "conflict", ack
            ids += ack["data"]["conflicts"]
        over = {"change_id": "s2", "changes": [
            {"op": "insert", "element_id": "extra", "element_type": "clip", "props": {}},
            {"op": "set", "element_id": "clip", "prop": "title", "value": 2, "base": 1},
        ]}  # fmt: skip
        refused = await c.request("timeline_change", over)
        assert refused["data"]["code"] == "too_large", refused
        assert refused["data"]["message"].startswith("data.changes[1]: max_pending_conflicts")
        client = redis_py.Redis.from_url(redis_server.url)
        await trio.to_thread.run_sync(client.delete, "crealia:{p1}:pending")
        client.close()
        refused = await b.request("timeline_change", over)
        assert refused["data"]["code"] == "too_large", refused
        assert (await b.request("ping", {}))["type"] == "pong"
        assert len(await nodes[2].hub.backplane.pending_conflicts("p1")) == 2
        snap = await nodes[0].hub.backplane.snapshot("p1")
        assert "extra" not in snap["elements"] and snap["seq"] == 2
        ack = await a.request("conflict_dismiss", {"conflict_id": ids[0]})
        assert ack["type"] == "ack", ack
        again = await c.request("timeline_change", over)
        assert again["data"]["status"] == "partial", again


async def test_a_chain_change_on_one_process_is_used_by_every_process(
    nodes: list[Server], on: dict[tuple[int, str], Clients]
) -> None:
    """Node 1 had the project's chain cached; node 0 changes it; node 1's next conflict goes
    to the new chain (it kept running ``merge, priority`` before)."""
    a = await on[0, "ws"].join("alice")
    b = await on[1, "ws"].join("bob")
    c = await on[1, "ws"].join("carol")
    with trio.fail_after(15):
        await b.request("timeline_change", insert("c1", "clip", title="Intro"))
        await b.request("timeline_change", set_op("c2", "clip", "title", "Intro one", 1))
        first = await c.request("timeline_change", set_op("c3", "clip", "title", "Intro two", 1))
        (settled,) = first["data"]["conflicts"]
        await c.expect_type("conflict_resolved", conflict_id=settled)  # node 1's chain, cached
        await nodes[0].hub.settler.set_chain("p1", ["manual"], {})
        # The notice went out on the project's channel before this cursor: once node 1 delivers
        # the cursor, it has heard the notice.
        await a.send("cursor_update", {"position": {"x": 1, "y": 1}})
        await b.event("cursor_update")
        seq = await b.request("timeline_change", set_op("c4", "clip", "title", "Intro 3", None))
        second = await c.request(
            "timeline_change", set_op("c5", "clip", "title", "Intro 4", seq["data"]["seq"] - 1)
        )
        (pending,) = second["data"]["conflicts"]
        detected = await c.expect(
            lambda env: (
                env["type"] == "conflict_detected" and env["data"]["conflicts"][0]["id"] == pending
            )
        )
        assert detected["data"]["conflicts"][0]["strategy"] == "manual"
        assert nodes[1].hub.settler.forgotten == 1
