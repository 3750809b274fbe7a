"""Per-leaf resolution over real sockets: what merges is merged, only the colliding leaves go to
the rest of the chain, and every member's document ends equal to the server's snapshot."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from crealia._model import Resolution
from crealia._strategy import MAX_PARTS
from crealia.strategies.merge import split_conflict
from crealia.testing import make_conflict

from .conftest import Clients
from .faults._scenario import Replica
from .test_protocol import insert, set_op


def replica_of(welcome: dict[str, Any]) -> Replica:
    """A member's document from its welcome snapshot (then every durable event it applies,
    the way a client keeps one: docs/protocol.md §5)."""
    replica = Replica()
    replica.load(welcome["snapshot"])
    return replica


async def catch_up(replica: Replica, client: Any, conflict_id: str) -> dict[str, Any]:
    """Apply what ``client`` received, in order, up to the conflict's resolution (its push's
    data)."""
    while True:
        envelope = await client.next()
        replica.apply(envelope)
        data = envelope.get("data") or {}
        if envelope.get("type") == "conflict_resolved" and data["conflict_id"] == conflict_id:
            return dict(data)


async def settle_in_parts(
    clients: Clients, base: Any, current: Any, incoming: Any, *, b_role: str = "editor"
) -> tuple[dict[str, Any], list[Replica], list[Any]]:
    """alice inserts clip.prop=base and writes ``current``; bob writes ``incoming`` on the
    stale base; the default chain (merge, priority) settles the conflict. Returns the
    resolution push's data, both members' replicas caught up with it, and both clients."""
    a = await clients.join("alice")
    b = await clients.join("bob", role=b_role)
    replicas = [replica_of(a.welcome), replica_of(b.welcome)]
    await a.request("timeline_change", insert("c1", "clip", prop=base))
    await a.request("timeline_change", set_op("c2", "clip", "prop", current, 1))
    ack = await b.request("timeline_change", set_op("c3", "clip", "prop", incoming, 1))
    assert ack["type"] == "ack" and ack["data"]["status"] == "conflict", ack
    (conflict_id,) = ack["data"]["conflicts"]
    pushed = [await catch_up(replica, client, conflict_id)
              for replica, client in zip(replicas, (a, b), strict=True)]  # fmt: skip
    assert pushed[0] == pushed[1]
    return pushed[0], replicas, [a, b]


async def assert_converged(clients: Clients, replicas: list[Replica]) -> Any:
    """Every member's document equals a late joiner's snapshot; the property's value."""
    late = await clients.join("carol", role="viewer")
    snapshot = late.welcome["snapshot"]
    for replica in replicas:
        assert replica.seq == snapshot["seq"]
        assert replica.elements == snapshot["elements"]
    return snapshot["elements"]["clip"]["props"]["prop"]


async def test_parts_an_object_keeps_every_merging_key_and_settles_the_colliding_one(
    clients: Clients,
) -> None:
    with trio.fail_after(15):
        data, replicas, _ = await settle_in_parts(
            clients,
            base={"x": 100, "y": 5, "scale": 1},
            current={"x": 120, "y": 6, "scale": 1},
            incoming={"x": 130, "y": 5, "scale": 2},
        )
        res = data["resolution"]
        # y is alice's, scale bob's; x collided and priority's tie (the last writer) took bob's
        assert res["value"] == {"x": 130, "y": 6, "scale": 2}
        assert (res["strategy"], res["choice"]) == ("merge", "custom")
        assert "'prop.x' by priority" in res["explanation"]
        assert "scale" in res["explanation"] and "y" in res["explanation"]
        assert res["review"] is True  # a priority pick between two values decided a part
        assert res["confidence"] == 0.6
        assert await assert_converged(clients, replicas) == {"x": 130, "y": 6, "scale": 2}


async def test_parts_an_id_list_keeps_an_added_item_when_both_reorder(clients: Clients) -> None:
    base = [{"id": "c1"}, {"id": "c2"}, {"id": "c3"}]
    with trio.fail_after(15):
        data, replicas, _ = await settle_in_parts(
            clients,
            base=base,
            current=[{"id": "c2"}, {"id": "c1"}, {"id": "c3"}],  # alice: c2 first
            incoming=[{"id": "c1"}, {"id": "c3"}, {"id": "c2"}, {"id": "c4"}],  # bob: c2 last, +c4
            b_role="owner",
        )
        res = data["resolution"]
        # The order collided: priority gives it to bob (owner over editor); c4 is kept.
        assert [item["id"] for item in res["value"]] == ["c1", "c3", "c2", "c4"]
        assert "'prop (order)' by priority" in res["explanation"]
        assert "added item 'c4'" in res["explanation"]
        await assert_converged(clients, replicas)


