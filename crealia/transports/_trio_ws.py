"""The fast-path client transport: trio-websocket on its own port.

It reaches into trio-websocket 0.12's internals in four places, pinned by setup.cfg (``<0.13``):
writing frames straight to the socket under the connection's own send lock, closing the TCP
stream that trio-websocket leaves open when the peer closed first (both checked when a
connection is wrapped), reading the handshake's ``Host`` (for the Origin check: a request
without it can only come from an allow-listed origin or none), and naming the accepted stream
to the connection gate (a trusted proxy's connection counts against its client's address once
the handshake's ``X-Forwarded-For`` has said whose it is).

:class:`TrioWebSocketTransport` is a :class:`~crealia._transport.Transport` like any other: the
server runs it with the same :class:`~crealia._transport.Acceptor` it gives every transport.
Each accepted WebSocket is wrapped in a :class:`TrioWebSocketConnection` and handed to the
acceptor in the handler nursery that trio-websocket gives it. trio-websocket enforces the frame
limit (close 1009) and wsproto the UTF-8 validity of text frames (close 1007); permessage-deflate
is negotiated when offered (:mod:`crealia.transports._deflate`).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket as _socket
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import TextMessage

from .._echo import ECHO_PATH, SUBPROTOCOL_REFUSED
from .._edge import ConnectionGate, GatedListener
from .._errors import ConnectionClosed
from .._lag import unacked_bytes
from .._origin import header, header_values
from .._transport import MAX_CLOSE_REASON, Acceptor, Connection, Transport
from .._wire import SUBPROTOCOL
from ._deflate import accept_websocket

#: Seconds :meth:`TrioWebSocketConnection.close` lets trio-websocket finish writing a close
#: frame of its own (its answer to the peer's close, or a protocol failure) before dropping TCP.
CLOSE_REPLY_TIMEOUT = 1.0


class TrioWebSocketConnection(Connection):
    """A :class:`Connection` over a trio-websocket server connection."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        user_agent: str = "",
        remote: str | None = None,
    ) -> None:
        self._ws = ws
        self.user_agent = user_agent
        #: ``remote``: the client's address when known (behind a trusted proxy), else the peer's.
        self.remote = _peer(ws) if remote is None else remote
        stream = getattr(ws, "_stream", None)
        socket = getattr(stream, "socket", None)
        self._fd = socket.fileno() if isinstance(stream, trio.SocketStream) and socket else -1
        self._socket = socket if self._fd >= 0 else None
        #: Bytes handed to the socket (frames and our pings; not trio-websocket's pongs).
        self._written = 0
        #: wsproto's open connection when no extension was agreed: frames are then framed here
        #: (a header and the bytes as they are), not by wsproto.
        opened = ws._wsproto.connection
        self._plain = opened if opened is not None and not opened._proto.extensions else None

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def send(self, frame: bytes) -> None:
        ws = self._ws
        try:
            if ws._close_reason is None and self._fd >= 0:
                lock = ws._stream_lock
                try:
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    pass  # the reader is sending (a pong, a close): queue behind it
                else:
                    try:
                        await self._send_direct(frame)
                    finally:
                        lock.release()
                    return
            self._written += len(frame) + 10  # about: a header, maybe deflated
            await ws.send_message(frame.decode())
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message (the conformance echo's; sessions send text only)."""
        self._written += len(data) + 10
        try:
            await self._ws.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def _send_direct(self, frame: bytes) -> None:
        """Frame with wsproto and write straight to the socket, holding trio-websocket's lock.

        Most frames fit in the socket buffer: one ``write`` and no trip through the scheduler,
        where ``send_message`` costs three (lock, send, checkpoint). This was a third of the
        server's CPU under fan-out load. What does not fit goes through the stream as usual.
        """
        ws = self._ws
        plain = self._plain
        if plain is not None and plain.state is ConnectionState.OPEN:
            data = _text_frame(frame)
        else:  # compressed, or closing (wsproto refuses data then, as it should)
            data = ws._wsproto.send(TextMessage(data=frame.decode()))
        self._written += len(data)
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            await ws._abort_web_socket()
            raise trio_websocket.ConnectionClosed(ws._close_reason) from None
        if sent < len(data):
            try:
                await ws._stream.send_all(memoryview(data)[sent:])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise trio_websocket.ConnectionClosed(ws._close_reason) from None

    async def round_trip(self) -> float | None:
        start = trio.current_time()
        try:
            await self._ws.ping()  # a random payload; returns when its pong arrives
        except (trio_websocket.ConnectionClosed, ValueError):
            return None
        return trio.current_time() - start

    def start_ping(self) -> trio.Event | None:
        ws = self._ws
        fd = self._fd
        if fd < 0 or ws._close_reason is not None or ws._wsproto.state is not ConnectionState.OPEN:
            return None
        # A frame being written (ours or trio-websocket's) must not be split by the ping.
        if ws._stream_lock.locked() or not _writable(fd):
            return None
        payload = struct.pack("!I", random.getrandbits(32))
        while payload in ws._pings:
            payload = struct.pack("!I", random.getrandbits(32))
        frame = b"\x89\x04" + payload  # a final, unmasked ping of four bytes (RFC 6455 §5.5.2)
        try:
            sent = os.write(fd, frame)
        except OSError:  # BlockingIOError included: not at once, then
            return None
        if sent < len(frame):
            # Cannot happen on a socket poll found writable (it has room for far more); if it
            # did, the stream would be garbage: end it.
            self._shut()
            return None
        self._written += len(frame)
        event = trio.Event()
        ws._pings[payload] = event  # trio-websocket's reader sets it when the pong arrives
        return event

    def tcp_progress(self) -> tuple[int, int] | None:
        if self._fd < 0:
            return None
        unacked = unacked_bytes(self._socket)
        return None if unacked is None else (self._written, unacked)

    def _shut(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._socket.shutdown(_socket.SHUT_RDWR)  # type: ignore[union-attr]

    async def close(self, code: int, reason: str = "") -> None:
        ws = self._ws
        try:
            await ws.aclose(code, reason[:MAX_CLOSE_REASON])
            # When the peer closed first, or broke the protocol (1002, 1007, 1009), trio-websocket's
            # reader may still be writing its close frame: it took the stream lock, with no
            # checkpoint, when it set the close reason that ended this connection. Dropping TCP
            # under it lost that frame (the peer saw 1006), so let it finish first, bounded.
            with trio.move_on_after(CLOSE_REPLY_TIMEOUT):
                async with ws._stream_lock:
                    pass
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            # trio-websocket keeps the TCP stream open when the peer closed first.
            await self.abort()

    async def abort(self) -> None:
        # Closed, the descriptor number may be reused by another socket: never write to it.
        self._fd = -1
        with trio.CancelScope(shield=True):
            await self._ws._close_stream()


def _peer(ws: trio_websocket.WebSocketConnection | trio_websocket.WebSocketRequest) -> str:
    """The TCP peer's address of a connection or handshake, without the port."""
    remote = ws.remote
    return str(getattr(remote, "address", remote))


def _writable(fd: int) -> bool:
    """Whether socket ``fd`` can take a write now (for TCP: a third of its buffer is free)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return any(mask & select.POLLOUT for _fd, mask in poller.poll(0))
    except OSError:
        return False


def _closed(exc: trio_websocket.ConnectionClosed) -> ConnectionClosed:
    reason = exc.reason
    return ConnectionClosed(reason.code, reason.reason or "") if reason else ConnectionClosed()


async def _reject(
    request: trio_websocket.WebSocketRequest,
    status: int,
    *,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a handshake with ``status`` and close the TCP stream: trio-websocket would keep it
    (and its file descriptor) until the client closes."""
    try:
        await request.reject(status, extra_headers=extra_headers, body=body)
    finally:
        await request._connection._close_stream()


async def _accept(
    request: trio_websocket.WebSocketRequest, max_frame_bytes: int, subprotocol: str | None
) -> Any:
    """Accept with bounded deflate and the frame limit, agreeing ``subprotocol`` (None: none)."""
    ws = await accept_websocket(request, subprotocol=subprotocol, max_message_size=max_frame_bytes)
    _forget_handshake(ws._wsproto)
    return ws


def _text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame of ``payload`` (RFC 6455 §5.2), as wsproto frames it
    when no extension is agreed: about 0.3 µs where wsproto takes 5 to 15 (it decodes the
    bytes to text and encodes them again)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class _SpentHandshake:
    """What a wsproto connection keeps of its handshake once it is open: nothing. wsproto keeps
    the whole ``H11Handshake`` (an h11 connection, its buffers and state, two deques) for the
    connection's life, about 2.5 KiB of an idle connection's 31; it only ever asks it for
    events again, and it has none left."""

    __slots__ = ()

    def events(self) -> Iterator[Any]:
        return iter(())


_SPENT = _SpentHandshake()


def _forget_handshake(wsproto_connection: Any) -> None:
    """Drop an open wsproto connection's finished handshake (see :class:`_SpentHandshake`);
    nothing if it is not open (the handshake may still be needed)."""
    if wsproto_connection.connection is not None:
        wsproto_connection.handshake = _SPENT


@attrs.define(eq=False)
class TrioWebSocketTransport(Transport):
    """The fast path: the protocol on ``ws://host:port/ws``, served by trio-websocket.

    Connections are admitted through the acceptor's gate before any handshake work (see
    :mod:`crealia._edge`). A handshake to another path gets 404; one the acceptor's handshake
    policy refuses gets its status (421 for the ``Host``, 403 for the ``Origin``: see
    :meth:`~crealia._transport.Acceptor.check_handshake`); one during shutdown gets 503.
    """

    host: str
    port: int

    async def serve(
        self,
        acceptor: Acceptor,
        *,
        task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound port.

        Raises:
            OSError: the port cannot be bound.
        """
        gate = acceptor.gate

        async def handler(request: trio_websocket.WebSocketRequest) -> None:
            path = request.path.split("?", 1)[0]
            echo = path == ECHO_PATH and acceptor.echo_enabled
            if path != "/ws" and not echo:
                await _reject(request, 404, body=b"not found: the WebSocket endpoint is /ws")
                return
            agent = header(request.headers, b"user-agent") or ""
            remote = acceptor.client_address(
                _peer(request), header_values(request.headers, b"x-forwarded-for")
            )
            # The gate counts the connection by the stream it accepted.
            over = acceptor.readdress(request._connection._stream, remote)
            if over is not None:
                await _reject(request, 503, extra_headers=[_TEXT_PLAIN],
                              body=f"{over}\n".encode())  # fmt: skip
                return
            refusal = acceptor.check_handshake(
                # wsproto keeps Host out of the extra headers, on the handshake event.
                host=getattr(getattr(request, "_event", None), "host", None),
                origin=header(request.headers, b"origin"),
                remote=remote,
                user_agent=agent,
            )
            if refusal is not None:
                await _reject(request, refusal.status, extra_headers=[_TEXT_PLAIN],
                              body=refusal.body)  # fmt: skip
                return
            if not acceptor.accepting:
                await _reject(request, 503, body=b"server shutting down")
                return
            if echo:
                if SUBPROTOCOL in request.proposed_subprotocols:
                    await _reject(request, 400, extra_headers=[_TEXT_PLAIN],
                                  body=SUBPROTOCOL_REFUSED)  # fmt: skip
                    return
                ws = await _accept(request, acceptor.max_frame_bytes, None)
                await acceptor.serve_echo(TrioWebSocketConnection(ws, agent, remote))
                return
            offered = SUBPROTOCOL in request.proposed_subprotocols
            ws = await _accept(request, acceptor.max_frame_bytes, SUBPROTOCOL if offered else None)
            await acceptor.serve(TrioWebSocketConnection(ws, agent, remote))

        async with trio.open_nursery() as nursery:
            bound = await trio.open_tcp_listeners(self.port, host=self.host)
            listeners = [GatedListener(listener, gate, nursery) for listener in bound]
            server = _GatedWebSocketServer(
                gate,
                handler,
                listeners,
                handler_nursery=nursery,
                max_message_size=acceptor.max_frame_bytes,
                connect_timeout=acceptor.handshake_timeout,
                disconnect_timeout=2,
            )
            await nursery.start(server.run)
            task_status.started(listeners[0].port)


_TEXT_PLAIN = (b"Content-Type", b"text/plain; charset=utf-8")


class _GatedWebSocketServer(trio_websocket.WebSocketServer):
    """Releases each connection from the gate when trio-websocket is done with it (its
    ``_handle_connection`` runs from accept to close, handshake included)."""

    def __init__(self, gate: ConnectionGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = gate

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await super()._handle_connection(stream)
        finally:
            self._gate.release(stream)
