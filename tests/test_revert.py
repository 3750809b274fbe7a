"""Reverting a settled conflict (``conflict_revert``) and the WebSocket dry run
(``conflict_preview``) over real sockets, on SQLite and on a Redis the test starts.

Every member applies what it is pushed to the document its welcome gave it, and must end with the
server's snapshot. Servers are on 127.0.0.1 port 0; every test runs under a deadline.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from crealia import Server, open_server, open_session

from ._redis import run_redis
from ._wsclient import RawClient
from .conftest import Clients, make_config
from .test_conflicts import conflict_on, resolved, rest
from .test_protocol import insert, set_op


def apply_ops(elements: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Apply §5 operations to a snapshot's ``elements``, as a client does."""
    for op in ops:
        eid = op["element_id"]
        if op["op"] == "insert":
            elements[eid] = {"type": op["element_type"], "props": copy.deepcopy(op["props"])}
        elif op["op"] == "set":
            if eid in elements:
                elements[eid]["props"][op["prop"]] = copy.deepcopy(op["value"])
        else:
            elements.pop(eid, None)


class Member:
    """A raw client and the document it keeps from its welcome and the durable pushes."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        snapshot = client.welcome["snapshot"]
        self.seq: int = snapshot["seq"]
        self.elements: dict[str, Any] = copy.deepcopy(snapshot["elements"])
        self.reverts: list[dict[str, Any]] = []

    async def follow(self, seq: int) -> None:
        """Apply durable pushes until ``seq``."""
        while self.seq < seq:
            env = await self.client.next()
            data = env["data"]
            if env["type"] == "conflict_resolved":
                ops = data["changes"]
            elif env["type"] == "collaboration_event" and "seq" in data:
                ops = data["payload"].get("changes", [])
                if "revert_of" in data["payload"]:
                    self.reverts.append(data)
            else:
                continue
            assert data["seq"] == self.seq + 1, (data, self.seq)
            self.seq = data["seq"]
            apply_ops(self.elements, ops)


async def members(clients: Clients, *users: str) -> list[Member]:
    return [Member(await clients.join(user)) for user in users]


async def snapshot_of(server: Server, project: str = "p1") -> dict[str, Any]:
    token = server.issue_token("reader", project, "viewer")
    reply = await rest(server, "GET", f"/api/projects/{project}/snapshot", token)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


async def audit_rows(server: Server, action: str) -> list[dict[str, Any]]:
    token = server.issue_token("olga", "p1", "owner")
    reply = await rest(server, "GET", f"/api/collaboration/audit?projectId=p1&action={action}",
                       token)  # fmt: skip
    assert reply.status_code == 200, reply.text
    return list(reply.json()["events"])


async def refused(client: RawClient, data: dict[str, Any], code: str, *words: str) -> None:
    reply = await client.request("conflict_revert", data)
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == code, reply
    for word in words:
        assert word in reply["data"]["message"], reply


async def test_revert_undoes_a_strategy_resolution(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        # priority keeps the owner's value: the revert brings back the editor's.
        a, b, ack = await conflict_on(
            clients, a_role="editor", b_role="owner", current="A fox", incoming="Some fox"
        )
        (cid,) = ack["conflicts"]
        settled = await resolved(a, cid)
        assert settled["resolution"]["choice"] == "incoming"
        watchers = await members(clients, "watcher1", "watcher2")
        reply = await a.request("conflict_revert", {"conflict_id": cid})
        assert reply["type"] == "ack", reply
        assert reply["data"] == {"change_id": f"revert:{cid}", "seq": 4, "status": "applied",
                                 "conflicts": []}  # fmt: skip
        for member in watchers:
            await member.follow(4)
            (event,) = member.reverts
            assert event["kind"] == "timeline_change" and event["user_id"] == "alice"
            assert event["payload"] == {
                "change_id": f"revert:{cid}",
                "revert_of": cid,
                "changes": [{"op": "set", "element_id": "clip", "prop": "title",
                             "value": "A fox", "base": 3}],
            }  # fmt: skip
        snapshot = await snapshot_of(server)
        assert snapshot["seq"] == 4
        assert snapshot["elements"]["clip"]["props"]["title"] == "A fox"
        for member in watchers:
            assert member.elements == snapshot["elements"]
        # b, the other author, got it too (its own stream in seq order).
        pushed = await b.expect(lambda e: e["data"].get("payload", {}).get("revert_of") == cid)
        assert pushed["data"]["seq"] == 4
        # A second revert is refused, by anyone, and changes nothing.
        await refused(a, {"conflict_id": cid}, "bad_request", "reverted already")
        await refused(b, {"conflict_id": cid}, "bad_request", "reverted already")
        assert (await snapshot_of(server))["seq"] == 4
        (row,) = await audit_rows(server, "conflict_revert")
        assert row["userId"] == "alice" and row["resource"] == f"conflict:{cid}"
        assert row["details"]["side"] == "current" and row["details"]["seq"] == 4
        assert row["details"]["status"] == "applied"


@pytest.mark.chain("manual")
async def test_revert_of_a_hand_resolution_and_each_refusal(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b, ack = await conflict_on(clients, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        viewer = await clients.join("vic", role="viewer")
        # Pending: nothing to revert yet. Unknown: not_found. A viewer: forbidden.
        await refused(a, {"conflict_id": cid}, "bad_request", "still pending", "conflict_resolve")
        await refused(a, {"conflict_id": "nope"}, "not_found", "nope")
        await refused(viewer, {"conflict_id": cid}, "forbidden")
        await refused(a, {"conflict_id": cid, "side": "sideways"}, "bad_request", "data.side")
        await refused(a, {}, "bad_request", "data.conflict_id")
        squat = await a.request("timeline_change", set_op(f"revert:{cid}", "clip", "x", 1, None))
        assert squat["data"]["code"] == "bad_request", squat
        assert "data.change_id" in squat["data"]["message"]
        ok = await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        assert ok["type"] == "ack", ok
        await resolved(a, cid)
        # The side the resolution chose is not a revert.
        await refused(a, {"conflict_id": cid, "side": "incoming"}, "bad_request", "data.side",
                      "chose 'incoming'")  # fmt: skip
        assert (await snapshot_of(server))["seq"] == 3  # every refusal changed nothing
        watcher = Member(await clients.join("watcher"))
        reply = await a.request("conflict_revert", {"conflict_id": cid, "side": "current"})
        assert reply["data"]["status"] == "applied" and reply["data"]["seq"] == 4, reply
        await watcher.follow(4)
        snapshot = await snapshot_of(server)
        assert snapshot["elements"]["clip"]["props"]["title"] == "mine"
        assert watcher.elements == snapshot["elements"]
        # A custom resolution names no side to go back to: the revert must.
        c, d = await clients.join("carol"), await clients.join("dan")
        await c.request("timeline_change", set_op("c4", "clip", "title", "C", 4))
        conflicting = await d.request("timeline_change", set_op("c5", "clip", "title", "D", 4))
        (cid2,) = conflicting["data"]["conflicts"]
        await c.request("conflict_resolve", {"conflict_id": cid2, "choice": "custom",
                                             "value": "C and D"})  # fmt: skip
        await resolved(a, cid2)
        await refused(a, {"conflict_id": cid2}, "bad_request", "data.side", "custom")
        reply = await a.request("conflict_revert", {"conflict_id": cid2, "side": "incoming"})
        assert reply["data"]["status"] == "applied", reply
        assert (await snapshot_of(server))["elements"]["clip"]["props"]["title"] == "D"
        # A dismissal keeps what was there: nothing to revert.
        await c.request("timeline_change", set_op("c6", "clip", "title", "E", reply["data"]["seq"]))
        late = await d.request("timeline_change", set_op("c7", "clip", "title", "F", 4))
        (cid3,) = late["data"]["conflicts"]
        await c.request("conflict_dismiss", {"conflict_id": cid3})
        await resolved(a, cid3)
        seq = (await snapshot_of(server))["seq"]
        await refused(a, {"conflict_id": cid3}, "bad_request", "dismissed")
        assert (await snapshot_of(server))["seq"] == seq


@pytest.mark.chain("manual")
async def test_a_revert_over_a_newer_write_becomes_a_conflict(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b, ack = await conflict_on(clients, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        c = await clients.join("carol")
        newer = await c.request("timeline_change", set_op("c9", "clip", "title", "C", None))
        assert newer["data"]["seq"] == 4
        reply = await a.request("conflict_revert", {"conflict_id": cid})
        assert reply["type"] == "ack", reply
        assert reply["data"]["status"] == "conflict" and reply["data"]["seq"] is None
        (again,) = reply["data"]["conflicts"]
        detected = await c.expect(
            lambda e: e["type"] == "conflict_detected" and e["data"]["conflicts"][0]["id"] == again
        )
        conflict = detected["data"]["conflicts"][0]
        assert conflict["current"] == {"value": "C", "user_id": "carol", "seq": 4}
        assert conflict["incoming"] == {"value": "mine", "user_id": "alice",
                                        "change_id": f"revert:{cid}"}  # fmt: skip
        snapshot = await snapshot_of(server)
        assert snapshot["seq"] == 4 and snapshot["elements"]["clip"]["props"]["title"] == "C"
        # It was reverted (as a conflict): not twice.
        await refused(a, {"conflict_id": cid}, "bad_request", "reverted already")
        # The newer conflict settles like any other, here by hand.
        await c.request("conflict_resolve", {"conflict_id": again, "choice": "incoming"})
        await resolved(a, again)
        assert (await snapshot_of(server))["elements"]["clip"]["props"]["title"] == "mine"


async def test_a_conflicting_revert_is_settled_by_the_chain(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, _b, ack = await conflict_on(
            clients, a_role="editor", b_role="owner", current="A fox", incoming="Some fox"
        )
        (cid,) = ack["conflicts"]
        await resolved(a, cid)  # priority: the owner's "Some fox", at seq 3
        c = await clients.join("carol", role="owner")
        await c.request("timeline_change", set_op("c9", "clip", "title", "Carol's fox", 3))
        reply = await a.request("conflict_revert", {"conflict_id": cid})
        assert reply["data"]["status"] == "conflict", reply
        (again,) = reply["data"]["conflicts"]
        # merge declines ("A fox" and "Carol's fox" from "Some fox"); priority keeps the owner's.
        settled = await resolved(a, again)
        assert settled["resolution"]["strategy"] == "priority"
        assert settled["resolution"]["value"] == "Carol's fox"
        snapshot = await snapshot_of(server)
        assert snapshot["elements"]["clip"]["props"]["title"] == "Carol's fox"
        assert snapshot["seq"] == settled["seq"]


@pytest.mark.chain("manual")
async def test_reverting_a_restore_deletes_the_element_again(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b = await clients.join("alice"), await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", title="t"))
        delete = {"op": "delete", "element_id": "clip"}
        await b.request("timeline_change", {"change_id": "c2", "changes": [delete]})
        late = await a.request("timeline_change", set_op("c3", "clip", "title", "kept", 1))
        (cid,) = late["data"]["conflicts"]  # a set on an element deleted since its base
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        assert (await snapshot_of(server))["elements"]["clip"]["props"] == {"title": "kept"}
        watcher = Member(await clients.join("watcher"))
        reply = await b.request("conflict_revert", {"conflict_id": cid})
        assert reply["data"]["status"] == "applied", reply
        await watcher.follow(reply["data"]["seq"])
        assert watcher.reverts[0]["payload"]["changes"] == [
            {"op": "delete", "element_id": "clip", "base": 3}
        ]
        snapshot = await snapshot_of(server)
        assert "clip" not in snapshot["elements"] and watcher.elements == snapshot["elements"]


@pytest.mark.chain("manual")
async def test_a_revert_never_writes_over_the_reverters_own_newer_edit(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b, ack = await conflict_on(clients, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        await a.request("timeline_change", set_op("c9", "clip", "title", "later", None))
        await refused(a, {"conflict_id": cid}, "bad_request", "you changed clip.title", "seq 4")
        snapshot = await snapshot_of(server)
        assert snapshot["seq"] == 4 and snapshot["elements"]["clip"]["props"]["title"] == "later"


@pytest.mark.chain("manual")
async def test_reverting_a_delete_brings_the_element_back(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b = await clients.join("alice"), await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", title="t", start=1))
        await b.request("timeline_change", set_op("c2", "clip", "title", "retitled", 1))
        delete = {"op": "delete", "element_id": "clip", "base": 1}
        gone = await a.request("timeline_change", {"change_id": "c3", "changes": [delete]})
        (cid,) = gone["data"]["conflicts"]
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        assert "clip" not in (await snapshot_of(server))["elements"]
        watcher = Member(await clients.join("watcher"))
        reply = await b.request("conflict_revert", {"conflict_id": cid})
        assert reply["data"]["status"] == "applied", reply
        await watcher.follow(reply["data"]["seq"])
        (event,) = watcher.reverts
        props = {"title": "retitled", "start": 1}
        assert event["payload"]["changes"] == [
            {"op": "insert", "element_id": "clip", "element_type": "clip", "props": props}
        ]
        snapshot = await snapshot_of(server)
        assert snapshot["elements"]["clip"] == {"type": "clip", "props": props}
        assert watcher.elements == snapshot["elements"]
        # A resumed client gets the revert replayed like any durable event.
        resumed = await clients.join("late", resume=reply["data"]["seq"] - 1)
        assert resumed.welcome["replayed"] == 1
        replay = await resumed.next()
        assert replay["data"]["payload"]["revert_of"] == cid


@pytest.mark.chain("manual")
async def test_revert_over_rest_is_role_checked(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a, b, ack = await conflict_on(clients, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        path = f"/api/collaboration/conflicts/{cid}/revert"
        editor = server.issue_token("ed", "p1", "editor")
        viewer = server.issue_token("vic", "p1", "viewer")
        pending = await rest(server, "POST", path, editor, json={})
        assert pending.status_code == 400 and "still pending" in pending.text
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        assert (await rest(server, "POST", path, viewer, json={})).status_code == 403
        assert (await rest(server, "POST", path, "not-a-token", json={})).status_code == 401
        other = server.issue_token("ed", "p2", "editor")
        assert (await rest(server, "POST", path, other, json={})).status_code == 404
        wrong = await rest(server, "POST", path, editor, json={"projectId": "p2"})
        assert wrong.status_code == 403
        unknown = await rest(server, "POST", "/api/collaboration/conflicts/nope/revert", editor,
                             json={})  # fmt: skip
        assert unknown.status_code == 404
        bad = await rest(server, "POST", path, editor, json={"side": "up"})
        assert bad.status_code == 400 and "body.side" in bad.text
        assert (await snapshot_of(server))["seq"] == 3
        done = await rest(server, "POST", path, editor, json={})
        assert done.status_code == 200, done.text
        assert done.json() == {"conflict_id": cid, "change_id": f"revert:{cid}", "seq": 4,
                               "status": "applied", "conflicts": []}  # fmt: skip
        pushed = await a.expect(lambda e: e["data"].get("payload", {}).get("revert_of") == cid)
        assert pushed["data"]["user_id"] == "ed"
        again = await rest(server, "POST", path, editor, json={})
        assert again.status_code == 400 and "reverted already" in again.text
        (row,) = await audit_rows(server, "conflict_revert")
        assert row["userId"] == "ed" and row["details"]["seq"] == 4


async def test_the_websocket_dry_run_answers_what_rest_answers(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(15):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", title="t", start=0))
        await a.request("timeline_change", set_op("c2", "clip", "title", "u", 1))
        changes = [
            {"op": "set", "element_id": "clip", "prop": "title", "value": "v", "base": 1},
            {"op": "set", "element_id": "clip", "prop": "start", "value": 5, "base": 1},
        ]
        b = await clients.join("bob")
        token = server.issue_token("bob", "p1", "editor")
        over_rest = await rest(server, "POST", "/api/collaboration/conflicts/detect", token,
                               json={"changes": changes})  # fmt: skip
        assert over_rest.status_code == 200, over_rest.text
        reply = await b.request("conflict_preview", {"changes": changes})
        assert reply["type"] == "ack", reply
        assert reply["data"] == over_rest.json()
        assert [op["prop"] for op in reply["data"]["applies"]] == ["start"]
        assert reply["data"]["conflicts"][0]["settled_by"] == "priority"
        viewer = await clients.join("vic", role="viewer")
        denied = await viewer.request("conflict_preview", {"changes": changes})
        assert denied["data"]["code"] == "forbidden"
        bad = await b.request("conflict_preview", {"changes": []})
        assert bad["data"]["code"] == "bad_request" and "data.changes" in bad["data"]["message"]
        missing = await b.request("conflict_preview", {"changes": [
            {"op": "set", "element_id": "ghost", "prop": "x", "value": 1}]})  # fmt: skip
        assert missing["data"]["code"] == "not_found"
        snapshot = await snapshot_of(server)
        assert snapshot["seq"] == 2 and snapshot["elements"]["clip"]["props"]["start"] == 0
        rows = await audit_rows(server, "conflict_preview")
        assert len(rows) == 2  # the REST call and the WebSocket one
        assert {r["userId"] for r in rows} == {"bob"}
        assert rows[0]["details"] == {"operations": 2, "applies": 1, "conflicts": 1}


async def test_the_python_client_reverts_and_previews(
    server: Server, nursery: trio.Nursery
) -> None:
    clients = Clients(server, "ws", nursery)
    with trio.fail_after(15):
        a, _b, ack = await conflict_on(clients, a_role="editor", b_role="owner",
                                       current="A fox", incoming="Some fox")  # fmt: skip
        (cid,) = ack["conflicts"]
        await resolved(a, cid)
        url = f"ws://127.0.0.1:{server.ws_port}/ws"
        token = server.issue_token("carol", "p1", "editor")
        async with open_session(url, token=token, project_id="p1") as session:
            preview = await session.preview_changes(
                [{"op": "set", "element_id": "clip", "prop": "title", "value": "x", "base": 1}]
            )
            assert preview["conflicts"][0]["current"]["value"] == "Some fox"
            done = await session.revert_conflict(cid)
            assert done["status"] == "applied" and done["seq"] == 4
    await clients.aclose()


# -- Redis --------------------------------------------------------------------------------------


@pytest.fixture
async def redis_nodes(tmp_path: Path) -> AsyncIterator[list[Server]]:
    """Two servers sharing a Redis the test starts; conflicts wait for a person."""
    async with run_redis(tmp_path / "redis") as redis_server, AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_server(make_config(
            tmp_path / f"node{i}", redis_url=redis_server.url, strategy_chain=("manual",))))
            for i in range(2)]  # fmt: skip


async def test_revert_on_the_redis_backplane(
    redis_nodes: list[Server], nursery: trio.Nursery
) -> None:
    first, second = (Clients(node, "ws", nursery) for node in redis_nodes)
    with trio.fail_after(20):
        a, b, ack = await conflict_on(first, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        await resolved(a, cid)
        watcher = Member(await second.join("watcher"))
        carol = await second.join("carol")
        reply = await carol.request("conflict_revert", {"conflict_id": cid})
        assert reply["data"]["status"] == "applied", reply
        seq = reply["data"]["seq"]
        await watcher.follow(seq)
        assert watcher.reverts[0]["payload"]["revert_of"] == cid
        pushed = await a.expect(lambda e: e["data"].get("payload", {}).get("revert_of") == cid)
        assert pushed["data"]["seq"] == seq
        for node in redis_nodes:
            snapshot = await snapshot_of(node)
            assert snapshot["elements"]["clip"]["props"]["title"] == "mine"
            assert snapshot["elements"] == watcher.elements
        # Not twice, from either process; a newer write makes the next one a conflict.
        await refused(a, {"conflict_id": cid}, "bad_request", "reverted already")
        await refused(carol, {"conflict_id": cid}, "bad_request", "reverted already")
        again = await b.request("timeline_change", set_op("c4", "clip", "title", "B", 1))
        (cid2,) = again["data"]["conflicts"]
        await carol.request("conflict_resolve", {"conflict_id": cid2, "choice": "incoming"})
        await resolved(a, cid2)
        await a.request("timeline_change", set_op("c5", "clip", "title", "newest", None))
        late = await carol.request("conflict_revert", {"conflict_id": cid2})
        assert late["data"]["status"] == "conflict", late
        assert (await snapshot_of(redis_nodes[1]))["elements"]["clip"]["props"]["title"] == "newest"
        # The dry run over WebSocket on Redis answers as REST does.
        changes = [{"op": "set", "element_id": "clip", "prop": "title", "value": "z", "base": 1}]
        preview = await carol.request("conflict_preview", {"changes": changes})
        token = redis_nodes[1].issue_token("carol", "p1", "editor")
        over_rest = await rest(redis_nodes[1], "POST", "/api/collaboration/conflicts/detect",
                               token, json={"changes": changes})  # fmt: skip
        assert preview["data"] == over_rest.json()
        assert preview["data"]["conflicts"][0]["settled_by"] == "manual"
    await first.aclose()
    await second.aclose()


async def test_a_revert_survives_a_restart(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = make_config(tmp_path / "data", strategy_chain=("manual",))
    with trio.fail_after(20):
        async with open_server(config) as server:
            clients = Clients(server, "ws", nursery)
            a, b, ack = await conflict_on(clients, current="mine", incoming="theirs")
            (cid,) = ack["conflicts"]
            await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
            await resolved(a, cid)
            reply = await a.request("conflict_revert", {"conflict_id": cid})
            assert reply["data"]["seq"] == 4, reply
            await clients.aclose()
        async with open_server(config) as server:
            clients = Clients(server, "ws", nursery)
            a = await clients.join("alice")
            assert a.welcome["snapshot"]["seq"] == 4
            assert a.welcome["snapshot"]["elements"]["clip"]["props"]["title"] == "mine"
            resumed = await clients.join("bob", resume=3)
            replay = await resumed.next()
            assert replay["data"]["payload"]["revert_of"] == cid
            await refused(a, {"conflict_id": cid}, "bad_request", "reverted already")
            await clients.aclose()
