"""A raw protocol client for tests: every frame visible, nothing hidden or retried."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson
import trio
import trio_websocket

Envelope = dict[str, Any]


class RawClient:
    """One WebSocket speaking docs/protocol.md with explicit frames."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.inbox: list[Envelope] = []
        self.frames = 0
        self.welcome: dict[str, Any] = {}

    async def send(self, kind: str, data: Any = None, ref: int | None = None) -> None:
        env: dict[str, Any] = {"type": kind, "data": {} if data is None else data}
        if ref is not None:
            env["ref"] = ref
        await self.ws.send_message(orjson.dumps(env).decode())

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def _fill(self) -> None:
        message = await self.ws.get_message()
        self.frames += 1
        value = orjson.loads(message)
        self.inbox.extend(value if isinstance(value, list) else [value])

    async def next(self) -> Envelope:
        while not self.inbox:
            await self._fill()
        return self.inbox.pop(0)

    async def expect(self, predicate: Callable[[Envelope], bool]) -> Envelope:
        """The first envelope (already received or coming) that matches; others stay queued."""
        index = 0
        while True:
            while index >= len(self.inbox):
                await self._fill()
            if predicate(self.inbox[index]):
                return self.inbox.pop(index)
            index += 1

    async def expect_type(self, kind: str, **match: Any) -> Envelope:
        def pred(env: Envelope) -> bool:
            if env.get("type") != kind:
                return False
            data = env.get("data", {})
            return all(data.get(k) == v for k, v in match.items())

        return await self.expect(pred)

    async def event(self, kind: str, **match: Any) -> Envelope:
        """The next ``collaboration_event`` of ``kind`` (matching ``match`` on its data)."""

        def pred(env: Envelope) -> bool:
            if env.get("type") != "collaboration_event":
                return False
            data = env["data"]
            return data.get("kind") == kind and all(data.get(k) == v for k, v in match.items())

        return await self.expect(pred)

    async def request(self, kind: str, data: Any = None) -> Envelope:
        """Send with a fresh ref and return the direct reply carrying it."""
        ref = next(self.refs)
        await self.send(kind, data, ref)
        return await self.expect(lambda env: env.get("ref") == ref)

    async def hello(
        self, token: str, project: str, resume: int | None = None, epoch: str | None = None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"token": token, "project_id": project}
        if resume is not None:
            data["resume"] = {"seq": resume}
            if epoch is not None:
                data["resume"]["epoch"] = epoch
        reply = await self.request("hello", data)
        assert reply["type"] == "welcome", reply
        return dict(reply["data"])

    async def closed(self) -> int | None:
        """Read until the server closes; returns the close code."""
        try:
            while True:
                await self._fill()
        except trio_websocket.ConnectionClosed as exc:
            await self.aclose()
            return exc.reason.code if exc.reason else None

    async def aclose(self) -> None:
        await self.ws.aclose()
        # trio-websocket leaves the TCP stream open when the peer closed first.
        await self.ws._close_stream()


async def open_raw_client(
    nursery: trio.Nursery,
    url: str,
    *,
    subprotocols: list[str] | None = None,
    max_message_size: int = 64 * 1024 * 1024,
) -> RawClient:
    ws = await trio_websocket.connect_websocket_url(
        nursery, url, subprotocols=subprotocols, max_message_size=max_message_size
    )
    return RawClient(ws)
