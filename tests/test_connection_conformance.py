"""``check_connection`` over both WebSocket endpoints: the fast path (trio-websocket) and the
``/ws`` route in hypercorn, each run as the server runs it but with a ConnectionCatcher in place
of the hub; proof that the check catches a connection that breaks the contract; and what the
contract buys a real server.

Policy: loopback only, port 0, every check under ``check_connection``'s own deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import hypercorn.config
import orjson
import pytest
import trio

from crealia import ConnectionClosed, open_server
from crealia._edge import ConnectionGate, edge_app, serve_http
from crealia._origin import HostPolicy
from crealia.abc import Connection
from crealia.testing import ConnectionCatcher, ConnectionFactory, ConnectionPeer, check_connection
from crealia.transports._asgi import Receive, Scope, Send, websocket_route
from crealia.transports._trio_ws import TrioWebSocketTransport

from ._wspeer import WebSocketPeer
from .conftest import Clients, make_config

LIMIT = 4096

Pair = tuple[Connection, ConnectionPeer]


@asynccontextmanager
async def fast_path_pair() -> AsyncIterator[Pair]:
    catcher = ConnectionCatcher(max_frame_bytes=LIMIT)
    async with trio.open_nursery() as nursery:
        transport = TrioWebSocketTransport("127.0.0.1", 0)
        port = await nursery.start(transport.serve, catcher.acceptor)
        assert port is not None
        peer = await WebSocketPeer.connect(port)
        try:
            yield await catcher.accept(), peer
        finally:
            await peer.aclose()
            nursery.cancel_scope.cancel()


async def _nothing_else(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the route: lifespan, and 404 for everything else."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def asgi_pair() -> AsyncIterator[Pair]:
    """The route behind the edge, in hypercorn, as crealia._server serves it."""
    catcher = ConnectionCatcher(max_frame_bytes=LIMIT)
    gate = ConnectionGate()
    catcher.acceptor.gate = gate
    config = hypercorn.config.Config()
    # What configure_hypercorn sets, without its process-wide deflate patch (never offered here).
    config.websocket_max_message_size = LIMIT
    config.accesslog = None
    config.graceful_timeout = 0.5
    app = edge_app(websocket_route(catcher.acceptor, _nothing_else), hosts=HostPolicy(),
                   header_timeout=10, body_timeout=10, gate=gate)  # fmt: skip
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_http, app, config, gate, "127.0.0.1", 0, header_timeout=10,
                        shutdown_trigger=stop.wait)  # fmt: skip
        port = await nursery.start(serve)
        peer = await WebSocketPeer.connect(port)
        try:
            yield await catcher.accept(), peer
        finally:
            await peer.aclose()
            nursery.cancel_scope.cancel()


async def test_connection_fast_path_keeps_the_contract() -> None:
    await check_connection(fast_path_pair, max_frame_bytes=LIMIT)


async def test_connection_asgi_route_keeps_the_contract() -> None:
    # hypercorn 0.18 tells the app 1006 for every close the client starts.
    await check_connection(asgi_pair, max_frame_bytes=LIMIT, peer_close_codes=False)


# -- the check fails on connections that break the contract ------------------------------


class _Wrapped(Connection):
    """Delegates to a real connection; subclasses break one rule."""

    def __init__(self, inner: Connection) -> None:
        self.inner = inner
        self.remote = inner.remote
        self.user_agent = inner.user_agent

    async def receive(self) -> str | bytes:
        return await self.inner.receive()

    async def send(self, frame: bytes) -> None:
        await self.inner.send(frame)

    async def close(self, code: int, reason: str = "") -> None:
        await self.inner.close(code, reason)

    async def abort(self) -> None:
        await self.inner.abort()


class _TextAsBytes(_Wrapped):
    async def receive(self) -> str | bytes:
        message = await self.inner.receive()
        return message.encode() if isinstance(message, str) else message


class _AlwaysNormalClose(_Wrapped):
    async def close(self, code: int, reason: str = "") -> None:
        await self.inner.close(1000, reason)


class _CloseRaisesWhenClosed(_Wrapped):
    closed = False

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            raise ConnectionClosed(code, "already closed")
        self.closed = True
        await self.inner.close(code, reason)


class _SendAfterCloseIgnored(_Wrapped):
    closed = False

    async def send(self, frame: bytes) -> None:
        if not self.closed:
            await self.inner.send(frame)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = True
        await self.inner.close(code, reason)


class _UnboundedSend(_Wrapped):
    """Buffers big frames without limit instead of ever blocking."""

    def __init__(self, inner: Connection) -> None:
        super().__init__(inner)
        self.queue: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        if len(frame) < 8192:
            await self.inner.send(frame)
            return
        self.queue.append(frame)
        await trio.lowlevel.checkpoint()


def broken(wrapper: Callable[[Connection], Connection]) -> ConnectionFactory:
    @asynccontextmanager
    async def pair() -> AsyncIterator[Pair]:
        async with fast_path_pair() as (conn, peer):
            yield wrapper(conn), peer

    return pair


@pytest.mark.parametrize(
    ("wrapper", "rule"),
    [
        (_TextAsBytes, "text_both_ways: receive of the client's text message 0: expected str"),
        (_AlwaysNormalClose, "close_delivers_code: close(4321): the client got close code 1000"),
        (_CloseRaisesWhenClosed, "close_delivers_code: a second close raised"),
        (
            _SendAfterCloseIgnored,
            "close_delivers_code: send after close: expected ConnectionClosed",
        ),
        (_UnboundedSend, "cancelled_send_then_abort: 4096 sends of 16384 characters"),
    ],
)
async def test_connection_check_fails_a_broken_connection(
    wrapper: Callable[[Connection], Connection], rule: str
) -> None:
    with pytest.raises(AssertionError) as failure:
        await check_connection(broken(wrapper), max_frame_bytes=LIMIT)
    assert str(failure.value).startswith(f"check_connection: {rule}"), failure.value


# -- what the contract buys: a send that cannot be cancelled is aborted -------------------


async def test_connection_client_that_stops_reading_is_aborted_after_4409(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    """hypercorn shields its socket writes, so on the HTTP app's endpoint the session's writer
    could not be cancelled: before, a client that stopped reading kept its session (and the
    server's shutdown) waiting forever after its 4409. Now the core aborts the connection
    when a send outlives the close deadline."""
    config = make_config(tmp_path, outbox_frames=64, outbox_bytes=1024 * 1024,
                         close_timeout=0.5, rate_limits={"comment": "off"})  # fmt: skip
    with trio.fail_after(30):
        async with open_server(config) as server:
            clients = Clients(server, endpoint, nursery)
            writer = await clients.join("writer")
            port = server.ws_port if endpoint == "ws" else server.http_port
            stalled = await WebSocketPeer.connect(port)
            token = server.issue_token("stalled", "p1", "viewer")
            hello = {"type": "hello", "ref": 1, "data": {"token": token, "project_id": "p1"}}
            await stalled.send(orjson.dumps(hello).decode())
            assert orjson.loads(await stalled.receive())["type"] == "welcome"
            room = server.hub.rooms.rooms["p1"]
            session = next(s for s in room.sessions.values() if s.user.id == "stalled")
            sent = 0
            while session.close_code is None:  # it reads nothing from here on
                sent += 1
                assert sent < 5000, "the stalled client was never cut off"
                comment = {"id": f"k{sent}", "text": "x" * 9000}
                ack = await writer.request("comment_add", {"comment": comment})
                assert ack["type"] == "ack", ack
                writer.inbox.clear()
            assert session.close_code == 4409
            with trio.move_on_after(10):  # close_timeout is 0.5 s
                await session.ended.wait()
            ended = session.ended.is_set()
            # The client going away frees a stuck send: the server can stop even when broken.
            await stalled.aclose()
            assert ended, "the session of a client that stopped reading never ended"
            assert session.id not in room.sessions
            await clients.aclose()
