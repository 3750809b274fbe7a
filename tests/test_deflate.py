"""Bounded permessage-deflate on the trio-websocket and hypercorn endpoints."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import random
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import psutil
import pytest
import trio
import trio_websocket
from hypercorn.config import Config
from hypercorn.protocol import ws_stream
from hypercorn.trio import serve as hypercorn_serve
from quart import websocket
from quart_trio import QuartTrio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from crealia.transports._deflate import (
    DEFAULT_MAX_MESSAGE_SIZE,
    BoundedDeflate,
    accept_websocket,
    install_hypercorn_deflate,
    uninstall_hypercorn_deflate,
)

MAX = DEFAULT_MAX_MESSAGE_SIZE
SMALL_WINDOW = "permessage-deflate; client_max_window_bits=11; server_max_window_bits=11"
TIMEOUT = 10


# -- raw frames and payloads -------------------------------------------------


def _masked_frame(
    payload: bytes,
    *,
    opcode: int = 0x2,
    rsv1: bool = True,
    fin: bool = True,
) -> bytes:
    """A client (masked) frame, built by hand so it can be anything we like."""
    mask = os.urandom(4)
    head = bytearray([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n,
        "little",
    )
    return bytes(head) + mask + body


def _deflate(data: bytes, wbits: int = 15) -> bytes:
    """A permessage-deflate payload (RFC 7692 7.2.1) for ``data``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -wbits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


@functools.cache
def _bomb() -> bytes:
    """~50 KB of deflate data inflating to 50 MiB of zeros (built without 50 MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    out = b"".join(c.compress(zeros) for _ in range(50)) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def _text(n: int) -> str:
    rnd = random.Random(n)
    words = ["".join(rnd.choices("abcdefghij", k=rnd.randint(2, 8))) for _ in range(200)]
    return " ".join(rnd.choices(words, k=n // 5))[:n]


class _OfferWithoutWindowBits(PerMessageDeflate):
    """A client offering bare ``permessage-deflate`` (as Firefox does)."""

    def offer(self) -> bool:
        return True


# -- a raw wsproto client ------------------------------------------------------


class _Client:
    """Minimal wsproto client over a trio TCP stream, keeping the raw bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.extensions_header: str | None = None
        self.extensions: list[object] = []
        self.wire = bytearray()  # everything received after the handshake

    async def handshake(self, extension: PerMessageDeflate | None) -> None:
        offer = [extension] if extension is not None else []
        await self.stream.send_all(
            self.ws.send(Request(host="127.0.0.1", target="/ws", extensions=offer)),
        )
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = await self.stream.receive_some(65536)
            assert data, "server closed during handshake"
            raw += data
            self.ws.receive_data(data)
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.wire += rest
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions":
                self.extensions_header = value.strip()
        events = list(self.ws.events())
        assert isinstance(events[0], AcceptConnection), events
        self.extensions = list(events[0].extensions)

    async def send(self, message: str | bytes) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(message)
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        """Send raw bytes; the server may legitimately hang up before reading them all."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self.stream.send_all(data)

    async def receive(self) -> str | bytes | CloseConnection:
        """The next whole message, or the server's Close."""
        parts: list[str | bytes] = []
        while True:
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    return event
                assert isinstance(event, Message), event
                parts.append(event.data)
                if event.message_finished and isinstance(event, BytesMessage):
                    return b"".join(part for part in parts if isinstance(part, bytes))
                if event.message_finished:
                    return "".join(part for part in parts if isinstance(part, str))
            data = await self.stream.receive_some(65536)
            assert data, "TCP closed without a Close frame"
            self.wire += data
            self.ws.receive_data(data)


@contextlib.asynccontextmanager
async def _connect(port: int, extension: PerMessageDeflate | None) -> AsyncIterator[_Client]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = _Client(stream)
        await client.handshake(extension)
        yield client


