"""Slow consumers found from their own progress (``client_lag_timeout``, crealia._lag): a client
that stops reading, or reads at a trickle, is closed with 4409 within the bound, not once the
kernel's buffers and the outbox are full; it learns why (the close frame reaches it when it
reads again); a client slow for a moment is left alone; the room goes on meanwhile.

Policy: loopback only, port 0, real sockets, a ``fail_after`` on every test. The room's traffic
comes from a writer paced with sleeps (a load, not synchronization); what the tests wait for
are events and the server's own state.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from crealia import ConfigurationError, ConnectionClosed, Server, open_server
from crealia._config import Config
from crealia._lag import LagMeter, unacked_bytes
from crealia._session import Session

from ._memory_backplane import MemoryBackplane
from ._wsclient import RawClient
from ._wspeer import WebSocketPeer
from .conftest import Clients, make_config
from .test_protocol import insert, set_op

#: The bound the tests run with: the watch samples every quarter of it.
TIMEOUT = 1.0
#: A comment's text: with the writer's pace, about 400 KB/s to every member.
TEXT = "x" * 4000
PACE = 0.01


@attrs.define
class LagRoom:
    server: Server
    clients: Clients
    writer: RawClient
    observer: RawClient
    peer: WebSocketPeer
    session: Session
    #: trio time each comment was sent, in order; the observer's latency of each.
    sent_at: list[float] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    #: Set once the writer has sent ``stop_after`` comments (when set).
    stop_after: int | None = None
    enough: trio.Event = attrs.Factory(trio.Event)
    _target: float = math.inf
    _more: trio.Event = attrs.Factory(trio.Event)

    async def write(self) -> None:
        """The room's traffic: comments at a pace, until cancelled."""
        count = 0
        while True:
            count += 1
            self.sent_at.append(trio.current_time())
            comment = {"id": f"k{count}", "text": TEXT}
            ack = await self.writer.request("comment_add", {"comment": comment})
            assert ack["type"] == "ack", ack
            self.writer.inbox.clear()
            if self.stop_after is not None and count >= self.stop_after:
                self.enough.set()
            await trio.sleep(PACE)

    async def observe(self) -> None:
        """A member that reads as it should: how late each comment reaches it."""
        while True:
            await self.observer.event("comment_add")
            self.latencies.append(trio.current_time() - self.sent_at[len(self.latencies)])
            if len(self.latencies) >= self._target:
                self._more.set()

    async def more(self, count: int) -> None:
        """Wait until the observer has seen ``count`` more comments."""
        self._target, self._more = len(self.latencies) + count, trio.Event()
        await self._more.wait()


@asynccontextmanager
async def lag_room(tmp_path: Path, nursery: trio.Nursery, endpoint: str,
                   **settings: object) -> AsyncIterator[LagRoom]:  # fmt: skip
    """A server with ``client_lag_timeout`` = :data:`TIMEOUT`, a writer, an observer and a raw
    peer (``lagging``, past its welcome) that reads only when the test says so."""
    config = make_config(tmp_path, client_lag_timeout=TIMEOUT, rate_limits={"comment": "off"},
                         **settings)  # fmt: skip
    async with open_server(config) as server:
        clients = Clients(server, endpoint, nursery)
        writer = await clients.join("writer")
        observer = await clients.join("observer", role="viewer")
        port = server.ws_port if endpoint == "ws" else server.http_port
        peer = await WebSocketPeer.connect(port)
        token = server.issue_token("lagging", "p1", "viewer")
        hello = {"type": "hello", "ref": 1, "data": {"token": token, "project_id": "p1"}}
        await peer.send(orjson.dumps(hello).decode())
        assert orjson.loads(await peer.receive())["type"] == "welcome"
        room = server.hub.rooms.rooms["p1"]
        session = next(s for s in room.sessions.values() if s.user.id == "lagging")
        try:
            yield LagRoom(server, clients, writer, observer, peer, session)
        finally:
            await peer.aclose()
            await clients.aclose()


async def receive_until_closed(peer: WebSocketPeer) -> ConnectionClosed:
    """Read everything the server sent, to its end."""
    while True:
        try:
            await peer.receive()
        except ConnectionClosed as closed:
            return closed


