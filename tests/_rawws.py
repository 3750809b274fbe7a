"""A raw RFC 6455 client for conformance tests: every octet built by hand, every frame checked.

Nothing here is lenient on purpose: frames go out exactly as the test builds them (masked or
not, any opcode, RSV bits and length encoding, chopped into any pieces), and every frame the
server sends is checked against the RFC before the test sees it (unmasked, no RSV bit but RSV1
under permessage-deflate, control frames final and at most 125 bytes, close codes sendable).
permessage-deflate (RFC 7692) is done here with zlib, so the server's deflate is checked
against an independent one.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_EMPTY_BLOCK = b"\x00\x00\xff\xff"
#: Largest HTTP response head read (the handshake's answer).
_MAX_HEAD = 16 * 1024
#: Close codes a server may send (RFC 6455 §7.4.1; 1004-1006 and 1015 never go on the wire).
_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


class Refused(Exception):
    """The server answered the handshake with something other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"handshake refused: {status} {body[:200]!r}")
        self.status = status
        self.body = body


class ServerBrokeProtocol(AssertionError):
    """A frame from the server breaks RFC 6455 (or the negotiated extension)."""


@attrs.frozen
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv1: bool = False


@attrs.define
class Deflate:
    """The client half of permessage-deflate as negotiated (RFC 7692 §7)."""

    client_bits: int = 15
    server_bits: int = 15
    client_no_context: bool = False
    server_no_context: bool = False
    _compressor: zlib._Compress | None = None
    _decompressor: zlib._Decompress | None = None

    @classmethod
    def from_response(cls, header: str) -> Deflate:
        """The parameters of the server's ``Sec-WebSocket-Extensions`` answer."""
        name, *params = (part.strip() for part in header.split(";"))
        if name != "permessage-deflate" or "," in header:
            raise ServerBrokeProtocol(f"unexpected extensions answer: {header!r}")
        deflate = cls()
        for param in params:
            key, _, value = (part.strip() for part in param.partition("="))
            if key == "client_max_window_bits":
                deflate.client_bits = int(value)
            elif key == "server_max_window_bits":
                deflate.server_bits = int(value)
            elif key == "client_no_context_takeover":
                deflate.client_no_context = True
            elif key == "server_no_context_takeover":
                deflate.server_no_context = True
            else:
                raise ServerBrokeProtocol(f"unknown permessage-deflate parameter: {param!r}")
        return deflate

    def compress(self, data: bytes) -> bytes:
        if self._compressor is None or self.client_no_context:
            # zlib has no raw 8-bit window (it uses 9): only a peer's decoder could tell.
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, -max(self.client_bits, 9))
        out = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(_EMPTY_BLOCK)
        return out[:-4]

    def decompress(self, data: bytes) -> bytes:
        """Inflate one message of the server's, with a window no larger than the one agreed
        (a server using more, or keeping context it said it would not, fails here)."""
        if self._decompressor is None or self.server_no_context:
            self._decompressor = zlib.decompressobj(-self.server_bits)
        try:
            return self._decompressor.decompress(data + _EMPTY_BLOCK)
        except zlib.error as exc:
            raise ServerBrokeProtocol(f"the server's deflate data does not inflate: {exc}") from exc


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length_bytes: int | None = None,
) -> bytes:
    """One frame as a client sends it (masked unless ``mask=False``). ``rsv`` is the three RSV
    bits as a number (4: RSV1); ``length_bytes`` forces a 0-, 2- or 8-byte extended length,
    minimal or not."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    marker = {0: size, 2: 126, 8: 127}[length_bytes]
    head += bytes([(0x80 if mask else 0) | marker])
    if length_bytes:
        head += size.to_bytes(length_bytes, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _masked(payload, key)


def _masked(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def close_payload(code: int | None = None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


class RawWebSocket:
    """One client connection, opened by :func:`open_ws`."""

    def __init__(self, stream: trio.SocketStream, rest: bytes, deflate: Deflate | None) -> None:
        self.stream = stream
        self._buffer = bytearray(rest)
        self.deflate = deflate
        self.subprotocol: str | None = None
        #: True once a write failed: the server had dropped TCP.
        self.send_failed = False
        #: Set when TCP ended with a reset rather than a FIN.
        self.reset: str | None = None
        #: Whether this side has sent a close frame (then it does not answer the server's).
        self.close_sent = False

    # -- sending --

    async def send_raw(self, data: bytes, chop: int | None = None) -> None:
        """Write ``data``, in pieces of ``chop`` octets if given (each its own write).

        Once the server has dropped TCP (it failed the connection while octets were still
        going out), the rest is not sent: what it sent before is still read.
        """
        step = chop or max(1, len(data))
        for start in range(0, len(data), step):
            if self.send_failed:
                return
            try:
                await self.stream.send_all(data[start : start + step])
            except trio.BrokenResourceError:
                self.send_failed = True

    async def send(self, opcode: int, payload: bytes = b"", **options: int | bool | None) -> None:
        """One masked frame (``frame``'s options; ``chop`` splits the write)."""
        chop = options.pop("chop", None)
        await self.send_raw(frame(opcode, payload, **options), chop)  # type: ignore[arg-type]
        self.close_sent |= opcode == CLOSE

    async def send_message(
        self, opcode: int, data: bytes, *, compress: bool = False, fragments: int = 1
    ) -> None:
        """A whole data message, deflated if asked, split into ``fragments`` frames."""
        rsv = 0
        if compress:
            assert self.deflate is not None, "permessage-deflate was not negotiated"
            data, rsv = self.deflate.compress(data), 4
        step = max(1, -(-len(data) // fragments))
        pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        out = b""
        for index, piece in enumerate(pieces):
            out += frame(opcode if index == 0 else CONTINUATION, piece,
                         fin=index == len(pieces) - 1, rsv=rsv if index == 0 else 0)  # fmt: skip
        await self.send_raw(out)

    # -- receiving --

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError as exc:
            # A reset: the server dropped TCP with our octets unread. Fine once it has said
            # why in a close frame (the caller checks that), never in place of one.
            self.reset = repr(exc.__cause__ or exc)
            return False
        self._buffer += data
        return bool(data)

    async def _take(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not await self._fill():
                return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_frame(self) -> Frame | None:
        """The next frame from the server (checked), or None once TCP is closed."""
        head = await self._take(2)
        if head is None:
            if self._buffer:
                raise ServerBrokeProtocol(f"TCP closed inside a frame: {bytes(self._buffer)!r}")
            return None
        fin, rsv, opcode = bool(head[0] & 0x80), (head[0] >> 4) & 7, head[0] & 0x0F
        if head[1] & 0x80:
            raise ServerBrokeProtocol("a masked frame from the server")
        size = head[1] & 0x7F
        if size >= 126:
            extended = await self._take(2 if size == 126 else 8)
            assert extended is not None, "TCP closed inside a frame header"
            size = int.from_bytes(extended, "big")
        payload = await self._take(size)
        assert payload is not None, "TCP closed inside a frame"
        if rsv & 3 or (rsv & 4 and (self.deflate is None or opcode not in (TEXT, BINARY))):
            raise ServerBrokeProtocol(f"RSV bits {rsv:03b} on opcode {opcode:#x}")
        if opcode >= 8 and (not fin or size > 125):
            raise ServerBrokeProtocol(f"a control frame fragmented or of {size} bytes")
        if opcode not in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG):
            raise ServerBrokeProtocol(f"reserved opcode {opcode:#x} from the server")
        return Frame(opcode, payload, fin, bool(rsv & 4))

    async def next_frame(self) -> Frame:
        got = await self.read_frame()
        if got is None:
            raise AssertionError("the server closed TCP where a frame was expected")
        return got

    async def read_message(self) -> Frame:
        """The next frame, or the next whole data message (fragments joined, inflated) as one
        final frame: control frames come as they are."""
        first = await self.next_frame()
        if first.opcode >= 8:
            return first
        if first.opcode == CONTINUATION:
            raise ServerBrokeProtocol("a continuation frame with no message to continue")
        parts, last = [first.payload], first
        while not last.fin:
            last = await self.next_frame()
            if last.opcode >= 8:
                raise AssertionError(f"control frame {last} inside a message: not expected here")
            if last.opcode != CONTINUATION:
                raise ServerBrokeProtocol("a new message inside a fragmented one")
            parts.append(last.payload)
        data = b"".join(parts)
        if first.rsv1:
            assert self.deflate is not None
            data = self.deflate.decompress(data)
        if first.opcode == TEXT:
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                raise ServerBrokeProtocol(f"invalid UTF-8 in a text message: {exc}") from exc
        return Frame(first.opcode, data)

    # -- expectations --

    async def expect(self, opcode: int, payload: bytes) -> None:
        """The next message (or control frame) is ``opcode`` with ``payload``."""
        got = await self.read_message()
        if (got.opcode, got.payload) != (opcode, payload):
            shown = got.payload if len(got.payload) < 80 else got.payload[:80] + b"..."
            raise AssertionError(
                f"expected opcode {opcode:#x} with {len(payload)} bytes, got opcode "
                f"{got.opcode:#x} with {len(got.payload)} bytes: {shown!r}"
            )

    async def expect_echo(self, opcode: int, data: bytes) -> None:
        await self.expect(opcode, data)

    async def expect_close(self, *codes: int | None) -> int | None:
        """The next frame is a close with one of ``codes`` (None: without a code), and then
        the server ends TCP. Returns the code.

        When the server closed first, the close is answered (RFC 6455 §5.5.1) before waiting
        for TCP to end: a server that waits for the answer, as it may, closes TCP on it; one
        that failed the connection may have dropped TCP already (the answer is then lost).
        """
        got = await self.read_message()
        if got.opcode != CLOSE:
            raise AssertionError(f"expected a close {codes}, got opcode {got.opcode:#x}: "
                                 f"{got.payload[:80]!r}")  # fmt: skip
        code = None
        if got.payload:
            if len(got.payload) < 2:
                raise ServerBrokeProtocol(f"a close payload of one byte: {got.payload!r}")
            code = int.from_bytes(got.payload[:2], "big")
            if code not in _SENDABLE and not 3000 <= code <= 4999:
                raise ServerBrokeProtocol(f"close code {code} may not be sent")
            got.payload[2:].decode()  # the reason is UTF-8 (raises otherwise)
        if code not in codes:
            raise AssertionError(f"expected close {codes}, got {code}: {got.payload[2:]!r}")
        if not self.close_sent:
            await self.send(CLOSE, close_payload(code))
        await self.expect_tcp_closed()
        return code

    async def expect_tcp_closed(self) -> None:
        """Nothing more arrives, and the server closes TCP."""
        extra = await self.read_frame()
        if extra is not None:
            raise AssertionError(f"a frame after the server's close: {extra}")

    async def close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        """Close cleanly: the server answers with the same code and closes TCP."""
        await self.send(CLOSE, close_payload(code, reason))
        await self.expect_close(code)


def _accept_token(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


@asynccontextmanager
async def open_ws(
    port: int,
    path: str,
    *,
    extensions: str | None = None,
    protocols: tuple[str, ...] = (),
    origin: str | None = None,
) -> AsyncIterator[RawWebSocket]:
    """Open a WebSocket to ``ws://127.0.0.1:port/path`` with a hand-written handshake.

    Raises:
        Refused: the server did not answer 101 (its status and body).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]  # fmt: skip
        if extensions is not None:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        if origin is not None:
            lines.append(f"Origin: {origin}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise Refused(0, received)
            received += chunk
            assert len(received) < _MAX_HEAD, "handshake answer too long"
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 101:
            size = int(headers.get("content-length", "0"))
            body = rest
            while len(body) < size:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                body += chunk
            raise Refused(status, body)
        assert headers.get("sec-websocket-accept") == _accept_token(key), headers
        answer = headers.get("sec-websocket-extensions")
        if answer is not None and extensions is None:
            raise ServerBrokeProtocol(f"an extension nobody offered: {answer!r}")
        deflate = Deflate.from_response(answer) if answer else None
        ws = RawWebSocket(stream, rest, deflate)
        ws.subprotocol = headers.get("sec-websocket-protocol")
        yield ws