async def test_parts_an_item_removed_on_one_side_and_changed_on_the_other(
    clients: Clients,
) -> None:
    base = [{"id": "k1", "t": 0}, {"id": "k2", "t": 5}]
    with trio.fail_after(15):
        data, replicas, _ = await settle_in_parts(
            clients,
            base=base,
            current=[{"id": "k1", "t": 0}],  # alice removed k2
            incoming=[{"id": "k1", "t": 0}, {"id": "k2", "t": 7}, {"id": "k3", "t": 9}],
        )
        res = data["resolution"]
        # k2's removal against its change collided (priority: bob's change, the last write);
        # bob's new k3 merged in whichever way k2 went.
        assert res["value"] == [{"id": "k1", "t": 0}, {"id": "k2", "t": 7}, {"id": "k3", "t": 9}]
        assert "'prop[k2]' by priority" in res["explanation"]
        assert res["review"] is True
        await assert_converged(clients, replicas)


async def test_parts_are_audited_with_what_settled_each(clients: Clients) -> None:
    with trio.fail_after(15):
        data, _, _ = await settle_in_parts(
            clients,
            base={"x": 1, "label": "Intro"},
            current={"x": 2, "label": "Intro"},
            incoming={"x": 3, "label": "Intro card"},
        )
        assert data["resolution"]["value"] == {"x": 3, "label": "Intro card"}
        audit = clients.server.hub.audit
        rows = await audit.query(project_id="p1", action="conflict_resolution")
        (row,) = [r for r in rows if r.resource == f"conflict:{data['conflict_id']}"]
        assert row.details["strategy"] == "merge"
        assert row.details["parts"] == [{"part": "prop.x", "strategy": "priority",
                                         "choice": "incoming", "confidence": 0.6,
                                         "review": True}]  # fmt: skip


async def test_parts_the_dry_run_shows_the_split(clients: Clients) -> None:
    with trio.fail_after(15):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", prop={"x": 1, "y": 1}))
        await a.request("timeline_change", set_op("c2", "clip", "prop", {"x": 2, "y": 1}, 1))
        token = clients.token("bob")
        async with httpx.AsyncClient(base_url=clients.server.http_url, timeout=10) as http:
            reply = await http.post(
                "/api/collaboration/conflicts/detect",
                headers={"Authorization": f"Bearer {token}"},
                json={"projectId": "p1", "changes": [
                    {"op": "set", "element_id": "clip", "prop": "prop",
                     "value": {"x": 3, "y": 4}, "base": 1}]},
            )  # fmt: skip
        assert reply.status_code == 200, reply.text
        (found,) = reply.json()["conflicts"]
        merge = found["strategies"][0]
        assert merge["strategy"] == "merge" and merge["answer"] == "resolved"
        assert merge["resolution"]["value"] == {"x": 3, "y": 4}
        assert merge["parts"][0]["part"] == "prop.x"
        # nothing was applied
        late = await clients.join("carol", role="viewer")
        assert late.welcome["snapshot"]["elements"]["clip"]["props"]["prop"] == {"x": 2, "y": 1}


def _answer(choice: str, value: Any) -> Resolution:
    return Resolution(value=value, choice=choice, strategy="priority",  # type: ignore[arg-type]
                      confidence=0.8, explanation="picked")  # fmt: skip


def test_parts_split_declines_what_has_nothing_to_gain() -> None:
    # two numbers: the whole value is the one colliding leaf
    assert split_conflict(make_conflict(2, 3, base_value=1)) is None
    # only colliding leaves, nothing merging besides
    assert split_conflict(make_conflict({"x": 2}, {"x": 3}, base_value={"x": 1})) is None
    # an unknown base, a delete
    assert split_conflict(make_conflict({"x": 2, "y": 1}, {"x": 3, "y": 2})) is None
    assert split_conflict(make_conflict({"a": 1}, None, op="delete", base_value={"a": 0})) is None
    # a merge that succeeds needs no split
    assert split_conflict(make_conflict({"x": 2, "y": 1}, {"x": 1, "y": 2},
                                        base_value={"x": 1, "y": 1})) is None  # fmt: skip


