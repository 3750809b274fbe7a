"""Bad input (DESIGN.md "Bad input", docs/protocol.md §2, §3, §7) over real sockets, both endpoints.

Every bad message gets an ``error`` with the right code, a message naming what is wrong, and the
request's ``ref`` when the server could read it; nothing changes (the project's ``seq``, its
document, recorded change and comment ids, what other members receive) and the session goes on.
Frame-level faults close with the code docs/protocol.md gives them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
import trio_websocket
from jwt.utils import base64url_encode
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)

from crealia import Server, open_server

from ._wsclient import RawClient
from .conftest import JWT_SECRET, Clients, make_config

TIMEOUT = 10
REF = 7
MAX_FRAME = 64 * 1024
ERROR_CODES = {
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "too_large",
    "overloaded",
    "internal",
}


# -- helpers -----------------------------------------------------------------------------------


def frame(kind: Any, data: Any = None, ref: Any = REF, **extra: Any) -> str:
    """One client frame as JSON text (``data`` omitted when ``None``)."""
    env: dict[str, Any] = {"type": kind}
    if ref is not None:
        env["ref"] = ref
    if data is not None:
        env["data"] = data
    env.update(extra)
    return json.dumps(env)


def change(*ops: dict[str, Any], change_id: str = "bad-1") -> dict[str, Any]:
    return {"change_id": change_id, "changes": list(ops)}


def set_op(element_id: str = "clip-1", prop: str = "start", value: Any = 1, **kw: Any):
    return {"op": "set", "element_id": element_id, "prop": prop, "value": value, **kw}


def nested(levels: int, leaf: Any = 1) -> Any:
    """``levels`` nested objects around ``leaf``."""
    value = leaf
    for _ in range(levels):
        value = {"k": value}
    return value


async def snapshot(server: Server, project: str = "p1") -> dict[str, Any]:
    """The project's snapshot from the REST API."""
    token = server.issue_token("auditor", project, "viewer")
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(
            f"{server.http_url}/api/projects/{project}/snapshot",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def assert_error(reply: dict[str, Any], code: str, *fragments: str, ref: int | None = REF) -> None:
    """``reply`` is an ``error`` with ``code``, ``ref`` (absent when None) and a message that
    contains every fragment."""
    assert reply["type"] == "error", reply
    assert reply.get("ref") == ref, reply
    if ref is None:
        assert "ref" not in reply, reply
    data = reply["data"]
    assert data["code"] in ERROR_CODES, reply
    assert data["code"] == code, reply
    message = data["message"]
    assert isinstance(message, str) and message, reply
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"


def durable(envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The envelopes that carry or announce durable state."""
    return [
        env
        for env in envelopes
        if env.get("type") in ("conflict_detected", "conflict_resolved")
        or (env.get("type") == "collaboration_event" and "seq" in env.get("data", {}))
    ]


class Room:
    """A project with one element, an owner who sends bad input and a watching viewer."""

    def __init__(self, clients: Clients, alice: RawClient, bob: RawClient) -> None:
        self.clients = clients
        self.alice = alice
        self.bob = bob
        self.before: dict[str, Any] = {}
        self.probes = 0

    @classmethod
    async def open(cls, clients: Clients) -> Room:
        alice = await clients.join("alice", role="owner")
        bob = await clients.join("bob", role="viewer")
        ack = await alice.request(
            "timeline_change",
            change(
                {
                    "op": "insert",
                    "element_id": "clip-1",
                    "element_type": "clip",
                    "props": {"start": 0, "title": "intro"},
                },
                change_id="setup",
            ),
        )
        assert ack["data"]["seq"] == 1, ack
        await alice.event("timeline_change", seq=1)
        await bob.event("timeline_change", seq=1)
        room = cls(clients, alice, bob)
        room.before = await snapshot(clients.server)
        assert room.before["seq"] == 1
        alice.inbox.clear()
        bob.inbox.clear()
        return room

    async def reply_to(self, text: str, ref: int | None = REF) -> dict[str, Any]:
        """Send a raw frame; return the reply with ``ref``, or (``ref`` None) the next error."""
        await self.alice.send_raw(text)
        if ref is None:
            return await self.alice.expect_type("error")
        return await self.alice.expect(lambda env: env.get("ref") == ref)

    async def assert_nothing_changed(self) -> None:
        """Nothing was applied or delivered, and the session still answers."""
        self.probes += 1
        # A later request is answered: every reply to earlier frames is already here.
        pong = await self.alice.request("ping", {"t": self.probes})
        assert pong["type"] == "pong", pong
        assert [e for e in self.alice.inbox if e.get("type") == "error"] == []
        # The watcher gets a later cursor probe, and nothing durable before it.
        await self.alice.send("cursor_update", {"position": {"x": -self.probes, "y": 0}})
        await self.bob.event("cursor_update", user_id="alice")
        assert durable(self.bob.inbox) == [], self.bob.inbox
        assert durable(self.alice.inbox) == [], self.alice.inbox
        assert await snapshot(self.clients.server) == self.before

    async def assert_session_goes_on(self) -> None:
        """Valid requests are applied, under the change and comment ids the bad ones used."""
        ack = await self.alice.request("timeline_change", change(set_op(value=2, base=1)))
        assert ack["type"] == "ack", ack
        assert ack["data"] == {"change_id": "bad-1", "seq": 2, "status": "applied", "conflicts": []}
        ack = await self.alice.request("comment_add", {"comment": {"id": "k-bad", "text": "ok"}})
        assert ack["type"] == "ack", ack
        assert ack["data"] == {"seq": 3, "status": "applied"}
        ev = await self.bob.event("comment_add", seq=3)
        assert ev["data"]["payload"]["comment"]["text"] == "ok"
        assert (await snapshot(self.clients.server))["seq"] == 3


# -- a raw WebSocket client: any frame, even one no library would send --------------------------


def masked_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked client frame built by hand (``opcode`` 1: text)."""
    mask = os.urandom(4)
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + mask + body


class WireClient:
    """A minimal wsproto client over a trio TCP stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []

    async def _pump(self) -> None:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        self.pending.extend(self.ws.events())

    async def handshake(self) -> None:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/ws")))
        while not self.pending:
            await self._pump()
        accepted = self.pending.pop(0)
        assert isinstance(accepted, AcceptConnection), accepted

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def send_bytes(self, raw: bytes) -> None:
        """Raw bytes on the wire; the server may hang up before reading them all."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(raw)

    async def receive(self) -> str | bytes | CloseConnection:
        """The next whole message, or the server's Close."""
        parts: list[Any] = []
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, CloseConnection):
                    return event
                assert isinstance(event, Message), event
                parts.append(event.data)
                if event.message_finished:
                    return type(parts[0])().join(parts)
            await self._pump()

    async def envelopes(self) -> list[dict[str, Any]]:
        message = await self.receive()
        assert isinstance(message, str), message
        value = json.loads(message)
        return value if isinstance(value, list) else [value]


@contextlib.asynccontextmanager
async def wire_client(server: Server, endpoint: str) -> AsyncIterator[WireClient]:
    port = server.ws_port if endpoint == "ws" else server.http_port
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = WireClient(stream)
        await client.handshake()
        yield client


# -- envelopes that do not decode ----------------------------------------------------------------

# (frame, code, fragments of the message, ref of the reply)
_ENVELOPE_CASES = [
    pytest.param(
        '{"type": "ping", "ref": 7, "data": {', "bad_request", ("JSON",), None, id="malformed-json"
    ),
    pytest.param("ping", "bad_request", ("JSON",), None, id="not-json"),
    pytest.param("", "bad_request", ("JSON",), None, id="empty-frame"),
    pytest.param('[{"type": "ping", "ref": 7}]', "bad_request", ("object",), None, id="json-array"),
    pytest.param('"ping"', "bad_request", ("object",), None, id="json-string"),
    pytest.param("42", "bad_request", ("object",), None, id="json-number"),
    pytest.param("null", "bad_request", ("object",), None, id="json-null"),
    pytest.param(
        frame("teleport", {}), "bad_request", ("type", "teleport"), REF, id="unknown-type"
    ),
    pytest.param(
        frame("Ping", {}), "bad_request", ("type", "Ping"), REF, id="type-is-case-sensitive"
    ),
    pytest.param(
        json.dumps({"ref": REF, "data": {}}), "bad_request", ("type",), REF, id="missing-type"
    ),
    pytest.param(frame(["ping"], {}), "bad_request", ("type",), REF, id="type-not-string"),
    pytest.param(frame("ping", {}, ref=0), "bad_request", ("ref",), None, id="ref-zero"),
    pytest.param(frame("ping", {}, ref=-7), "bad_request", ("ref",), None, id="ref-negative"),
    pytest.param(frame("ping", {}, ref=7.5), "bad_request", ("ref",), None, id="ref-float"),
    pytest.param(frame("ping", {}, ref="7"), "bad_request", ("ref",), None, id="ref-string"),
    pytest.param(frame("ping", {}, ref=True), "bad_request", ("ref",), None, id="ref-bool"),
    pytest.param(frame("ping", {}, ref=[7]), "bad_request", ("ref",), None, id="ref-array"),
    pytest.param(frame("ping", {}, ref=2**53), "bad_request", ("ref",), None, id="ref-over-2**53"),
    pytest.param(
        '{"type":"ping","ref":7,"data":{"t":' + "[" * 2000 + "]" * 2000 + "}}",
        "bad_request",
        ("JSON",),
        None,
        id="nesting-over-json-parser-limit",
    ),
    pytest.param(
        '{"type":"cursor_update","ref":7,"data":{"position":{"x":1e999,"y":0}}}',
        "bad_request",
        ("JSON",),
        None,
        id="number-out-of-range",
    ),
    pytest.param(frame("ping", []), "bad_request", ("data",), REF, id="data-array"),
    pytest.param(frame("ping", "t"), "bad_request", ("data",), REF, id="data-string"),
    pytest.param(frame("users_request", 5), "bad_request", ("data",), REF, id="data-number"),
    pytest.param(
        json.dumps({"type": "ping", "ref": REF, "data": None}),
        "bad_request",
        ("data",),
        REF,
        id="data-null",
    ),
]


@pytest.mark.parametrize(("text", "code", "fragments", "ref"), _ENVELOPE_CASES)
async def test_bad_envelope_is_an_error_and_changes_nothing(
    clients: Clients, text: str, code: str, fragments: tuple[str, ...], ref: int | None
) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        reply = await room.reply_to(text, ref)
        assert_error(reply, code, *fragments, ref=ref)
        await room.assert_nothing_changed()
        await room.assert_session_goes_on()


# -- data that does not validate ------------------------------------------------------------------

_LONG_ID = "x" * 129
_INSERT = {"op": "insert", "element_id": "clip-2", "element_type": "clip"}

_DATA_CASES = [
    # wrong types
    pytest.param(
        frame("cursor_update", {"position": {"x": "1", "y": 2}}),
        "bad_request",
        ("data.position.x", "number"),
        id="position.x-string",
    ),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1, "y": True}}),
        "bad_request",
        ("data.position.y",),
        id="position.y-bool",
    ),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1, "y": 2, "time": "now"}}),
        "bad_request",
        ("data.position.time",),
        id="position.time-string",
    ),
    pytest.param(
        frame("cursor_update", {"position": [1, 2]}),
        "bad_request",
        ("data.position",),
        id="position-array",
    ),
    pytest.param(
        frame("element_active", {"element_id": 5, "element_type": "clip"}),
        "bad_request",
        ("data.element_id", "string"),
        id="element_id-number",
    ),
    pytest.param(
        frame("typing_start", {"element_id": ["clip-1"]}),
        "bad_request",
        ("data.element_id",),
        id="typing-element_id-array",
    ),
    pytest.param(frame("ping", {"t": "now"}), "bad_request", ("data.t",), id="ping-t-string"),
    pytest.param(
        frame("timeline_change", change(set_op(), change_id=17)),
        "bad_request",
        ("data.change_id",),
        id="change_id-number",
    ),
    pytest.param(
        frame("timeline_change", {"change_id": "bad-1", "changes": "set"}),
        "bad_request",
        ("data.changes:", "array"),
        id="changes-string",
    ),
    pytest.param(
        frame("timeline_change", {"change_id": "bad-1", "changes": set_op()}),
        "bad_request",
        ("data.changes:", "array"),
        id="changes-object",
    ),
    pytest.param(
        frame("timeline_change", {"change_id": "bad-1", "changes": 3}),
        "bad_request",
        ("data.changes",),
        id="changes-number",
    ),
    pytest.param(
        frame("timeline_change", change(5)),
        "bad_request",
        ("data.changes[0]", "object"),
        id="op-not-object",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(), set_op(element_id=9))),
        "bad_request",
        ("data.changes[1].element_id",),
        id="op-element_id-number",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(prop=["start"]))),
        "bad_request",
        ("data.changes[0].prop",),
        id="op-prop-array",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(base="1"))),
        "bad_request",
        ("data.changes[0].base",),
        id="op-base-string",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(base=1.5))),
        "bad_request",
        ("data.changes[0].base",),
        id="op-base-fraction",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(base=-1))),
        "bad_request",
        ("data.changes[0]", "base"),
        id="op-base-negative",
    ),
    pytest.param(
        frame("timeline_change", change({**_INSERT, "props": [1]})),
        "bad_request",
        ("data.changes[0].props",),
        id="insert-props-array",
    ),
    pytest.param(
        frame("timeline_change", change({**_INSERT, "props": {"": 1}})),
        "bad_request",
        ("data.changes[0].props",),
        id="insert-prop-name-empty",
    ),
    pytest.param(
        frame("comment_add", {"comment": {"id": "k-bad", "text": 5}}),
        "bad_request",
        ("data.comment.text", "string"),
        id="comment-text-number",
    ),
    pytest.param(
        frame("comment_add", {"comment": "k-bad"}),
        "bad_request",
        ("data.comment",),
        id="comment-not-object",
    ),
    pytest.param(
        frame("conflict_resolve", {"conflict_id": "c", "choice": "mine"}),
        "bad_request",
        ("data.choice",),
        id="choice-not-allowed",
    ),
    pytest.param(
        frame("conflict_dismiss", {"conflict_id": None}),
        "bad_request",
        ("data.conflict_id",),
        id="conflict_id-null",
    ),
    # missing fields
    pytest.param(
        frame("cursor_update", {}),
        "bad_request",
        ("data.position", "required"),
        id="missing-position",
    ),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1}}),
        "bad_request",
        ("data.position.y", "required"),
        id="missing-position.y",
    ),
    pytest.param(
        frame("element_active", {}), "bad_request", ("data.element_id",), id="missing-element_id"
    ),
    pytest.param(
        frame("timeline_change", {"changes": [set_op()]}),
        "bad_request",
        ("data.change_id", "required"),
        id="missing-change_id",
    ),
    pytest.param(
        frame("timeline_change", {"change_id": "bad-1"}),
        "bad_request",
        ("data.changes", "required"),
        id="missing-changes",
    ),
    pytest.param(frame("timeline_change", change()), "bad_request", ("data.changes",), id="no-ops"),
    pytest.param(
        frame("timeline_change", change({"op": "set", "element_id": "clip-1", "prop": "start"})),
        "bad_request",
        ("data.changes[0].value", "required"),
        id="missing-op-value",
    ),
    pytest.param(
        frame("timeline_change", change({"op": "insert", "element_id": "clip-2"})),
        "bad_request",
        ("data.changes[0].element_type",),
        id="missing-element_type",
    ),
    pytest.param(
        frame("timeline_change", change({"element_id": "clip-1"})),
        "bad_request",
        ("data.changes[0]", "op"),
        id="missing-op",
    ),
    pytest.param(
        frame("comment_add", {"comment": {"id": "k-bad"}}),
        "bad_request",
        ("data.comment.text", "required"),
        id="missing-comment-text",
    ),
    pytest.param(
        frame("conflict_resolve", {"conflict_id": "c"}),
        "bad_request",
        ("data.choice",),
        id="missing-choice",
    ),
    pytest.param(
        frame("conflict_resolve", {"conflict_id": "c", "choice": "custom"}),
        "bad_request",
        ("data.value",),
        id="custom-without-value",
    ),
    pytest.param(frame("live_start", {}), "bad_request", ("data.kind",), id="missing-kind"),
    # invalid values
    pytest.param(
        frame("timeline_change", change({"op": "move", "element_id": "clip-1"})),
        "bad_request",
        ("data.changes[0]", "op", "move"),
        id="op-kind-unknown",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(), {"op": 3, "element_id": "clip-1"})),
        "bad_request",
        ("data.changes[1]", "op"),
        id="op-kind-number",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(), change_id="")),
        "bad_request",
        ("data.change_id", "empty"),
        id="change_id-empty",
    ),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1, "y": 2, "track": ""}}),
        "bad_request",
        ("data.position.track",),
        id="track-empty",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(base=10**20))),
        "bad_request",
        ("data.changes[0]", "base"),
        id="op-base-over-64-bits",
    ),
    pytest.param(
        frame("timeline_change", change({"op": "delete", "element_id": "clip-1", "base": 10**25})),
        "bad_request",
        ("data.changes[0]", "base"),
        id="delete-base-over-64-bits",
    ),
    # huge strings
    pytest.param(
        frame("timeline_change", change(set_op(element_id=_LONG_ID))),
        "too_large",
        ("data.changes[0].element_id", "128"),
        id="element_id-129",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(), change_id=_LONG_ID)),
        "too_large",
        ("data.change_id", "128"),
        id="change_id-129",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(prop=_LONG_ID))),
        "too_large",
        ("data.changes[0].prop",),
        id="prop-129",
    ),
    pytest.param(
        frame("timeline_change", change({**_INSERT, "element_type": _LONG_ID})),
        "too_large",
        ("data.changes[0].element_type",),
        id="element_type-129",
    ),
    pytest.param(
        frame("element_active", {"element_id": _LONG_ID, "element_type": "clip"}),
        "too_large",
        ("data.element_id",),
        id="active-element_id-129",
    ),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1, "y": 2, "track": _LONG_ID}}),
        "too_large",
        ("data.position.track",),
        id="track-129",
    ),
    pytest.param(
        frame("comment_add", {"comment": {"id": _LONG_ID, "text": "hi"}}),
        "too_large",
        ("data.comment.id", "128"),
        id="comment-id-129",
    ),
    pytest.param(
        frame("comment_add", {"comment": {"id": "k-bad", "text": "hi", "element_id": _LONG_ID}}),
        "too_large",
        ("data.comment.element_id",),
        id="comment-element_id-129",
    ),
    pytest.param(
        frame("conflict_dismiss", {"conflict_id": _LONG_ID}),
        "too_large",
        ("data.conflict_id",),
        id="conflict_id-129",
    ),
    pytest.param(
        frame("comment_add", {"comment": {"id": "k-bad", "text": "y" * 10_001}}),
        "too_large",
        ("data.comment.text", "10000"),
        id="comment-text-10001",
    ),
    pytest.param(
        frame("timeline_change", change(*[{"op": "delete", "element_id": "g"}] * 1001)),
        "too_large",
        ("data.changes", "1000"),
        id="ops-1001",
    ),
    # deep nesting
    pytest.param(
        frame("timeline_change", change({**_INSERT, "props": {"p": nested(40)}})),
        "bad_request",
        ("data.changes[0].props", "32"),
        id="props-nested-40",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(value=nested(33)))),
        "bad_request",
        ("data.changes[0].value", "32"),
        id="value-nested-33",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(value=[nested(20, [nested(20)])]))),
        "bad_request",
        ("data.changes[0].value",),
        id="value-mixed-nesting-42",
    ),
    pytest.param(
        frame("conflict_resolve", {"conflict_id": "c", "choice": "custom", "value": nested(40)}),
        "bad_request",
        ("data.value",),
        id="resolve-value-nested-40",
    ),
    # contradicts the document
    pytest.param(
        frame("timeline_change", change(set_op(element_id="ghost"))),
        "not_found",
        ("data.changes[0].element_id", "ghost"),
        id="set-missing-element",
    ),
    pytest.param(
        frame("timeline_change", change({"op": "delete", "element_id": "ghost"})),
        "not_found",
        ("data.changes[0].element_id",),
        id="delete-missing-element",
    ),
    pytest.param(
        frame("timeline_change", change(set_op(value=5), set_op(element_id="ghost"))),
        "not_found",
        ("data.changes[1].element_id",),
        id="second-op-missing-element",
    ),
    pytest.param(
        frame(
            "timeline_change",
            change({"op": "insert", "element_id": "clip-1", "element_type": "clip"}),
        ),
        "bad_request",
        ("data.changes[0].element_id", "exists"),
        id="insert-existing-element",
    ),
    pytest.param(
        frame("timeline_change", change(_INSERT, _INSERT)),
        "bad_request",
        ("data.changes[1].element_id",),
        id="insert-twice-in-change",
    ),
    pytest.param(
        frame("timeline_change", change({"op": "delete", "element_id": "clip-1"}, set_op())),
        "bad_request",
        ("data.changes[1].element_id",),
        id="set-after-delete-in-change",
    ),
    pytest.param(
        frame("conflict_resolve", {"conflict_id": "nope", "choice": "current"}),
        "not_found",
        ("data.conflict_id",),
        id="resolve-unknown-conflict",
    ),
    pytest.param(
        frame("conflict_dismiss", {"conflict_id": "nope"}),
        "not_found",
        ("data.conflict_id",),
        id="dismiss-unknown-conflict",
    ),
    # a second hello inside a session is not an event a client may send
    pytest.param(
        frame("hello", {"token": "x", "project_id": "p1"}),
        "bad_request",
        ("hello",),
        id="second-hello",
    ),
]


