"""Resume (docs/protocol.md §6): exact replay after welcome, snapshot when too far behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from crealia import Server, open_server, open_session

from .conftest import Clients, make_config, opened
from .test_protocol import insert, set_op


async def seed(client, n: int) -> None:
    await client.request("timeline_change", insert("seed", "clip", v=0))
    for i in range(1, n):
        await client.request("timeline_change", set_op(f"s{i}", "clip", "v", i, None))


async def test_resume_replays_exactly_the_missed_events(clients: Clients) -> None:
    with trio.fail_after(15):
        a = await clients.join("alice")
        await seed(a, 5)
        b = await clients.join("bob", resume=2)
        assert b.welcome["replayed"] == 3
        assert b.welcome["seq"] == 5
        assert "snapshot" not in b.welcome
        got = [await b.next() for _ in range(3)]
        assert [e["data"]["seq"] for e in got] == [3, 4, 5]
        # Nothing twice: the next durable event is the live one.
        await a.request("timeline_change", set_op("live", "clip", "v", 99, None))
        live = await b.event("timeline_change")
        assert live["data"]["seq"] == 6


async def test_resume_at_head_replays_nothing(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        await seed(a, 3)
        b = await clients.join("bob", resume=3)
        assert b.welcome["replayed"] == 0
        assert b.welcome["seq"] == 3


async def test_resume_from_the_future_gets_a_snapshot(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        await seed(a, 2)
        b = await clients.join("bob", resume=50)
        assert "replayed" not in b.welcome
        assert b.welcome["snapshot"]["seq"] == 2
        assert b.welcome["snapshot"]["elements"]["clip"]["props"] == {"v": 1}
        assert b.welcome["snapshot"]["versions"]["clip"] == {"v": 2}


# Floods on purpose: not what the rate limits are for here.
@pytest.mark.settings(rate_limits={"cursor": "off", "edit": "off", "comment": "off"})
async def test_resume_too_far_behind_gets_a_snapshot(clients: Clients) -> None:
    limit = clients.server.config.history_limit
    clients.server.hub.backplane.history_limit = 1000  # type: ignore[attr-defined]
    a = await clients.join("alice")
    with trio.fail_after(60):
        await a.request("timeline_change", insert("seed", "clip", v=0))
        # Pipeline the writes: send them all, then read the acks.
        total = 1005
        for i in range(1, total):
            await a.send("timeline_change", set_op(f"s{i}", "clip", "v", i, None), ref=1000 + i)
        acks = 0
        while acks < total - 1:
            env = await a.next()
            if env["type"] == "ack":
                acks += 1
        b = await clients.join("bob", resume=2)
        assert "snapshot" in b.welcome, "events after seq 2 are no longer all kept"
        assert b.welcome["snapshot"]["seq"] == total
        c = await clients.join("carol", resume=total - 10)
        assert c.welcome["replayed"] == 10
    assert limit >= 1000


async def test_events_during_join_are_neither_lost_nor_doubled(clients: Clients) -> None:
    """Joiners racing a writer each see every seq exactly once, in order."""
    a = await clients.join("alice")
    await a.request("timeline_change", insert("seed", "clip", v=0))
    total = 200
    results: list[list[int]] = []

    async def writer() -> None:
        for i in range(total):
            await a.send("timeline_change", set_op(f"w{i}", "clip", "v", i, None))

    async def joiner(k: int) -> None:
        client = await clients.join(f"j{k}", resume=1)
        seqs: list[int] = []
        first = client.welcome["seq"] - client.welcome["replayed"]
        while not seqs or seqs[-1] < total + 1:
            env = await client.next()
            if env["type"] == "collaboration_event" and "seq" in env["data"]:
                seqs.append(env["data"]["seq"])
        assert seqs == list(range(first + 1, total + 2)), (first, seqs[:5])
        results.append(seqs)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            for k in range(5):
                nursery.start_soon(joiner, k)
    assert len(results) == 5


# -- epochs (docs/protocol.md §3, §6) -----------------------------------------------------------


async def test_resume_with_the_welcome_epoch_or_none_replays(clients: Clients) -> None:
    with trio.fail_after(15):
        a = await clients.join("alice")
        epoch = a.welcome["epoch"]
        assert isinstance(epoch, str) and epoch
        await seed(a, 4)
        same = await clients.join("bob", resume=2, epoch=epoch)
        assert (same.welcome["replayed"], same.welcome["epoch"]) == (2, epoch)
        # No epoch in the resume: as before epochs, the seq alone decides.
        legacy = await clients.join("carol", resume=2)
        assert legacy.welcome["replayed"] == 2 and "snapshot" not in legacy.welcome


async def test_resume_with_another_epoch_gets_a_snapshot(clients: Clients) -> None:
    with trio.fail_after(15):
        a = await clients.join("alice")
        await seed(a, 3)
        b = await clients.join("bob", resume=3, epoch="some-other-history")
        assert "replayed" not in b.welcome
        assert b.welcome["snapshot"]["seq"] == 3
        assert b.welcome["epoch"] == a.welcome["epoch"]


@pytest.mark.parametrize(
    ("resume", "field"),
    [({"seq": 1, "epoch": 7}, "epoch"), ({"seq": 1, "epoch": ""}, "epoch"),
     ({"seq": 1, "epoch": "e" * 129}, "epoch")],
)  # fmt: skip
async def test_resume_epoch_must_be_a_short_string(
    clients: Clients, resume: dict[str, object], field: str
) -> None:
    with trio.fail_after(10):
        client = await clients.raw()
        reply = await client.request(
            "hello", {"token": clients.token("alice"), "project_id": "p1", "resume": resume}
        )
        assert reply["type"] == "error", reply
        assert reply["data"]["code"] in ("bad_request", "too_large")
        assert field in reply["data"]["message"]
        # As for any malformed hello: refused, then closed.
        assert await client.closed() == 4400


async def test_epoch_is_kept_across_a_restart(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "data"
    with trio.fail_after(30):
        async with open_server(make_config(data)) as server, opened(server, nursery) as clients:
            a = await clients.join("alice")
            before = a.welcome["epoch"]
            await seed(a, 3)
        async with open_server(make_config(data)) as server, opened(server, nursery) as clients:
            b = await clients.join("bob", resume=1, epoch=before)
            assert (b.welcome["epoch"], b.welcome["replayed"]) == (before, 2)


async def test_python_client_resumes_with_its_epoch(server: Server) -> None:
    """The client sends the epoch it was welcomed with; another one gets it a snapshot."""
    url = f"ws://127.0.0.1:{server.ws_port}/ws"
    token = server.issue_token("alice", "p1", "editor")
    with trio.fail_after(20):
        async with open_session(url, token, "p1") as session:
            await session.change([{"op": "insert", "element_id": "clip", "element_type": "clip",
                                   "props": {"v": 0}}])  # fmt: skip
            epoch = session.epoch
            assert epoch == session.welcome["epoch"]
        async with open_session(url, token, "p1", resume_seq=1, resume_epoch=epoch) as session:
            assert session.welcome["replayed"] == 0
        async with open_session(url, token, "p1", resume_seq=1, resume_epoch="stale") as session:
            assert session.welcome["snapshot"]["seq"] == 1
            assert session.epoch == epoch