def test_parts_join_takes_each_answer_in_its_place() -> None:
    base = {"title": "The quick fox", "x": 1, "tags": [{"id": 1}, {"id": 2}]}
    current = {"title": "The slow fox", "x": 2, "tags": [{"id": 2}, {"id": 1}]}
    incoming = {"title": "The lazy fox", "x": 3, "tags": [{"id": 1}, {"id": 2}, {"id": 3}],
                "new": True}  # fmt: skip
    split = split_conflict(make_conflict(current, incoming, base_value=base, prop="fx"))
    assert split is not None
    labels = [part.label for part in split.parts]
    assert labels == ["fx.title", "fx.x"]  # the reorder is one side's only: it merges
    title, _ = (part.conflict for part in split.parts)
    assert (title.base_value, title.current["value"], title.incoming["value"]) == (
        "The quick fox", "The slow fox", "The lazy fox")  # fmt: skip
    joined = split.join((_answer("custom", "The slow lazy fox"), _answer("current", 2)))
    assert joined is not None
    assert joined.value == {"title": "The slow lazy fox", "x": 2,
                            "tags": [{"id": 2}, {"id": 3}, {"id": 1}], "new": True}  # fmt: skip
    assert joined.choice == "custom" and joined.confidence == 0.8
    assert "'fx.title' by priority" in joined.explanation
    assert "'fx.x' by priority" in joined.explanation
    # an answer for the wrong number of parts, or an order that is neither side's, is refused
    assert split.join((_answer("current", 2),)) is None
    order = split_conflict(make_conflict([{"id": 2}, {"id": 1}, {"id": 3}],
                                         [{"id": 1}, {"id": 3}, {"id": 2}, {"id": 4}],
                                         base_value=[{"id": 1}, {"id": 2}, {"id": 3}]))  # fmt: skip
    assert order is not None and [p.label for p in order.parts] == ["label (order)"]
    assert order.join((_answer("custom", [3, 2, 1]),)) is None


async def test_parts_a_leaf_left_to_a_person_leaves_the_whole_conflict_to_them(
    clients: Clients,
) -> None:
    with trio.fail_after(15):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", prop={"x": 1, "y": 1}))
        await a.request("timeline_change", set_op("c2", "clip", "prop", {"x": 2, "y": 1}, 1))
        owner = {"Authorization": f"Bearer {clients.token('olga', role='owner')}"}
        editor = {"Authorization": f"Bearer {clients.token('bob')}"}
        body = {"projectId": "p1", "changes": [{"op": "set", "element_id": "clip", "prop": "prop",
                                                "value": {"x": 3, "y": 4}, "base": 1}]}  # fmt: skip
        async with httpx.AsyncClient(base_url=clients.server.http_url, timeout=10) as http:
            put = await http.put("/api/projects/p1/strategies", headers=owner,
                                 json={"strategies": ["merge", "manual"]})  # fmt: skip
            assert put.status_code == 200, put.text
            reply = await http.post("/api/collaboration/conflicts/detect", headers=editor,
                                    json=body)  # fmt: skip
        assert reply.status_code == 200, reply.text
        (found,) = reply.json()["conflicts"]
        merge, manual = found["strategies"]
        assert merge == {"strategy": "merge", "answer": "declined"}
        assert manual == {"strategy": "manual", "answer": "deferred"}
        assert found["settled_by"] == "manual"


async def test_ask_when_unsure_holds_an_unsure_resolution_for_a_person(clients: Clients) -> None:
    server = clients.server
    owner = {"Authorization": f"Bearer {clients.token('olga', role='owner')}"}
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            bad = await http.put("/api/projects/p1/strategies", headers=owner,
                                 json={"strategies": ["merge"], "ask_when_unsure": 1})  # fmt: skip
            assert bad.status_code == 400, bad.text
            assert "body.ask_when_unsure: expected true or false, got a number" in bad.text
            put = await http.put("/api/projects/p1/strategies", headers=owner,
                                 json={"strategies": ["merge", "priority"],
                                       "ask_when_unsure": True})  # fmt: skip
            assert put.status_code == 200 and put.json()["ask_when_unsure"] is True, put.text
            got = await http.get("/api/projects/p1/strategies", headers=owner)
            assert got.json()["ask_when_unsure"] is True
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", fx={"a": 1, "b": 1}, x=1))
        # a clean merge of disjoint keys (confidence 0.95) is sure enough: applied
        await a.request("timeline_change", set_op("c2", "clip", "fx", {"a": 2, "b": 1}, 1))
        ack = await b.request("timeline_change", set_op("c3", "clip", "fx", {"a": 1, "b": 2}, 1))
        (merged,) = ack["data"]["conflicts"]
        res = (await b.expect_type("conflict_resolved", conflict_id=merged))["data"]["resolution"]
        assert (res["strategy"], res["value"], res["review"]) == ("merge", {"a": 2, "b": 2},
                                                                  False)  # fmt: skip
        # priority picking between two numbers needs review: held for a person
        await a.request("timeline_change", set_op("c4", "clip", "x", 2, 1))
        ack = await b.request("timeline_change", set_op("c5", "clip", "x", 3, 1))
        (held,) = ack["data"]["conflicts"]
        while not await server.hub.audit.query(project_id="p1", action="conflict_held"):
            await trio.sleep(0.02)  # the chain runs in the room's nursery
        (row,) = await server.hub.audit.query(project_id="p1", action="conflict_held")
        assert row.resource == f"conflict:{held}" and row.details["strategy"] == "priority"
        reply = await b.request("conflict_resolve", {"conflict_id": held, "choice": "current"})
        assert reply["type"] == "ack", reply
        res = (await b.expect_type("conflict_resolved", conflict_id=held))["data"]["resolution"]
        assert (res["strategy"], res["value"]) == ("manual", 2)


