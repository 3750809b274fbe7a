"""The fault proxy on its own, over real loopback sockets: each mode does what it says, bounded.

The target is a small TCP server in the test: it greets each connection with ``hi\\n``, keeps
what it receives, and echoes it back. Where a test checks that nothing arrives, it waits a
fixed quiet window (an absence cannot be awaited); everything else waits on data or events.
"""

from __future__ import annotations

from functools import partial

import attrs
import pytest
import trio

from .._redis import run_redis
from ._proxy import Direction, FaultProxy, open_proxy

QUIET = 0.3  # seconds of silence that count as "nothing was forwarded"


@attrs.define
class Target:
    port: int = 0
    received: bytearray = attrs.Factory(bytearray)
    closed: int = 0
    got: trio.Event = attrs.Factory(trio.Event)
    ended: trio.Event = attrs.Factory(trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"hi\n")
            while data := await stream.receive_some(65536):
                self.received += data
                self.got.set()
                self.got = trio.Event()
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed += 1
            self.ended.set()
            await stream.aclose()


@pytest.fixture
async def target(nursery: trio.Nursery) -> Target:
    server = Target()
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(proxy.host, proxy.port)


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"closed after {len(data)} of {count} bytes"
        data += chunk
    return data


async def test_proxy_passes_bytes_both_ways(target: Target) -> None:
    with trio.fail_after(5):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            stream = await connect(proxy)
            assert await receive_exactly(stream, 3) == b"hi\n"
            await stream.send_all(b"x" * 100_000)
            assert await receive_exactly(stream, 100_000) == b"x" * 100_000
            assert proxy.forwarded[Direction.UPSTREAM] == 100_000
            assert proxy.forwarded[Direction.DOWNSTREAM] == 100_003
            assert (proxy.accepted, proxy.open_connections) == (1, 1)
            await stream.aclose()
            await target.ended.wait()
        assert proxy.open_connections == 0


async def test_proxy_cut_closes_both_sides_now(target: Target) -> None:
    with trio.fail_after(5):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            stream = await connect(proxy)
            await receive_exactly(stream, 3)
            proxy.cut()
            assert await stream.receive_some(10) == b""  # the client's side: closed
            await stream.aclose()
            await target.ended.wait()  # the target's side: closed too
            assert proxy.open_connections == 0
            # New connections are forwarded as before.
            again = await connect(proxy)
            assert await receive_exactly(again, 3) == b"hi\n"
            await again.aclose()


async def test_proxy_stall_forwards_nothing_and_keeps_the_sockets_open(target: Target) -> None:
    with trio.fail_after(5):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            stream = await connect(proxy)
            await receive_exactly(stream, 3)
            proxy.stall()
            await stream.send_all(b"held")
            with trio.move_on_after(QUIET):
                await target.got.wait()
                pytest.fail("a stalled proxy forwarded data")
            assert bytes(target.received) == b""
            assert target.closed == 0 and proxy.open_connections == 1
            proxy.passthrough()
            assert await receive_exactly(stream, 4) == b"held"
            await stream.aclose()


async def test_proxy_stall_blocks_a_sender_once_the_buffers_are_full(target: Target) -> None:
    """Nothing is read while stalled, so the sender's kernel buffers fill and it blocks."""
    with trio.fail_after(10):
        async with open_proxy("127.0.0.1", target.port, rcvbuf=16384) as proxy:
            stream = await connect(proxy)
            await receive_exactly(stream, 3)
            proxy.stall()
            sent = 0
            with trio.move_on_after(1):
                while True:
                    await stream.send_all(b"y" * 16384)
                    sent += 16384
            assert sent < 64 * 1024 * 1024, "the sender never blocked"
            assert proxy.forwarded[Direction.UPSTREAM] == 0
            await stream.aclose()


async def test_proxy_slow_holds_its_rate(target: Target) -> None:
    rate, size = 40_000, 20_000
    with trio.fail_after(10):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            stream = await connect(proxy)
            await receive_exactly(stream, 3)
            proxy.slow(rate)
            start = trio.current_time()
            await stream.send_all(b"z" * size)
            await receive_exactly(stream, size)
            elapsed = trio.current_time() - start
            # Both directions are paced, but the echo overlaps its way in: about size/rate in
            # all, less the first piece (a twentieth of a second) that goes out at once.
            assert elapsed >= size / rate - 0.05 - 0.02, elapsed
            assert elapsed < 2 * size / rate + 2, elapsed
            assert proxy.forwarded[Direction.UPSTREAM] == size
            await stream.aclose()


@pytest.mark.parametrize("dropped", list(Direction))
async def test_proxy_half_open_drops_one_direction_silently(
    target: Target, dropped: Direction
) -> None:
    with trio.fail_after(5):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            proxy.half_open(dropped)
            stream = await connect(proxy)
            await stream.send_all(b"ping")
            if dropped is Direction.UPSTREAM:
                # The target's greeting comes through; what the client sends never arrives.
                assert await receive_exactly(stream, 3) == b"hi\n"
                with trio.move_on_after(QUIET):
                    await target.got.wait()
                    pytest.fail("the dropped direction was forwarded")
                assert bytes(target.received) == b""
            else:
                # The target gets the data; its greeting and echo are swallowed.
                while bytes(target.received) != b"ping":
                    await target.got.wait()
                with trio.move_on_after(QUIET):
                    data = await stream.receive_some(10)
                    pytest.fail(f"the dropped direction was forwarded: {data!r}")
            assert proxy.dropped[dropped] > 0 and proxy.open_connections == 1
            await stream.aclose()


async def test_proxy_refuses_new_connections_for_a_while(target: Target) -> None:
    with trio.fail_after(5):
        async with open_proxy("127.0.0.1", target.port) as proxy:
            kept = await connect(proxy)
            await receive_exactly(kept, 3)
            start = trio.current_time()
            proxy.drop(0.5)
            assert await kept.receive_some(10) == b""  # the open one was cut
            await kept.aclose()
            refused = 0
            while True:  # reconnect, as a client would, until the window ends
                try:
                    stream = await connect(proxy)
                except OSError:
                    refused += 1
                    await trio.sleep(0.02)  # a client's retry backoff
                    continue
                break
            assert await receive_exactly(stream, 3) == b"hi\n"
            assert refused > 0
            assert 0.5 <= trio.current_time() - start < 1.5
            await stream.aclose()


async def test_proxy_in_front_of_redis_cut_and_reconnect(tmp_path: object) -> None:
    """Between a server and Redis: RESP passes, a cut breaks the client's connection, and
    the next connection works."""
    import shutil
    from pathlib import Path

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    assert isinstance(tmp_path, Path)
    with trio.fail_after(15):
        async with (
            run_redis(tmp_path / "redis") as redis,
            open_proxy("127.0.0.1", redis.port) as proxy,
        ):
            stream = await connect(proxy)
            await stream.send_all(b"PING\r\n")
            assert await stream.receive_some(64) == b"+PONG\r\n"
            proxy.cut()
            assert await stream.receive_some(64) == b""
            await stream.aclose()
            again = await connect(proxy)
            await again.send_all(b"SET k v\r\nGET k\r\n")
            reply = b""
            while reply.count(b"\r\n") < 3:
                reply += await again.receive_some(64)
            assert reply == b"+OK\r\n$1\r\nv\r\n"
            await again.aclose()
