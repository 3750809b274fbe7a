"""The lean load-generating WebSocket client shared by ``crealia loadtest`` and the benchmarks.

A load generator must not be the bottleneck it measures. wsproto's pure-Python frame parser
costs about 8 µs a frame, which with batching off makes a one-process generator slower than the
server; so wsproto does the handshake and every send, and :meth:`Connection.read` parses the
server's (unmasked) frames inline: text, continuation, close, ping, pong, permessage-deflate
through zlib. Subclasses get each text message, each close and each chunk's size through the
``on_*`` hooks, which run in the reader task and must not block.

Timestamps are milliseconds on this process's monotonic clock (:func:`now_ms`): a sender puts
one in its message and a receiver in the same process subtracts it from :attr:`rx_ms`, the time
the chunk holding the message arrived.
"""

from __future__ import annotations

import contextlib
import math
import ssl
import time
import zlib
from collections.abc import Iterable
from typing import Any

import orjson
import psutil
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError

from ._wire import SUBPROTOCOL

__all__ = [
    "NET_ERRORS",
    "Connection",
    "HandshakeRefused",
    "cpu_seconds",
    "envelopes",
    "now_ms",
    "percentiles",
]

#: What a socket that went away raises.
NET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError)
RECV_SIZE = 256 * 1024
_MAX_RESPONSE_HEAD = 1 << 20
_BASE_NS = time.monotonic_ns()
_monotonic_ns = time.monotonic_ns


def now_ms() -> float:
    """Milliseconds on this process's monotonic clock (the clock put in messages)."""
    return (_monotonic_ns() - _BASE_NS) / 1e6


