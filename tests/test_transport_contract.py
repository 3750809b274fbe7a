"""A transport written in tests/ against the public API (tests/_framed.py) passes
``check_connection`` and serves real sessions beside the WebSocket endpoints: adding a transport
touches no core module.

Policy: loopback only, port 0, a deadline on every test.
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import crealia
import crealia.abc
import crealia.testing
from crealia import ConnectionClosed, Server, open_server
from crealia.abc import Connection
from crealia.testing import ConnectionCatcher, ConnectionPeer, check_connection

from ._framed import FramedClient, FramedTransport
from .conftest import make_config, opened

LIMIT = 4096


@asynccontextmanager
async def framed_pair() -> AsyncIterator[tuple[Connection, ConnectionPeer]]:
    catcher = ConnectionCatcher(max_frame_bytes=LIMIT)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(FramedTransport().serve, catcher.acceptor)
        assert port is not None
        client = await FramedClient.connect(port)
        try:
            yield await catcher.accept(), client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_transport_framed_keeps_the_connection_contract() -> None:
    await check_connection(framed_pair, max_frame_bytes=LIMIT)


def test_transport_framed_uses_only_the_public_api() -> None:
    source = (Path(__file__).parent / "_framed.py").read_text()
    public = {"crealia", "crealia.abc", "crealia.testing"}
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            used.add(node.module)
        elif isinstance(node, ast.Import):
            used.update(alias.name for alias in node.names)
    assert {m for m in used if m.split(".")[0] == "crealia"} == public


class Framed:
    """A protocol client over the framed transport: JSON envelopes in, lists of them out."""

    def __init__(self, client: FramedClient) -> None:
        self.client = client
        self.inbox: list[dict[str, Any]] = []

    async def send(self, kind: str, data: Any, ref: int | None = None) -> None:
        envelope: dict[str, Any] = {"type": kind, "data": data}
        if ref is not None:
            envelope["ref"] = ref
        await self.client.send(orjson.dumps(envelope).decode())

    async def expect(self, type_: str, **match: Any) -> dict[str, Any]:
        """The first envelope of type ``type_`` whose data matches (others are kept)."""
        while True:
            for i, envelope in enumerate(self.inbox):
                data = envelope.get("data", {})
                if envelope["type"] == type_ and all(data.get(k) == v for k, v in match.items()):
                    return self.inbox.pop(i)
            value = orjson.loads(await self.client.receive())
            self.inbox.extend(value if isinstance(value, list) else [value])


async def framed_session(server: Server, port: int, user: str) -> Framed:
    framed = Framed(await FramedClient.connect(port))
    token = server.issue_token(user, "p1", "editor")
    await framed.send("hello", {"token": token, "project_id": "p1"}, ref=1)
    welcome = await framed.expect("welcome")
    assert welcome["ref"] == 1 and welcome["data"]["user"]["id"] == user
    return framed


def insert(change_id: str, element_id: str) -> dict[str, Any]:
    op = {"op": "insert", "element_id": element_id, "element_type": "clip", "props": {"start": 1}}
    return {"change_id": change_id, "changes": [op]}


async def test_transport_framed_serves_sessions_beside_websockets(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    transport = FramedTransport()
    with trio.fail_after(20):
        async with open_server(make_config(tmp_path), transports=[transport]) as server:
            port = server.transport_ports[transport]
            assert port is not None and port not in (server.ws_port, server.http_port)
            framed = await framed_session(server, port, "fran")
            async with opened(server, nursery) as clients:
                ws = await clients.join("wes")
                # An edit over the framed transport: acked, fanned out to the WebSocket.
                await framed.send("timeline_change", insert("c1", "clip1"), ref=2)
                ack = await framed.expect("ack")
                assert ack["ref"] == 2 and ack["data"]["status"] == "applied", ack
                event = await ws.event("timeline_change")
                assert event["data"]["seq"] == ack["data"]["seq"]
                assert event["data"]["user_id"] == "fran"
                # And the other way round.
                reply = await ws.request("timeline_change", insert("c2", "clip2"))
                assert reply["type"] == "ack", reply
                pushed = await framed.expect("collaboration_event", kind="timeline_change",
                                             user_id="wes")  # fmt: skip
                assert pushed["data"]["seq"] == reply["data"]["seq"]
                assert "fran" in {u["user_id"] for u in ws.welcome["users"]}
            # Leaving the server closes the framed session with 1001, like any other.
            async with trio.open_nursery() as waiting:
                closed: list[ConnectionClosed] = []

                async def read_to_close() -> None:
                    try:
                        while True:
                            await framed.client.receive()
                    except ConnectionClosed as exc:
                        closed.append(exc)

                waiting.start_soon(read_to_close)
                await server.aclose()
            assert closed[0].code == 1001, closed


async def test_transport_framed_goes_through_the_gate(tmp_path: Path) -> None:
    transport = FramedTransport()
    config = make_config(tmp_path, max_connections_per_address=1)
    with trio.fail_after(20):
        async with open_server(config, transports=[transport]) as server:
            port = server.transport_ports[transport]
            assert port is not None
            first = await framed_session(server, port, "fran")
            second = await FramedClient.connect(port)
            with pytest.raises(ConnectionClosed) as refused:
                await second.receive()
            assert (refused.value.code, refused.value.reason) == (
                1013, "too many connections from your address (at most 1)"
            )  # fmt: skip
            assert server.hub.gate.refused["address"] == 1
            await first.client.aclose()
            await second.aclose()


def test_transport_contract_is_exported() -> None:
    assert {"Connection", "Transport"} <= set(crealia.abc.__all__)
    assert {"Acceptor", "ConnectionClosed", "HandshakeRefusal"} <= set(crealia.__all__)
    assert {"ConnectionCatcher", "ConnectionPeer", "check_connection"} <= set(
        crealia.testing.__all__
    )
