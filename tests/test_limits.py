"""Issue 10, items 7, 12 (ids, integers) and 14: one editor cannot bloat a project, every welcome
fits what a client can receive, a resume never livelocks, and ids and numbers are what they say."""

from __future__ import annotations

from pathlib import Path

import httpx
import jwt
import orjson
import pytest
import trio

from crealia import Server, open_server
from crealia._backplane import History
from crealia._client import open_session
from crealia._model import Conflict, DurableEvent
from crealia._strategy import Answer, ConflictStrategy, ResolutionContext

from ._wsclient import RawClient, open_raw_client
from .conftest import JWT_SECRET, Clients, data_store, make_config, opened
from .test_protocol import insert, set_op

#: A default WebSocket client's message cap (trio-websocket, browsers' usual proxies): 1 MiB.
CLIENT_CAP = 1024 * 1024


def big(n: int, fill: str = "x") -> str:
    return fill * n


async def get_snapshot(server: Server, token: str, project: str = "p1") -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(
            f"{server.http_url}/api/projects/{project}/snapshot",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


# -- item 7: quotas ------------------------------------------------------------------------------


@pytest.mark.settings(value_max_bytes=4096)
async def test_value_quota_refuses_a_value_naming_the_quota(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", title="t"))
        refused = await a.request("timeline_change", set_op("c2", "clip", "title", big(5000), 1))
        assert refused["data"]["code"] == "too_large", refused
        assert "value_max_bytes" in refused["data"]["message"]
        assert "data.changes[0].value" in refused["data"]["message"]
        refused = await a.request("timeline_change", insert("c3", "clip2", title=big(5000)))
        assert refused["data"]["code"] == "too_large"
        assert "data.changes[0].props.title" in refused["data"]["message"]
        # Nothing applied, the change id not recorded, and the others go on.
        ok = await b.request("timeline_change", set_op("c4", "clip", "title", big(4000), 1))
        assert ok["data"]["status"] == "applied"
        assert ok["data"]["seq"] == 2
        again = await a.request("timeline_change", set_op("c2", "clip", "title", "short", None))
        assert again["data"]["status"] == "applied"


@pytest.mark.settings(document_max_bytes=64 * 1024)
async def test_document_quota_refuses_growth_but_never_a_shrink(clients: Clients) -> None:
    with trio.fail_after(20):
        a = await clients.join("alice")
        for i in range(2):
            ok = await a.request("timeline_change", insert(f"c{i}", f"e{i}", blob=big(25_000)))
            assert ok["data"]["status"] == "applied", ok
        refused = await a.request("timeline_change", insert("c2", "e2", blob=big(25_000)))
        assert refused["data"]["code"] == "too_large", refused
        assert "document_max_bytes" in refused["data"]["message"]
        # Shrinking edits are always accepted, and make room again.
        shrink = await a.request("timeline_change", set_op("c3", "e0", "blob", "small", None))
        assert shrink["data"]["status"] == "applied"
        delete = await a.request(
            "timeline_change",
            {"change_id": "c4", "changes": [{"op": "delete", "element_id": "e1"}]},
        )
        assert delete["data"]["status"] == "applied"
        ok = await a.request("timeline_change", insert("c2", "e2", blob=big(25_000)))
        assert ok["data"]["status"] == "applied", ok
        snap = await get_snapshot(clients.server, clients.token("alice"))
        assert set(snap["elements"]) == {"e0", "e2"}  # type: ignore[arg-type]


def test_history_keeps_1000_events_then_bounds_bytes() -> None:
    def event(seq: int, size: int) -> DurableEvent:
        return DurableEvent(project_id="p", seq=seq, kind="comment_add", user_id="u", at=0,
                            payload={"comment": {"id": str(seq), "text": big(size)}})  # fmt: skip

    history = History(limit=10_000, max_bytes=1 << 20)
    for seq in range(1, 3001):
        history.append(event(seq, 2000))
    # 1,000 events of 2 KB are over 1 MiB: the protocol's minimum of 1,000 wins.
    assert len(history) == 1000
    assert history[0].seq == 2001
    assert history.bytes == sum(len(e.encoded) for e in history)
    small = History(limit=10_000, max_bytes=1 << 20)
    for seq in range(1, 3001):
        small.append(event(seq, 100))
    assert len(small) == 3000  # under the byte bound: only the count applies
    small.append(event(3001, 1 << 20))
    assert len(small) == 1000 and small[-1].seq == 3001


def test_kept_events_cost_their_encoded_size() -> None:
    """history_max_bytes counts encoded bytes: they must be what the events hold (orjson's
    result kept about 8 times a 60 KB text, and 4 KiB for a small one)."""
    import tracemalloc

    events = [
        DurableEvent(project_id="p", seq=seq, kind="comment_add", user_id="u", at=0,
                     payload={"comment": {"id": str(seq), "text": big(size)}})
        for seq, size in enumerate([60_000] * 20 + [10] * 200)
    ]  # fmt: skip
    tracemalloc.start()
    try:
        encoded = [event.encoded for event in events]
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = sum(len(e) for e in encoded)
    assert held < 1.2 * size + 200 * 100, (held, size)


@pytest.mark.settings(rate_limits={"edit": "off"})
async def test_history_in_memory_is_bounded_by_bytes(server: Server, nursery: trio.Nursery) -> None:
    # history_max_bytes has a floor of 1 MiB; with 1,100 events of ~1.5 KB the byte bound only
    # trims below the count once the minimum of 1,000 events is kept.
    async with opened(server, nursery) as clients:
        with trio.fail_after(60):
            a = await clients.join("alice")
            await a.request("timeline_change", insert("c0", "e", v=0))
            for i in range(1, 1100):
                await a.request("timeline_change", set_op(f"c{i}", "e", "v", big(1500), None))
                a.inbox.clear()
            history = server.hub.backplane._projects["p1"].history  # type: ignore[attr-defined]
            assert history.kept == 1100  # 1.6 MB of 10,000 events is not over 64 MiB
            # In memory, what fits in history_memory_bytes (4 MiB): not all of them.
            assert history.held_bytes <= server.config.history_memory_bytes
            assert 0 < len(history) < 1100
            history.max_bytes = 1 << 20
            await a.request("timeline_change", set_op("last", "e", "v", 1, None))
            assert history.kept == 1000
            assert history.first_kept == 102 and history[-1].seq == 1101


async def test_rest_snapshot_of_a_closed_project_keeps_nothing_resident(
    server: Server, nursery: trio.Nursery
) -> None:
    token = server.issue_token("vic", "p1", "viewer")
    async with opened(server, nursery) as clients:
        with trio.fail_after(20):
            a = await clients.join("alice")
            for i in range(5):
                await a.request("timeline_change", insert(f"c{i}", f"e{i}", blob=big(50_000)))
            await a.aclose()
            backplane = server.hub.backplane
            with trio.fail_after(10):
                while "p1" in backplane._projects:  # type: ignore[attr-defined]
                    await trio.sleep(0.05)  # the room closes after its grace; bounded above
            for _ in range(5):
                snap = await get_snapshot(server, token)
                assert snap["seq"] == 5 and len(snap["elements"]) == 5  # type: ignore[arg-type]
            assert "p1" not in backplane._projects  # type: ignore[attr-defined]


# -- item 7: welcome within what a client receives ------------------------------------------------


async def test_big_document_welcome_fits_a_1mib_client(
    server: Server, nursery: trio.Nursery
) -> None:
    """The attack of the issue with the default settings: 20 edits of 60 KB make a document
    over 1 MiB; a client with a 1 MiB message cap still joins (it got 1009 before)."""
    async with opened(server, nursery) as clients:
        with trio.fail_after(30):
            a = await clients.join("alice")
            for i in range(20):
                reply = await a.request(
                    "timeline_change", insert(f"c{i}", f"e{i}", blob=big(60_000))
                )
                assert reply["data"]["status"] == "applied"
            capped = await open_raw_client(nursery, clients.url, max_message_size=CLIENT_CAP)
            await capped.send("hello", {"token": clients.token("bob"), "project_id": "p1"}, 1)
            welcome = await capped.next()
            assert welcome["type"] == "welcome", welcome
            count = welcome["data"]["welcome_chunks"]
            assert "snapshot" not in welcome["data"] and count >= 2
            assert "users" not in welcome["data"] and "pending_conflicts" not in welcome["data"]
            pieces = []
            for i in range(count):
                chunk = await capped.next()
                assert chunk["type"] == "welcome_chunk"
                assert chunk["data"]["index"] == i and chunk["data"]["count"] == count
                pieces.append(chunk["data"]["data"])
            parts = orjson.loads("".join(pieces))
            assert set(parts) == {"snapshot", "users", "pending_conflicts"}
            assert {u["user_id"] for u in parts["users"]} == {"alice", "bob"}
            snapshot = parts["snapshot"]
            assert snapshot == await get_snapshot(server, clients.token("bob"))
            assert snapshot["seq"] == welcome["data"]["seq"] == 20
            # Live events follow, in order, after the last chunk.
            await a.request("timeline_change", set_op("after", "e0", "blob", "x", None))
            event = await capped.event("timeline_change")
            assert event["data"]["seq"] == 21
            await capped.aclose()
            # The Python client puts the pieces together: its welcome has a snapshot.
            async with open_session(clients.url, clients.token("carol"), "p1") as session:
                assert session.welcome["snapshot"]["seq"] == 21
                assert len(session.welcome["snapshot"]["elements"]) == 20
                assert "welcome_chunks" not in session.welcome
                assert {u["user_id"] for u in session.welcome["users"]} == {"alice", "carol"}


@pytest.mark.settings(welcome_frame_bytes=16 * 1024)
async def test_chunks_stay_under_the_welcome_frame_budget_with_multibyte_text(
    clients: Clients, nursery: trio.Nursery
) -> None:
    with trio.fail_after(20):
        a = await clients.join("alice")
        text = 'é"\\\U0001f600' * 3000  # 2-, 1- (escaped), 1- (escaped) and 4-byte characters
        await a.request("timeline_change", insert("c1", "e", t=text))
        raw = await open_raw_client(nursery, clients.url, max_message_size=16 * 1024)
        await raw.send("hello", {"token": clients.token("bob"), "project_id": "p1"}, 1)
        welcome = (await raw.next())["data"]
        parts = [(await raw.next())["data"]["data"] for _ in range(welcome["welcome_chunks"])]
        snapshot = orjson.loads("".join(parts))["snapshot"]
        assert snapshot["elements"]["e"]["props"]["t"] == text
        await raw.aclose()


# -- item 14: a resume that does not fit ----------------------------------------------------------


@pytest.mark.settings(rate_limits={"edit": "off"})
async def test_resume_too_big_to_replay_gets_a_snapshot_not_4409(
    server: Server, nursery: trio.Nursery
) -> None:
    """Default settings: 150 events of 60 KB (9 MB, over the 8 MiB outbox) after the client's
    seq. Before: closed with 4409 before welcome, every time. Now: a welcome with a snapshot."""
    async with opened(server, nursery) as clients:
        with trio.fail_after(60):
            a = await clients.join("alice")
            await a.request("timeline_change", insert("c0", "e", blob="x"))
            for i in range(1, 151):
                blob = big(60_000, str(i % 10))
                await a.request("timeline_change", set_op(f"c{i}", "e", "blob", blob, None))
                a.inbox.clear()
            for _attempt in range(3):
                b = await clients.raw()
                welcome = await b.hello(clients.token("bob"), "p1", resume=1)
                assert "replayed" not in welcome
                head = welcome["seq"]
                assert head == 151
                # The snapshot comes inline or in chunks; either way it is the document at 151.
                if "welcome_chunks" in welcome:
                    parts = [
                        (await b.next())["data"]["data"] for _ in range(welcome["welcome_chunks"])
                    ]
                    snapshot = orjson.loads("".join(parts))["snapshot"]
                else:
                    snapshot = welcome["snapshot"]
                assert snapshot["seq"] == 151
                assert snapshot["elements"]["e"]["props"]["blob"] == big(60_000, "0")
                pong = await b.request("ping", {})
                assert pong["type"] == "pong"
                await b.aclose()
            # A small resume is still a replay.
            c = await clients.raw()
            welcome = await c.hello(clients.token("carol"), "p1", resume=149)
            assert welcome["replayed"] == 2


# -- item 12: ids and integers --------------------------------------------------------------------

BAD_IDS = ["a\x00b", "a\u202eb", "a\u2066b", "tab\tid", "a\u200fb", "x\x85"]


async def test_control_and_bidi_characters_are_refused_in_every_id(clients: Clients) -> None:
    with trio.fail_after(20):
        a = await clients.join("alice")
        for bad in BAD_IDS:
            cases = {
                "element": ("timeline_change", insert("ok-change", bad)),
                "change": ("timeline_change", insert(bad, "clip")),
                "comment": ("comment_add", {"comment": {"id": bad, "text": "hi"}}),
                "conflict": ("conflict_dismiss", {"conflict_id": bad}),
                "prop": ("timeline_change", {"change_id": "okc", "changes": [
                    {"op": "insert", "element_id": "ok", "element_type": "clip",
                     "props": {bad: 1}}]}),
                "session": ("live_join", {"session_id": bad}),
            }  # fmt: skip
            for what, (kind, data) in cases.items():
                reply = await a.request(kind, data)
                assert reply["type"] == "error", (what, bad, reply)
                assert reply["data"]["code"] == "bad_request", (what, reply)
                assert "control or bidirectional" in reply["data"]["message"], (what, reply)
        snap = await get_snapshot(clients.server, clients.token("alice"))
        assert snap["seq"] == 0 and snap["elements"] == {}
        assert (await a.request("timeline_change", insert("good", "clip")))["type"] == "ack"


async def test_bad_project_ids_are_refused_in_hello_and_tokens(clients: Clients) -> None:
    with trio.fail_after(20):
        for bad in BAD_IDS:
            raw = await clients.raw()
            await raw.send("hello", {"token": clients.token("alice"), "project_id": bad}, 1)
            reply = await raw.next()
            assert (
                reply["data"]["code"] == "bad_request" and "project_id" in reply["data"]["message"]
            )
            with pytest.raises(Exception, match="control or bidirectional"):
                clients.token("alice", project=bad)
            # A token signed with the right secret but naming such a project (or user).
            for claims in ({"sub": "alice", "project": bad}, {"sub": bad, "project": "p1"}):
                token = jwt.encode({**claims, "role": "editor", "exp": 2**31}, JWT_SECRET)
                raw = await clients.raw()
                await raw.send("hello", {"token": token, "project_id": claims["project"]}, 1)
                reply = await raw.next()
                assert reply["data"]["code"] in ("unauthorized", "bad_request"), reply
                assert await raw.closed() in (4401, 4400)


async def test_integers_beyond_64_bits_are_refused_naming_the_field(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", n=0))
        numbers = ("18446744073709551616", "9223372036854775808", "-9223372036854775809",
                   "123456789012345678901234567890")  # fmt: skip
        for number in numbers:
            change = set_op("big", "clip", "n", "NUMBER", None)
            frame = orjson.dumps({"type": "timeline_change", "ref": 7, "data": change}).decode()
            await a.send_raw(frame.replace('"NUMBER"', number))
            reply = await a.expect(lambda env: env.get("ref") == 7)
            assert reply["data"]["code"] == "bad_request", reply
            message = reply["data"]["message"]
            assert message.startswith("data.changes[0].value: integer out of range"), message
            change = insert("big2", "x", n=[1, "NUMBER"])
            frame = orjson.dumps({"type": "timeline_change", "ref": 8, "data": change}).decode()
            await a.send_raw(frame.replace('"NUMBER"', number))
            reply = await a.expect(lambda env: env.get("ref") == 8)
            assert "data.changes[0].props.n[1]" in reply["data"]["message"], reply
        ok = await a.request("timeline_change", set_op("c2", "clip", "n", 2**63 - 1, None))
        assert ok["data"]["status"] == "applied"
        snap = await get_snapshot(clients.server, clients.token("alice"))
        assert snap["elements"]["clip"]["props"]["n"] == 2**63 - 1  # type: ignore[index]
        assert snap["seq"] == 2


# -- item 7: deleted elements, resolutions and the welcome's other parts -------------------------


def delete(change_id: str, element_id: str) -> dict[str, object]:
    return {"change_id": change_id, "changes": [{"op": "delete", "element_id": element_id}]}


async def stored_snapshot_bytes(server: Server, project: str = "p1") -> int:
    store = data_store(server)
    row = await store.read(
        lambda conn: conn.execute(
            "SELECT length(document) FROM snapshots WHERE project_id = ?", (project,)
        ).fetchone()
    )
    return int(row[0])


@pytest.mark.chain("manual")
@pytest.mark.settings(document_max_bytes=64 * 1024, snapshot_every=10, rate_limits={"edit": "off"})
async def test_insert_delete_loop_stays_within_the_document_quota(
    server: Server, nursery: trio.Nursery
) -> None:
    """40 elements of 20 KB inserted and deleted one after the other (800 KB of deleted content
    against a 64 KiB quota): the document (and its stored snapshot) keeps only the most recent
    deleted elements, edits of those are still conflicts, and edits of forgotten ones are
    not_found."""
    async with opened(server, nursery) as clients:
        with trio.fail_after(60):
            a = await clients.join("alice")
            b = await clients.join("bob")
            for i in range(40):
                ok = await a.request("timeline_change", insert(f"i{i}", f"e{i}", blob=big(20_000)))
                assert ok["data"]["status"] == "applied", ok
                ok = await a.request("timeline_change", delete(f"d{i}", f"e{i}"))
                assert ok["data"]["status"] == "applied", ok
                a.inbox.clear()
                b.inbox.clear()
            # The stored snapshot (written at seq 80) holds no more than the quota allows.
            assert await stored_snapshot_bytes(server) < 80 * 1024
            doc = server.hub.backplane._projects["p1"].doc  # type: ignore[attr-defined]
            assert doc.elements == {}
            assert 0 < len(doc.tombstones) <= 3
            assert doc.held_bytes <= 64 * 1024
            # e39 was inserted at seq 79 and deleted at 80: bob's edit from 79 still conflicts.
            recent = await b.request("timeline_change", set_op("b1", "e39", "blob", "mine", 79))
            assert recent["data"]["status"] == "conflict", recent
            # e0 was forgotten: there is nothing to conflict with, nor to bring back.
            old = await b.request("timeline_change", set_op("b2", "e0", "blob", "mine", 1))
            assert old["data"]["code"] == "not_found", old
            # The kept tombstone brings e39 back when the conflict is settled for bob.
            (cid,) = recent["data"]["conflicts"]
            done = await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
            assert done["type"] == "ack", done
            snap = await get_snapshot(server, clients.token("alice"))
            assert snap["elements"] == {"e39": {"type": "clip", "props": {"blob": "mine"}}}
            # Nothing was lost: a new element of the quota's size minus what is live fits.
            ok = await a.request("timeline_change", insert("last", "f", blob=big(40_000)))
            assert ok["data"]["status"] == "applied", ok


@pytest.mark.chain("manual")
@pytest.mark.settings(document_max_bytes=64 * 1024)
async def test_a_resolution_by_hand_may_not_grow_the_document_past_its_quota(
    clients: Clients,
) -> None:
    with trio.fail_after(20):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c1", "clip", title="t"))
        await a.request("timeline_change", set_op("c2", "clip", "title", "alice's", 1))
        ack = await b.request("timeline_change", set_op("c3", "clip", "title", "bob's", 1))
        (cid,) = ack["data"]["conflicts"]
        for i in range(2):
            ok = await a.request("timeline_change", insert(f"f{i}", f"fill{i}", blob=big(25_000)))
            assert ok["data"]["status"] == "applied", ok
        # 30 KB is within value_max_bytes (64 KiB) but not within what the document has left.
        custom = {"conflict_id": cid, "choice": "custom", "value": big(30_000)}
        refused = await b.request("conflict_resolve", custom)
        assert refused["data"]["code"] == "too_large", refused
        assert refused["data"]["message"].startswith("data.value: document_max_bytes quota")
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(
                f"{clients.server.http_url}/api/collaboration/conflicts/{cid}/resolve",
                headers={"Authorization": f"Bearer {clients.token('bob')}"},
                json={"choice": "custom", "value": big(30_000)},
            )
        assert reply.status_code == 413, reply.text
        assert "document_max_bytes" in reply.json()["error"]["message"]
        # Still pending, nothing written; a value that fits settles it.
        late = await clients.join("carol")
        assert [c["id"] for c in late.welcome["pending_conflicts"]] == [cid]
        assert late.welcome["seq"] == 4
        ok = await b.request("conflict_resolve", {**custom, "value": big(5_000)})
        assert ok["type"] == "ack", ok
        data = (await a.expect_type("conflict_resolved", conflict_id=cid))["data"]
        assert data["seq"] == 5


class _Bloat(ConflictStrategy):
    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        return self.resolution(conflict, "custom", big(40_000), 0.9, "bigger is better")


async def test_a_strategy_resolution_past_the_quota_is_declined_to_the_next(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path, strategies={"bloat": lambda o: _Bloat()},
                         strategy_chain=("bloat", "priority"),
                         document_max_bytes=64 * 1024)  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(20):
            a = await clients.join("alice")
            b = await clients.join("bob")
            await a.request("timeline_change", insert("fill", "fill", blob=big(40_000)))
            await a.request("timeline_change", insert("c1", "clip", title="t"))
            await a.request("timeline_change", set_op("c2", "clip", "title", "A", 2))
            ack = await b.request("timeline_change", set_op("c3", "clip", "title", "B", 2))
            (cid,) = ack["data"]["conflicts"]
            data = (await a.expect_type("conflict_resolved", conflict_id=cid))["data"]
            assert data["resolution"]["strategy"] == "priority", data
            assert data["resolution"]["value"] in ("A", "B")
            snap = await get_snapshot(server, clients.token("alice"))
            assert snap["elements"]["clip"]["props"]["title"] == data["resolution"]["value"]


@pytest.mark.chain("manual")
@pytest.mark.settings(welcome_frame_bytes=16 * 1024)
async def test_many_big_pending_conflicts_fit_a_small_client_in_chunks(
    clients: Clients, nursery: trio.Nursery
) -> None:
    """12 pending conflicts carrying 8 KB each (about 100 KB) and a tiny snapshot: a client that
    takes 16 KiB messages got 1009 on its welcome; now the conflicts come in welcome chunks, on
    a first join and on a resume alike."""
    with trio.fail_after(30):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request("timeline_change", insert("c0", "clip", title="t"))
        await a.request("timeline_change", set_op("c1", "clip", "title", "A", 1))
        ids = []
        for i in range(12):
            ack = await b.request(
                "timeline_change", set_op(f"b{i}", "clip", "title", big(8_000, str(i % 10)), 1)
            )
            ids += ack["data"]["conflicts"]
        for resume in (None, 2):
            raw = await open_raw_client(nursery, clients.url, max_message_size=16 * 1024)
            hello: dict[str, object] = {"token": clients.token("carol"), "project_id": "p1"}
            if resume is not None:
                hello["resume"] = {"seq": resume}
            await raw.send("hello", hello, 1)
            welcome = (await raw.next())["data"]
            assert "pending_conflicts" not in welcome
            pieces = [(await raw.next())["data"]["data"] for _ in range(welcome["welcome_chunks"])]
            parts = orjson.loads("".join(pieces))
            assert [c["id"] for c in parts["pending_conflicts"]] == ids
            assert ("snapshot" in parts) is (resume is None)
            assert (welcome.get("replayed") == 0) is (resume is not None)
            assert (await raw.request("ping", {}))["type"] == "pong"
            await raw.aclose()
        async with open_session(clients.url, clients.token("dave"), "p1") as session:
            assert len(session.welcome["pending_conflicts"]) == 12


@pytest.mark.settings(max_members_per_project=2)
async def test_members_per_project_are_capped(clients: Clients) -> None:
    with trio.fail_after(20):
        a = await clients.join("alice")
        b = await clients.join("bob")
        carol = await clients.raw()
        await carol.send("hello", {"token": clients.token("carol"), "project_id": "p1"}, 1)
        refused = await carol.next()
        assert refused["data"]["code"] == "overloaded", refused
        assert "at most 2" in refused["data"]["message"]
        assert await carol.closed() == 1013
        # A user already present may open another connection; other projects are unaffected.
        again = await clients.join("alice")
        assert again.welcome["seq"] == 0
        elsewhere = await clients.join("carol", project="p2")
        assert elsewhere.welcome["project_id"] == "p2"
        # Once someone leaves, there is room again.
        await b.aclose()
        room = clients.server.hub.rooms.rooms["p1"]
        while "bob" in room.members:
            await a.expect(lambda env: env.get("data", {}).get("kind") == "user_left")
        late = await clients.join("carol")
        assert {u["user_id"] for u in late.welcome["users"]} == {"alice", "carol"}


# -- item 7: pending conflicts ---------------------------------------------------------------------


def stale_set(change_id: str, value: object, *, also: str | None = None) -> dict[str, object]:
    """``title`` set from base 1 (alice wrote it at 2: a conflict), after an insert of ``also``
    that applies on its own."""
    change = set_op(change_id, "clip", "title", value, 1)
    if also is not None:
        change["changes"] = [*insert("-", also, n=1)["changes"], *change["changes"]]  # type: ignore[misc]
    return change


async def alice_wrote_title(a: RawClient) -> None:
    await a.request("timeline_change", insert("a1", "clip", title="t"))
    ok = await a.request("timeline_change", set_op("a2", "clip", "title", "alice's", 1))
    assert ok["data"]["status"] == "applied", ok


async def refused_for(client: RawClient, change: dict[str, object], quota: str) -> None:
    refused = await client.request("timeline_change", change)
    assert refused["type"] == "error" and refused["data"]["code"] == "too_large", refused
    message = refused["data"]["message"]
    assert message.startswith(f"data.changes[{len(change['changes']) - 1}]: {quota} quota"), message  # type: ignore[arg-type]


async def dismiss(client: RawClient, cid: str) -> None:
    ack = await client.request("conflict_dismiss", {"conflict_id": cid})
    assert ack["type"] == "ack", ack
    await client.expect_type("conflict_resolved", conflict_id=cid)


@pytest.mark.chain("manual")
@pytest.mark.settings(max_pending_conflicts=3, rate_limits={"edit": "off"})
async def test_pending_conflicts_are_capped_by_count(clients: Clients) -> None:
    """The reviewer's scenario scaled down: stale sets on one property pile up as pending
    conflicts until the count quota; the next change is refused whole, nothing applied."""
    with trio.fail_after(20):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await alice_wrote_title(a)
        ids = []
        for i in range(3):
            ack = await b.request("timeline_change", stale_set(f"b{i}", f"bob {i}"))
            assert ack["data"]["status"] == "conflict", ack
            ids += ack["data"]["conflicts"]
        # Its insert would apply, but its conflict is one too many: the whole change is refused.
        await refused_for(b, stale_set("b3", "bob 3", also="extra"), "max_pending_conflicts")
        late = await clients.join("carol")
        assert late.welcome["seq"] == 2
        assert "extra" not in late.welcome["snapshot"]["elements"]
        assert [c["id"] for c in late.welcome["pending_conflicts"]] == ids
        # Other writes go on; dismissing one makes room, and the id was not recorded.
        ok = await a.request("timeline_change", set_op("a3", "clip", "other", "x", None))
        assert ok["data"]["status"] == "applied"
        await dismiss(a, ids[0])
        again = await b.request("timeline_change", stale_set("b3", "bob 3", also="extra"))
        assert again["data"]["status"] == "partial", again
        await refused_for(b, stale_set("b4", "bob 4"), "max_pending_conflicts")
        pending = await clients.server.hub.backplane.pending_conflicts("p1")
        assert len(pending) == 3


@pytest.mark.chain("manual")
@pytest.mark.settings(pending_conflicts_max_bytes=64 * 1024, rate_limits={"edit": "off"})
async def test_pending_conflicts_are_capped_by_bytes(clients: Clients) -> None:
    """Three conflicts carrying 20 KB each fit 64 KiB; a fourth does not, while a small one
    does; resolving a big one makes room for another."""
    with trio.fail_after(20):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await alice_wrote_title(a)
        ids = []
        for i in range(3):
            ack = await b.request("timeline_change", stale_set(f"b{i}", big(20_000, str(i))))
            assert ack["data"]["status"] == "conflict", ack
            ids += ack["data"]["conflicts"]
        await refused_for(b, stale_set("b3", big(20_000), also="extra"),
                          "pending_conflicts_max_bytes")  # fmt: skip
        late = await clients.join("carol")
        assert late.welcome["seq"] == 2
        assert len(late.welcome["pending_conflicts"]) == 3
        small = await b.request("timeline_change", stale_set("b4", "small"))
        assert small["data"]["status"] == "conflict", small
        ack = await a.request("conflict_resolve", {"conflict_id": ids[1], "choice": "current"})
        assert ack["type"] == "ack", ack
        await a.expect_type("conflict_resolved", conflict_id=ids[1])
        again = await b.request("timeline_change", stale_set("b3", big(20_000), also="extra"))
        assert again["data"]["status"] == "partial", again


async def test_stored_pending_conflicts_count_after_a_restart(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Conflicts stored pending count again once the data dir is reopened, by count and bytes."""
    config = make_config(tmp_path, strategy_chain=("manual",), max_pending_conflicts=3,
                         pending_conflicts_max_bytes=64 * 1024)  # fmt: skip
    with trio.fail_after(30):
        async with open_server(config) as server, opened(server, nursery) as clients:
            a = await clients.join("alice")
            b = await clients.join("bob")
            await alice_wrote_title(a)
            for i in range(2):
                ack = await b.request("timeline_change", stale_set(f"b{i}", big(25_000)))
                assert ack["data"]["status"] == "conflict", ack
        async with open_server(config) as server, opened(server, nursery) as clients:
            a = await clients.join("alice")
            b = await clients.join("bob")
            first, _second = [c["id"] for c in b.welcome["pending_conflicts"]]
            await refused_for(b, stale_set("b2", big(25_000)), "pending_conflicts_max_bytes")
            ack = await b.request("timeline_change", stale_set("b3", "small"))
            assert ack["data"]["status"] == "conflict", ack
            await refused_for(b, stale_set("b4", "small"), "max_pending_conflicts")
            await dismiss(a, first)
            ack = await b.request("timeline_change", stale_set("b4", "small"))
            assert ack["data"]["status"] == "conflict", ack


def test_pending_conflict_quotas_have_defaults_ranges_and_env(tmp_path: Path) -> None:
    from crealia import Config, ConfigurationError

    config = make_config(tmp_path)
    assert (config.max_pending_conflicts, config.pending_conflicts_max_bytes) == (1000, 16 << 20)
    env = {"CREALIA_MAX_PENDING_CONFLICTS": "7", "CREALIA_PENDING_CONFLICTS_MAX_BYTES": "65536"}
    from_env = Config.from_env({**env, "CREALIA_DATA_DIR": str(tmp_path)})
    assert (from_env.max_pending_conflicts, from_env.pending_conflicts_max_bytes) == (7, 65536)
    for bad in ({"max_pending_conflicts": 0}, {"max_pending_conflicts": 100_001},
                {"pending_conflicts_max_bytes": 65535},
                {"pending_conflicts_max_bytes": (1 << 30) + 1}):  # fmt: skip
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            make_config(tmp_path, **bad)
