"""A webhook receiver for tests: a real HTTP/1.1 server on 127.0.0.1, port 0 (h11 over trio)."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from typing import Any

import attrs
import h11
import trio


@attrs.define
class Receiver:
    """An HTTP server on 127.0.0.1 that answers POSTs with scripted statuses (then 200s), or
    never answers (``hang``)."""

    statuses: list[int] = attrs.Factory(list)
    hang: bool = False
    port: int = 0
    attempts: int = 0
    #: The JSON bodies of the requests answered 2xx.
    received: list[Any] = attrs.Factory(list)
    paths: list[str] = attrs.Factory(list)
    _arrived: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listener.socket.getsockname()[1]
            task_status.started()

    async def wait_received(self, count: int) -> None:
        while len(self.received) < count:
            await self._arrived.wait()
            self._arrived = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        # A sender that hangs up mid-request (a server shutting down) is not the receiver's error.
        with contextlib.suppress(h11.RemoteProtocolError, trio.BrokenResourceError):
            await self._exchange(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Request):
                    assert event.method == b"POST"
                    self.paths.append(event.target.decode())
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return  # the sender hung up before the request was complete
            self.attempts += 1
            if self.hang:
                await trio.sleep_forever()
            status = self.statuses.pop(0) if self.statuses else 200
            if 200 <= status < 300:
                self.received.append(json.loads(body))
                self._arrived.set()
            headers = [("Content-Length", "0"), ("Connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.EndOfMessage()))


async def start_receiver(nursery: trio.Nursery, **kw: Any) -> Receiver:
    receiver = Receiver(**kw)
    await nursery.start(receiver.serve)
    return receiver


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
