"""The conformance check for client transports: :func:`check_connection`.

Like trio's ``check_two_way_stream``, it takes a factory of connected pairs and checks the
contract of :class:`~crealia._transport.Connection` on fresh pairs, one rule at a time. A pair
is the server side (the :class:`Connection` the transport hands to its acceptor) and a
:class:`ConnectionPeer`: the client side, which the author of the transport writes (it speaks
the transport's protocol, nothing more). :class:`ConnectionCatcher` is an acceptor that hands
connections to the factory instead of running sessions::

    @asynccontextmanager
    async def my_pair():
        catcher = ConnectionCatcher(max_frame_bytes=4096)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(MyTransport("127.0.0.1", 0).serve, catcher.acceptor)
            peer = await MyClient.connect("127.0.0.1", port)
            conn = await catcher.accept()
            try:
                yield conn, peer
            finally:
                await peer.aclose()
                nursery.cancel_scope.cancel()

    async def test_my_transport_keeps_the_contract() -> None:
        await check_connection(my_pair, max_frame_bytes=4096)

crealia's own tests run it over both WebSocket endpoints (tests/test_connection_conformance.py)
and over a transport written in the tests against the public API only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Final

import attrs
import trio
import trio.testing

from ._errors import ConnectionClosed
from ._transport import Acceptor, Connection

__all__ = ["ConnectionCatcher", "ConnectionFactory", "ConnectionPeer", "check_connection"]

#: Seconds each rule may take (factory included) before it counts as broken.
CHECK_TIMEOUT: Final = 20.0
#: Most frames sent to a peer that does not read before a send must have blocked (64 MiB).
_MAX_UNREAD_FRAMES: Final = 4096
_UNREAD_FRAME_CHARS: Final = 16 * 1024


class ConnectionPeer(ABC):
    """The client end of a connection under :func:`check_connection`, written by the author of
    the transport. Its calls are made from one task at a time, except that ``send`` and
    ``receive`` may run at the same time."""

    @abstractmethod
    async def send(self, message: str | bytes) -> None:
        """Send one message: text for ``str``, binary for ``bytes``, whatever its size."""

    @abstractmethod
    async def receive(self) -> str | bytes:
        """The next whole message from the server; reads nothing while it is not called (the
        check relies on that to stop reading).

        Raises:
            ConnectionClosed: the server closed the connection (``code``: its close code) or it
                ended without a close (``code`` None or 1006).
        """

    @abstractmethod
    async def close(self, code: int) -> None:
        """Start a close with ``code`` from the client side and return once it is sent."""

    @abstractmethod
    async def vanish(self) -> None:
        """Drop the connection without a close, as a client whose process died."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the client end (whatever state it is in); the factory calls it."""


#: What :func:`check_connection` takes: opens a fresh connected pair for each rule.
ConnectionFactory = Callable[[], AbstractAsyncContextManager[tuple[Connection, ConnectionPeer]]]


class ConnectionCatcher:
    """An :class:`~crealia._transport.Acceptor` for tests: instead of running a session on
    each connection a transport hands over, it gives it to :meth:`accept`.

    The acceptor holds each connection (its ``serve`` call does not return) until cancelled:
    run the transport in a nursery that the test cancels when done.
    """

    def __init__(
        self, *, max_frame_bytes: int = 64 * 1024, handshake_timeout: float = 10.0
    ) -> None:
        self._send, self._receive = trio.open_memory_channel[Connection](64)
        #: Give this to the transport under test.
        self.acceptor = Acceptor(
            run_session=self._hold,
            max_frame_bytes=max_frame_bytes,
            handshake_timeout=handshake_timeout,
        )

    async def _hold(self, conn: Connection) -> None:
        await self._send.send(conn)
        await trio.sleep_forever()

    async def accept(self) -> Connection:
        """The next connection the transport handed to the acceptor (waits for it)."""
        return await self._receive.receive()


@attrs.frozen
class _Options:
    max_frame_bytes: int | None
    peer_close_codes: bool


