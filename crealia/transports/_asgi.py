"""The ASGI client transport: the ``/ws`` route of the HTTP app, served by hypercorn.

The route is a plain ASGI callable in front of the Quart app (Quart's own websocket machinery
adds a task and a queue per connection that this protocol does not need). It is mounted in the
HTTP app rather than run as a :class:`~crealia._transport.Transport` of its own, since hypercorn
serves it with the REST API, but it uses the same :class:`~crealia._transport.Acceptor` as every
transport: the same handshake policy, the same sessions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import hypercorn.config
import trio

from .._echo import ECHO_PATH, SUBPROTOCOL_REFUSED
from .._edge import STREAM_KEY
from .._errors import ConnectionClosed
from .._lag import unacked_bytes
from .._origin import header
from .._transport import MAX_CLOSE_REASON, Acceptor, Connection
from .._wire import SUBPROTOCOL
from ._deflate import install_hypercorn_deflate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds a close may take to be handed to hypercorn, also when the caller is cancelled.
CLOSE_SEND_TIMEOUT = 1.0
#: Seconds :meth:`ASGIWebSocketConnection.close` waits for the client's close reply.
CLOSE_REPLY_TIMEOUT = 2.0


class ASGIWebSocketConnection(Connection):
    """A :class:`Connection` over an accepted ASGI websocket.

    hypercorn enforces the frame limit (close 1009; the app then sees a disconnect with 1006)
    and wsproto the UTF-8 validity of text frames (close 1007).

    hypercorn shields its socket writes from cancellation, so a :meth:`send` to a client that
    stops reading cannot be cancelled: :meth:`abort` (which the core calls from its other task
    when a send outlives the session's close deadline) closes the socket under it, through the
    edge's stream in the scope (``crealia._edge.STREAM_KEY``). Without that stream (the route
    served by another server) it can only close with 1011. :meth:`close` hands over its close
    frame only once the socket can take it, and aborts when it cannot within
    :data:`CLOSE_SEND_TIMEOUT`.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        #: The close code, once closed (the client's as hypercorn reports it, or ours).
        self._code: int | None = None
        self._stream: trio.abc.Stream | None = (scope.get("state") or {}).get(STREAM_KEY)
        client = scope.get("client")
        self.remote = client[0] if client else ""
        self.user_agent = header(scope.get("headers") or [], b"user-agent") or ""

    async def receive(self) -> str | bytes:
        if self._closed:
            raise ConnectionClosed(self._code)
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._closed = True
        self._code = message.get("code")
        raise ConnectionClosed(self._code)

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise ConnectionClosed(self._code)
        try:
            await self._send({"type": "websocket.send", "text": frame.decode()})
        except (OSError, RuntimeError) as exc:
            self._closed = True
            raise ConnectionClosed(self._code) from exc

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message (the conformance echo's; sessions send text only)."""
        if self._closed:
            raise ConnectionClosed(self._code)
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except (OSError, RuntimeError) as exc:
            self._closed = True
            raise ConnectionClosed(self._code) from exc

    async def close(self, code: int, reason: str = "") -> None:
        if not await self._send_close(code, reason):
            return
        # Wait (bounded) for the client's close reply: if the app returned at once, hypercorn
        # would drop the socket with unread client data in it, and the kernel's reset can
        # destroy our close frame before the client reads it.
        with trio.move_on_after(CLOSE_REPLY_TIMEOUT):
            while (await self._receive())["type"] != "websocket.disconnect":
                pass

    def tcp_progress(self) -> tuple[int, int] | None:
        # The edge's stream counts what hypercorn writes (crealia._edge.DeadlineStream).
        stream = self._stream
        written = getattr(stream, "written", None)
        if self._closed or not isinstance(written, int):
            return None
        unacked = unacked_bytes(getattr(stream, "socket", None))
        return None if unacked is None else (written, unacked)

    async def abort(self) -> None:
        stream = self._stream
        if stream is None:
            await self._send_close(1011, "aborted")
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await stream.aclose()  # also wakes a send blocked on it, shielded or not

    async def _send_close(self, code: int, reason: str) -> bool:
        """Hand hypercorn the close, once; True when it took it."""
        if self._closed:
            return False
        # Even when cancelled (bounded): without the close frame the client would wait until
        # the app returns.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_SEND_TIMEOUT):
            if not await self._can_send():
                await self.abort()
                return False
            self._closed = True
            self._code = code
            try:
                await self._send({"type": "websocket.close", "code": code,
                                  "reason": reason[:MAX_CLOSE_REASON]})  # fmt: skip
            except (OSError, RuntimeError):
                return False
            return True
        self._closed = True
        return False  # the close could not be handed over in time

    async def _can_send(self) -> bool:
        """Whether the socket can take a small frame: hypercorn's writes cannot be cancelled,
        so one must not start on a socket whose client stopped reading."""
        if self._stream is None:
            return True
        with trio.move_on_after(CLOSE_SEND_TIMEOUT):
            try:
                await self._stream.wait_send_all_might_not_block()
            except trio.BusyResourceError:
                pass  # hypercorn is sending (a pong): its lock orders the close behind it
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        return False


def configure_hypercorn(config: hypercorn.config.Config, max_frame_bytes: int) -> None:
    """Set hypercorn up for the route: the frame limit (close 1009) and permessage-deflate with
    inflation bounded by it (installed process-wide, see :mod:`crealia.transports._deflate`)."""
    config.websocket_max_message_size = max_frame_bytes
    install_hypercorn_deflate(max_frame_bytes)


def websocket_route(acceptor: Acceptor, app: ASGIApp, path: str = "/ws") -> ASGIApp:
    """Wrap ``app`` so that websocket requests to ``path`` go to ``acceptor``.

    During shutdown a handshake is closed before it is accepted (hypercorn answers 403).
    Handshakes the acceptor's policy refuses (:meth:`~crealia._transport.Acceptor.check_handshake`:
    421 for the ``Host``, 403 for the ``Origin``) get that status before they are accepted.
    With the acceptor's conformance echo on, websocket requests to ``crealia._echo.ECHO_PATH``
    pass the same checks and go to :meth:`~crealia._transport.Acceptor.serve_echo`.
    """

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        echo = scope.get("path") == ECHO_PATH and acceptor.echo_enabled
        if scope["type"] != "websocket" or (scope.get("path") != path and not echo):
            await app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not acceptor.accepting:
            await send({"type": "websocket.close", "code": 1001})
            return
        headers = scope.get("headers") or []
        client = scope.get("client")
        refusal = acceptor.check_handshake(
            host=header(headers, b"host"),
            origin=header(headers, b"origin"),
            remote=str(client[0]) if client else "",
            user_agent=header(headers, b"user-agent") or "",
        )
        if refusal is not None:
            await _refuse(scope, send, refusal.body, refusal.status)
            return
        offered = scope.get("subprotocols") or []
        if echo:
            if SUBPROTOCOL in offered:
                await _refuse(scope, send, SUBPROTOCOL_REFUSED, 400)
                return
            await send({"type": "websocket.accept"})
            await acceptor.serve_echo(ASGIWebSocketConnection(scope, receive, send))
            return
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if SUBPROTOCOL in offered:
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        await acceptor.serve(ASGIWebSocketConnection(scope, receive, send))

    return route


async def _refuse(scope: Scope, send: Send, body: bytes, status: int = 403) -> None:
    """Answer a websocket handshake with ``status`` and ``body``.

    With the ASGI WebSocket Denial Response extension (hypercorn has it) both are sent;
    without it a close before accept is the only way, and the server answers 403 on its own.
    """
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})