async def test_lag_client_that_stops_reading_is_cut_within_the_bound_and_told_why(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    with trio.fail_after(15):
        async with lag_room(tmp_path, nursery, endpoint) as room:
            async with trio.open_nursery() as load:
                load.start_soon(room.observe)
                stopped = trio.current_time()  # the peer reads nothing from here on
                load.start_soon(room.write)
                session = room.session
                await session.wait_killed()
                took = trio.current_time() - stopped
                assert session.close_code == 4409, session.close_reason
                assert "behind" in session.close_reason, session.close_reason
                print(f"{endpoint}: cut {took:.2f} s after it stopped reading "
                      f"({session.close_reason})")  # fmt: skip
                # Within the bound and a sample period or two (the ping is written at one).
                assert took < TIMEOUT * 1.5 + 0.5, took
                # Reading again, it gets the frame that was on its way, then the close that
                # says why.
                closed = await receive_until_closed(room.peer)
                print(f"{endpoint}: the peer read to a close {closed.code} {closed.reason!r}")
                assert (closed.code, closed.reason) == (4409, session.close_reason)
                await session.ended.wait()
                # The room went on, and its other members kept their latency.
                await room.more(10)
                load.cancel_scope.cancel()
            assert max(room.latencies) < 0.5, max(room.latencies)
            traffic = room.server.hub.traffic
            assert (traffic.slow_consumers, traffic.lagging_consumers) == (1, 1)


async def test_lag_throttled_client_is_cut(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    """It reads 8 KB/s while the room sends about 400 KB/s to it."""
    with trio.fail_after(15):
        async with lag_room(tmp_path, nursery, endpoint) as room:
            peer, session = room.peer, room.session

            async def trickle() -> None:
                while True:  # bytes kept for wsproto, parsed once it reads again
                    peer._ws.receive_data(await peer._stream.receive_some(2048))
                    await trio.sleep(0.25)  # its pace, not synchronization

            async with trio.open_nursery() as load:
                load.start_soon(room.observe)
                started = trio.current_time()
                load.start_soon(room.write)
                load.start_soon(trickle)
                await session.wait_killed()
                took = trio.current_time() - started
                print(f"{endpoint}: throttled client cut after {took:.2f} s "
                      f"({session.close_reason})")  # fmt: skip
                assert session.close_code == 4409, session.close_reason
                assert took < TIMEOUT * 1.5 + 0.5, took
                load.cancel_scope.cancel()
            closed = await receive_until_closed(peer)
            print(f"{endpoint}: the throttled peer read to a close {closed.code}")
            assert closed.code == 4409, closed
            assert max(room.latencies) < 0.5, max(room.latencies)


async def test_lag_client_slow_for_a_moment_is_not_cut(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    """It stops reading for half the bound, then catches up: it stays."""
    with trio.fail_after(15):
        async with lag_room(tmp_path, nursery, endpoint) as room:
            peer, session = room.peer, room.session
            comments = 0

            async def read() -> None:
                nonlocal comments
                while True:
                    message = orjson.loads(await peer.receive())
                    for env in message if isinstance(message, list) else [message]:
                        if env.get("data", {}).get("kind") == "comment_add":
                            comments += 1

            async with trio.open_nursery() as load:
                load.start_soon(room.observe)
                load.start_soon(room.write)
                with trio.move_on_after(TIMEOUT / 2):  # it is not reading meanwhile
                    await session.wait_killed()
                assert session.close_code is None
                paused_lag = session.lag
                load.start_soon(read)
                room.stop_after = len(room.sent_at) + 4 / TIMEOUT / PACE  # the bound, four times
                await room.enough.wait()
                load.cancel_scope.cancel()
            print(f"{endpoint}: lag {paused_lag:.2f} s at the end of the pause; "
                  f"{comments} comments read, {len(room.sent_at)} sent")  # fmt: skip
            assert session.close_code is None, session.close_reason
            assert comments >= len(room.sent_at) - 5
            assert session.lag < TIMEOUT


@pytest.mark.parametrize("value", [0.1, -1, 301, math.nan, True, "3"])
def test_lag_timeout_bad_values_are_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Config(client_lag_timeout=value)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"client_lag_timeout must be 0 (off) or a number from 0.5 to 300, got {value!r}"
    )
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({"CREALIA_CLIENT_LAG_TIMEOUT": "0.2"})
    assert str(refused.value) == (
        "CREALIA_CLIENT_LAG_TIMEOUT='0.2': client_lag_timeout must be 0 (off) or a number "
        "from 0.5 to 300"
    )
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({}, flags={"client_lag_timeout": ("--client-lag-timeout", "soon")})
    assert str(refused.value).startswith("--client-lag-timeout soon: must be 0 (off)")
    assert Config(client_lag_timeout=0).client_lag_timeout == 0


def test_lag_meter_counts_from_the_oldest_unacknowledged_byte() -> None:
    meter = LagMeter()
    assert meter.sample(0.0, 0, 0) == 0.0
    assert meter.sample(0.25, 10_000, 0) == 0.0  # all acknowledged
    assert meter.sample(0.5, 20_000, 9_000) == 0.0  # written since the last sample only
    assert meter.sample(0.75, 30_000, 19_000) == 0.25  # the bytes of 0.5 are not acked
    assert meter.sample(1.0, 30_000, 19_000) == 0.5
    assert meter.sample(1.75, 30_000, 19_000) == 1.25  # no progress: it only grows
    assert meter.sample(2.0, 30_000, 500) == 0.0  # caught up (but for the slack)


async def test_lag_unacked_bytes_of_a_socket_and_of_none() -> None:
    with trio.fail_after(5):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        assert unacked_bytes(server.socket) in (0, None)
        await server.send_all(b"x" * 100)
        assert await client.receive_some(100)
        for stream in (client, server, listener):
            await stream.aclose()
        assert unacked_bytes(server.socket) is None  # closed
        assert unacked_bytes(object()) is None


@attrs.define(eq=False)
class GatedBackplane(MemoryBackplane):
    """The test-only in-memory backplane, whose commits of one user's changes wait for a gate:
    a store that is slow for that write."""

    gate: trio.Event = attrs.Factory(trio.Event)
    gated_user: str = "lagging"
    waiting: trio.Event = attrs.Factory(trio.Event)

    async def commit_change(self, user: Any, change: Any, *, strategy: str = "manual") -> Any:
        if user.id == self.gated_user:
            self.waiting.set()
            await self.gate.wait()
        return await super().commit_change(user, change, strategy=strategy)


async def test_lag_a_client_waiting_for_a_slow_store_is_not_taken_for_a_slow_one(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    """While the session handles its client's edit (the store slow for it), it reads nothing
    more from that client; once the client has sent more (its cursor moves), the WebSocket
    library stops reading too, pongs included. The client, reading everything the room sends,
    must not be cut for the server's own delay (it was, by the ping measure: the PostgreSQL
    backplane at 1,000 edits/s had 193 of 200 clients cut)."""
    config = make_config(tmp_path, client_lag_timeout=TIMEOUT, rate_limits={"comment": "off"})
    with trio.fail_after(20):
        backplane = GatedBackplane(config=config)
        async with open_server(config, backplane=backplane) as server:
            clients = Clients(server, endpoint, nursery)
            writer = await clients.join("writer")
            slow = await clients.join("lagging")
            await writer.request("timeline_change", insert("c0", "clip", x=0))
            await slow.send("timeline_change", set_op("c1", "clip", "x", 1, None), ref=99)
            await backplane.waiting.wait()
            started = trio.current_time()
            async with trio.open_nursery() as load:

                async def traffic() -> None:  # the room goes on: data waits for `slow`
                    for i in range(10_000):
                        await writer.request(
                            "comment_add", {"comment": {"id": f"k{i}", "text": TEXT}}
                        )
                        writer.inbox.clear()
                        await trio.sleep(PACE)

                async def read() -> None:  # and `slow` reads all of it
                    while True:
                        await slow.next()

                async def move() -> None:  # and keeps moving its cursor: behind its edit
                    while True:
                        cursor = {"position": {"x": 1, "y": 2}}
                        await slow.send("cursor_update", cursor)
                        await trio.sleep(PACE)

                load.start_soon(traffic)
                load.start_soon(read)
                load.start_soon(move)
                await trio.sleep_until(started + 3 * TIMEOUT)  # the store's slowness
                load.cancel_scope.cancel()
            room = server.hub.rooms.rooms["p1"]
            session = next(s for s in room.sessions.values() if s.user.id == "lagging")
            assert session.close_code is None, session.close_reason
            backplane.gate.set()
            ack = await slow.expect(lambda env: env.get("ref") == 99)
            assert ack["type"] == "ack", ack
            await clients.aclose()