_Rule = Callable[[Connection, ConnectionPeer, _Options], Awaitable[None]]


async def check_connection(
    factory: ConnectionFactory,
    *,
    max_frame_bytes: int | None = None,
    peer_close_codes: bool = True,
) -> None:
    """Check the :class:`~crealia._transport.Connection` contract on pairs from ``factory``.

    Each rule gets a fresh pair, under a deadline of :data:`CHECK_TIMEOUT` seconds:

    - text messages both ways arrive whole, in order, as ``str`` (non-ASCII and empty ones too);
    - binary messages arrive as ``bytes``;
    - with ``max_frame_bytes`` (the transport's limit; None: it has no frames to limit), a
      message of exactly the limit arrives and one over it closes with 1009;
    - ``close(code)`` delivers ``code`` to the peer and never raises: not twice, not after the
      peer vanished; ``send`` and ``receive`` then raise ``ConnectionClosed``;
    - what the peer sent before it closed is received, then ``receive`` raises
      ``ConnectionClosed`` (with the peer's code, unless ``peer_close_codes`` is False: for
      transports that cannot report it, like hypercorn's ASGI layer); ``send`` raises too;
    - a cancelled ``receive`` loses nothing and leaves the connection usable;
    - a ``send`` to a peer that stops reading blocks, and after cancelling it ``abort`` ends the
      connection: the peer gets whole frames in order, then the end;
    - ``send`` and ``receive`` run concurrently;
    - ``close`` when cancelled still ends the connection.

    Raises:
        AssertionError: a rule is broken; the message names it.
    """
    options = _Options(max_frame_bytes, peer_close_codes)
    for rule in _RULES:
        if rule is _frame_limit and max_frame_bytes is None:
            continue
        name = rule.__name__.strip("_")
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                async with factory() as (conn, peer):
                    await rule(conn, peer, options)
        except (AssertionError, trio.TooSlowError, ConnectionClosed, BaseExceptionGroup) as exc:
            raise _failure(name, exc) from exc


