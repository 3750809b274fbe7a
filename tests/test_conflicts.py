"""The strategy core over real sockets: chains, pushes, manual settling, re-detection, REST."""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from crealia import Server, open_server
from crealia._model import Conflict, Resolution
from crealia._settle import needs_review
from crealia._strategy import DECLINE, Answer, ConflictStrategy, ResolutionContext
from crealia.testing import make_conflict

from ._memory_backplane import MemoryBackplane
from .conftest import Clients, make_config, opened
from .test_protocol import insert, set_op


async def conflict_on(
    clients: Clients, a_role: str = "editor", b_role: str = "editor", **values: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """alice inserts clip.title='The quick fox', sets it; bob writes from the stale base."""
    a = await clients.join("alice", role=a_role)
    b = await clients.join("bob", role=b_role)
    base = values.get("base", "The quick fox")
    await a.request("timeline_change", insert("c1", "clip", title=base))
    await a.request("timeline_change", set_op("c2", "clip", "title", values["current"], 1))
    ack = await b.request("timeline_change", set_op("c3", "clip", "title", values["incoming"], 1))
    assert ack["type"] == "ack", ack
    return a, b, ack["data"]


async def resolved(client: Any, conflict_id: str) -> dict[str, Any]:
    env = await client.expect_type("conflict_resolved", conflict_id=conflict_id)
    return dict(env["data"])


async def test_merge_settles_two_edits_of_one_title(clients: Clients) -> None:
    with trio.fail_after(10):
        a, b, ack = await conflict_on(clients, current="The slow fox", incoming="The quick red fox")
        assert ack["status"] == "conflict"
        (cid,) = ack["conflicts"]
        detected = await a.expect_type("conflict_detected")
        assert detected["data"]["conflicts"][0]["status"] == "pending"
        assert detected["data"]["conflicts"][0]["strategy"] == "merge"
        for client in (a, b):
            data = await resolved(client, cid)
            res = data["resolution"]
            assert res["strategy"] == "merge"
            assert res["value"] == "The slow red fox"
            assert res["choice"] == "custom"
            assert 0 < res["confidence"] <= 1
            assert res["explanation"]
            assert data["seq"] == 3
        late = await clients.join("carol", role="viewer")
        assert late.welcome["snapshot"]["elements"]["clip"]["props"]["title"] == "The slow red fox"
        assert late.welcome["pending_conflicts"] == []


async def test_overlapping_edits_fall_to_priority_by_role(clients: Clients) -> None:
    with trio.fail_after(10):
        a, _b, ack = await conflict_on(
            clients, a_role="editor", b_role="owner", current="A fox", incoming="Some fox"
        )
        (cid,) = ack["conflicts"]
        data = await resolved(a, cid)
        res = data["resolution"]
        assert res["strategy"] == "priority"
        assert res["choice"] == "incoming" and res["value"] == "Some fox"
        assert "owner" in res["explanation"]


async def test_every_member_sees_resolutions_in_seq_order(clients: Clients) -> None:
    with trio.fail_after(15):
        a, _b, _ack = await conflict_on(clients, current="x1", incoming="y1")
        watcher = await clients.join("watcher", role="viewer", resume=0)
        await a.request("comment_add", {"comment": {"id": "k", "text": "after"}})
        seqs: list[tuple[int, str]] = []
        while len(seqs) < 4:
            env = await watcher.next()
            if env["type"] == "conflict_resolved":
                seqs.append((env["data"]["seq"], "resolved"))
            elif env["type"] == "collaboration_event" and "seq" in env["data"]:
                seqs.append((env["data"]["seq"], env["data"]["kind"]))
        assert [s for s, _ in seqs] == [1, 2, 3, 4, 5][: len(seqs)]
        assert "resolved" in {kind for _, kind in seqs}


@pytest.fixture
async def manual_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = make_config(
        tmp_path / "data",
        strategy_chain=("manual", "priority"),
        strategy_options={"manual": {"timeout": 30}},
    )
    async with open_server(config) as server:
        yield server


@pytest.fixture
async def manual(
    manual_server: Server, endpoint: str, nursery: trio.Nursery
) -> AsyncIterator[Clients]:
    clients = Clients(manual_server, endpoint, nursery)
    try:
        yield clients
    finally:
        await clients.aclose()


async def test_manual_conflict_waits_for_an_editor(manual: Clients) -> None:
    with trio.fail_after(10):
        _a, b, ack = await conflict_on(manual, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        viewer = await manual.join("vic", role="viewer")
        assert [c["id"] for c in viewer.welcome["pending_conflicts"]] == [cid]
        assert viewer.welcome["pending_conflicts"][0]["strategy"] == "manual"
        refused = await viewer.request(
            "conflict_resolve", {"conflict_id": cid, "choice": "current"}
        )
        assert refused["data"]["code"] == "forbidden"
        ok = await b.request(
            "conflict_resolve", {"conflict_id": cid, "choice": "custom", "value": "ours"}
        )
        assert ok == {"type": "ack", "ref": ok["ref"], "data": {}}
        data = await resolved(viewer, cid)
        assert data["resolution"]["value"] == "ours"
        assert data["resolution"]["strategy"] == "manual"
        assert data["resolution"]["confidence"] == 1.0
        assert "bob" in data["resolution"]["explanation"]


def _rest(server: Server, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
    with httpx.Client(base_url=server.http_url, timeout=5) as http:
        return http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)


async def rest(server: Server, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
    return await trio.to_thread.run_sync(lambda: _rest(server, method, path, token, **kw))


async def test_manual_conflict_settled_over_rest(manual: Clients) -> None:
    server = manual.server
    with trio.fail_after(10):
        a, _b, ack = await conflict_on(manual, current="mine", incoming="theirs")
        (cid,) = ack["conflicts"]
        viewer_token = server.issue_token("vic", "p1", "viewer")
        listed = await rest(
            server, "GET", "/api/collaboration/conflicts?projectId=p1", viewer_token
        )
        assert listed.status_code == 200
        (item,) = listed.json()["conflicts"]
        assert item["id"] == cid and item["status"] == "pending"
        denied = await rest(
            server,
            "POST",
            f"/api/collaboration/conflicts/{cid}/resolve",
            viewer_token,
            json={"choice": "incoming"},
        )
        assert denied.status_code == 403
        editor_token = server.issue_token("ed", "p1", "editor")
        bad = await rest(
            server,
            "POST",
            f"/api/collaboration/conflicts/{cid}/resolve",
            editor_token,
            json={"choice": "sideways"},
        )
        assert bad.status_code == 400 and "body.choice" in bad.json()["error"]["message"]
        done = await rest(
            server,
            "POST",
            f"/api/collaboration/conflicts/{cid}/resolve",
            editor_token,
            json={"choice": "incoming"},
        )
        assert done.status_code == 200, done.text
        assert done.json() == {"conflict_id": cid, "seq": 3}
        data = await resolved(a, cid)
        assert data["resolution"]["value"] == "theirs"
        again = await rest(
            server,
            "POST",
            f"/api/collaboration/conflicts/{cid}/resolve",
            editor_token,
            json={"choice": "incoming"},
        )
        assert again.status_code == 404
        listed = await rest(
            server, "GET", "/api/collaboration/conflicts?projectId=p1&status=resolved", viewer_token
        )
        (item,) = listed.json()["conflicts"]
        assert item["status"] == "resolved"
        assert item["resolution"]["strategy"] == "manual"
        other = await rest(server, "GET", "/api/collaboration/conflicts?projectId=p2", viewer_token)
        assert other.status_code == 403


async def test_manual_timeout_hands_the_conflict_on(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = make_config(
        tmp_path,
        strategy_chain=("manual", "priority"),
        strategy_options={"manual": {"timeout": 0.3}},
    )
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, _b, ack = await conflict_on(clients, current="mine", incoming="theirs")
            (cid,) = ack["conflicts"]
            data = await resolved(a, cid)
            assert data["resolution"]["strategy"] == "priority"
        await clients.aclose()


async def test_detect_is_a_dry_run(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(10):
        a = await clients.join("alice")
        await a.request("timeline_change", insert("c1", "clip", title="t", start=0))
        await a.request("timeline_change", set_op("c2", "clip", "title", "u", 1))
        token = server.issue_token("bob", "p1", "editor")
        body = {
            "projectId": "p1",
            "changes": [
                {"op": "set", "element_id": "clip", "prop": "title", "value": "v", "base": 1},
                {"op": "set", "element_id": "clip", "prop": "start", "value": 5, "base": 1},
            ],
        }
        reply = await rest(server, "POST", "/api/collaboration/conflicts/detect", token, json=body)
        assert reply.status_code == 200, reply.text
        out = reply.json()
        assert [op["prop"] for op in out["applies"]] == ["start"]
        (conflict,) = out["conflicts"]
        assert conflict["prop"] == "title"
        assert conflict["current"] == {"value": "u", "user_id": "alice", "seq": 2}
        assert conflict["base_value"] == "t"
        assert (conflict["op"], conflict["base"]) == ("set", 1)
        # What each strategy of the chain (merge, priority) would do, nothing applied: "t" to
        # "u" and "t" to "v" do not merge; priority would keep one side, for a person to check.
        merge, priority = conflict["strategies"]
        assert merge == {"strategy": "merge", "answer": "declined"}
        assert (priority["strategy"], priority["answer"]) == ("priority", "resolved")
        assert priority["resolution"]["review"] is True
        assert priority["resolution"]["value"] in ("u", "v")
        assert conflict["settled_by"] == "priority"
        b = await clients.join("bob")
        assert b.welcome["seq"] == 2  # nothing was applied
        assert b.welcome["pending_conflicts"] == []
        viewer = server.issue_token("vic", "p1", "viewer")
        refused = await rest(
            server, "POST", "/api/collaboration/conflicts/detect", viewer, json=body
        )
        assert refused.status_code == 403
        bad = await rest(
            server, "POST", "/api/collaboration/conflicts/detect", token, json={"changes": "nope"}
        )
        assert bad.status_code == 400 and "body.changes" in bad.json()["error"]["message"]


class _Gate(ConflictStrategy):
    """Holds each conflict until the test opens the gate, then takes the incoming value."""

    def __init__(self, entered: trio.Event, gate: trio.Event) -> None:
        self.entered = entered
        self.gate = gate

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        self.entered.set()
        await self.gate.wait()
        return self.resolution(conflict, "incoming", conflict.incoming["value"], 0.9, "gate")


async def test_a_property_that_moves_while_settling_is_detected_again(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    entered, opened = trio.Event(), trio.Event()

    def factory(options: Mapping[str, Any]) -> _Gate:
        return _Gate(entered, opened)

    config = make_config(tmp_path, strategies={"gate": factory}, strategy_chain=("gate", "manual"))
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, _b, ack = await conflict_on(clients, current="A", incoming="B")
            (cid,) = ack["conflicts"]
            await entered.wait()
            c = await clients.join("carol")
            moved = await c.request("timeline_change", set_op("c9", "clip", "title", "C", None))
            assert moved["data"]["status"] == "applied"
            opened.set()
            first = await resolved(a, cid)
            assert first["resolution"]["choice"] == "current"
            assert first["resolution"]["value"] == "C"
            assert "detected again" in first["resolution"]["explanation"]
            detected = await a.expect(
                lambda e: (
                    e["type"] == "conflict_detected" and e["data"]["conflicts"][0]["id"] != cid
                )
            )
            again = detected["data"]["conflicts"][0]
            assert again["current"]["value"] == "C" and again["current"]["user_id"] == "carol"
            assert again["incoming"]["value"] == "B"
            second = await resolved(a, again["id"])
            assert second["resolution"]["value"] == "B"
        await clients.aclose()


class _Broken(ConflictStrategy):
    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        raise RuntimeError("plugin bug")


class _Slow(ConflictStrategy):
    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        await trio.sleep_forever()
        return DECLINE


async def test_failing_and_slow_strategies_fall_back_down_the_chain(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(
        tmp_path,
        strategies={"broken": lambda o: _Broken(), "slow": lambda o: _Slow()},
        strategy_chain=("broken", "slow", "priority"),
        strategy_timeout=0.2,
    )
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, _b, ack = await conflict_on(clients, current="A", incoming="B")
            (cid,) = ack["conflicts"]
            data = await resolved(a, cid)
            assert data["resolution"]["strategy"] == "priority"
        await clients.aclose()


async def test_strategy_chain_is_set_per_project_by_its_owner(clients: Clients) -> None:
    server = clients.server
    owner = server.issue_token("olga", "p1", "owner")
    editor = server.issue_token("ed", "p1", "editor")
    with trio.fail_after(10):
        got = await rest(server, "GET", "/api/projects/p1/strategies", editor)
        assert got.json()["strategies"] == ["merge", "priority"]
        assert {"merge", "priority", "manual"} <= set(got.json()["available"])
        put = await rest(
            server,
            "PUT",
            "/api/projects/p1/strategies",
            owner,
            json={"strategies": ["manual"], "options": {"manual": {"timeout": 5}}},
        )
        assert put.status_code == 200, put.text
        refused = await rest(
            server, "PUT", "/api/projects/p1/strategies", editor, json={"strategies": ["priority"]}
        )
        assert refused.status_code == 403
        unknown = await rest(
            server, "PUT", "/api/projects/p1/strategies", owner, json={"strategies": ["nope"]}
        )
        assert unknown.status_code == 400
        assert "known:" in unknown.json()["error"]["message"]
        bad_opts = await rest(
            server,
            "PUT",
            "/api/projects/p1/strategies",
            owner,
            json={"strategies": ["priority"], "options": {"priority": {"tie": 3}}},
        )
        assert bad_opts.status_code == 400
        a, _b, _ack = await conflict_on(clients, current="mine", incoming="theirs")
        detected = await a.expect_type("conflict_detected")
        assert detected["data"]["conflicts"][0]["strategy"] == "manual"
        other = await rest(
            server, "GET", "/api/projects/p2/strategies", server.issue_token("x", "p2", "viewer")
        )
        assert other.json()["strategies"] == ["merge", "priority"]


async def test_ai_strategy_with_the_offline_provider(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = make_config(tmp_path, strategy_chain=("ai", "priority"))
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, b, ack = await conflict_on(
                clients, a_role="owner", current="Opening shot of the harbour", incoming="Harbour"
            )
            # alice is present and editing the clip right now.
            await a.send("element_active", {"element_id": "clip", "element_type": "clip"})
            (cid,) = ack["conflicts"]
            data = await resolved(b, cid)
            res = data["resolution"]
            assert res["strategy"] == "ai"
            assert res["choice"] in ("current", "incoming")
            assert 0.5 <= res["confidence"] <= 0.95
            assert "alice" in res["explanation"] and "bob" in res["explanation"]
            value = {"current": "Opening shot of the harbour", "incoming": "Harbour"}[res["choice"]]
            assert res["value"] == value
        await clients.aclose()


async def test_merge_of_disjoint_object_keys_and_id_lists_over_sockets(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        base_fx = {"blur": 1, "gain": 0}
        base_kf = [{"id": "k1", "t": 0}, {"id": "k2", "t": 5}]
        await a.request("timeline_change", insert("c1", "clip", fx=base_fx, keys=base_kf))
        await a.request("timeline_change", {"change_id": "c2", "changes": [
            {"op": "set", "element_id": "clip", "prop": "fx", "value": {"blur": 3, "gain": 0},
             "base": 1},
            {"op": "set", "element_id": "clip", "prop": "keys",
             "value": [{"id": "k1", "t": 0}, {"id": "k2", "t": 6}], "base": 1},
        ]})  # fmt: skip
        ack = await b.request("timeline_change", {"change_id": "c3", "changes": [
            {"op": "set", "element_id": "clip", "prop": "fx", "value": {"blur": 1, "gain": 2},
             "base": 1},
            {"op": "set", "element_id": "clip", "prop": "keys",
             "value": [{"id": "k1", "t": 0}, {"id": "k2", "t": 5}, {"id": "k3", "t": 9}],
             "base": 1},
        ]})  # fmt: skip
        assert ack["data"]["status"] == "conflict"
        results = {}
        for cid in ack["data"]["conflicts"]:
            data = await resolved(a, cid)
            assert data["resolution"]["strategy"] == "merge"
            results[data["conflict_id"]] = data["resolution"]["value"]
        values = list(results.values())
        assert {"blur": 3, "gain": 2} in values
        assert [{"id": "k1", "t": 0}, {"id": "k2", "t": 6}, {"id": "k3", "t": 9}] in values
        late = await clients.join("carol")
        props = late.welcome["snapshot"]["elements"]["clip"]["props"]
        assert props["fx"] == {"blur": 3, "gain": 2}
        assert [k["id"] for k in props["keys"]] == ["k1", "k2", "k3"]


async def test_ai_strategy_over_http_falls_back_on_garbage(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from .test_strategy_ai import VALID, ChatDouble, Reply, completion

    # A test double of a model: a local chat-completions endpoint with scripted answers.
    model = ChatDouble(replies=[Reply(body=completion("this is not JSON"))])
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, model.handle, 0, host="127.0.0.1")
    )
    model.port = listeners[0].socket.getsockname()[1]
    config = make_config(
        tmp_path,
        strategy_chain=("ai", "priority"),
        strategy_options={"ai": {"provider": "judge"}},
        ai_providers={"judge": {"url": model.url, "model": "judge"}},
    )
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, _b, ack = await conflict_on(clients, current="first", incoming="second")
            (cid,) = ack["conflicts"]
            data = await resolved(a, cid)
            assert data["resolution"]["strategy"] == "priority"  # garbage: fell back
            await a.request("timeline_change", set_op("c4", "clip", "title", "third", 3))
            c = await clients.join("carol")
            again = await c.request("timeline_change", set_op("c5", "clip", "title", "fourth", 3))
            (cid2,) = again["data"]["conflicts"]
            data = await resolved(a, cid2)
            res = data["resolution"]
            assert res["strategy"] == "ai"
            assert res["confidence"] == VALID["confidence"]
            assert res["explanation"] == VALID["explanation"]
            assert res["value"] == "fourth"
            assert model.requests[-1].body["model"] == "judge"
        await clients.aclose()


async def test_conflict_counters_move(clients: Clients) -> None:
    traffic = clients.server.hub.traffic
    with trio.fail_after(10):
        a, _b, ack = await conflict_on(
            clients, current="The slow fox", incoming="The quick red fox"
        )
        (cid,) = ack["conflicts"]
        await resolved(a, cid)
        assert traffic.conflicts_detected == 1
        assert traffic.conflicts_settled == 1


class _Unstorable(ConflictStrategy):
    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        return self.resolution(conflict, "custom", {1, 2}, 0.5, "a set is not JSON")


async def test_a_resolution_that_cannot_be_stored_leaves_the_conflict_pending(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path, strategies={"bad": lambda o: _Unstorable()},
                         strategy_chain=("bad",))  # fmt: skip
    async with open_server(config) as server:
        clients = Clients(server, "ws", nursery)
        with trio.fail_after(10):
            a, b, ack = await conflict_on(clients, current="A", incoming="B")
            (cid,) = ack["conflicts"]
            # The room goes on, the conflict waits for a person.
            assert (await a.request("ping", {}))["type"] == "pong"
            ok = await b.request("conflict_resolve", {"conflict_id": cid, "choice": "incoming"})
            assert ok["type"] == "ack"
            data = await resolved(a, cid)
            assert data["resolution"]["value"] == "B"
        await clients.aclose()


@pytest.mark.chain("manual")
async def test_dismiss_keeps_a_newer_edit(clients: Clients) -> None:
    with trio.fail_after(10):
        a, _b, ack = await conflict_on(clients, current="A", incoming="B")
        (cid,) = ack["conflicts"]
        c = await clients.join("carol")
        newer = await c.request("timeline_change", set_op("c9", "clip", "title", "C", None))
        assert newer["data"]["status"] == "applied"
        await a.request("conflict_dismiss", {"conflict_id": cid})
        data = await resolved(a, cid)
        assert data["resolution"]["value"] == "C"
        late = await clients.join("dave")
        assert late.welcome["snapshot"]["elements"]["clip"]["props"]["title"] == "C"
        assert late.welcome["pending_conflicts"] == []  # dismissed: not detected again


async def test_strategy_chain_limits_are_bounded_and_refused_clearly(clients: Clients) -> None:
    server = clients.server
    owner = server.issue_token("olga", "p1", "owner")
    path = "/api/projects/p1/strategies"
    with trio.fail_after(30):
        for body, message in [
            ({"strategies": ["merge"] * 90_000}, "at most 8 strategies, got 90000"),
            ({"strategies": ["merge", "priority"] * 5}, "at most 8 strategies, got 10"),
            ({"strategies": ["merge", "merge"]}, "once in a chain: merge"),
            ({"strategies": ["manual", "priority"]}, "give it a timeout or put it last"),
            ({"strategies": ["manual", "priority"], "options": {"manual": {"timeout": 1e300}}},
             "timeout must be a number of seconds in 0 < timeout <= 604800"),
            ({"strategies": ["manual"], "options": {"manual": {"timeout": True}}},
             "timeout must be a number of seconds"),
            ({"strategies": ["merge"], "options": {"merge": {"max_diff_steps": 10**12}}},
             "max_diff_steps must be an integer in 1..1000000"),
            ({"strategies": ["merge"], "options": {"merge": {"max_text_chars": 10**12}}},
             "max_text_chars must be an integer in 1..200000"),
            ({"strategies": ["merge"], "options": {"merge": {"max_diff_ms": 0}}},
             "max_diff_ms must be an integer in 1..1000"),
            ({"strategies": ["merge"], "options": {"merge": {"max_dif_steps": 5}}},
             "unknown options ['max_dif_steps']"),
            ({"strategies": ["priority"], "options": {"priority": {"tie": "last", "x": 1}}},
             "unknown options ['x'] (known: tie)"),
            ({"strategies": ["merge"], "options": {"merge": {"k" * 20_000: 1}}},
             "over the limit of 16384"),
            ({"strategies": ["merge"], "optoins": {}}, "optoins"),
        ]:  # fmt: skip
            refused = await rest(server, "PUT", path, owner, json=body)
            assert refused.status_code == 400, (message, refused.text)
            assert message in refused.json()["error"]["message"], refused.text
            got = await rest(server, "GET", path, owner)
            assert got.json()["strategies"] == ["merge", "priority"], "nothing was stored"
        # At the bounds, and manual without a timeout as the last strategy, are fine.
        bounds = {"max_diff_steps": 1_000_000, "max_text_chars": 200_000, "max_diff_ms": 1000}
        chain = {"strategies": ["merge", "priority", "manual"], "options": {"merge": bounds}}
        ok = await rest(server, "PUT", path, owner, json=chain)
        assert ok.status_code == 200, ok.text


def _texts(kb: int) -> tuple[str, str, str]:
    words = kb * 1024 // 6
    base, current, incoming = (" ".join(f"{t}{i:04d}" for i in range(words)) for t in "abc")
    return base, current, incoming


@pytest.mark.settings(rate_limits={"other": "off"})  # the victim pings flat out
async def test_a_worst_case_merge_does_not_stall_another_project(clients: Clients) -> None:
    """One project's owner sets the merge limits to their maximum and raises a conflict between
    15 KB texts with nothing in common (the Myers diff's worst case): another project's pings
    go on being answered while that merge runs. No absolute timing: the longest silence between
    two pongs must be well under the time the merge took (it equals it when the merge holds the
    event loop)."""
    server = clients.server
    owner = server.issue_token("olga", "p1", "owner")
    bounds = {"max_diff_steps": 1_000_000, "max_text_chars": 200_000, "max_diff_ms": 1000}
    with trio.fail_after(30):
        ok = await rest(server, "PUT", "/api/projects/p1/strategies", owner,
                        json={"strategies": ["merge", "priority"],
                              "options": {"merge": bounds}})  # fmt: skip
        assert ok.status_code == 200, ok.text
        victim = await clients.join("vic", project="p2")
        a = await clients.join("alice")
        b = await clients.join("bob")
        base, current, incoming = _texts(15)
        await a.request("timeline_change", insert("c1", "doc", text=base))
        await a.request("timeline_change", set_op("c2", "doc", "text", current, 1))
        pongs: list[float] = []
        done = trio.Event()

        async def ping() -> None:
            while not done.is_set():
                await victim.request("ping", {})
                pongs.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            started = trio.current_time()
            ack = await b.request("timeline_change", set_op("c3", "doc", "text", incoming, 1))
            (cid,) = ack["data"]["conflicts"]
            data = await resolved(b, cid)
            took = trio.current_time() - started
            done.set()
        assert data["resolution"]["strategy"] == "priority"  # the merge declined
        during = [t for t in pongs if t >= started]
        gaps = [y - x for x, y in itertools.pairwise([started, *during])]
        assert during and max(gaps) < took / 2, (max(gaps), took, len(during))
        await clients.aclose()


async def test_a_priority_pick_between_two_values_is_marked_for_review(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """merge declines two different numbers; priority keeps one side verbatim, which is
    right only if the other did not matter: the resolution says a person should look."""
    async with open_server(make_config(tmp_path / "data")) as server, opened(server, nursery) as c:
        with trio.fail_after(10):
            a, b = await c.join("ann"), await c.join("bob")
            first = insert("c1", "clip", start=0, title="Intro")
            seq = (await a.request("timeline_change", first))["data"]["seq"]
            await a.request("timeline_change", set_op("c2", "clip", "start", 10, seq))
            picked = await b.request("timeline_change", set_op("c3", "clip", "start", 20, seq))
            (cid,) = picked["data"]["conflicts"]
            resolved = await a.expect_type("conflict_resolved", conflict_id=cid)
            resolution = resolved["data"]["resolution"]
            assert resolution["strategy"] == "priority" and resolution["review"] is True
            opening, closing = "Opening titles for the summer", "Closing titles for the summer"
            change = set_op("c4", "clip", "title", f"{opening} trailer", None)
            retitled = (await a.request("timeline_change", change))["data"]["seq"]
            change = set_op("c5", "clip", "title", f"{closing} trailer", retitled)
            await a.request("timeline_change", change)
            change = set_op("c6", "clip", "title", f"{opening} teaser", retitled)
            merged = await b.request("timeline_change", change)
            (mid,) = merged["data"]["conflicts"]
            clean = await a.expect_type("conflict_resolved", conflict_id=mid)
            assert clean["data"]["resolution"]["strategy"] == "merge"
            assert clean["data"]["resolution"]["confidence"] == 0.9
            assert clean["data"]["resolution"]["review"] is False  # confidence 0.9


def test_review_follows_the_calibrated_threshold() -> None:
    conflict = make_conflict(current="a", incoming="b", base_value="c")
    resolution = Resolution(value="ab", choice="custom", strategy="merge", confidence=0.95,
                            explanation="")  # fmt: skip
    assert not needs_review(conflict, resolution)
    assert needs_review(conflict, attrs.evolve(resolution, confidence=0.85))
    pick = attrs.evolve(resolution, strategy="priority", choice="current", value="a")
    assert needs_review(conflict, pick)
    same = make_conflict(current="a", incoming="a", base_value="c")
    assert not needs_review(same, pick)


async def test_a_dry_run_previews_its_first_twenty_conflicts_only(clients: Clients) -> None:
    """A preview runs every strategy of the chain (an ``ai`` one asks its provider): one dry
    run of a thousand conflicting ops must not cost a thousand previews."""
    server = clients.server
    with trio.fail_after(20):
        a = await clients.join("alice")
        ops = [{"op": "insert", "element_id": f"e{i}", "element_type": "clip",
                "props": {"start": 0}} for i in range(25)]  # fmt: skip
        seq = await a.request("timeline_change", {"change_id": "c1", "changes": ops})
        base = seq["data"]["seq"]
        sets = [{"op": "set", "element_id": f"e{i}", "prop": "start", "value": 1, "base": base}
                for i in range(25)]  # fmt: skip
        await a.request("timeline_change", {"change_id": "c2", "changes": sets})
        stale = [{**op, "value": 2} for op in sets]
        token = server.issue_token("bob", "p1", "editor")
        reply = await rest(server, "POST", "/api/collaboration/conflicts/detect", token,
                           json={"changes": stale})  # fmt: skip
        assert reply.status_code == 200, reply.text
        conflicts = reply.json()["conflicts"]
        assert len(conflicts) == 25
        assert all(c["settled_by"] == "priority" for c in conflicts[:20])
        assert all(c["strategies"] is None and c["settled_by"] is None for c in conflicts[20:])


@attrs.define(eq=False)
class SlowWelcomes(MemoryBackplane):
    """The test-only in-memory backplane, whose next read for a welcome (the snapshot, or the
    events since a resume) waits for ``gate`` once ``hold`` is set: a store slow to answer a
    joiner while the room goes on."""

    hold: bool = False
    gate: trio.Event = attrs.Factory(trio.Event)
    waiting: trio.Event = attrs.Factory(trio.Event)

    async def _held(self) -> None:
        if self.hold:
            self.hold = False
            self.waiting.set()
            await self.gate.wait()

    async def snapshot(self, project_id: str) -> dict[str, Any]:
        await self._held()
        return await super().snapshot(project_id)

    async def events_since(self, project_id: str, seq: int) -> Any:
        await self._held()
        return await super().events_since(project_id, seq)


@asynccontextmanager
async def slow_welcomes(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[
    tuple[SlowWelcomes, Clients]
]:  # fmt: skip
    config = make_config(tmp_path, strategy_chain=("manual",))
    backplane = SlowWelcomes(config=config)
    async with open_server(config, backplane=backplane) as server:
        clients = Clients(server, "ws", nursery)
        try:
            yield backplane, clients
        finally:
            await clients.aclose()


async def held_join(
    backplane: SlowWelcomes, clients: Clients, nursery: trio.Nursery, **hello: Any
) -> Callable[[], Awaitable[Any]]:
    """carol's hello, sent now; returns once her welcome waits for the store, with what to
    await for her client once the gate opens."""
    joined: dict[str, Any] = {}
    done = trio.Event()

    async def join() -> None:
        joined["carol"] = await clients.join("carol", **hello)
        done.set()

    backplane.hold = True
    nursery.start_soon(join)
    await backplane.waiting.wait()

    async def welcomed() -> Any:
        backplane.gate.set()
        await done.wait()
        return joined["carol"]

    return welcomed


async def pending_as_told(client: Any) -> tuple[set[str], list[str]]:
    """The pending conflicts as ``client`` knows them after its welcome and what followed it
    (up to a pong), and the conflict pushes it got, in order."""
    known = {c["id"] for c in client.welcome["pending_conflicts"]}
    told: list[str] = []
    await client.send("ping", {}, ref=999)
    while (envelope := await client.next()).get("ref") != 999:
        data = envelope["data"]
        if envelope["type"] == "conflict_detected":
            for conflict in data["conflicts"]:
                known.add(conflict["id"])
                told.append(f"detected {conflict['id']}")
        elif envelope["type"] == "conflict_resolved":
            known.discard(data["conflict_id"])
            told.append(f"resolved {data['conflict_id']}")
    return known, told


async def test_a_conflict_settled_while_a_welcome_is_prepared_is_not_pending_in_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The welcome lists the conflicts pending at its snapshot's seq: one settled while the
    store read the snapshot is not among them (it was: the list was read before the
    snapshot, and the member showed a conflict that was gone)."""
    with trio.fail_after(10):
        async with slow_welcomes(tmp_path, nursery) as (backplane, clients):
            a, _b, ack = await conflict_on(clients, current="mine", incoming="theirs")
            (cid,) = ack["conflicts"]
            welcomed = await held_join(backplane, clients, nursery)
            await a.request("conflict_resolve", {"conflict_id": cid, "choice": "current"})
            carol = await welcomed()
            assert carol.welcome["snapshot"]["seq"] == 3  # with the resolution
            known, _told = await pending_as_told(carol)
            assert cid not in known


@pytest.mark.parametrize("resume", [False, True])
async def test_a_conflict_detected_and_settled_while_a_welcome_is_prepared_is_not_pending(
    tmp_path: Path, nursery: trio.Nursery, resume: bool
) -> None:
    """A conflict detected and settled while a joiner's welcome is prepared: with a snapshot
    (which holds the resolution) the joiner is not told of it; resuming, it hears it detected
    then resolved, in order. Before, its detection came after the welcome and the replay,
    and the member kept a pending conflict that was gone."""
    with trio.fail_after(10):
        async with slow_welcomes(tmp_path, nursery) as (backplane, clients):
            a = await clients.join("alice")
            b = await clients.join("bob")
            await a.request("timeline_change", insert("c1", "clip", title="t"))
            await a.request("timeline_change", set_op("c2", "clip", "title", "mine", 1))
            welcomed = await held_join(backplane, clients, nursery,
                                       **({"resume": 2} if resume else {}))  # fmt: skip
            ack = await b.request("timeline_change", set_op("c3", "clip", "title", "theirs", 1))
            (cid,) = ack["data"]["conflicts"]
            await a.request("conflict_resolve", {"conflict_id": cid, "choice": "current"})
            carol = await welcomed()
            known, told = await pending_as_told(carol)
            assert cid not in known, told
            if resume:
                assert carol.welcome["replayed"] == 1
                assert told == [f"detected {cid}", f"resolved {cid}"]
            else:
                assert carol.welcome["snapshot"]["seq"] == 3
                assert told == []
