"""The role matrix of docs/protocol.md §4: every role and every client event, on both endpoints.

Allowed events are answered (``ack``, ``pong``, ``users_list``; the live-session events about
a session that does not exist with ``not_found``, not ``forbidden``) and take effect. Refused
ones get ``forbidden`` with the request's ``ref``, and nothing is applied or delivered to others.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from crealia import Server

from ._wsclient import RawClient
from .conftest import Clients

TIMEOUT = 10
ROLES = ("viewer", "commenter", "editor", "owner")
RANK = {role: rank for rank, role in enumerate(ROLES)}

#: The least role each client event needs, as docs/protocol.md §4 states it. ``live_stop`` (host),
#: ``webrtc_signal`` and ``stream_stats`` (session member) are not role-gated: any role passes
#: the role check and the session check decides.
REQUIRED = {
    "cursor_update": "viewer",
    "element_active": "viewer",
    "typing_start": "commenter",
    "typing_stop": "commenter",
    "comment_add": "commenter",
    "timeline_change": "editor",
    "conflict_resolve": "editor",
    "conflict_dismiss": "editor",
    "users_request": "viewer",
    "ping": "viewer",
    "live_start": "editor",
    "live_join": "viewer",
    "live_leave": "viewer",
    "live_stop": "viewer",
    "webrtc_signal": "viewer",
    "stream_stats": "viewer",
}
PRESENCE = ("cursor_update", "element_active", "typing_start", "typing_stop")
LIVE = ("live_start", "live_join", "live_leave", "live_stop", "webrtc_signal", "stream_stats")
CONFLICT = ("conflict_resolve", "conflict_dismiss")


def allowed(role: str, event: str) -> bool:
    return RANK[role] >= RANK[REQUIRED[event]]


def payload(event: str, conflict_id: str | None) -> dict[str, Any]:
    """Valid ``data`` for ``event``."""
    live = {"session_id": "live-1"}
    return {
        "cursor_update": {"position": {"x": 3, "y": 4, "track": "v1"}},
        "element_active": {"element_id": "clip-1", "element_type": "clip"},
        "typing_start": {"element_id": "clip-1"},
        "typing_stop": {"element_id": "clip-1"},
        "comment_add": {
            "comment": {"id": "k-role", "text": "looks good", "element_id": "clip-1", "time": 1.5}
        },
        "timeline_change": {
            "change_id": "c-role",
            "changes": [
                {"op": "set", "element_id": "clip-1", "prop": "title", "value": "new", "base": 1}
            ],
        },
        "conflict_resolve": {"conflict_id": conflict_id, "choice": "incoming"},
        "conflict_dismiss": {"conflict_id": conflict_id},
        "users_request": {},
        "ping": {"t": 41.5},
        "live_start": {"kind": "camera", "mode": "p2p"},
        "live_join": live,
        "live_leave": live,
        "live_stop": live,
        "webrtc_signal": {
            **live,
            "to": "server",
            "description": {"type": "offer", "sdp": "v=0\r\n"},
        },
        "stream_stats": {
            **live,
            "bitrate_kbps": 1500,
            "rtt_ms": 40,
            "packet_loss": 0.01,
            "fps": 30,
            "width": 1280,
            "height": 720,
        },
    }[event]


async def snapshot(server: Server) -> dict[str, Any]:
    token = server.issue_token("auditor", "p1", "viewer")
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(
            f"{server.http_url}/api/projects/p1/snapshot",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def from_actor(envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in envelopes
        if e.get("type") == "collaboration_event" and e["data"].get("user_id") == "actor"
    ]


def durable(envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in envelopes
        if e.get("type") in ("conflict_detected", "conflict_resolved")
        or (e.get("type") == "collaboration_event" and "seq" in e["data"])
    ]


class Stage:
    """Project p1 with one element, maybe a pending conflict, an owner watching, and the actor."""

    olga: RawClient
    actor: RawClient
    conflict_id: str | None = None
    before: dict[str, Any]

    @classmethod
    async def open(cls, clients: Clients, role: str, event: str) -> Stage:
        stage = cls()
        olga = stage.olga = await clients.join("olga", role="owner")
        ack = await olga.request(
            "timeline_change",
            {
                "change_id": "setup",
                "changes": [
                    {
                        "op": "insert",
                        "element_id": "clip-1",
                        "element_type": "clip",
                        "props": {"start": 0, "title": "intro"},
                    }
                ],
            },
        )
        assert ack["data"]["seq"] == 1, ack
        if event in CONFLICT:
            ack = await olga.request(
                "timeline_change",
                {
                    "change_id": "olga-2",
                    "changes": [
                        {
                            "op": "set",
                            "element_id": "clip-1",
                            "prop": "start",
                            "value": 5,
                            "base": 1,
                        }
                    ],
                },
            )
            assert ack["data"]["status"] == "applied", ack
            eve = await clients.join("eve", role="editor")
            ack = await eve.request(
                "timeline_change",
                {
                    "change_id": "eve-1",
                    "changes": [
                        {
                            "op": "set",
                            "element_id": "clip-1",
                            "prop": "start",
                            "value": 9,
                            "base": 1,
                        }
                    ],
                },
            )
            assert ack["data"]["status"] == "conflict", ack
            (stage.conflict_id,) = ack["data"]["conflicts"]
            await olga.expect_type("conflict_detected")
        stage.actor = await clients.join("actor", role=role)
        assert stage.actor.welcome["user"]["role"] == role
        await olga.event("user_joined", user_id="actor")
        stage.before = await snapshot(clients.server)
        olga.inbox.clear()
        stage.actor.inbox.clear()
        return stage


@pytest.mark.chain("manual")
@pytest.mark.parametrize("event", list(REQUIRED))
@pytest.mark.parametrize("role", ROLES)
async def test_role_matrix(clients: Clients, role: str, event: str) -> None:
    with trio.fail_after(TIMEOUT):
        stage = await Stage.open(clients, role, event)
        reply = await stage.actor.request(event, payload(event, stage.conflict_id))
        assert reply.get("ref") is not None
        if allowed(role, event):
            await _check_allowed(clients, stage, role, event, reply)
        else:
            await _check_refused(clients, stage, event, reply)


async def _check_allowed(
    clients: Clients, stage: Stage, role: str, event: str, reply: dict[str, Any]
) -> None:
    olga, actor, seq = stage.olga, stage.actor, stage.before["seq"]
    if event == "live_start":
        assert reply["type"] == "ack", reply
        ev = await olga.event("live_started", user_id="actor")
        assert ev["data"]["payload"]["session_id"] == reply["data"]["session_id"]
        return
    if event in LIVE:
        # Past the role check: the session named does not exist.
        assert reply["type"] == "error" and reply["data"]["code"] == "not_found", reply
        return
    assert reply["type"] != "error", reply
    match event:
        case "ping":
            assert reply["type"] == "pong", reply
            assert reply["data"]["t"] == 41.5
            assert isinstance(reply["data"]["timestamp"], int)
        case "users_request":
            assert reply["type"] == "users_list", reply
            users = {u["user_id"]: u for u in reply["data"]["users"]}
            assert users["actor"]["role"] == role
            assert users["olga"]["role"] == "owner"
        case "cursor_update" | "element_active" | "typing_start" | "typing_stop":
            assert reply == {"type": "ack", "ref": reply["ref"], "data": {}}, reply
            ev = await olga.event(event, user_id="actor")
            assert ev["data"]["payload"] == _expected_payload(event)
            assert "seq" not in ev["data"]
        case "comment_add":
            assert reply["type"] == "ack", reply
            assert reply["data"] == {"seq": seq + 1, "status": "applied"}
            ev = await olga.event("comment_add", seq=seq + 1)
            assert ev["data"]["user_id"] == "actor"
            assert ev["data"]["payload"]["comment"]["text"] == "looks good"
        case "timeline_change":
            assert reply["type"] == "ack", reply
            assert reply["data"] == {
                "change_id": "c-role",
                "seq": seq + 1,
                "status": "applied",
                "conflicts": [],
            }
            ev = await olga.event("timeline_change", seq=seq + 1)
            assert ev["data"]["user_id"] == "actor"
            assert (await snapshot(clients.server))["elements"]["clip-1"]["props"]["title"] == "new"
        case "conflict_resolve" | "conflict_dismiss":
            cid = stage.conflict_id
            if reply["type"] == "error":
                # Only if a strategy settled the conflict first: then its resolution comes.
                assert reply["data"]["code"] == "not_found", reply
            else:
                assert reply == {"type": "ack", "ref": reply["ref"], "data": {}}, reply
            resolved = await olga.expect_type("conflict_resolved", conflict_id=cid)
            value = resolved["data"]["resolution"]["value"]
            if reply["type"] == "ack":
                assert resolved["data"]["seq"] == seq + 1
                assert value == (9 if event == "conflict_resolve" else 5)
            assert (await snapshot(clients.server))["elements"]["clip-1"]["props"]["start"] == value
        case _:
            raise AssertionError(event)
    # The actor's session goes on.
    assert (await actor.request("ping", {}))["type"] == "pong"


def _expected_payload(event: str) -> dict[str, Any]:
    return {
        "cursor_update": {"position": {"x": 3.0, "y": 4.0, "track": "v1"}},
        "element_active": {"element_id": "clip-1", "element_type": "clip"},
        "typing_start": {"element_id": "clip-1"},
        "typing_stop": {"element_id": "clip-1"},
    }[event]


async def _check_refused(clients: Clients, stage: Stage, event: str, reply: dict[str, Any]) -> None:
    olga, actor = stage.olga, stage.actor
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == "forbidden", reply
    assert isinstance(reply["data"]["message"], str) and reply["data"]["message"]
    # Exactly one reply, and the session goes on.
    assert (await actor.request("ping", {}))["type"] == "pong"
    assert [e for e in actor.inbox if e.get("type") == "error"] == []
    # Nothing was delivered to the others: a later probe from the actor arrives first.
    await actor.send("cursor_update", {"position": {"x": 99, "y": 99}})
    probe = await olga.event("cursor_update", user_id="actor")
    assert probe["data"]["payload"]["position"] == {"x": 99.0, "y": 99.0}
    assert from_actor(olga.inbox) == [], olga.inbox
    assert durable(olga.inbox) == [], olga.inbox
    assert durable(actor.inbox) == [], actor.inbox
    # Nothing was applied.
    assert await snapshot(clients.server) == stage.before
    users = {u["user_id"]: u for u in (await olga.request("users_request", {}))["data"]["users"]}
    assert users["actor"]["typing"] is None
    assert users["actor"]["active_element"] is None
    seq = stage.before["seq"]
    match event:
        case "comment_add":
            # The refused comment's id was not recorded.
            ack = await olga.request("comment_add", payload(event, None))
            assert ack["data"] == {"seq": seq + 1, "status": "applied"}, ack
        case "timeline_change":
            ack = await olga.request("timeline_change", payload(event, None))
            assert ack["data"]["status"] == "applied", ack
            assert ack["data"]["seq"] == seq + 1
        case "conflict_resolve" | "conflict_dismiss":
            late = await clients.join("late", role="viewer")
            pending = [c["id"] for c in late.welcome["pending_conflicts"]]
            assert pending == [stage.conflict_id]
            ack = await olga.request(event, payload(event, stage.conflict_id))
            assert ack["type"] == "ack", ack


async def test_hello_cannot_raise_the_tokens_role(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        viewer = await clients.raw()
        reply = await viewer.request(
            "hello",
            {
                "token": clients.token("vic", "p1", "viewer"),
                "project_id": "p1",
                "role": "owner",
                "user": {"id": "vic", "role": "owner"},
            },
        )
        assert reply["type"] == "welcome", reply
        assert reply["data"]["user"] == {"id": "vic", "name": "vic", "role": "viewer"}
        refused = await viewer.request("timeline_change", payload("timeline_change", None))
        assert refused["data"]["code"] == "forbidden", refused
        refused = await viewer.request(
            "comment_add", {**payload("comment_add", None), "role": "owner"}
        )
        assert refused["data"]["code"] == "forbidden", refused
