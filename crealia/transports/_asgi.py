"""The ASGI client transport: the ``/ws`` route of the HTTP app, served by hypercorn.

The route is handled by a plain ASGI callable in front of the Quart app (Quart's own websocket
machinery adds a task and a queue per connection that this protocol does not need).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

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
    """Wrap ``app`` so that websocket requests to ``path`` go to the hub."""

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
        offered = scope.get("subprotocols") or []
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if SUBPROTOCOL in offered:
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        await hub.serve_connection(ASGIWebSocketConnection(scope, receive, send))

    return route