async def _peak_rss_growth(work: Callable[[], Awaitable[None]]) -> int:
    """Run ``work`` and return the peak growth of this process's RSS meanwhile."""
    proc = psutil.Process()
    gc.collect()
    base = peak = proc.memory_info().rss

    async def sample() -> None:
        nonlocal peak
        while True:  # a sampler, not synchronization
            peak = max(peak, proc.memory_info().rss)
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        await work()
        nursery.cancel_scope.cancel()
    return int(max(peak, proc.memory_info().rss) - base)


# -- the two servers -------------------------------------------------------------


@dataclass
class _Server:
    kind: str
    port: int
    close_codes: list[int] = field(default_factory=list)  # seen by trio-websocket handlers


async def _start_trio_websocket(nursery: trio.Nursery) -> _Server:
    close_codes: list[int] = []

    async def echo(request: trio_websocket.WebSocketRequest) -> None:
        ws = await accept_websocket(request, max_message_size=MAX)
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            close_codes.append(exc.reason.code if exc.reason else -1)

    server = await nursery.start(
        functools.partial(
            trio_websocket.serve_websocket,
            echo,
            "127.0.0.1",
            0,
            None,
            max_message_size=MAX,
        ),
    )
    return _Server("trio-websocket", server.port, close_codes)


async def _start_hypercorn(nursery: trio.Nursery) -> _Server:
    app = QuartTrio(__name__)

    @app.websocket("/ws")
    async def echo() -> None:
        while True:
            await websocket.send(await websocket.receive())

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.websocket_max_message_size = MAX
    config.accesslog = None
    config.errorlog = None
    # hypercorn reports what it bound (e.g. "http://127.0.0.1:41234") via task_status.
    binds = await nursery.start(functools.partial(hypercorn_serve, app, config))
    return _Server("hypercorn", int(binds[0].rsplit(":", 1)[1]))


@pytest.fixture(params=["trio-websocket", "hypercorn"])
async def server(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
) -> AsyncIterator[_Server]:
    if request.param == "trio-websocket":
        yield await _start_trio_websocket(nursery)
        return
    install_hypercorn_deflate(MAX)
    try:
        yield await _start_hypercorn(nursery)
    finally:
        uninstall_hypercorn_deflate()


# -- end-to-end -------------------------------------------------------------------


async def test_deflate_negotiated_with_small_window_and_round_trips(server: _Server) -> None:
    with trio.fail_after(TIMEOUT):
        async with _connect(server.port, PerMessageDeflate()) as client:
            assert client.extensions_header == SMALL_WINDOW
            (ext,) = client.extensions
            assert isinstance(ext, PerMessageDeflate)
            assert (ext.client_max_window_bits, ext.server_max_window_bits) == (11, 11)

            text = _text(6000)
            await client.send(text)
            assert await client.receive() == text
            assert client.wire[0] == 0xC1  # FIN | RSV1 (compressed) | TEXT
            assert len(client.wire) < len(text) // 2
            # Context takeover across messages, binary, empty, up to the cap.  (Not
            # b"": quart turns an empty binary message into None.)
            for message in (text, os.urandom(3000), "", "x" * MAX, bytes(MAX)):
                await client.send(message)
                assert await client.receive() == message


async def test_offer_without_client_window_bits(server: _Server) -> None:
    """The client may then use a 15-bit window; the server must inflate it."""
    with trio.fail_after(TIMEOUT):
        async with _connect(server.port, _OfferWithoutWindowBits()) as client:
            assert client.extensions_header == "permessage-deflate; server_max_window_bits=11"
            block = os.urandom(8000)  # repeated 8 KB apart: needs > 11-bit window
            await client.send(block * 3)
            assert await client.receive() == block * 3


