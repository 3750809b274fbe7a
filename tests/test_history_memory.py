"""Issue 17: a project's history is bounded in memory by what its events really cost
(``history_memory_bytes``), reported (``crealia_history_bytes``, ``historyBytes``) and released
when its room closes; a resume from older kept events reads them from the store."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from pathlib import Path

import orjson
import pytest
import trio

from crealia import Config, Server, User
from crealia._backplane import History
from crealia._model import DurableEvent
from crealia._wire import Comment, TimelineChange, structure
from crealia.backplanes.sqlite import open_backplane

from ._scrape import fetch_metrics, parse_metrics
from .conftest import JWT_SECRET, opened
from .test_protocol import insert, set_op

KIB = 1024


def _edit(seq: int) -> DurableEvent:
    # As the server builds it: the ops decoded off the wire, shared by payload and effects.
    op = {"op": "set", "element_id": f"clip-{seq % 20}", "prop": "start", "value": 1000 + seq,
          "base": seq}  # fmt: skip
    ops = orjson.loads(orjson.dumps([op]))
    payload = {"change_id": f"u-e{seq}", "changes": ops}
    return DurableEvent(project_id="p", seq=seq, kind="timeline_change", user_id="u", at=seq,
                        payload=payload, effects=ops)  # fmt: skip


def _comment(seq: int, size: int) -> DurableEvent:
    payload = orjson.loads(orjson.dumps({"comment": {"id": f"c{seq}", "text": "x" * size,
                                                     "element_id": "e", "time": seq}}))  # fmt: skip
    return DurableEvent(project_id="p", seq=seq, kind="comment_add", user_id="u", at=seq,
                        payload=payload)  # fmt: skip


@pytest.mark.parametrize(("make", "count"), [(_edit, 2000), (lambda s: _comment(s, 10), 2000),
                                             (lambda s: _comment(s, 60_000), 40)])  # fmt: skip
def test_held_bytes_is_what_tracemalloc_counts(make, count) -> None:  # type: ignore[no-untyped-def]
    """The history's figure is measured, not guessed: within 10 % of what tracemalloc traces
    for the events, their frames and the history's own bookkeeping."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        history = History(limit=100_000, max_bytes=1 << 40)
        for seq in range(1, count + 1):
            history.append(make(seq))
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(history) == count
    assert abs(history.held_bytes - traced) < 0.1 * traced, (history.held_bytes, traced)
    # An edit costs about four times its frame, a large comment twice (the text and the frame).
    assert history.held_bytes > 1.8 * history.bytes


def test_history_stays_within_its_memory_bound_with_large_events() -> None:
    bound = 1 << 20
    history = History(limit=10_000, max_bytes=64 << 20, memory_bytes=bound)
    for seq in range(1, 301):
        history.append(_comment(seq, 60_000))
        assert history.held_bytes <= bound
    # Memory holds the newest that fit; the kept window (what resume may use) is every one.
    assert history.kept == 300 and history.first_kept == 1
    assert 0 < len(history) < 20 and history[-1].seq == 300
    assert history.first_held == 300 - len(history) + 1
    # One event over the whole bound is not held at all (the store has it).
    history.append(_comment(301, 2 << 20))
    assert len(history) == 0 and history.held_bytes <= bound and history.kept == 301
    history.append(_edit(302))
    assert [e.seq for e in history] == [302]
    # The count bound still applies to the window, held or not.
    small = History(limit=1000, max_bytes=64 << 20, memory_bytes=64 * KIB)
    for seq in range(1, 1501):
        small.append(_edit(seq))
    assert small.kept == 1000 and small.first_kept == 501 and small.held_bytes <= 64 * KIB


async def test_history_since_reads_what_memory_no_longer_holds() -> None:
    history = History(limit=10_000, max_bytes=64 << 20, memory_bytes=64 * KIB)
    stored = {seq: _edit(seq) for seq in range(1, 2001)}
    for event in stored.values():
        history.append(event)
    reads: list[tuple[int, int]] = []

    async def read(after: int, upto: int) -> list[DurableEvent]:
        reads.append((after, upto))
        return [stored[s] for s in range(after + 1, upto + 1)]

    first_held = history.first_held
    assert first_held > 1
    got = await history.since(10, read)
    assert got is not None and [e.seq for e in got] == list(range(11, 2001))
    assert reads == [(10, first_held - 1)]
    assert await history.since(2000, read) == []
    assert await history.since(2001, read) is None  # beyond the newest

    async def lossy(after: int, upto: int) -> list[DurableEvent]:
        return [stored[s] for s in range(after + 2, upto + 1)]

    assert await history.since(10, lossy) is None  # a store that lost events: a snapshot


