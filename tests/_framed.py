"""A test-only client transport: length-prefixed frames over plain TCP.

Written against crealia's public API only (``crealia``, ``crealia.abc``, ``crealia.testing``),
as a third party would write one, to show that a new transport touches no core module
(tests/test_transport_contract.py checks its imports too).

A frame is one kind byte, a 4-byte big-endian length, and that many bytes:

- ``T``: a text message (UTF-8);
- ``B``: a binary message;
- ``C``: a close: a 2-byte big-endian close code, then the reason (UTF-8).

Either side closes by sending ``C``; the other answers with ``C`` and both drop TCP.
"""

from __future__ import annotations

import contextlib
from functools import partial

import trio

from crealia import Acceptor, ConnectionClosed
from crealia.abc import Connection, Transport
from crealia.testing import ConnectionPeer

TEXT, BINARY, CLOSE = b"T", b"B", b"C"
#: What a stream raises once the other side is gone or it was closed here.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_KINDS = (TEXT, BINARY, CLOSE)
#: Longest close reason sent, in characters.
_MAX_REASON = 120
#: A close frame carries at most a code and a short reason.
_MAX_CLOSE_FRAME = 2 + 4 * _MAX_REASON


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + len(payload).to_bytes(4, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(CLOSE, code.to_bytes(2, "big") + reason[:_MAX_REASON].encode())


class _FrameTooBig(Exception):
    pass


class _BadFrame(Exception):
    pass


class _Reader:
    """Frames out of a byte stream; what a cancelled read had received stays buffered."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_payload: int | None) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max = max_payload

    async def next(self) -> tuple[bytes, bytes] | None:
        """The next (kind, payload), or None at the end of the stream."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data

    def _parse(self) -> tuple[bytes, bytes] | None:
        if len(self._buffer) < 5:
            return None
        kind, length = bytes(self._buffer[:1]), int.from_bytes(self._buffer[1:5], "big")
        if kind not in _KINDS:
            raise _BadFrame(f"unknown frame kind {kind!r}")
        limit = _MAX_CLOSE_FRAME if kind == CLOSE else self._max
        # A text message's limit counts characters: a UTF-8 character is at most 4 bytes.
        if limit is not None and length > (4 * limit if kind == TEXT else limit):
            raise _FrameTooBig
        if len(self._buffer) < 5 + length:
            return None
        payload = bytes(self._buffer[5 : 5 + length])
        del self._buffer[: 5 + length]
        return kind, payload


def _close_of(payload: bytes) -> ConnectionClosed:
    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    return ConnectionClosed(code, payload[2:].decode(errors="replace"))


class FramedConnection(Connection):
    """The server side of one framed TCP connection."""

    def __init__(self, stream: trio.SocketStream, max_frame_bytes: int, remote: str) -> None:
        self._stream = stream
        self._reader = _Reader(stream, max_frame_bytes)
        self._limit = max_frame_bytes
        self._send_lock = trio.Lock()
        self._closed: ConnectionClosed | None = None
        self._receiving = False
        self.remote = remote
        self.user_agent = "framed-tcp"

    async def receive(self) -> str | bytes:
        if self._closed is not None:
            raise self._closed
        failure: tuple[int, str] | None = None
        self._receiving = True
        try:
            parsed = await self._reader.next()
        except _FrameTooBig:
            parsed, failure = None, (1009, "message too big")
        except _BadFrame as exc:
            parsed, failure = None, (1002, str(exc))
        except _GONE as exc:
            raise self._gone(ConnectionClosed(None, "connection lost")) from exc
        finally:
            self._receiving = False
        text = ""
        if parsed is not None and parsed[0] == TEXT:
            try:
                text = parsed[1].decode()
            except UnicodeDecodeError:
                failure = (1007, "invalid UTF-8")
            if len(text) > self._limit:
                failure = (1009, "message too big")
        if failure is not None:
            await self.close(*failure)
            raise ConnectionClosed(*failure)
        if parsed is None:
            raise self._gone(ConnectionClosed(None, "the client went away without a close"))
        kind, payload = parsed
        if kind == BINARY:
            return payload
        if kind == CLOSE:
            closed = self._gone(_close_of(payload))
            with trio.move_on_after(1), contextlib.suppress(*_GONE):
                await self._write(close_frame(closed.code or 1000))
            await self._drop()
            raise closed
        return text

    def _gone(self, closed: ConnectionClosed) -> ConnectionClosed:
        if self._closed is None:
            self._closed = closed
        return self._closed

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send(self, frame_bytes: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        try:
            await self._write(frame(TEXT, frame_bytes))
        except _GONE as exc:
            raise self._gone(ConnectionClosed(None, "connection lost")) from exc
        if self._closed is not None:
            raise self._closed  # closed while this frame waited for the lock

    async def close(self, code: int, reason: str = "") -> None:
        if self._closed is not None:
            await self._drop()
            return
        self._closed = ConnectionClosed(code, reason)
        try:
            await self._write(close_frame(code, reason))
            await self._stream.send_eof()
            if not self._receiving:
                # Until the client answers: closing with its data unread would reset the
                # connection, which can destroy the close frame before it is read.
                with trio.move_on_after(2):
                    while await self._stream.receive_some(65536):
                        pass
        except _GONE:
            pass
        finally:
            await self._drop()

    async def abort(self) -> None:
        self._gone(ConnectionClosed(None, "aborted"))
        await self._drop()

    async def _drop(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()  # wakes a send or receive blocked on it


class FramedTransport(Transport):
    """Serves framed TCP on ``host:port`` (0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port

    async def serve(
        self,
        acceptor: Acceptor,
        *,
        task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(self._handle, acceptor), self.port, host=self.host)
            )
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _handle(self, acceptor: Acceptor, stream: trio.SocketStream) -> None:
        address = str(stream.socket.getpeername()[0])
        refused = acceptor.admit(stream, address)
        if refused is not None:
            with trio.move_on_after(1):
                await stream.send_all(close_frame(1013, refused))
            await stream.aclose()
            return
        conn = FramedConnection(stream, acceptor.max_frame_bytes, address)
        try:
            if not acceptor.accepting:
                await conn.close(1001, "server shutting down")
                return
            await acceptor.serve(conn)
        finally:
            acceptor.release(stream)
            await conn.abort()


class FramedClient(ConnectionPeer):
    """The client side: a :class:`~crealia.testing.ConnectionPeer`, and a protocol client."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._reader = _Reader(stream, None)
        self._send_lock = trio.Lock()
        self._closed: ConnectionClosed | None = None

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> FramedClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self._write(frame(TEXT, message.encode()))
        else:
            await self._write(frame(BINARY, message))

    async def receive(self) -> str | bytes:
        if self._closed is not None:
            raise self._closed
        try:
            parsed = await self._reader.next()
        except _GONE:
            parsed = None
        if parsed is None:
            self._closed = ConnectionClosed(None, "the server went away without a close")
            raise self._closed
        kind, payload = parsed
        if kind == CLOSE:
            self._closed = _close_of(payload)
            with trio.move_on_after(1), contextlib.suppress(*_GONE):
                await self._write(close_frame(self._closed.code or 1000))
            await self._stream.aclose()
            raise self._closed
        return payload if kind == BINARY else payload.decode()

    async def close(self, code: int) -> None:
        await self._write(close_frame(code))

    async def vanish(self) -> None:
        await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()