async def test_client_without_deflate_gets_uncompressed(server: _Server) -> None:
    with trio.fail_after(TIMEOUT):
        async with _connect(server.port, None) as client:
            assert client.extensions_header is None
            assert client.extensions == []
            text = _text(3000)
            await client.send(text)
            assert await client.receive() == text
            assert client.wire[0] == 0x81  # FIN | TEXT, no RSV1
            await client.send(b"\x00\x01")
            assert await client.receive() == b"\x00\x01"


async def test_bombs_closed_with_1009_without_growing_memory(server: _Server) -> None:
    bomb_frame = _masked_frame(_bomb())
    codes: list[int] = []

    async def bomber() -> None:
        async with _connect(server.port, PerMessageDeflate()) as client:
            await client.send("warm up the decompressor")
            assert await client.receive() == "warm up the decompressor"
            await client.send_raw(bomb_frame)
            reply = await client.receive()
            assert isinstance(reply, CloseConnection), reply
            codes.append(reply.code)

    async def bombard() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(bomber)

    with trio.fail_after(TIMEOUT):
        growth = await _peak_rss_growth(bombard)
        assert codes == [CloseReason.MESSAGE_TOO_BIG] * 8
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
        if server.kind == "trio-websocket":
            assert server.close_codes == [1009] * 8

        # (d) and the server still serves a good client.
        async with _connect(server.port, PerMessageDeflate()) as client:
            assert client.extensions_header == SMALL_WINDOW
            await client.send("still there?")
            assert await client.receive() == "still there?"


async def test_data_after_close_is_not_buffered(server: _Server) -> None:
    """An uncompressed over-size message is closed with 1009 by the transport
    itself; a client ignoring that Close and streaming on must not grow the
    server (hypercorn buffers such data forever unless installed)."""
    chunk = _masked_frame(b"b" * 2**20, opcode=0x0, rsv1=False, fin=False)

    async def flood() -> None:
        async with _connect(server.port, None) as client:
            await client.send_raw(_masked_frame(b"a" * (MAX + 1), rsv1=False, fin=False))
            reply = await client.receive()
            assert isinstance(reply, CloseConnection)
            assert reply.code == CloseReason.MESSAGE_TOO_BIG
            for _ in range(100):
                try:
                    await client.stream.send_all(chunk)
                except trio.BrokenResourceError:  # trio-websocket hangs up
                    break

    with trio.fail_after(TIMEOUT):
        growth = await _peak_rss_growth(flood)
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


async def test_corrupt_deflate_data_closes_with_1007(server: _Server) -> None:
    with trio.fail_after(TIMEOUT):
        async with _connect(server.port, PerMessageDeflate()) as client:
            await client.send_raw(_masked_frame(b"\xff\xff\xff\xff"))
            reply = await client.receive()
            assert isinstance(reply, CloseConnection)
            assert reply.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA


# -- the extension on its own -----------------------------------------------------


def _server_connection(offer: str, ext: BoundedDeflate | None = None) -> Connection:
    ext = ext or BoundedDeflate()
    assert ext.accept(offer) is not None
    return Connection(ConnectionType.SERVER, [ext])


