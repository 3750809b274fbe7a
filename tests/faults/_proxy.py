"""A fault-injecting TCP proxy on 127.0.0.1, in Trio, for the fault scenarios.

``async with open_proxy(host, port) as proxy:`` listens on a free loopback port and forwards
every connection to ``host:port`` (a crealia server, a redis-server). The proxy owns one
nursery: the listener, and per connection two pumps (``UPSTREAM``: client to target,
``DOWNSTREAM``: target to client). Leaving the block closes every connection.

The faults, switchable at any time, apply to every connection, open or new:

- :meth:`FaultProxy.passthrough`: forward everything (the default).
- :meth:`FaultProxy.cut`: close both sides of every open connection now.
- :meth:`FaultProxy.stall`: stop forwarding but keep the sockets open; the pumps stop reading,
  so the senders' kernel buffers fill and they block, as behind a dead link.
- :meth:`FaultProxy.slow`: forward at most ``bytes_per_s`` per connection and direction.
- :meth:`FaultProxy.half_open`: read one direction and drop it silently; the other passes.
- :meth:`FaultProxy.refuse`: refuse new connections for ``seconds`` (the listening socket is
  closed, so a connect fails at once, then opened again on the same port);
  :meth:`FaultProxy.drop` is a network drop: refuse, and cut what is open.

A pump holds at most one read (``chunk`` bytes) while stalled; ``rcvbuf`` sets ``SO_RCVBUF``
on the proxy's sockets (before connecting upstream), to bound what the kernel absorbs.
"""

from __future__ import annotations

import enum
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio


class Direction(enum.Enum):
    UPSTREAM = "upstream"  # client to target
    DOWNSTREAM = "downstream"  # target to client


class Mode(enum.Enum):
    PASS = "pass"
    STALL = "stall"
    SLOW = "slow"
    HALF_OPEN = "half_open"


@attrs.define(eq=False)
class _Link:
    """One proxied connection: its two streams and the scope its pumps run in."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


@attrs.define(eq=False)
class FaultProxy:
    """The proxy's state; build it with :func:`open_proxy`."""

    target_host: str
    target_port: int
    chunk: int = 16384
    rcvbuf: int | None = None
    port: int = 0
    mode: Mode = Mode.PASS
    bytes_per_s: float = math.inf
    dropped_direction: Direction | None = None
    refuse_until: float = -math.inf
    #: Connections accepted (forwarded), and open now.
    accepted: int = 0
    #: Bytes forwarded and dropped, per direction.
    forwarded: dict[Direction, int] = attrs.Factory(lambda: dict.fromkeys(Direction, 0))
    dropped: dict[Direction, int] = attrs.Factory(lambda: dict.fromkeys(Direction, 0))
    links: set[_Link] = attrs.Factory(set)
    _listening: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def open_connections(self) -> int:
        return len(self.links)

    def _switch(self, mode: Mode) -> None:
        self.mode = mode
        self._changed.set()
        self._changed = trio.Event()

    def passthrough(self) -> None:
        """Forward everything again (what was held while stalled goes on)."""
        self._switch(Mode.PASS)

    def stall(self) -> None:
        """Stop forwarding in both directions; the connections stay open."""
        self._switch(Mode.STALL)

    def slow(self, bytes_per_s: float) -> None:
        """Forward at most ``bytes_per_s`` per connection and direction."""
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, got {bytes_per_s!r}")
        self.bytes_per_s = bytes_per_s
        self._switch(Mode.SLOW)

    def half_open(self, dropped: Direction) -> None:
        """Read ``dropped``'s bytes and discard them silently; the other direction passes."""
        self.dropped_direction = dropped
        self._switch(Mode.HALF_OPEN)

    def cut(self) -> None:
        """Close both sides of every open connection now (the mode is unchanged)."""
        for link in list(self.links):
            link.scope.cancel()

    def refuse(self, seconds: float) -> None:
        """Refuse new connections for ``seconds`` from now (their connect fails)."""
        self.refuse_until = trio.current_time() + seconds
        self._listening.cancel()
        self._changed.set()
        self._changed = trio.Event()

    def drop(self, seconds: float) -> None:
        """A network drop of ``seconds``: refuse new connections, and cut the open ones."""
        self.refuse(seconds)
        self.cut()

    @property
    def refusing(self) -> bool:
        return trio.current_time() < self.refuse_until

    async def wait_connections(self, count: int) -> None:
        """Wait until ``accepted`` reaches ``count`` (bound it with ``fail_after``)."""
        while self.accepted < count:
            await self._changed.wait()

    async def _serve(
        self,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        while True:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            self._listening = trio.CancelScope()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            try:
                with self._listening:
                    await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            await trio.sleep_until(self.refuse_until)  # the fault's length

    async def _handle(self, client: trio.SocketStream) -> None:
        link = _Link(client)
        self.links.add(link)
        try:
            with link.scope:
                if self.rcvbuf is not None:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                try:
                    link.upstream = await self._connect()
                except OSError:
                    return  # the target is down: the client sees its connection closed
                self.accepted += 1
                self._changed.set()
                self._changed = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, link.upstream, Direction.UPSTREAM, link)
                    nursery.start_soon(
                        self._pump, link.upstream, client, Direction.DOWNSTREAM, link
                    )
        finally:
            self.links.discard(link)
            with trio.CancelScope(shield=True):
                for stream in (client, link.upstream):
                    if stream is not None:
                        await trio.aclose_forcefully(stream)

    async def _connect(self) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sock.connect((self.target_host, self.target_port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _hold(self) -> None:
        while self.mode is Mode.STALL:
            await self._changed.wait()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, way: Direction, link: _Link
    ) -> None:
        try:
            while True:
                await self._hold()
                data = await source.receive_some(self.chunk)
                if not data:
                    break
                # A read that was pending when the stall began is held, not forwarded.
                await self._hold()
                if self.mode is Mode.HALF_OPEN and self.dropped_direction is way:
                    self.dropped[way] += len(data)
                    continue
                if self.mode is Mode.SLOW:
                    await self._send_slowly(sink, data, way)
                else:
                    self.forwarded[way] += len(data)
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Either side closing closes the link (both pumps), as a NAT dropping the flow would.
        link.scope.cancel()

    async def _send_slowly(self, sink: trio.SocketStream, data: bytes, way: Direction) -> None:
        # Pieces of a twentieth of a second each, paced: the rate holds within one piece.
        step = max(1, int(self.bytes_per_s / 20))
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            self.forwarded[way] += len(piece)
            await sink.send_all(piece)
            await self._hold()
            await trio.sleep(len(piece) / self.bytes_per_s)  # the rate limit itself


@asynccontextmanager
async def open_proxy(
    target_host: str, target_port: int, *, chunk: int = 16384, rcvbuf: int | None = None
) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` to ``target_host:target_port`` on 127.0.0.1 and a free port,
    closed (every connection with it) when the block ends."""
    proxy = FaultProxy(target_host, target_port, chunk=chunk, rcvbuf=rcvbuf)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy._serve, nursery)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


__all__ = ["Direction", "FaultProxy", "Mode", "open_proxy"]