def _failure(name: str, exc: BaseException) -> BaseException:
    """The AssertionError naming the broken rule (nurseries wrap what their tasks raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, AssertionError):
        return AssertionError(f"check_connection: {name}: {exc}")
    if isinstance(exc, trio.TooSlowError):
        return AssertionError(f"check_connection: {name}: did not finish in {CHECK_TIMEOUT} s")
    if isinstance(exc, ConnectionClosed):
        return AssertionError(f"check_connection: {name}: unexpected {exc!r}")
    return exc


# -- helpers ------------------------------------------------------------------------------


async def _closed(call: Callable[[], Awaitable[object]], what: str) -> ConnectionClosed:
    """The ConnectionClosed that ``call`` must raise."""
    try:
        value = await call()
    except ConnectionClosed as exc:
        return exc
    raise AssertionError(f"{what}: expected ConnectionClosed, got {_short(value)}")


async def _peer_end(peer: ConnectionPeer) -> tuple[list[str | bytes], ConnectionClosed]:
    """Everything the peer still receives, and how its connection ended."""
    received: list[str | bytes] = []
    while True:
        try:
            received.append(await peer.receive())
        except ConnectionClosed as exc:
            return received, exc


async def _no_raise(call: Callable[[], Awaitable[None]], what: str) -> None:
    try:
        await call()
    except trio.Cancelled:
        raise
    except BaseException as exc:
        raise AssertionError(f"{what} raised {exc!r}; it must never raise") from exc


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _same(got: object, expected: str | bytes, what: str) -> None:
    assert type(got) is type(expected), (
        f"{what}: expected {type(expected).__name__} {_short(expected)}, got {_short(got)}"
    )
    assert got == expected, f"{what}: expected {_short(expected)}, got {_short(got)}"


async def _gone_both_ways(conn: Connection, after: str) -> None:
    await _closed(conn.receive, f"receive after {after}")
    await _closed(lambda: conn.send(b'{"type":"pong"}'), f"send after {after}")


# -- the rules -----------------------------------------------------------------------------

_TEXTS: Final = ("one", "twö ✓ 🎉", "", '{"type":"ping","data":{}}', "x" * 3000)


async def _text_both_ways(conn: Connection, peer: ConnectionPeer, options: _Options) -> None:
    assert isinstance(conn.remote, str), f"remote: expected str, got {conn.remote!r}"
    assert isinstance(conn.user_agent, str), f"user_agent: expected str, got {conn.user_agent!r}"
    for text in _TEXTS:
        await peer.send(text)
    for i, text in enumerate(_TEXTS):
        _same(await conn.receive(), text, f"receive of the client's text message {i}")
    for text in _TEXTS:
        await conn.send(text.encode())
    for i, text in enumerate(_TEXTS):
        _same(await peer.receive(), text, f"the client's receive of sent message {i}")


async def _binary_as_bytes(conn: Connection, peer: ConnectionPeer, options: _Options) -> None:
    for message in (b"\x00\x01\xfe\xff binary", b"", "text after binary"):
        await peer.send(message)
    _same(await conn.receive(), b"\x00\x01\xfe\xff binary", "receive of a binary message")
    _same(await conn.receive(), b"", "receive of an empty binary message")
    _same(await conn.receive(), "text after binary", "receive of a text message after them")


async def _frame_limit(conn: Connection, peer: ConnectionPeer, options: _Options) -> None:
    limit = options.max_frame_bytes
    assert limit is not None
    await peer.send("a" * limit)
    _same(await conn.receive(), "a" * limit, "receive of a message of exactly the limit")
    await peer.send("b" * (limit + 1))
    ends: list[ConnectionClosed] = []

    async def client_reads() -> None:
        ends.append((await _peer_end(peer))[1])

    async with trio.open_nursery() as nursery:
        # The client reads meanwhile: it answers the close, which some transports wait for.
        nursery.start_soon(client_reads)
        await _closed(conn.receive, "receive of a message over the limit")
    code = ends[0].code
    assert code == 1009, f"a message over the limit: the client got close {code}, not 1009"


async def _close_delivers_code(conn: Connection, peer: ConnectionPeer, options: _Options) -> None:
    async with trio.open_nursery() as nursery:
        # The peer reads while the close waits for its answer.
        nursery.start_soon(_no_raise, lambda: conn.close(4321, "checking"), "close(4321)")
        received, end = await _peer_end(peer)
    assert not received, f"the client got {_short(received)} before the close"
    assert end.code == 4321, f"close(4321): the client got close code {end.code}"
    await _no_raise(lambda: conn.close(4000), "a second close")
    await _gone_both_ways(conn, "close")


async def _close_after_peer_vanished(
    conn: Connection, peer: ConnectionPeer, options: _Options
) -> None:
    await peer.vanish()
    await _no_raise(lambda: conn.close(1000), "close after the client vanished")
    await _no_raise(lambda: conn.close(1001), "a second close after the client vanished")
    await _gone_both_ways(conn, "close")


async def _peer_close_reaches_receive(
    conn: Connection, peer: ConnectionPeer, options: _Options
) -> None:
    await peer.send("last words")
    await peer.close(4002)
    _same(await conn.receive(), "last words", "receive of what the client sent before it closed")
    end = await _closed(conn.receive, "receive after the client closed")
    if options.peer_close_codes:
        assert end.code == 4002, f"the client closed with 4002; receive raised code {end.code}"
    again = await _closed(conn.receive, "a second receive after the client closed")
    if options.peer_close_codes:
        assert again.code == 4002, f"a second receive raised code {again.code}, not 4002"
    await _closed(lambda: conn.send(b"{}"), "send after the client closed")
    await _no_raise(lambda: conn.close(1000), "close after the client closed")


async def _cancelled_receive_loses_nothing(
    conn: Connection, peer: ConnectionPeer, options: _Options
) -> None:
    returned: list[str | bytes] = []
    scope = trio.CancelScope()

    async def receive_until_cancelled() -> None:
        with scope:
            returned.append(await conn.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_until_cancelled)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert not returned, f"receive returned {_short(returned)} though nothing was sent"
    await peer.send("after the cancelled receive")
    _same(await conn.receive(), "after the cancelled receive", "receive after a cancelled one")
    await conn.send(b"still open")
    _same(await peer.receive(), "still open", "the client's receive after a cancelled receive")


def _unread_frame(i: int) -> str:
    return f"{i:08d}".ljust(_UNREAD_FRAME_CHARS, "x")


@attrs.define
class _Send:
    """One send under test: whether it returned, and whether it has ended at all."""

    returned: bool = False
    ended: bool = False
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    async def run(self, conn: Connection, frame: bytes) -> None:
        try:
            with self.scope:
                await conn.send(frame)
                self.returned = True
        except ConnectionClosed:
            pass  # allowed once it was aborted (checked by the caller)
        finally:
            self.ended = True


async def _cancelled_send_then_abort(
    conn: Connection, peer: ConnectionPeer, options: _Options
) -> None:
    sent = 0
    # The peer reads nothing meanwhile: sooner or later a send must wait for it.
    while True:
        send = _Send()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send.run, conn, _unread_frame(sent).encode())
            await trio.testing.wait_all_tasks_blocked()
            if not send.ended:
                send.scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                if not send.ended:
                    # A send the transport cannot cancel: abort from another task must end
                    # it (the core does this when a send outlives the close deadline).
                    await _no_raise(conn.abort, "abort while a cancelled send is blocked")
        if not send.returned:
            break
        sent += 1
        assert sent < _MAX_UNREAD_FRAMES, (
            f"{sent} sends of {_UNREAD_FRAME_CHARS} characters to a client that reads nothing "
            "never blocked: a transport must not buffer without bound"
        )
    await _no_raise(conn.abort, "abort after a cancelled send")
    await _no_raise(conn.abort, "a second abort")
    received, _end = await _peer_end(peer)
    assert len(received) <= sent + 1, f"the client got {len(received)} frames of {sent + 1} sent"
    for i, got in enumerate(received):
        _same(got, _unread_frame(i), f"frame {i} the client got after the abort")
    await _gone_both_ways(conn, "abort")
    await _no_raise(lambda: conn.close(1000), "close after abort")


async def _concurrent_send_and_receive(
    conn: Connection, peer: ConnectionPeer, options: _Options
) -> None:
    count = 200
    got_by_peer: list[str | bytes] = []
    got_by_conn: list[str | bytes] = []

    async def server_sends() -> None:
        for i in range(count):
            await conn.send(f"s{i}".encode())

    async def client_sends() -> None:
        for i in range(count):
            await peer.send(f"c{i}")

    async def client_receives() -> None:
        for _ in range(count):
            got_by_peer.append(await peer.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_sends)
        nursery.start_soon(client_sends)
        nursery.start_soon(client_receives)
        for _ in range(count):
            got_by_conn.append(await conn.receive())
    assert got_by_conn == [f"c{i}" for i in range(count)], "concurrent receive: order lost"
    assert got_by_peer == [f"s{i}" for i in range(count)], "concurrent send: order lost"


async def _close_when_cancelled(conn: Connection, peer: ConnectionPeer, options: _Options) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await _no_raise(lambda: conn.close(1000), "close in a cancelled scope")
    received, _end = await _peer_end(peer)
    assert not received, f"the client got {_short(received)} before the close"
    await _gone_both_ways(conn, "a cancelled close")


_RULES: Final[tuple[_Rule, ...]] = (
    _text_both_ways,
    _binary_as_bytes,
    _frame_limit,
    _close_delivers_code,
    _close_after_peer_vanished,
    _peer_close_reaches_receive,
    _cancelled_receive_loses_nothing,
    _cancelled_send_then_abort,
    _concurrent_send_and_receive,
    _close_when_cancelled,
)