@pytest.mark.parametrize(
    ("offers", "response"),
    [
        (["permessage-deflate"], "server_max_window_bits=11"),
        (["permessage-deflate; client_max_window_bits"], SMALL_WINDOW.partition("; ")[2]),
        (
            ["permessage-deflate; client_max_window_bits=9"],
            "client_max_window_bits=9; server_max_window_bits=11",
        ),
        (["permessage-deflate; server_max_window_bits=10"], "server_max_window_bits=10"),
        (['permessage-deflate; server_max_window_bits="13"'], "server_max_window_bits=11"),
        (
            ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
            "server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11",
        ),
        (["permessage-deflate; server_max_window_bits=8"], None),  # zlib cannot
        (["permessage-deflate; server_max_window_bits"], None),  # value required
        (["permessage-deflate; client_max_window_bits=16"], None),
        (["permessage-deflate; client_no_context_takeover=1"], None),
        (["permessage-deflate; mystery"], None),
        (["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
        # The first acceptable offer wins (wsproto asks about each in turn).
        (
            [
                "permessage-deflate; mystery",
                "permessage-deflate; client_max_window_bits=10",
                "permessage-deflate",
            ],
            "client_max_window_bits=10; server_max_window_bits=11",
        ),
    ],
)
async def test_negotiation(offers: list[str], response: str | None) -> None:
    with trio.fail_after(TIMEOUT):
        ext = BoundedDeflate()
        answers = [ext.accept(offer) for offer in offers]
        assert next((a for a in answers if a is not None), None) == response
        assert ext.enabled() is (response is not None)


async def test_inflate_cap_is_exact_and_bounded() -> None:
    with trio.fail_after(TIMEOUT):
        offer = "permessage-deflate; client_max_window_bits"
        conn = _server_connection(offer, BoundedDeflate(max_message_size=1000))
        conn.receive_data(_masked_frame(_deflate(b"a" * 1000, 11)))
        events = list(conn.events())
        assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == b"a" * 1000

        conn = _server_connection(offer, BoundedDeflate(max_message_size=1000))
        conn.receive_data(_masked_frame(_deflate(b"a" * 1001, 11)))
        (event,) = conn.events()
        assert isinstance(event, CloseConnection)
        assert event.code == CloseReason.MESSAGE_TOO_BIG

        # Text: the limit is in characters (the transport counts them), so 1000 characters
        # of two bytes inflate; more bytes than 1000 characters can take in UTF-8 do not.
        conn = _server_connection(offer, BoundedDeflate(max_message_size=1000))
        conn.receive_data(_masked_frame(_deflate("é".encode() * 1000, 11), opcode=0x1))
        events = list(conn.events())
        assert "".join(e.data for e in events if isinstance(e, TextMessage)) == "é" * 1000
        conn = _server_connection(offer, BoundedDeflate(max_message_size=1000))
        conn.receive_data(_masked_frame(_deflate(b"a" * 4001, 11), opcode=0x1))
        (event,) = conn.events()
        assert isinstance(event, CloseConnection)
        assert event.code == CloseReason.MESSAGE_TOO_BIG

        # The whole 50 MiB bomb in one go allocates about the cap, not 50 MiB.
        conn = _server_connection("permessage-deflate")
        frame = _masked_frame(_bomb())
        tracemalloc.start()
        try:
            conn.receive_data(frame)
            events = list(conn.events())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [type(e) for e in events] == [CloseConnection]
        assert peak < len(frame) * 3 + 4 * MAX


async def test_ping_between_compressed_fragments() -> None:
    """wsproto's stock class passes the fragments after the ping through raw."""
    with trio.fail_after(TIMEOUT):
        text = _text(3000).encode()
        payload = _deflate(text, 11)
        half = len(payload) // 2
        conn = _server_connection("permessage-deflate; client_max_window_bits")
        conn.receive_data(
            _masked_frame(payload[:half], opcode=0x1, fin=False)
            + _masked_frame(b"ping", opcode=0x9, rsv1=False)
            + _masked_frame(payload[half:], opcode=0x0, rsv1=False),
        )
        events = list(conn.events())
        assert "".join(e.data for e in events if isinstance(e, TextMessage)) == text.decode()


async def test_install_hypercorn_deflate_is_idempotent() -> None:
    with trio.fail_after(TIMEOUT):
        patched = vars(ws_stream)  # the module's globals, as Handshake.accept sees them
        original = patched["PerMessageDeflate"]
        try:
            install_hypercorn_deflate(1000)
            install_hypercorn_deflate(2000)
            ext = patched["PerMessageDeflate"]()
            assert isinstance(ext, BoundedDeflate)
            assert ext.max_message_size == 2000
        finally:
            uninstall_hypercorn_deflate()
            uninstall_hypercorn_deflate()
        assert patched["PerMessageDeflate"] is original is PerMessageDeflate
        assert patched["Connection"] is Connection