def percentiles(samples: Iterable[float], points: Iterable[int] = (50, 95, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles ``{"p50": …}`` of ``samples`` (None each when there are none)."""
    values = sorted(samples)
    out: dict[str, Any] = {}
    for point in points:
        if not values:
            out[f"p{point}"] = None
            continue
        rank = math.ceil(point / 100 * len(values)) - 1
        out[f"p{point}"] = values[max(0, min(len(values) - 1, rank))]
    return out


def envelopes(value: Any) -> list[Any]:
    """The envelopes of a decoded server frame: one envelope or an array of them (§2)."""
    return value if type(value) is list else [value]


def cpu_seconds(process: psutil.Process, *, children: bool = True) -> float:
    """User plus system CPU seconds of ``process`` (and, by default, its children)."""
    times = process.cpu_times()
    total = float(times.user + times.system)
    if children:
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
    return total


class HandshakeRefused(Exception):
    """The WebSocket handshake did not complete; the message says how it ended."""


class _FramingError(Exception):
    """The server broke RFC 6455 framing."""


class Connection:
    """One client connection: a Trio TCP stream, wsproto for the handshake and sends, an
    inline frame parser for reads.

    Use: :meth:`open`, then run :meth:`read` in a task of your nursery and send with
    :meth:`send` / :meth:`send_json`; :meth:`close` sends the close frame and waits for the
    reader to see the reply.
    """

    def __init__(self, *, deflate: bool = False, subprotocol: str | None = SUBPROTOCOL) -> None:
        self.stream: trio.abc.Stream | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._offer_deflate = deflate
        self._subprotocol = subprotocol
        #: Whether the handshake completed and the reader has not ended.
        self.alive = False
        #: Set by :meth:`close` (a close from then on is the one we asked for).
        self.closing = False
        #: Set when the server closed first.
        self.closed_by_server = False
        self.reader_done = trio.Event()
        #: When the last chunk arrived (:func:`now_ms`).
        self.rx_ms = 0.0
        #: Bytes received and sent on the wire (frames, headers included).
        self.received_bytes = 0
        self.sent_bytes = 0
        #: What the handshake agreed.
        self.deflated = False
        self.selected_subprotocol: str | None = None
        self._leftover = b""
        self._inflater: Any = None
        self._inflate_fresh = False  # server_no_context_takeover
        self._busy = False
        self._queue: list[bytes] = []

    # -- hooks (run in the reader task) --------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        """A whole text message arrived (``payload``: its UTF-8 bytes)."""

    def on_close(self, code: int, reason: str) -> None:
        """The server's close frame arrived (before it is echoed)."""

    def on_bytes(self, count: int) -> None:
        """A chunk of ``count`` bytes arrived."""

    def on_lost(self, why: str) -> None:
        """The connection ended without a close frame (``why``: EOF or the socket error),
        while not closing."""

    def on_reader_error(self, exc: Exception) -> None:
        """The server broke framing, or a hook raised; the connection is dropped."""

    # -- opening -------------------------------------------------------------------------------

    async def open(self, host: str, port: int, target: str, *, tls: bool = False) -> None:
        """Connect (over TLS with the system's trust store if ``tls``) and complete the
        handshake.

        Raises:
            HandshakeRefused: the server answered with something other than 101, or the
                response was cut short or too large.
            OSError: the TCP connection failed.
            trio.BrokenResourceError: the TLS handshake failed.
        """
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        self.stream = stream
        if tls:
            self.stream = stream = trio.SSLStream(
                stream, ssl.create_default_context(), server_hostname=host
            )
            await stream.do_handshake()
        deflate = PerMessageDeflate() if self._offer_deflate else None
        request = Request(
            host=f"{host}:{port}",
            target=target,
            subprotocols=[self._subprotocol] if self._subprotocol else [],
            extensions=[deflate] if deflate else [],
        )
        await stream.send_all(self.ws.send(request))
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                raise HandshakeRefused("the server closed the connection during the handshake")
            head += data
            if len(head) > _MAX_RESPONSE_HEAD:
                raise HandshakeRefused("the handshake response is larger than 1 MiB")
        end = head.index(b"\r\n\r\n") + 4
        self.ws.receive_data(head[:end])
        self._leftover = head[end:]
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                if event.extensions and deflate is not None:
                    self.deflated = True
                    self._inflate_fresh = deflate.server_no_context_takeover
                    self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                self.selected_subprotocol = event.subprotocol
                self.alive = True
                return
            if isinstance(event, RejectConnection):
                raise HandshakeRefused(f"the handshake was refused with HTTP {event.status_code}")
        raise HandshakeRefused("the handshake response was incomplete")

    # -- sending -------------------------------------------------------------------------------

    async def send_bytes(self, data: bytes) -> None:
        """Send wire bytes; concurrent callers queue behind the one in ``send_all`` (order
        kept, one task ever in ``send_all``)."""
        self.sent_bytes += len(data)
        if self._busy:
            self._queue.append(data)
            return
        stream = self.stream
        assert stream is not None
        self._busy = True
        try:
            await stream.send_all(data)
            while self._queue:
                more = b"".join(self._queue)
                self._queue.clear()
                await stream.send_all(more)
        finally:
            self._busy = False

    async def send(self, text: str) -> None:
        """Send one text message."""
        await self.send_bytes(self.ws.send(TextMessage(data=text)))

    async def send_json(self, message: Any) -> None:
        """Send one JSON text message."""
        await self.send(orjson.dumps(message).decode())

    # -- reading -------------------------------------------------------------------------------

    async def read(self) -> None:
        """Read frames until the connection ends, calling the hooks. Never raises for what the
        server or the network did (see :meth:`on_lost`, :meth:`on_reader_error`)."""
        stream = self.stream
        assert stream is not None
        receive = stream.receive_some
        on_text = self.on_text
        on_bytes = self.on_bytes
        from_bytes = int.from_bytes
        buf = self._leftover
        self._leftover = b""
        fragments: list[bytes] = []
        compressed = False
        try:
            while True:
                pos = 0
                size = len(buf)
                while size - pos >= 2:
                    b0 = buf[pos]
                    b1 = buf[pos + 1]
                    n = b1 & 0x7F
                    if n < 126:
                        start = pos + 2
                    elif n == 126:
                        if size - pos < 4:
                            break
                        n = from_bytes(buf[pos + 2 : pos + 4], "big")
                        start = pos + 4
                    else:
                        if size - pos < 10:
                            break
                        n = from_bytes(buf[pos + 2 : pos + 10], "big")
                        start = pos + 10
                    if b1 & 0x80:
                        raise _FramingError("masked frame from the server")
                    end = start + n
                    if end > size:
                        break
                    payload = buf[start:end]
                    pos = end
                    opcode = b0 & 0x0F
                    if opcode == 1 and b0 & 0x80 and not fragments:  # the usual case
                        on_text(self._inflate(payload) if b0 & 0x40 else payload)
                    elif opcode < 3:  # fragmented (or binary)
                        if opcode:
                            if fragments:
                                raise _FramingError("a data frame inside a fragmented one")
                            compressed = bool(b0 & 0x40)
                            fragments.append(b"\x01" if opcode == 1 else b"\x02")
                        elif not fragments:
                            raise _FramingError("an unexpected continuation frame")
                        fragments.append(payload)
                        if b0 & 0x80:
                            kind = fragments[0]
                            whole = b"".join(fragments[1:])
                            fragments.clear()
                            if compressed:
                                whole = self._inflate(whole)
                            if kind == b"\x01":
                                on_text(whole)
                    elif opcode == 8:
                        await self._closed(payload)
                        return
                    elif opcode == 9:
                        await self.send_bytes(self.ws.send(Pong(payload=payload)))
                    elif opcode != 10:
                        raise _FramingError(f"unknown opcode {opcode}")
                buf = buf[pos:] if pos else buf
                data = bytes(await receive(RECV_SIZE))  # no copy: it is bytes
                if not data:
                    if not self.closing:
                        self.on_lost("EOF without close frame")
                    return
                self.rx_ms = (_monotonic_ns() - _BASE_NS) / 1e6
                self.received_bytes += len(data)
                on_bytes(len(data))
                buf = buf + data if buf else data
        except NET_ERRORS as exc:
            if not self.closing:
                self.on_lost(f"socket error: {type(exc).__name__}")
        except Exception as exc:
            self.on_reader_error(exc)
        finally:
            self.alive = False
            self.reader_done.set()

    def _inflate(self, payload: bytes) -> bytes:
        if self._inflater is None:
            raise _FramingError("a compressed frame, but permessage-deflate was not agreed")
        if self._inflate_fresh:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._inflater.decompress(payload + b"\x00\x00\xff\xff"))

    async def _closed(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.alive = False  # stops senders before the echo
        if not self.closing:
            self.closed_by_server = True
        self.on_close(code, payload[2:].decode("utf-8", "replace"))
        if self.ws.state is ConnectionState.OPEN:  # the server started the close: echo it
            with contextlib.suppress(*NET_ERRORS):
                reply = 1000 if code in (1005, 1006, 1015) else code
                await self.send_bytes(self.ws.send(CloseConnection(code=reply)))

    # -- closing -------------------------------------------------------------------------------

    async def close(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a deadline
        """Send a 1000 close frame and wait for the reader to end, both within ``timeout`` s,
        then drop the connection if it did not (a server that reads nothing never takes the
        close frame); whether the reader ended (False also when the connection was gone)."""
        self.closing = True
        if not self.alive or self.stream is None:
            return False
        with trio.move_on_after(timeout):
            try:
                if self.ws.state is ConnectionState.OPEN:
                    await self.send_bytes(self.ws.send(CloseConnection(code=1000)))
            except NET_ERRORS:
                return False
            await self.reader_done.wait()
        if not self.reader_done.is_set():
            await self.aclose()
        return self.reader_done.is_set()

    async def aclose(self) -> None:
        """Close the TCP stream (no close frame)."""
        if self.stream is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(*NET_ERRORS):
                await self.stream.aclose()