async def test_closed_project_releases_its_history(tmp_path: Path) -> None:
    """What a project's history held goes back when it is released: the held bytes and what
    tracemalloc traces return to where they were before it was opened."""
    config = Config(data_dir=tmp_path, jwt_secret=JWT_SECRET, history_memory_bytes=256 * KIB)
    user = User(id="alice", name="Alice", role="editor", project_id="p1")
    async with open_backplane("sqlite:", config) as backplane:
        with trio.fail_after(30):
            # Warm up what is made once (the converter's functions, the statement caches).
            await backplane.commit_change(user, structure(insert("c0", "e", v=0), TimelineChange))
            await backplane.commit_change(user, structure(set_op("w", "e", "v", 0, None),
                                                          TimelineChange))  # fmt: skip
            await backplane.commit_comment(user, structure({"id": "w", "text": "w",
                                                            "element_id": "e", "time": 0},
                                                           Comment))  # fmt: skip
            backplane.release("p1")
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(1, 400):
                    change = structure(set_op(f"c{i}", "e", "v", "y" * 2000, None),
                                       TimelineChange)  # fmt: skip
                    await backplane.commit_change(user, change)
                comment = structure({"id": "n1", "text": "z" * 50_000, "element_id": "e",
                                     "time": 0}, Comment)  # fmt: skip
                await backplane.commit_comment(user, comment)
                del comment, change  # what the test holds is not the project's
                held = backplane.held_history()
                assert held.projects == 1 and 0 < held.bytes <= 256 * KIB
                assert held == backplane.held_history("p1")
                history = list(backplane._projects["p1"].history)
                events = [weakref.ref(e) for e in history[:3] + history[-3:]]
                del history
                gc.collect()
                loaded = tracemalloc.get_traced_memory()[0] - before
                backplane.release("p1")
                gc.collect()
                after = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert backplane.held_history() == backplane.held_history("p1")
            assert backplane.held_history().bytes == 0
            assert all(ref() is None for ref in events), "an event outlived its project"
            assert loaded > held.bytes and after < 48 * KIB, (loaded, after)


@pytest.mark.settings(history_memory_bytes=64 * KIB, rate_limits={"edit": "off"})
async def test_room_history_bounded_reported_released_and_resumed_from_store(
    server: Server, nursery: trio.Nursery
) -> None:
    async with opened(server, nursery) as clients:
        with trio.fail_after(60):
            a = await clients.join("alice")
            await a.request("timeline_change", insert("c0", "e", v=0))
            for i in range(1, 120):
                ack = await a.request("timeline_change", set_op(f"c{i}", "e", "v", "x" * 3000,
                                                                None))  # fmt: skip
                assert ack["type"] == "ack", ack
            a.inbox.clear()
            history = server.hub.backplane._projects["p1"].history  # type: ignore[attr-defined]
            assert history.held_bytes <= 64 * KIB and history.first_held > 2
            assert history.kept == 120
            metrics = parse_metrics((await fetch_metrics(server.http_url)).text)
            assert 0 < metrics["crealia_history_bytes"] <= 64 * KIB
            assert metrics["crealia_history_events"] == len(history)
            assert metrics["crealia_history_projects"] == 1
            # What SQLite's caches hold beside them (sqlite3_memory_used): some, but bounded.
            assert 0 < metrics["crealia_sqlite_memory_bytes"] < 64 << 20
            samples = await server.monitor.take_sample()
            assert samples[0]["projectId"] is None
            assert samples[0]["historyBytes"] == history.held_bytes
            project = next(s for s in samples if s["projectId"] == "p1")
            assert project["historyEvents"] == len(history)
            # A resume from before what memory holds is replayed, from the store, exactly.
            b = await clients.join("bob", resume=1)
            assert "snapshot" not in b.welcome and b.welcome["replayed"] == 119
            got = [await b.next() for _ in range(119)]
            assert [e["data"]["seq"] for e in got] == list(range(2, 121))
            assert got[0]["data"]["payload"]["changes"][0]["value"] == "x" * 3000
            await a.request("timeline_change", set_op("live", "e", "v", 1, None))
            assert (await b.event("timeline_change"))["data"]["seq"] == 121
            room = server.hub.rooms.rooms["p1"]
            await a.aclose()
            await b.aclose()
            await room.done.wait()  # its grace (0.2 s) over, the room closed
            assert server.backplane.held_history().bytes == 0
            metrics = parse_metrics((await fetch_metrics(server.http_url)).text)
            assert metrics["crealia_history_bytes"] == 0
            assert metrics["crealia_history_projects"] == 0
            samples = await server.monitor.take_sample()
            assert samples[0]["historyBytes"] == 0 and samples[0]["historyEvents"] == 0


def test_history_memory_bytes_has_a_default_a_range_and_env(tmp_path: Path) -> None:
    from crealia import ConfigurationError

    from .conftest import make_config

    assert make_config(tmp_path).history_memory_bytes == 4 << 20
    env = {"CREALIA_HISTORY_MEMORY_BYTES": "65536", "CREALIA_DATA_DIR": str(tmp_path)}
    assert Config.from_env(env).history_memory_bytes == 65536
    for bad in (65535, (16 << 30) + 1, "4MiB"):
        with pytest.raises(ConfigurationError, match="history_memory_bytes"):
            make_config(tmp_path, history_memory_bytes=bad)


async def test_history_since_keeps_what_it_holds_while_writes_come_during_its_read() -> None:
    """Events appended while a resume reads older ones back from the store would push what
    memory holds out faster than it is read (a resume under load got a snapshot): memory keeps
    it until the resume has it, then falls back within its bound."""
    history = History(limit=10_000, max_bytes=64 << 20, memory_bytes=64 * KIB)
    stored = {seq: _edit(seq) for seq in range(1, 4001)}
    for seq in range(1, 2001):
        history.append(stored[seq])
    reads: list[tuple[int, int]] = []
    written = iter(range(2001, 4001))

    async def read_while_writing(after: int, upto: int) -> list[DurableEvent]:
        reads.append((after, upto))
        for _ in range(300):  # writes come in while the store is read
            history.append(stored[next(written)])
        await trio.lowlevel.checkpoint()
        return [stored[s] for s in range(after + 1, upto + 1)]

    first_held = history.first_held
    got = await history.since(10, read_while_writing)
    assert got is not None and [e.seq for e in got] == list(range(11, 2301))
    assert reads == [(10, first_held - 1)]  # one read: nothing it held was pushed out
    assert history.held_bytes <= 64 * KIB  # and back within the bound once it is done
    assert history._pins == []