async def test_rest_flags_are_json_booleans(clients: Clients) -> None:
    """``dismiss`` (and ``ask_when_unsure``) take true/false: a bool once reached the integer
    rule ("expected an integer, got a boolean")."""
    server = clients.server
    owner = {"Authorization": f"Bearer {clients.token('olga', role='owner')}"}
    editor = {"Authorization": f"Bearer {clients.token('bob')}"}
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            put = await http.put("/api/projects/p1/strategies", headers=owner,
                                 json={"strategies": ["manual"]})  # fmt: skip
            assert put.status_code == 200, put.text
            a = await clients.join("alice")
            b = await clients.join("bob")
            await a.request("timeline_change", insert("c1", "clip", x=1))
            await a.request("timeline_change", set_op("c2", "clip", "x", 2, 1))
            ack = await b.request("timeline_change", set_op("c3", "clip", "x", 3, 1))
            (cid,) = ack["data"]["conflicts"]
            path = f"/api/collaboration/conflicts/{cid}/resolve"
            bad = await http.post(path, headers=editor, json={"choice": "current", "dismiss": 0})
            assert bad.status_code == 400, bad.text
            assert "body.dismiss: expected true or false, got a number" in bad.text
            done = await http.post(path, headers=editor,
                                   json={"choice": "current", "dismiss": True})  # fmt: skip
            assert done.status_code == 200, done.text
        assert (await a.expect_type("conflict_resolved", conflict_id=cid))["data"]["seq"]


def test_parts_custom_answers_keep_the_value_well_formed() -> None:
    base = [{"id": "a", "n": 1}, {"id": "b", "n": 1}]
    current = [{"id": "a", "n": 1}]  # removed b
    incoming = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 1}]  # changed b, +c
    split = split_conflict(make_conflict(current, incoming, base_value=base))
    assert split is not None and [p.label for p in split.parts] == ["label[b]"]
    (part,) = split.parts
    assert part.conflict.current["value"] is None  # the side that removed it
    # a custom null for a leaf one side removed is that removal, not a null in the list
    removed = split.join((_answer("custom", None),))
    assert removed is not None and removed.value == [{"id": "a", "n": 1}, {"id": "c", "n": 1}]
    # a custom item must stay that item
    assert split.join((_answer("custom", {"id": "b", "n": 3}),)).value[1] == {"id": "b", "n": 3}
    for bad in ({"id": "a", "n": 3}, {"n": 3}, "b", 3):
        assert split.join((_answer("custom", bad),)) is None
    # a key removed on one side: custom null removes it
    keyed = split_conflict(make_conflict({"x": 1}, {"x": 1, "b": 5, "y": 2},
                                         base_value={"x": 1, "b": 1}))  # fmt: skip
    assert keyed is not None
    assert keyed.join((_answer("custom", None),)).value == {"x": 1, "y": 2}


def test_parts_ids_that_read_alike_get_their_own_answers() -> None:
    base = [{"id": 1, "v": 0}, {"id": "1", "v": 0}, {"id": "z", "v": 0}]
    current = [{"id": 1, "v": 1}, {"id": "1", "v": 1}, {"id": "z", "v": 0}]
    incoming = [{"id": 1, "v": 2}, {"id": "1", "v": 2}, {"id": "z", "v": 9}]
    split = split_conflict(make_conflict(current, incoming, base_value=base))
    assert split is not None and len(split.parts) == 2
    joined = split.join((_answer("current", {"id": 1, "v": 1}),
                         _answer("incoming", {"id": "1", "v": 2})))  # fmt: skip
    assert joined is not None
    assert joined.value == [{"id": 1, "v": 1}, {"id": "1", "v": 2}, {"id": "z", "v": 9}]


def test_parts_a_conflict_of_too_many_collisions_is_not_split() -> None:
    base = {f"k{i}": 0 for i in range(MAX_PARTS + 1)} | {"merges": 0}
    current = {f"k{i}": 1 for i in range(MAX_PARTS + 1)} | {"merges": 0}
    incoming = {f"k{i}": 2 for i in range(MAX_PARTS + 1)} | {"merges": 5}
    assert split_conflict(make_conflict(current, incoming, base_value=base)) is None
    del base["k0"], current["k0"], incoming["k0"]
    split = split_conflict(make_conflict(current, incoming, base_value=base))
    assert split is not None and len(split.parts) == MAX_PARTS