@pytest.mark.parametrize(("text", "code", "fragments"), _DATA_CASES)
async def test_bad_data_is_an_error_naming_the_field_and_changes_nothing(
    clients: Clients, text: str, code: str, fragments: tuple[str, ...]
) -> None:
    assert len(text.encode()) <= MAX_FRAME
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        reply = await room.reply_to(text)
        assert_error(reply, code, *fragments)
        await room.assert_nothing_changed()
        await room.assert_session_goes_on()


async def test_bad_messages_without_ref_get_an_error_without_ref(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        reply = await room.reply_to(
            frame("cursor_update", {"position": {"x": "1", "y": 2}}, ref=None), ref=None
        )
        assert_error(reply, "bad_request", "data.position.x", ref=None)
        reply = await room.reply_to(
            frame("timeline_change", change(set_op(element_id="ghost")), ref=None), ref=None
        )
        assert_error(reply, "not_found", "data.changes[0].element_id", ref=None)
        await room.assert_nothing_changed()
        await room.assert_session_goes_on()


async def test_values_at_the_limits_are_accepted(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        alice, edge = room.alice, "i" * 128
        ack = await alice.request(
            "timeline_change",
            {
                "change_id": edge,
                "changes": [
                    {
                        "op": "insert",
                        "element_id": edge,
                        "element_type": "t" * 128,
                        "props": {"p" * 128: nested(20), "list": [nested(20)]},
                    },
                    {"op": "set", "element_id": edge, "prop": "deep", "value": nested(30)},
                ],
            },
        )
        assert ack["type"] == "ack", ack
        assert ack["data"]["status"] == "applied"
        text = "z" * 10_000
        ack = await alice.request("comment_add", {"comment": {"id": edge, "text": text}})
        assert ack["type"] == "ack", ack
        ev = await room.bob.event("comment_add", seq=3)
        assert ev["data"]["payload"]["comment"]["text"] == text
        # Limits count characters, not bytes.
        wide = "\u00e9" * 10_000
        ack = await alice.request("comment_add", {"comment": {"id": "wide", "text": wide}})
        assert ack["data"] == {"seq": 4, "status": "applied"}, ack
        reply = await alice.request(
            "comment_add", {"comment": {"id": "wider", "text": wide + "\u00e9"}}
        )
        assert_error(reply, "too_large", "data.comment.text", ref=reply["ref"])
        many = await alice.request(
            "timeline_change",
            {"change_id": "many", "changes": [set_op(value=i) for i in range(1000)]},
        )
        assert many["data"]["status"] == "applied", many
        assert (await snapshot(clients.server))["elements"]["clip-1"]["props"]["start"] == 999


async def test_change_naming_another_projects_element_is_not_found(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        carol = await clients.join("carol", project="p2", role="owner")
        ack = await carol.request(
            "timeline_change",
            change(
                {
                    "op": "insert",
                    "element_id": "p2-clip",
                    "element_type": "clip",
                    "props": {"start": 0},
                },
                change_id="p2-setup",
            ),
        )
        assert ack["data"]["seq"] == 1
        room = await Room.open(clients)
        p2_before = await snapshot(clients.server, "p2")
        for op in (
            set_op(element_id="p2-clip", base=1),
            {"op": "delete", "element_id": "p2-clip", "base": 1},
        ):
            reply = await room.reply_to(frame("timeline_change", change(op)))
            assert_error(reply, "not_found", "data.changes[0].element_id", "p2-clip")
        await room.assert_nothing_changed()
        assert await snapshot(clients.server, "p2") == p2_before
        # Nothing of p1 reached p2 either.
        assert (await carol.request("ping", {}))["type"] == "pong"
        assert [
            e
            for e in carol.inbox
            if e.get("type") == "collaboration_event"
            and e["data"].get("user_id") in ("alice", "bob")
        ] == []
        await room.assert_session_goes_on()


# -- frames -------------------------------------------------------------------------------------


async def test_binary_frame_is_bad_request_and_session_goes_on(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        await room.alice.send_raw(frame("ping", {}).encode())
        reply = await room.alice.expect_type("error")
        assert_error(reply, "bad_request", "binary", ref=None)
        await room.alice.send_raw(b"\x00\xff\xfe garbage")
        reply = await room.alice.expect_type("error")
        assert_error(reply, "bad_request", "binary", ref=None)
        await room.assert_nothing_changed()
        await room.assert_session_goes_on()


async def test_frame_of_exactly_64_kib_is_accepted(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        head, tail = '{"type":"ping","ref":7,"data":{"pad":"', '"}}'
        text = head + "p" * (MAX_FRAME - len(head) - len(tail)) + tail
        assert len(text.encode()) == MAX_FRAME
        reply = await room.reply_to(text)
        assert reply["type"] == "pong", reply
        await room.assert_session_goes_on()


@pytest.mark.parametrize("extra", [1, 100_000])
async def test_frame_over_64_kib_closes_with_1009(clients: Clients, extra: int) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        head, tail = '{"type":"comment_add","ref":7,"data":{"comment":{"id":"k","text":"', '"}}}'
        text = head + "w" * (MAX_FRAME + extra - len(head) - len(tail)) + tail
        assert len(text.encode()) == MAX_FRAME + extra
        code = None
        try:
            await room.alice.send_raw(text)
        except trio_websocket.ConnectionClosed as exc:
            # The server may close before the whole frame is sent.
            code = exc.reason.code
        if code is None:
            code = await room.alice.closed()
        assert code == 1009
        # The others go on; the oversized frame applied nothing.
        left = await room.bob.event("user_left", user_id="alice")
        assert "seq" not in left["data"]
        assert await snapshot(clients.server) == room.before
        assert (await room.bob.request("ping", {}))["type"] == "pong"


@pytest.mark.parametrize("after_hello", [True, False], ids=["in-session", "before-hello"])
@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"ping","ref":7,"data":{"t":"\xff"}}',
        b'{"type":"ping","ref":7,"data":{"t":"\xed\xa0\x80"}}',  # an encoded surrogate
        b'{"type":"ping","ref":7,"data":{"t":"\xe2\x82"}}',  # truncated sequence
        b"\xc0\xaf",  # overlong encoding
    ],
    ids=["ff", "surrogate", "truncated", "overlong"],
)
async def test_text_frame_not_utf8_closes_with_1007(
    clients: Clients, after_hello: bool, payload: bytes
) -> None:
    server = clients.server
    with trio.fail_after(TIMEOUT):
        watcher = await clients.join("bob", role="viewer")
        async with wire_client(server, clients.endpoint) as client:
            if after_hello:
                token = server.issue_token("alice", "p1", "owner")
                await client.send_text(frame("hello", {"token": token, "project_id": "p1"}, ref=1))
                while True:
                    envelopes = await client.envelopes()
                    if any(e.get("ref") == 1 for e in envelopes):
                        break
                assert [e["type"] for e in envelopes if e.get("ref") == 1] == ["welcome"]
                await watcher.event("user_joined", user_id="alice")
            await client.send_bytes(masked_frame(payload))
            while True:
                message = await client.receive()
                if isinstance(message, CloseConnection):
                    break
                # Only pushes may come before the close: no reply to the broken frame.
                assert all(e.get("ref") != REF for e in json.loads(message)), message
            assert message.code == 1007, message
        if after_hello:
            await watcher.event("user_left", user_id="alice")
        assert (await watcher.request("ping", {}))["type"] == "pong"
        assert (await snapshot(server))["seq"] == 0


# -- before hello --------------------------------------------------------------------------------


_PRE_HELLO_CASES = [
    pytest.param(frame("ping", {}), "bad_request", ("hello",), REF, id="ping"),
    pytest.param(
        frame("cursor_update", {"position": {"x": 1, "y": 2}}),
        "bad_request",
        ("hello",),
        REF,
        id="cursor_update",
    ),
    pytest.param(
        frame("timeline_change", change(set_op())),
        "bad_request",
        ("hello",),
        REF,
        id="timeline_change",
    ),
    pytest.param(frame("teleport", {}), "bad_request", ("type",), REF, id="unknown-type"),
    pytest.param("{oops", "bad_request", ("JSON",), None, id="malformed-json"),
    pytest.param("[]", "bad_request", ("object",), None, id="json-array"),
    pytest.param(
        frame("hello", {"project_id": "p1"}),
        "bad_request",
        ("data.token", "required"),
        REF,
        id="hello-without-token",
    ),
    pytest.param(
        frame("hello", {"token": 12345, "project_id": "p1"}),
        "bad_request",
        ("data.token", "string"),
        REF,
        id="hello-token-number",
    ),
    pytest.param(
        frame("hello", {"token": "t"}),
        "bad_request",
        ("data.project_id",),
        REF,
        id="hello-without-project",
    ),
    pytest.param(frame("hello", "token"), "bad_request", ("data",), REF, id="hello-data-string"),
    pytest.param(
        frame("hello", {"token": "t", "project_id": "p1", "resume": {"seq": "1"}}),
        "bad_request",
        ("data.resume.seq",),
        REF,
        id="hello-resume-seq-string",
    ),
]


@pytest.mark.parametrize(("text", "code", "fragments", "ref"), _PRE_HELLO_CASES)
async def test_message_before_hello_is_bad_request_then_close_4400(
    clients: Clients, text: str, code: str, fragments: tuple[str, ...], ref: int | None
) -> None:
    with trio.fail_after(TIMEOUT):
        watcher = await clients.join("bob", role="viewer")
        client = await clients.raw()
        await client.send_raw(text)
        assert_error(await client.next(), code, *fragments, ref=ref)
        assert await client.closed() == 4400
        await _assert_nobody_joined(clients, watcher)


async def test_binary_frame_before_hello_is_bad_request_then_close_4400(
    clients: Clients,
) -> None:
    with trio.fail_after(TIMEOUT):
        client = await clients.raw()
        await client.send_raw(b"\x01\x02")
        assert_error(await client.next(), "bad_request", "binary", ref=None)
        assert await client.closed() == 4400


async def test_hello_with_id_over_128_chars_is_refused(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        client = await clients.raw()
        token = clients.token("alice", "p1")
        await client.send_raw(frame("hello", {"token": token, "project_id": _LONG_ID}))
        reply = await client.next()
        assert reply["data"]["code"] in ("bad_request", "too_large"), reply
        assert_error(reply, reply["data"]["code"], "data.project_id")
        assert await client.closed() == 4400


async def _assert_nobody_joined(clients: Clients, watcher: RawClient) -> None:
    """No one but the watcher is a member, and no join was announced before a later one."""
    late = await clients.join("zed", role="viewer")
    await watcher.event("user_joined", user_id="zed")
    assert [e for e in watcher.inbox if e.get("type") == "collaboration_event"] == []
    users = (await late.request("users_request", {}))["data"]["users"]
    assert sorted(u["user_id"] for u in users) == ["bob", "zed"]


# -- short hello timeout --------------------------------------------------------------------------


@pytest.fixture
async def short_hello_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with open_server(make_config(tmp_path / "data", hello_timeout=0.5)) as srv:
        yield srv


async def test_no_hello_in_time_closes_with_4408(
    short_hello_server: Server, endpoint: str, nursery: trio.Nursery
) -> None:
    opened = Clients(short_hello_server, endpoint, nursery)
    try:
        await _no_hello_in_time(opened)
    finally:
        await opened.aclose()


async def _no_hello_in_time(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        client = await clients.join("alice")
        welcome = client.welcome
        started = trio.current_time()
        silent = await clients.raw()
        assert await silent.closed() == 4408
        assert 0.4 <= trio.current_time() - started < 5
        # The client that said hello in time is still served, long after the timeout.
        assert welcome["seq"] == 0
        assert (await client.request("ping", {}))["type"] == "pong"
        users = (await client.request("users_request", {}))["data"]["users"]
        assert [u["user_id"] for u in users] == ["alice"]


# -- tokens --------------------------------------------------------------------------------------


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "mallory",
        "name": "Mallory",
        "project": "p1",
        "role": "owner",
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _token(case: str, server: Server) -> str:
    match case:
        case "forged":
            return jwt.encode(_claims(), "another-secret-of-at-least-32-bytes!!", "HS256")
        case "expired":
            return server.issue_token("mallory", "p1", "owner", ttl=-120)
        case "other-project":
            return server.issue_token("mallory", "p2", "owner")
        case "garbage":
            return "not-a-jwt"
        case "alg-none":
            return jwt.encode(_claims(), None, algorithm="none")
        case "tampered":
            token = server.issue_token("mallory", "p1", "viewer")
            head, body, sig = token.split(".")
            forged_body = base64url_encode(json.dumps(_claims(role="owner")).encode()).decode()
            assert forged_body != body
            return f"{head}.{forged_body}.{sig}"
        case "unknown-role":
            return jwt.encode(_claims(role="admin"), JWT_SECRET, "HS256")
        case "no-exp":
            return jwt.encode(_claims(exp=None), JWT_SECRET, "HS256")
        case "no-project":
            return jwt.encode(_claims(project=None), JWT_SECRET, "HS256")
        case "sub-not-string":
            return jwt.encode(_claims(sub=42), JWT_SECRET, "HS256")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "forged",
        "expired",
        "other-project",
        "garbage",
        "alg-none",
        "tampered",
        "unknown-role",
        "no-exp",
        "no-project",
        "sub-not-string",
    ],
)
async def test_bad_token_is_unauthorized_then_close_4401(clients: Clients, case: str) -> None:
    with trio.fail_after(TIMEOUT):
        watcher = await clients.join("bob", role="viewer")
        client = await clients.raw()
        token = _token(case, clients.server)
        await client.send("hello", {"token": token, "project_id": "p1"}, ref=3)
        reply = await client.next()
        assert_error(reply, "unauthorized", ref=3)
        if case == "expired":
            assert "expired" in reply["data"]["message"]
        if case == "other-project":
            assert "project" in reply["data"]["message"]
        assert await client.closed() == 4401
        await _assert_nobody_joined(clients, watcher)


async def test_token_for_another_project_gives_no_access_to_it(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        carol = await clients.join("carol", project="p2", role="owner")
        await carol.request(
            "timeline_change",
            change(
                {"op": "insert", "element_id": "secret", "element_type": "clip", "props": {"v": 1}},
                change_id="s",
            ),
        )
        client = await clients.raw()
        await client.send(
            "hello", {"token": clients.token("mallory", "p1", "owner"), "project_id": "p2"}, ref=1
        )
        assert_error(await client.next(), "unauthorized", ref=1)
        assert await client.closed() == 4401
        assert (await carol.request("ping", {}))["type"] == "pong"
        assert [
            e
            for e in carol.inbox
            if e.get("type") == "collaboration_event" and e["data"].get("user_id") == "mallory"
        ] == []


# -- repeated abuse ------------------------------------------------------------------------------


@pytest.fixture
async def strict_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with open_server(make_config(tmp_path / "data", abuse_errors=5)) as srv:
        yield srv


async def test_repeated_bad_input_closes_with_4429_and_only_that_session(
    strict_server: Server, endpoint: str, nursery: trio.Nursery
) -> None:
    opened = Clients(strict_server, endpoint, nursery)
    try:
        with trio.fail_after(TIMEOUT):
            abuser = await opened.join("mallory", role="owner")
            polite = await opened.join("bob", role="viewer")
            # Valid traffic never counts, however much of it there is.
            for i in range(50):
                assert (await polite.request("ping", {"t": i}))["type"] == "pong"
            for ref in range(1, 6):
                await abuser.send_raw(frame("timeline_change", change(set_op("ghost")), ref=ref))
                reply = await abuser.expect(lambda env, ref=ref: env.get("ref") == ref)
                assert_error(reply, "not_found", "data.changes[0].element_id", ref=ref)
            await abuser.send_raw("{not json")
            assert await abuser.closed() == 4429
            await polite.event("user_left", user_id="mallory")
            assert (await polite.request("ping", {}))["type"] == "pong"
            assert (await snapshot(strict_server))["seq"] == 0
    finally:
        await opened.aclose()


# -- what reaches others is what was validated -----------------------------------------------------


async def test_unknown_keys_are_neither_relayed_nor_stored(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        room = await Room.open(clients)
        alice, bob = room.alice, room.bob
        ack = await alice.request(
            "cursor_update", {"position": {"x": 1, "y": 2, "html": "<script>"}, "user_id": "bob"}
        )
        assert ack["type"] == "ack", ack
        cursor = await bob.event("cursor_update")
        assert cursor["data"]["user_id"] == "alice"
        assert cursor["data"]["payload"] == {"position": {"x": 1.0, "y": 2.0}}
        ack = await alice.request(
            "timeline_change",
            {
                "change_id": "c-extra",
                "seq": 99,
                "changes": [
                    {**set_op(value=3, base=1), "writer": "bob", "html": "<b>"},
                    {
                        "op": "insert",
                        "element_id": "clip-2",
                        "element_type": "clip",
                        "props": {"a": 1},
                        "versions": {"a": 99},
                    },
                ],
            },
        )
        assert ack["data"]["seq"] == 2, ack
        ev = await bob.event("timeline_change", seq=2)
        assert ev["data"]["user_id"] == "alice"
        assert ev["data"]["payload"] == {
            "change_id": "c-extra",
            "changes": [
                {"op": "set", "element_id": "clip-1", "prop": "start", "value": 3, "base": 1},
                {"op": "insert", "element_id": "clip-2", "element_type": "clip", "props": {"a": 1}},
            ],
        }
        snap = await snapshot(clients.server)
        assert snap["seq"] == 2
        assert snap["versions"] == {"clip-1": {"start": 2, "title": 1}, "clip-2": {"a": 2}}
        ack = await alice.request(
            "comment_add", {"comment": {"id": "k1", "text": "hi", "user_id": "bob", "seq": 1}}
        )
        assert ack["data"] == {"seq": 3, "status": "applied"}, ack
        ev = await bob.event("comment_add", seq=3)
        assert ev["data"]["user_id"] == "alice"
        assert ev["data"]["payload"] == {"comment": {"id": "k1", "text": "hi"}}


# -- fragmented frames -----------------------------------------------------------------------------


async def _hello_over_wire(client: WireClient, server: Server) -> None:
    token = server.issue_token("alice", "p1", "owner")
    await client.send_text(frame("hello", {"token": token, "project_id": "p1"}, ref=1))
    while True:
        envelopes = await client.envelopes()
        if any(e.get("ref") == 1 for e in envelopes):
            assert [e["type"] for e in envelopes if e.get("ref") == 1] == ["welcome"]
            return


async def test_character_split_across_fragments_is_valid_utf8(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        async with wire_client(clients.server, clients.endpoint) as client:
            await _hello_over_wire(client, clients.server)
            raw = json.dumps(
                {
                    "type": "comment_add",
                    "ref": REF,
                    "data": {"comment": {"id": "k1", "text": "caf\u00e9 \U0001f3ac"}},
                },
                ensure_ascii=False,
            ).encode()
            cut = raw.index("\U0001f3ac".encode()) + 2  # inside the four-byte character
            await client.send_bytes(masked_frame(raw[:cut], opcode=0x1, fin=False))
            await client.send_bytes(masked_frame(raw[cut:], opcode=0x0, fin=True))
            received: list[dict[str, Any]] = []
            while not any(e.get("type") == "collaboration_event" for e in received):
                received += await client.envelopes()
            replies = [e for e in received if e.get("ref") == REF]
            assert [e["type"] for e in replies] == ["ack"], received
            assert replies[0]["data"] == {"seq": 1, "status": "applied"}
            (event,) = [e for e in received if e.get("type") == "collaboration_event"]
            assert event["data"]["payload"]["comment"]["text"] == "caf\u00e9 \U0001f3ac"


async def test_fragmented_message_over_64_kib_closes_with_1009(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        watcher = await clients.join("bob", role="viewer")
        async with wire_client(clients.server, clients.endpoint) as client:
            await _hello_over_wire(client, clients.server)
            await watcher.event("user_joined", user_id="alice")
            head = b'{"type":"comment_add","ref":7,"data":{"comment":{"id":"k","text":"'
            await client.send_bytes(masked_frame(head, opcode=0x1, fin=False))
            for _ in range(3):  # each fragment is small; the message is not
                await client.send_bytes(masked_frame(b"f" * 30_000, opcode=0x0, fin=False))
            await client.send_bytes(masked_frame(b'"}}}', opcode=0x0, fin=True))
            while True:
                message = await client.receive()
                if isinstance(message, CloseConnection):
                    break
                assert all(e.get("ref") != REF for e in json.loads(message)), message
            assert message.code == 1009, message
        await watcher.event("user_left", user_id="alice")
        assert (await snapshot(clients.server))["seq"] == 0


# -- other projects' ids ---------------------------------------------------------------------------


@pytest.mark.chain("manual")
async def test_conflict_of_another_project_is_not_found(clients: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        carol = await clients.join("carol", project="p2", role="owner")
        dave = await clients.join("dave", project="p2", role="editor")
        await carol.request(
            "timeline_change",
            change(
                {"op": "insert", "element_id": "x", "element_type": "clip", "props": {"v": 0}},
                change_id="p2-1",
            ),
        )
        await carol.request(
            "timeline_change", change(set_op("x", "v", 1, base=1), change_id="p2-2")
        )
        ack = await dave.request(
            "timeline_change", change(set_op("x", "v", 2, base=1), change_id="p2-3")
        )
        (conflict_id,) = ack["data"]["conflicts"]
        room = await Room.open(clients)
        for text in (
            frame(
                "conflict_resolve", {"conflict_id": conflict_id, "choice": "custom", "value": 666}
            ),
            frame("conflict_dismiss", {"conflict_id": conflict_id}),
        ):
            reply = await room.reply_to(text)
            assert_error(reply, "not_found", "data.conflict_id")
        await room.assert_nothing_changed()
        # The conflict is still pending in its own project, which did not move.
        late = await clients.join("late", project="p2", role="viewer")
        assert [c["id"] for c in late.welcome["pending_conflicts"]] == [conflict_id]
        assert late.welcome["seq"] == 2
        assert [e for e in carol.inbox if e.get("type") == "conflict_resolved"] == []


async def test_rest_snapshot_refuses_bad_tokens_and_other_projects(server: Server) -> None:
    with trio.fail_after(TIMEOUT):
        url = f"{server.http_url}/api/projects/p2/snapshot"
        cases = {
            "none": ({}, 401),
            "not-bearer": ({"Authorization": "Basic abc"}, 401),
            "garbage": ({"Authorization": "Bearer not-a-jwt"}, 401),
            "forged": ({"Authorization": "Bearer " + _token("forged", server)}, 401),
            "expired": ({"Authorization": "Bearer " + _token("expired", server)}, 401),
            "other-project": (
                {"Authorization": "Bearer " + server.issue_token("mallory", "p1", "owner")},
                403,
            ),
        }
        async with httpx.AsyncClient(timeout=5) as http:
            for name, (headers, status) in cases.items():
                response = await http.get(url, headers=headers)
                assert response.status_code == status, (name, response.text)
                error = response.json()["error"]
                assert error["code"] == ("unauthorized" if status == 401 else "forbidden")
                assert error["message"], name


@pytest.mark.chain("manual")
async def test_rest_bodies_refuse_integers_beyond_64_bits_and_oversized_bodies_in_json(
    clients: Clients,
) -> None:
    """REST bodies get the WebSocket's rules: an integer orjson would turn into a float is
    refused naming where it is (nothing applied); a body over the HTTP app's limit gets the JSON
    error envelope, not an HTML page."""
    server = clients.server
    with trio.fail_after(TIMEOUT):
        alice = await clients.join("alice")
        bob = await clients.join("bob")
        ins = {"op": "insert", "element_id": "c1", "element_type": "clip", "props": {"start": 1}}
        await alice.request("timeline_change", change(ins, change_id="c1"))
        await alice.request(
            "timeline_change", change(set_op("c1", value=2, base=1), change_id="c2")
        )
        ack = await bob.request("timeline_change", change(set_op("c1", value=3, base=1),
                                                          change_id="c3"))  # fmt: skip
        (conflict_id,) = ack["data"]["conflicts"]
        owner = server.issue_token("olga", "p1", "owner")
        headers = {"Authorization": f"Bearer {owner}", "Content-Type": "application/json"}
        path = f"{server.http_url}/api/collaboration/conflicts/{conflict_id}/resolve?projectId=p1"
        async with httpx.AsyncClient(timeout=5) as http:
            huge = await http.post(
                path,
                headers=headers,
                content=b'{"choice": "custom", "value": 99999999999999999999}',
            )
            top = await http.post(path, headers=headers, content=b"[18446744073709551616]")
        # Announced over the limit: refused from the headers, before any body is read (a raw
        # request, so no client is left holding a body it could not send).
        status, body = await _raw_post(
            server, path.split(str(server.http_port), 1)[1], headers, length=1 << 21
        )
    assert huge.status_code == 400, huge.text
    assert huge.json()["error"]["code"] == "bad_request"
    assert huge.json()["error"]["message"].startswith("body.value: integer out of range")
    assert top.status_code == 400
    assert top.json()["error"]["message"].startswith("body[0]: integer out of range")
    assert status == 413
    assert json.loads(body)["error"] == {"code": "too_large",
                                         "message": "body: larger than 1048576 bytes"}  # fmt: skip
    assert (await snapshot(server))["elements"]["c1"]["props"]["start"] == 2  # nothing applied


async def _raw_post(
    server: Server, target: str, headers: dict[str, str], *, length: int
) -> tuple[int, bytes]:
    """POST with ``Content-Length: length`` and no body; the status and body of the answer."""
    lines = [f"POST {target} HTTP/1.1", f"Host: 127.0.0.1:{server.http_port}",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    async with await trio.open_tcp_stream("127.0.0.1", server.http_port) as stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some()
            assert chunk, received
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        size = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")))  # fmt: skip
        while len(body) < size:
            chunk = await stream.receive_some()
            assert chunk, body
            body += chunk
    return int(head.split(b" ", 2)[1]), body


async def test_websocket_upgrade_to_an_unknown_path_is_404_and_the_server_goes_on(
    server: Server, clients: Clients
) -> None:
    """Not the 500 of a 404 handler that looked for an HTTP request in a WebSocket's context."""
    upgrade = (b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    with trio.fail_after(10):
        for port in (server.http_port, server.ws_port):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(upgrade)
                response = b""
                while chunk := await stream.receive_some(65536):
                    response += chunk
                    if b"\r\n\r\n" in response and port == server.ws_port:
                        break
            assert response.startswith(b"HTTP/1.1 404"), (port, response[:200])
            if port == server.http_port:
                assert b"no WebSocket endpoint at /nope" in response, response
        await clients.join("after")
