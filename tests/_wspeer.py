"""A WebSocket client end for ``check_connection``: wsproto over a trio stream, every frame in
the test's hands (it reads only when asked, sends any size, closes with any code, vanishes)."""

from __future__ import annotations

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from crealia import ConnectionClosed
from crealia.testing import ConnectionPeer


class WebSocketPeer(ConnectionPeer):
    """The client side of one WebSocket, for :func:`crealia.testing.check_connection`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._send_lock = trio.Lock()
        self._parts: list[str | bytes] = []
        self._ended: ConnectionClosed | None = None
        self._pending: list[object] = []

    @classmethod
    async def connect(cls, port: int, path: str = "/ws") -> WebSocketPeer:
        """Open a WebSocket to ``ws://127.0.0.1:port/path`` (the handshake done)."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        peer = cls(stream)
        await peer._write(Request(host=f"127.0.0.1:{port}", target=path))
        while True:
            for event in await peer._events():
                if isinstance(event, AcceptConnection):
                    return peer
                if isinstance(event, RejectConnection):
                    raise AssertionError(f"handshake refused: {event.status_code}")
                peer._pending.append(event)

    async def _write(self, event: object) -> None:
        async with self._send_lock:
            await self._stream.send_all(self._ws.send(event))  # type: ignore[arg-type]

    async def _events(self) -> list[object]:
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        try:
            self._ws.receive_data(data or None)
            return list(self._ws.events())
        except RemoteProtocolError as exc:
            raise self._end(ConnectionClosed(1002, f"protocol error: {exc}")) from exc

    def _end(self, closed: ConnectionClosed) -> ConnectionClosed:
        if self._ended is None:
            self._ended = closed
        return self._ended

    async def send(self, message: str | bytes) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(message)
        await self._write(event)

    async def receive(self) -> str | bytes:
        while self._ended is None:
            events = await self._events()
            for i, event in enumerate(events):
                if isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self._pending = events[i + 1 :] + self._pending
                        parts, self._parts = self._parts, []
                        if isinstance(parts[0], str):
                            return "".join(str(p) for p in parts)
                        return b"".join(bytes(p) for p in parts)  # type: ignore[arg-type]
                elif isinstance(event, Ping):
                    await self._write(event.response())
                elif isinstance(event, CloseConnection):
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._write(event.response())
                    raise self._end(ConnectionClosed(event.code, event.reason or ""))
            if not events:
                raise self._end(ConnectionClosed(None, "the connection ended without a close"))
        raise self._ended

    async def close(self, code: int) -> None:
        await self._write(CloseConnection(code=code))

    async def vanish(self) -> None:
        await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()
