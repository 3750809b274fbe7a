"""The ASGI client transport: the ``/ws`` route of the HTTP app, served by hypercorn.

The route is handled by a plain ASGI callable in front of the Quart app (Quart's own websocket
machinery adds a task and a queue per connection that this protocol does not need).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from .._origin import OriginPolicy, header, refusal_body, report_refusal
from .._session import Connection, ConnectionClosed, Hub

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SUBPROTOCOL = "crealia.v1"


class ASGIWebSocketConnection(Connection):
    """A :class:`Connection` over an accepted ASGI websocket."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        client = scope.get("client")
        self.remote = client[0] if client else ""
        self.user_agent = header(scope.get("headers") or [], b"user-agent") or ""

    async def receive(self) -> str | bytes:
        if self._closed:
            raise ConnectionClosed(None)
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._closed = True
        raise ConnectionClosed(message.get("code"))

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise ConnectionClosed(None)
        try:
            await self._send({"type": "websocket.send", "text": frame.decode()})
        except (OSError, RuntimeError) as exc:
            self._closed = True
            raise ConnectionClosed(None) from exc

    async def close(self, code: int, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        except (OSError, RuntimeError):
            return
        # Wait (bounded) for the client's close reply: if the app returned at once, hypercorn
        # would drop the socket with unread client data in it, and the kernel's reset can
        # destroy our close frame before the client reads it.
        with trio.move_on_after(2):
            while (await self._receive())["type"] != "websocket.disconnect":
                pass

    async def abort(self) -> None:
        # hypercorn frames messages itself, so a cancelled send never leaves half a frame.
        await self.close(1011, "aborted")


def websocket_route(hub: Hub, app: ASGIApp, path: str = "/ws") -> ASGIApp:
    """Wrap ``app`` so that websocket requests to ``path`` go to the hub.

    Handshakes whose ``Origin`` the config's ``allowed_origins`` does not allow (same-origin: the
    ``Host`` header's) are answered 403 before they are accepted (see :mod:`crealia._origin`).
    """
    origins = OriginPolicy.from_origins(hub.config.allowed_origins)

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope.get("path") != path:
            await app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not hub.accepting:
            await send({"type": "websocket.close", "code": 1001})
            return
        headers = scope.get("headers") or []
        origin = header(headers, b"origin")
        if origin is not None and not origins.allows(origin, header(headers, b"host")):
            client = scope.get("client")
            report_refusal(hub, origin, str(client[0]) if client else "")
            await _refuse(scope, send, refusal_body(origin))
            return
        offered = scope.get("subprotocols") or []
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if SUBPROTOCOL in offered:
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        await hub.serve_connection(ASGIWebSocketConnection(scope, receive, send))

    return route


async def _refuse(scope: Scope, send: Send, body: bytes) -> None:
    """Answer a websocket handshake with 403 and ``body``.

    With the ASGI WebSocket Denial Response extension (hypercorn has it) the body is sent;
    without it a close before accept is the only way, and the server answers 403 on its own.
    """
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})
