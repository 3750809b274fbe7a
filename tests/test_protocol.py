"""docs/protocol.md §2-§5 over real sockets, on both WebSocket endpoints."""

from __future__ import annotations

import pytest
import trio

from .conftest import Clients


def insert(change_id: str, element_id: str, **props: object) -> dict[str, object]:
    return {
        "change_id": change_id,
        "changes": [
            {"op": "insert", "element_id": element_id, "element_type": "clip", "props": props}
        ],
    }


def set_op(change_id: str, element_id: str, prop: str, value: object, base: int | None):
    op: dict[str, object] = {"op": "set", "element_id": element_id, "prop": prop, "value": value}
    if base is not None:
        op["base"] = base
    return {"change_id": change_id, "changes": [op]}


async def test_welcome_carries_session_user_and_snapshot(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice", role="owner")
        w = a.welcome
        assert w["user"] == {"id": "alice", "name": "alice", "role": "owner"}
        assert w["project_id"] == "p1"
        assert w["seq"] == 0
        assert w["pending_conflicts"] == []
        assert w["snapshot"] == {"project_id": "p1", "seq": 0, "elements": {}, "versions": {}}
        assert [u["user_id"] for u in w["users"]] == ["alice"]
        assert isinstance(w["session_id"], str) and w["session_id"]


async def test_subprotocol_crealia_v1_is_selected(clients: Clients) -> None:
    with trio.fail_after(10):
        client = await clients.raw(subprotocols=["crealia.v1"])
        assert client.ws.subprotocol == "crealia.v1"
        plain = await clients.raw()
        assert plain.ws.subprotocol is None


async def test_ping_answers_pong_with_timestamp_and_echo(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice", role="viewer")
        reply = await a.request("ping", {"t": 123.5})
        assert reply["type"] == "pong"
        assert reply["data"]["t"] == 123.5
        assert isinstance(reply["data"]["timestamp"], int)
        await a.send("ping", {})
        pushed = await a.expect_type("pong")
        assert "ref" not in pushed


async def test_presence_reaches_others_and_own_other_connections_not_sender(
    clients: Clients,
) -> None:
    with trio.fail_after(10):
        a1 = await clients.join("alice")
        a2 = await clients.join("alice")
        b = await clients.join("bob", role="viewer")
        other = await clients.join("carol", project="p2")
        await a1.send("cursor_update", {"position": {"x": 10, "y": 20, "track": "v1"}})
        for client in (a2, b):
            ev = await client.event("cursor_update")
            assert ev["data"]["user_id"] == "alice"
            assert ev["data"]["payload"] == {"position": {"x": 10.0, "y": 20.0, "track": "v1"}}
            assert "seq" not in ev["data"]
        # The sender and the other project see nothing: a later probe arrives first.
        await b.send("cursor_update", {"position": {"x": 1, "y": 1}})
        probe = await a1.event("cursor_update")
        assert probe["data"]["user_id"] == "bob"
        assert not [e for e in a1.inbox if e["data"].get("user_id") == "alice"]
        ping = await other.request("ping", {})
        assert ping["type"] == "pong"
        assert not [
            e
            for e in other.inbox
            if e["type"] == "collaboration_event" and e["data"]["kind"] == "cursor_update"
        ]


async def test_cursor_updates_are_coalesced_per_user(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        for i in range(50):
            await a.send("cursor_update", {"position": {"x": i, "y": 0}})
        await a.send("element_active", {"element_id": "done", "element_type": "clip"})
        await b.event("element_active")
        cursors = [
            e
            for e in b.inbox
            if e["type"] == "collaboration_event" and e["data"]["kind"] == "cursor_update"
        ]
        # The latest always arrives; within a tick a user's updates merge into one.
        assert cursors[-1]["data"]["payload"]["position"]["x"] == 49.0
        assert len(cursors) < 50
        assert b.frames < 50


async def test_presence_state_in_users_list(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob", role="commenter")
        await b.send("cursor_update", {"position": {"x": 3, "y": 4}})
        await b.send("element_active", {"element_id": "clip-1", "element_type": "clip"})
        await b.send("typing_start", {"element_id": "clip-1"})
        await a.event("typing_start")
        reply = await a.request("users_request", {})
        assert reply["type"] == "users_list"
        users = {u["user_id"]: u for u in reply["data"]["users"]}
        assert set(users) == {"alice", "bob"}
        bob = users["bob"]
        assert bob["role"] == "commenter"
        assert bob["connections"] == 1
        assert bob["cursor"] == {"x": 3.0, "y": 4.0}
        assert bob["active_element"] == {"element_id": "clip-1", "element_type": "clip"}
        assert bob["typing"] == "clip-1"


async def test_join_and_leave_are_announced(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        joined = await a.event("user_joined")
        assert joined["data"]["user_id"] == "bob"
        assert "seq" not in joined["data"]
        await b.aclose()
        left = await a.event("user_left")
        assert left["data"]["user_id"] == "bob"


async def test_durable_events_reach_every_member_including_sender(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob", role="viewer")
        ack = await a.request("timeline_change", insert("c1", "clip-1", start=1.5))
        assert ack["data"] == {"change_id": "c1", "seq": 1, "status": "applied", "conflicts": []}
        for client in (a, b):
            ev = await client.event("timeline_change")
            assert ev["data"]["seq"] == 1
            assert ev["data"]["user_id"] == "alice"
            assert ev["data"]["payload"] == {
                "change_id": "c1",
                "changes": [
                    {
                        "op": "insert",
                        "element_id": "clip-1",
                        "element_type": "clip",
                        "props": {"start": 1.5},
                    }
                ],
            }
        ack = await a.request(
            "comment_add", {"comment": {"id": "k1", "text": "nice cut", "element_id": "clip-1"}}
        )
        assert ack["data"] == {"seq": 2, "status": "applied"}
        ev = await b.event("comment_add")
        assert ev["data"]["seq"] == 2
        assert ev["data"]["payload"]["comment"]["text"] == "nice cut"


async def test_three_editors_see_one_gap_free_order(clients: Clients) -> None:
    editors = [await clients.join(f"editor{i}") for i in range(3)]
    watcher = await clients.join("watcher", role="viewer")
    ack = await editors[0].request("timeline_change", insert("setup", "clip", n=0))
    assert ack["data"]["seq"] == 1
    per_editor = 40
    seen: dict[str, list[int]] = {}

    async def edit(i: int) -> None:
        for k in range(per_editor):
            reply = await editors[i].request(
                "timeline_change", set_op(f"e{i}-{k}", "clip", f"p{i}", k, None)
            )
            assert reply["data"]["status"] == "applied", reply

    async def collect(name: str, client) -> None:
        seqs: list[int] = []
        while len(seqs) < 1 + 3 * per_editor:
            env = await client.next()
            if env["type"] == "collaboration_event" and env["data"].get("seq"):
                seqs.append(env["data"]["seq"])
        seen[name] = seqs

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(edit, i)
        async with trio.open_nursery() as nursery:
            for i, client in enumerate([*editors, watcher]):
                nursery.start_soon(collect, f"c{i}", client)
    expected = list(range(1, 2 + 3 * per_editor))
    for seqs in seen.values():
        assert seqs == expected


async def test_duplicate_change_id_gets_first_seq_and_applies_once(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        first = await a.request("timeline_change", insert("c1", "clip-1", start=0))
        again = await a.request("timeline_change", insert("c1", "clip-1", start=0))
        assert first["data"]["status"] == "applied"
        assert again["data"] == {
            "change_id": "c1",
            "seq": 1,
            "status": "duplicate",
            "conflicts": [],
        }
        # A different body under the same change_id is refused (it names one change).
        third = await a.request("timeline_change", set_op("c1", "clip-1", "start", 5, 1))
        assert third["type"] == "error", third
        assert third["data"]["code"] == "bad_request"
        assert third["data"]["message"].startswith("data.change_id:")
        b = await clients.join("bob")
        assert b.welcome["seq"] == 1
        assert b.welcome["snapshot"]["elements"]["clip-1"]["props"] == {"start": 0}


async def test_refused_change_does_not_record_its_change_id(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        bad = await a.request("timeline_change", set_op("c1", "missing", "x", 1, 0))
        assert bad["type"] == "error" and bad["data"]["code"] == "not_found"
        await a.request("timeline_change", insert("c0", "missing"))
        good = await a.request("timeline_change", set_op("c1", "missing", "x", 1, 1))
        assert good["data"]["status"] == "applied"


@pytest.mark.chain("manual")
async def test_stale_base_from_another_user_is_a_conflict(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", start=0, title="x"))
        await a.request("timeline_change", set_op("c2", "clip", "start", 5, 1))
        reply = await b.request(
            "timeline_change",
            {
                "change_id": "c3",
                "changes": [
                    {"op": "set", "element_id": "clip", "prop": "start", "value": 9, "base": 1},
                    {"op": "set", "element_id": "clip", "prop": "title", "value": "y", "base": 1},
                ],
            },
        )
        data = reply["data"]
        assert data["status"] == "partial"
        assert data["seq"] == 3
        assert len(data["conflicts"]) == 1
        pushed = await a.expect_type("conflict_detected")
        (conflict,) = pushed["data"]["conflicts"]
        assert conflict["id"] == data["conflicts"][0]
        assert conflict["element_id"] == "clip" and conflict["prop"] == "start"
        assert conflict["base_value"] == 0
        assert conflict["current"] == {"value": 5, "user_id": "alice", "seq": 2}
        assert conflict["incoming"] == {"value": 9, "user_id": "bob", "change_id": "c3"}
        assert conflict["status"] == "pending"
        ev = await a.event("timeline_change", seq=3)
        assert ev["data"]["payload"]["changes"] == [
            {"op": "set", "element_id": "clip", "prop": "title", "value": "y", "base": 1}
        ]
        only = await b.request("timeline_change", set_op("c4", "clip", "start", 7, 1))
        assert only["data"]["status"] == "conflict" and only["data"]["seq"] is None
        c = await clients.join("carol")
        assert len(c.welcome["pending_conflicts"]) == 2
        assert c.welcome["snapshot"]["elements"]["clip"]["props"]["start"] == 5


async def test_own_stale_write_is_not_a_conflict(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", start=0))
        await a.request("timeline_change", set_op("c2", "clip", "start", 5, 1))
        reply = await a.request("timeline_change", set_op("c3", "clip", "start", 6, 1))
        assert reply["data"]["status"] == "applied"


async def test_set_on_element_deleted_since_base_is_a_conflict(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", start=0))
        await a.request(
            "timeline_change",
            {"change_id": "c2", "changes": [{"op": "delete", "element_id": "clip", "base": 1}]},
        )
        reply = await b.request("timeline_change", set_op("c3", "clip", "start", 1, 1))
        assert reply["data"]["status"] == "conflict"
        stale_delete = await b.request(
            "timeline_change",
            {
                "change_id": "c4",
                "changes": [
                    {"op": "insert", "element_id": "c2", "element_type": "clip", "props": {"a": 1}}
                ],
            },
        )
        assert stale_delete["data"]["status"] == "applied"
        await a.request("timeline_change", set_op("c5", "c2", "a", 2, stale_delete["data"]["seq"]))
        deleted = await b.request(
            "timeline_change",
            {
                "change_id": "c6",
                "changes": [
                    {"op": "delete", "element_id": "c2", "base": stale_delete["data"]["seq"]}
                ],
            },
        )
        assert deleted["data"]["status"] == "conflict"


@pytest.mark.chain("manual")
async def test_manual_resolution_is_a_durable_event(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        v = await clients.join("vic", role="viewer")
        await a.request("timeline_change", insert("c1", "clip", start=0))
        await a.request("timeline_change", set_op("c2", "clip", "start", 5, 1))
        reply = await b.request("timeline_change", set_op("c3", "clip", "start", 9, 1))
        (cid,) = reply["data"]["conflicts"]
        refused = await v.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        assert refused["data"]["code"] == "forbidden"
        ok = await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        assert ok["type"] == "ack"
        for client in (a, b, v):
            resolved = await client.expect_type("conflict_resolved", conflict_id=cid)
            assert resolved["data"]["seq"] == 3
            assert resolved["data"]["resolution"]["value"] == 9
            assert resolved["data"]["resolution"]["strategy"] == "manual"
            assert resolved["data"]["resolution"]["choice"] == "incoming"
        again = await b.request("conflict_dismiss", {"conflict_id": cid})
        assert again["data"]["code"] == "not_found"
        late = await clients.join("late", resume=2)
        assert late.welcome["replayed"] == 1
        replayed = await late.next()
        assert replayed["type"] == "conflict_resolved"
        assert late.welcome["pending_conflicts"] == []


async def test_second_hello_is_refused_and_session_goes_on(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        again = await a.request("hello", {"token": clients.token("alice"), "project_id": "p1"})
        assert again["type"] == "error"
        assert again["data"]["code"] == "bad_request"
        assert "hello" in again["data"]["message"]
        assert (await a.request("ping", {}))["type"] == "pong"


@pytest.mark.chain("manual")
async def test_a_delete_conflict_carries_the_elements_props_at_its_base(clients: Clients) -> None:
    """The element as the deleting user last saw it, rebuilt from the kept history (merge's
    delete rule needs it; it was null)."""
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        inserted = await a.request("timeline_change", insert("c1", "clip", name="Clip", start=0))
        base = inserted["data"]["seq"]
        await a.request("timeline_change", set_op("c2", "clip", "start", 4, base))
        seen = (await a.request("timeline_change", set_op("c3", "clip", "start", 5, None)))["data"]
        await a.request("timeline_change", set_op("c4", "clip", "name", "Retitled", seen["seq"]))
        deleted = await b.request("timeline_change", {"change_id": "c5", "changes": [
            {"op": "delete", "element_id": "clip", "base": seen["seq"]}]})  # fmt: skip
        assert deleted["data"]["status"] == "conflict"
        detected = await b.expect_type("conflict_detected")
        (conflict,) = detected["data"]["conflicts"]
        assert conflict["prop"] is None
        assert conflict["base_value"] == {"name": "Clip", "start": 5}
        assert conflict["current"]["value"] == {"name": "Retitled", "start": 5}


@pytest.mark.chain("manual")
async def test_a_resolution_by_hand_never_overwrites_a_newer_edit(clients: Clients) -> None:
    """Bob's 10 and Carol's 20 conflict; Ann then writes 33; Bob takes Carol's 20 without
    having seen the 33: the 33 stands, and Carol's 20 conflicts with it anew (it was written
    over it, silently)."""
    with trio.fail_after(10):
        ann, bob, carol = [await clients.join(name) for name in ("ann", "bob", "carol")]
        base = (await ann.request("timeline_change", insert("c1", "clip", start=0)))["data"]["seq"]
        await bob.request("timeline_change", set_op("c2", "clip", "start", 10, base))
        reply = await carol.request("timeline_change", set_op("c3", "clip", "start", 20, base))
        (cid,) = reply["data"]["conflicts"]
        newer = await ann.request("timeline_change", set_op("c4", "clip", "start", 33, base + 1))
        assert newer["data"]["status"] == "applied", newer
        took = await bob.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
        assert took["type"] == "ack", took
        resolved = await carol.expect_type("conflict_resolved", conflict_id=cid)
        resolution = resolved["data"]["resolution"]
        assert (resolution["value"], resolution["choice"]) == (33, "current")
        assert "ann changed it again while it was being settled" in resolution["explanation"]
        again = await carol.expect(lambda env: env["type"] == "conflict_detected"
                                   and env["data"]["conflicts"][0]["id"] != cid)  # fmt: skip
        (conflict,) = again["data"]["conflicts"]
        assert conflict["current"]["value"] == 33 and conflict["incoming"]["value"] == 20
        late = await clients.join("dan", role="viewer")
        assert late.welcome["snapshot"]["elements"]["clip"]["props"]["start"] == 33


@pytest.mark.chain("manual")
async def test_a_value_by_hand_must_be_of_one_sides_kind(clients: Clients) -> None:
    with trio.fail_after(10):
        bob, carol = await clients.join("bob"), await clients.join("carol")
        base = (await bob.request("timeline_change", insert("c1", "clip", start=0)))["data"]["seq"]
        await bob.request("timeline_change", set_op("c2", "clip", "start", 10, base))
        reply = await carol.request("timeline_change", set_op("c3", "clip", "start", 20, base))
        (cid,) = reply["data"]["conflicts"]
        refused = await bob.request("conflict_resolve", {"conflict_id": cid, "choice": "custom",
                                                          "value": "abc"})  # fmt: skip
        assert refused["type"] == "error" and refused["data"]["code"] == "bad_request"
        assert refused["data"]["message"] == (
            "data.value: must be number like the two sides, got text"
        )
        ok = await bob.request("conflict_resolve", {"conflict_id": cid, "choice": "custom",
                                                     "value": 15})  # fmt: skip
        assert ok["type"] == "ack"
        resolved = await carol.expect_type("conflict_resolved", conflict_id=cid)
        assert resolved["data"]["resolution"]["value"] == 15
