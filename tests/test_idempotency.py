"""A ``change_id`` names one change of one user: only the same change resent is a duplicate.

Another user's change (or the same user's different change) under a taken id is refused with
``bad_request`` naming ``data.change_id``, and nothing of it is applied: on the embedded store
(from memory, and from the store after a restart or once the id left the cache) and across a
Redis cluster. Opening a project reads none of its change ids.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from crealia import BadRequest, Server, User, open_server
from crealia._storage import open_store
from crealia._wire import InsertOp, SetOp, TimelineChange
from crealia.backplanes.sqlite import SQLiteBackplane

from ._redis import RedisServer, run_redis
from ._wsclient import RawClient
from .conftest import Clients, make_config, opened
from .test_protocol import insert, set_op


async def _attack(alice: RawClient, mallory: RawClient, clients: Clients) -> None:
    """alice's change, then mallory reusing its id; alice's honest resend; alice's own reuse."""
    first = await alice.request("timeline_change", set_op("c-1", "clip", "title", "alice", None))
    assert first["data"]["status"] == "applied", first
    seq = first["data"]["seq"]

    stolen = await mallory.request("timeline_change", set_op("c-1", "clip", "title", "pwned", None))
    assert stolen["type"] == "error", stolen
    assert stolen["data"]["code"] == "bad_request"
    assert "data.change_id" in stolen["data"]["message"]
    assert "'c-1'" in stolen["data"]["message"]
    assert "alice" not in stolen["data"]["message"]  # who used it is not told

    same = await alice.request("timeline_change", set_op("c-1", "clip", "title", "alice", None))
    assert same["data"] == {"change_id": "c-1", "seq": seq, "status": "duplicate",
                            "conflicts": []}  # fmt: skip

    other = await alice.request("timeline_change", set_op("c-1", "clip", "title", "again", None))
    assert other["type"] == "error", other
    assert other["data"]["code"] == "bad_request"
    assert "data.change_id" in other["data"]["message"]

    # Nothing of the refused ones was applied; the next change goes on from the same seq.
    after = await mallory.request("timeline_change", set_op("m-1", "clip", "note", "hi", None))
    assert after["data"]["seq"] == seq + 1, after
    snapshot = (await clients.join("watcher", role="viewer")).welcome["snapshot"]
    assert snapshot["seq"] == seq + 1
    assert snapshot["elements"]["clip"]["props"] == {"title": "alice", "note": "hi"}


async def _join_two(clients: Clients) -> tuple[RawClient, RawClient, Clients]:
    alice = await clients.join("alice")
    await alice.request("timeline_change", insert("seed", "clip"))
    return alice, await clients.join("mallory"), clients


async def test_change_id_reuse_is_refused_unless_it_is_the_same_change(
    server: Server, nursery: trio.Nursery
) -> None:
    with trio.fail_after(15):
        async with opened(server, nursery) as clients:
            await _attack(*await _join_two(clients))


async def test_change_id_reuse_is_refused_from_the_store_after_a_restart(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(20):
        async with open_server(config) as first, opened(first, nursery) as clients:
            alice = await clients.join("alice")
            await alice.request("timeline_change", insert("seed", "clip"))
            reply = await alice.request("timeline_change", set_op("c-1", "clip", "t", "a", None))
            seq = reply["data"]["seq"]
        async with open_server(config) as second, opened(second, nursery) as clients:
            alice, mallory = await clients.join("alice"), await clients.join("mallory")
            stolen = await mallory.request("timeline_change", set_op("c-1", "clip", "t", "m", None))
            assert stolen["data"]["code"] == "bad_request", stolen
            assert "data.change_id" in stolen["data"]["message"]
            same = await alice.request("timeline_change", set_op("c-1", "clip", "t", "a", None))
            assert (same["data"]["status"], same["data"]["seq"]) == ("duplicate", seq)
            snapshot = (await clients.join("watcher", role="viewer")).welcome["snapshot"]
            assert snapshot["elements"]["clip"]["props"] == {"t": "a"}
            assert snapshot["seq"] == seq


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


async def test_change_id_reuse_is_refused_across_a_cluster(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        async with (
            open_server(make_config(tmp_path / "n0", redis_url=redis_server.url)) as n0,
            open_server(make_config(tmp_path / "n1", redis_url=redis_server.url)) as n1,
            opened(n0, nursery) as on0,
            opened(n1, nursery) as on1,
        ):
            alice = await on0.join("alice")
            await alice.request("timeline_change", insert("seed", "clip"))
            await _attack(alice, await on1.join("mallory"), on1)


def _set(change_id: str, value: Any) -> TimelineChange:
    return TimelineChange(
        change_id=change_id, changes=[SetOp(op="set", element_id="e", prop="v", value=value)]
    )


async def test_opening_a_project_reads_no_change_ids_and_keeps_a_bounded_cache(
    tmp_path: Path,
) -> None:
    alice = User(id="alice", name="alice", role="editor", project_id="p")
    mallory = User(id="mallory", name="mallory", role="editor", project_id="p")
    with trio.fail_after(30):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store, id_cache=16)
            insert_op = InsertOp(op="insert", element_id="e", element_type="clip", props={})
            await backplane.commit_change(alice, TimelineChange(change_id="i", changes=[insert_op]))
            for i in range(200):
                await backplane.commit_change(alice, _set(f"c{i}", i))
            project = backplane._projects["p"]
            assert len(project.changes.recent) == 16
            assert not project.changes.inflight
            backplane.release("p")
            reopened = await backplane._project("p")
            assert not reopened.changes.recent  # nothing read at open
            # An id long out of the cache is found in the store: same change, same seq...
            again = await backplane.commit_change(alice, _set("c0", 0))
            assert (again.status, again.seq) == ("duplicate", 2)
            # ...and another user's or another change under it is refused.
            with pytest.raises(BadRequest, match="change_id"):
                await backplane.commit_change(mallory, _set("c1", 1))
            with pytest.raises(BadRequest, match="change_id"):
                await backplane.commit_change(alice, _set("c2", "other"))
            assert (await backplane.snapshot("p"))["seq"] == 201
