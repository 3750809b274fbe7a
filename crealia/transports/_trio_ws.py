"""The fast-path client transport: trio-websocket on its own port.

It reaches into trio-websocket 0.12's internals in three places, pinned by setup.cfg (``<0.13``):
writing frames straight to the socket under the connection's own send lock, closing the TCP
stream that trio-websocket leaves open when the peer closed first (both checked when a
connection is wrapped), and reading the handshake's ``Host`` (for the Origin check: a request
without it can only come from an allow-listed origin or none).

Each accepted WebSocket is wrapped in a :class:`~crealia._session.Connection` and served by the
hub in the handler nursery that trio-websocket gives it. trio-websocket enforces the frame limit
(close 1009) and wsproto the UTF-8 validity of text frames (close 1007).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import trio
import trio_websocket
from wsproto.events import TextMessage

from .._edge import ConnectionGate, GatedListener
from .._origin import (
    HostPolicy,
    OriginPolicy,
    header,
    misdirected_body,
    refusal_body,
    report_refusal,
)
from .._session import Connection, ConnectionClosed, Hub

SUBPROTOCOL = "crealia.v1"


class TrioWebSocketConnection(Connection):
    """A :class:`Connection` over a trio-websocket server connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, user_agent: str = "") -> None:
        self._ws = ws
        self.user_agent = user_agent
        remote = ws.remote
        self.remote = str(getattr(remote, "address", remote))
        stream = getattr(ws, "_stream", None)
        socket = getattr(stream, "socket", None)
        self._fd = socket.fileno() if isinstance(stream, trio.SocketStream) and socket else -1

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(reason.code if reason else None) from exc

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
            await ws.send_message(frame.decode())
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(reason.code if reason else None) from exc

    async def _send_direct(self, frame: bytes) -> None:
        """Frame with wsproto and write straight to the socket, holding trio-websocket's lock.

        Most frames fit in the socket buffer: one ``write`` and no trip through the scheduler,
        where ``send_message`` costs three (lock, send, checkpoint). This was a third of the
        server's CPU under fan-out load. What does not fit goes through the stream as usual.
        """
        ws = self._ws
        data = ws._wsproto.send(TextMessage(data=frame.decode()))
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

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await self._ws.aclose(code, reason[:120])
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            # trio-websocket keeps the TCP stream open when the peer closed first.
            await self.abort()

    async def abort(self) -> None:
        with trio.CancelScope(shield=True):
            await self._ws._close_stream()


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


async def _accept(request: trio_websocket.WebSocketRequest, max_frame_bytes: int) -> Any:
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.proposed_subprotocols else None
    try:
        from ._deflate import accept_websocket
    except ImportError:  # pragma: no cover - the deflate module ships with crealia
        return await request.accept(subprotocol=subprotocol)
    return await accept_websocket(
        request, subprotocol=subprotocol, max_message_size=max_frame_bytes
    )


async def serve_trio_websocket(
    hub: Hub,
    host: str,
    port: int,
    *,
    http_port: Callable[[], int | None] | None = None,
    gate: ConnectionGate | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the hub's WebSocket protocol on ``ws://host:port/ws``; reports the bound port.

    Handshakes whose ``Origin`` the config's ``allowed_origins`` does not allow get 403 (see
    :mod:`crealia._origin`). Same-origin here also means a page of the HTTP app: the same host
    with the HTTP port, which ``http_port`` tells when asked (it may be bound after this
    transport starts); without it, the configured ``port`` when it is not 0.

    Connections are admitted through ``gate`` (the hub's by default) before any handshake work
    (see :mod:`crealia._edge`); handshakes naming a ``Host`` the config's ``allowed_hosts`` does
    not allow get 421.
    """
    origins = OriginPolicy.from_origins(hub.config.allowed_origins)
    hosts = HostPolicy.from_hosts(hub.config.allowed_hosts)
    gate = gate if gate is not None else hub.gate

    def same_origin_ports() -> tuple[int, ...]:
        known = http_port() if http_port is not None else hub.config.port
        return (known,) if known else ()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        if request.path.split("?", 1)[0] != "/ws":
            await _reject(request, 404, body=b"not found: the WebSocket endpoint is /ws")
            return
        origin = header(request.headers, b"origin")
        # wsproto keeps Host out of the extra headers, on the handshake event.
        host = getattr(getattr(request, "_event", None), "host", None)
        if not hosts.allows(host):
            gate.refused["host"] += 1
            await _reject(
                request,
                421,
                extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
                body=misdirected_body(host or ""),
            )
            return
        if origin is not None and not origins.allows(origin, host, same_origin_ports()):
            remote = request.remote
            report_refusal(hub, origin, str(getattr(remote, "address", remote)))
            await _reject(
                request,
                403,
                extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
                body=refusal_body(origin),
            )
            return
        if not hub.accepting:
            await _reject(request, 503, body=b"server shutting down")
            return
        ws = await _accept(request, hub.config.max_frame_bytes)
        agent = header(request.headers, b"user-agent") or ""
        await hub.serve_connection(TrioWebSocketConnection(ws, agent))

    async with trio.open_nursery() as nursery:
        listeners = [GatedListener(listener, gate, nursery)
                     for listener in await trio.open_tcp_listeners(port, host=host)]  # fmt: skip
        server = _GatedWebSocketServer(
            gate,
            handler,
            listeners,
            handler_nursery=nursery,
            max_message_size=hub.config.max_frame_bytes,
            connect_timeout=hub.config.hello_timeout,
            disconnect_timeout=2,
        )
        await nursery.start(server.run)
        task_status.started(listeners[0].port)


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
