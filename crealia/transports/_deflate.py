"""Bounded, low-memory permessage-deflate (RFC 7692) for both WebSocket endpoints.

wsproto's stock :class:`~wsproto.extensions.PerMessageDeflate` inflates every
frame with an unbounded ``decompress()`` (a ~50 KB message of compressed zeros
becomes 50 MB) and keeps a 15-bit-window, ``memLevel=8`` deflate state per
connection.  trio-websocket negotiates no extension at all, and hypercorn
always accepts the stock one.  This module provides:

* :class:`BoundedDeflate` -- the extension.  Each inbound message is inflated
  with ``zlib``'s ``max_length`` so that at most ``max_message_size + 1`` bytes
  are ever produced per binary message (``4 * max_message_size + 1`` per text
  message, whose limit is in characters); past that the connection is failed
  with close code 1009 (MESSAGE_TOO_BIG).  It asks for a small server window
  (``server_max_window_bits=11``, and ``client_max_window_bits=11`` when the
  client offers that parameter), keeps context takeover unless the client asks
  otherwise, and compresses with ``memLevel=4``.
* :func:`accept_websocket` -- accept a :class:`trio_websocket.WebSocketRequest`
  with :class:`BoundedDeflate` negotiated when the client offered it.
* :func:`install_hypercorn_deflate` -- make hypercorn's WebSocket handshake use
  :class:`BoundedDeflate` instead of the stock extension.

Both routes also make a locally detected protocol failure (the 1009 above, or
1007 for corrupt deflate data) answer with a real Close frame.  wsproto
reports such a failure as a ``CloseConnection`` event while leaving the
connection ``OPEN``, and both trio-websocket and hypercorn then drop the TCP
connection without a Close frame, so the peer would only see 1006.  Data
messages that arrive after we have sent a Close are discarded rather than
handed to the server (hypercorn keeps appending them to its message buffer).

Memory per connection, measured as the RSS delta over 2000 server-side
wsproto connections that each received and sent 40 compressed ~2.4 KB text
messages (zlib 1.2.13, x86-64 Linux; zlib's buffers are invisible to
tracemalloc)::

    wsproto connection without permessage-deflate        ~2 KiB
    with stock PerMessageDeflate (15-bit, memLevel 8)  ~254 KiB
    with BoundedDeflate, client offered
        client_max_window_bits (11-bit both ways)       ~35 KiB
    with BoundedDeflate, client did not
        (the client may use 15 bits; inflater matches)  ~66 KiB

The compressor is created on the first outbound message and the
decompressor on the first compressed inbound message, so idle connections
pay nothing.  The small window costs little on small JSON operations
(compressed to 23.1% of their size instead of 22.4% with 15 bits) but more on
long prose-like text (54% instead of 42%); raise ``window_bits`` if that
matters more than memory.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Final

import wsproto
from wsproto.connection import Connection, ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Event, Message
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

if TYPE_CHECKING:
    import trio_websocket

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "BoundedDeflate",
    "accept_websocket",
    "install_hypercorn_deflate",
    "uninstall_hypercorn_deflate",
]

#: Default cap on the inflated size of one message.
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024
#: Default LZ77 window (2 KiB) asked for in both directions.
DEFAULT_WINDOW_BITS: Final = 11
#: Default zlib ``memLevel`` of the compressor (zlib's default is 8).
DEFAULT_MEM_LEVEL: Final = 4

_EMPTY_BLOCK: Final = b"\x00\x00\xff\xff"
# Bytes tolerated after a block with BFINAL set (RFC 7692 section 7.2.3.3):
# the appended empty block plus a little slack; anything more is garbage that
# zlib would otherwise keep accumulating in ``unused_data``.
_MAX_TRAILING_BYTES: Final = 16
#: Most bytes one character takes in UTF-8.
_UTF8_MAX_BYTES: Final = 4
_PARAMETERS: Final = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    },
)

_Proto = FrameDecoder | FrameProtocol


def _parse_offer(offer: str) -> dict[str, int | None] | None:
    """Parse the parameters of one ``permessage-deflate`` offer.

    Returns ``None`` when RFC 7692 section 5 requires the offer to be declined
    (unknown or repeated parameter, or an invalid value).  Window-bits values
    are returned as ints (``None`` when absent), flags map to ``None``.
    """
    params: dict[str, int | None] = {}
    for item in offer.split(";")[1:]:
        name, has_value, raw = (part.strip() for part in item.partition("="))
        if not name:
            continue
        if name not in _PARAMETERS or name in params:
            return None
        value: int | None = None
        if has_value:
            raw = raw.removeprefix('"').removesuffix('"')
            if not name.endswith("_max_window_bits") or not raw.isdigit():
                return None
            value = int(raw)
            if not 8 <= value <= 15 or raw != str(value):
                return None
        elif name == "server_max_window_bits":
            return None
        params[name] = value
    return params


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate with a hard cap on inflated size and small zlib state.

    A server-side instance serves exactly one connection (it holds that
    connection's zlib streams).  Inbound messages are inflated incrementally
    with ``max_length``, so a binary message never produces more than
    ``max_message_size + 1`` bytes; one that would exceed ``max_message_size``
    fails the connection with 1009 (MESSAGE_TOO_BIG) and nothing more of it is
    inflated.  The limit of a text message is in characters (the transport
    counts them once decoded), so a text message may inflate to the bytes that
    many characters can take, ``4 * max_message_size``, before 1009.  Only
    compressed messages are counted: uncompressed ones cannot amplify and are
    left to the transport's own limit.

    The server window is negotiated down to ``window_bits`` (RFC 7692 lets a
    server send ``server_max_window_bits`` even when not offered); the client
    window only when the client offers ``client_max_window_bits`` -- without
    it the client may use 15 bits and the inflater must match.  Context
    takeover is kept unless the client asks for ``*_no_context_takeover``.
    """

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        window_bits: int = DEFAULT_WINDOW_BITS,
        mem_level: int = DEFAULT_MEM_LEVEL,
        compression_level: int = zlib.Z_DEFAULT_COMPRESSION,
    ) -> None:
        """Configure the limits; nothing is allocated until traffic flows.

        :param max_message_size: cap on the inflated size of one message.
        :param window_bits: largest LZ77 window (9..15) asked of either side.
        :param mem_level: zlib ``memLevel`` (1..9) of the compressor.
        :param compression_level: zlib compression level of outbound messages.
        """
        super().__init__()
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        if not 9 <= window_bits <= 15:
            raise ValueError("window_bits must be between 9 and 15")
        if not 1 <= mem_level <= 9:
            raise ValueError("mem_level must be between 1 and 9")
        self.max_message_size = max_message_size
        self.window_bits = window_bits
        self.mem_level = mem_level
        self.compression_level = compression_level
        self._inbound_size = 0
        #: The inflated bytes the current message may take (see :meth:`frame_inbound_header`).
        self._inbound_limit = max_message_size

    # -- negotiation -------------------------------------------------------

    def accept(self, offer: str) -> str | None:
        """Answer one client offer (server side); ``None`` declines it.

        wsproto calls this for every ``permessage-deflate`` offer in the
        request and keeps the last non-``None`` answer, so after accepting
        one offer the rest are declined: the first acceptable offer wins, as
        RFC 7692 section 5 intends.
        """
        if self._enabled:
            return None
        params = _parse_offer(offer)
        if params is None:
            return None
        server_bits = self.window_bits
        if "server_max_window_bits" in params:
            requested = params["server_max_window_bits"]
            assert requested is not None
            if requested < 9:
                # zlib cannot produce raw deflate with a 256-byte window.
                return None
            server_bits = min(server_bits, requested)
        response = []
        if "server_no_context_takeover" in params:
            self.server_no_context_takeover = True
            response.append("server_no_context_takeover")
        if "client_no_context_takeover" in params:
            self.client_no_context_takeover = True
            response.append("client_no_context_takeover")
        client_bits = PerMessageDeflate.DEFAULT_CLIENT_MAX_WINDOW_BITS
        if "client_max_window_bits" in params:
            hint = params["client_max_window_bits"]
            announced = self.window_bits if hint is None else min(self.window_bits, hint)
            response.append(f"client_max_window_bits={announced}")
            # A client limited to 8 bits is decodable with a 9-bit window.
            client_bits = max(announced, 9)
        response.append(f"server_max_window_bits={server_bits}")
        self.server_max_window_bits = server_bits
        self.client_max_window_bits = client_bits
        self._enabled = True
        return "; ".join(response)

    # -- inbound -----------------------------------------------------------

    def frame_inbound_header(
        self,
        proto: _Proto,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        """Start tracking a message on its first frame; reject misplaced RSV1."""
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR
        self._inbound_is_compressible = self._compressible_opcode(opcode)
        # Only the first frame of a data message opens a message.  (The stock
        # class also resets on control frames, so a ping between two
        # fragments of a compressed message makes it pass the remaining
        # fragments through still compressed.)
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._inbound_compressed = rsv.rsv1
            self._inbound_size = 0
            # The limit counts a text message's characters (crealia._transport.Connection),
            # which the transport checks once the text is decoded: here only the bytes that
            # many characters can take in UTF-8.
            factor = _UTF8_MAX_BYTES if opcode is Opcode.TEXT else 1
            self._inbound_limit = self.max_message_size * factor
            if rsv.rsv1 and self._decompressor is None:
                bits = self.server_max_window_bits if proto.client else self.client_max_window_bits
                self._decompressor = zlib.decompressobj(-bits)
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto: _Proto, data: bytes) -> bytes | CloseReason:
        """Inflate one chunk of a compressed message, within the size cap."""
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: _Proto, fin: bool) -> bytes | CloseReason | None:
        """Finish a compressed message by inflating the implied empty block."""
        if not fin or not self._inbound_is_compressible:
            return None
        compressed, self._inbound_compressed = self._inbound_compressed, None
        if not compressed:
            return None
        data = self._inflate(_EMPTY_BLOCK)
        if isinstance(data, CloseReason):
            return data
        assert self._decompressor is not None
        no_context_takeover = (
            self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        )
        if no_context_takeover or self._decompressor.eof:
            # After a BFINAL block zlib cannot continue the stream; start the
            # next message afresh (a peer that still references the old window
            # then fails with 1007 instead of having its data dropped).
            self._decompressor = None
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None
        budget = self._inbound_limit - self._inbound_size
        try:
            # max_length=budget + 1 (never 0, which means "unlimited").
            out = decompressor.decompress(data, budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > budget or decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        if decompressor.eof and len(decompressor.unused_data) > _MAX_TRAILING_BYTES:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inbound_size += len(out)
        return out

    # -- outbound ----------------------------------------------------------

    def frame_outbound(
        self,
        proto: _Proto,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        """Compress like the stock class, but with a small-``memLevel`` compressor."""
        if self._compressor is None and opcode in (Opcode.TEXT, Opcode.BINARY):
            bits = self.client_max_window_bits if proto.client else self.server_max_window_bits
            self._compressor = zlib.compressobj(
                self.compression_level,
                zlib.DEFLATED,
                -bits,
                self.mem_level,
            )
        return super().frame_outbound(proto, opcode, rsv, data, fin)

    def __repr__(self) -> str:
        """Show the negotiated parameters and the cap."""
        return f"{super().__repr__()[:-1]}; max_message_size={self.max_message_size}>"


# -- failing the connection with a real Close frame ----------------------------


def _keep_event(connection: Connection | None, event: Event) -> bool:
    """Fix up wsproto's reporting of local failures; say whether to deliver ``event``.

    When a frame fails to parse (an extension returned a ``CloseReason``,
    invalid UTF-8, ...), wsproto yields ``CloseConnection(code)`` but leaves
    the connection ``OPEN``.  Both trio-websocket and hypercorn send a Close
    reply only in ``REMOTE_CLOSING``, so they would drop TCP without telling
    the peer why.  Moving to ``REMOTE_CLOSING`` makes them answer with
    ``event.response()`` -- a Close frame carrying the failure code -- after
    which wsproto is ``CLOSED`` and parses nothing more.  wsproto has no
    public way to do this, hence the private ``_state``.

    Data messages received after we sent a Close are dropped: hypercorn
    would append them to a message buffer it never clears after closing.
    """
    if connection is None:
        return True
    if isinstance(event, CloseConnection) and connection.state is ConnectionState.OPEN:
        connection._state = ConnectionState.REMOTE_CLOSING
    elif isinstance(event, Message) and connection.state in (
        ConnectionState.LOCAL_CLOSING,
        ConnectionState.CLOSED,
    ):
        return False
    return True


class _FailClosingConnection(Connection):
    """wsproto ``Connection`` that fails with a Close frame (used for hypercorn)."""

    def events(self) -> Generator[Event, None, None]:
        """Yield wsproto's events, see :func:`_keep_event`."""
        for event in super().events():
            if _keep_event(self, event):
                yield event


class _DeflateWSConnection(wsproto.WSConnection):
    """``WSConnection`` that accepts with :class:`BoundedDeflate` (for trio-websocket).

    Installed on trio-websocket's existing object by :func:`accept_websocket`.
    """

    _crealia_deflate: BoundedDeflate

    def send(self, event: Event) -> bytes:
        """Add the extension to the ``AcceptConnection`` event; otherwise unchanged."""
        if isinstance(event, AcceptConnection) and self.connection is None:
            extensions = [*event.extensions, self._crealia_deflate]
            event = dataclasses.replace(event, extensions=extensions)
        return super().send(event)

    def events(self) -> Generator[Event, None, None]:
        """Yield wsproto's events, see :func:`_keep_event`."""
        for event in super().events():
            if _keep_event(self.connection, event):
                yield event


async def accept_websocket(
    request: trio_websocket.WebSocketRequest,
    *,
    subprotocol: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> trio_websocket.WebSocketConnection:
    """Accept a trio-websocket handshake, negotiating :class:`BoundedDeflate` if offered.

    Use instead of ``await request.accept(...)`` in a ``serve_websocket``
    handler.  ``max_message_size`` caps the inflated size of compressed
    messages; pass the same value to ``serve_websocket(max_message_size=...)``
    to cap uncompressed ones too.  Clients that do not offer
    permessage-deflate get a plain connection.

    trio-websocket builds its ``AcceptConnection`` event without extensions
    and offers no hook, so the connection's wsproto object is switched to a
    subclass whose ``send()`` adds the extension to that event.  Everything
    else stays trio-websocket's own code, and the switch happens before the
    handshake response is produced, so no frame can slip past it.
    """
    connection = request._connection
    ws = connection._wsproto
    if type(ws) is not wsproto.WSConnection or ws.connection is not None:
        raise RuntimeError(f"unexpected trio-websocket internals: {ws!r}")
    ws.__class__ = _DeflateWSConnection
    assert isinstance(ws, _DeflateWSConnection)
    ws._crealia_deflate = BoundedDeflate(max_message_size)
    return await request.accept(subprotocol=subprotocol, extra_headers=extra_headers)


# -- hypercorn -------------------------------------------------------------------

_HYPERCORN_NAMES: Final = ("PerMessageDeflate", "Connection")
_hypercorn_originals: dict[str, Any] = {}


def install_hypercorn_deflate(max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
    """Make hypercorn negotiate :class:`BoundedDeflate` on every WebSocket.

    Call once before serving (calling again just replaces the cap).  It
    applies to every hypercorn server in the process, over HTTP/1.1 and
    HTTP/2.  Also set ``Config.websocket_max_message_size`` to the same value:
    that limit closes with 1009 too, but is checked only after wsproto has
    inflated a whole received chunk, so alone it does not stop a bomb.

    This is a module-attribute patch because hypercorn offers no other seam:
    ``Handshake.accept`` in ``hypercorn.protocol.ws_stream`` builds
    ``[PerMessageDeflate()]`` and ``Connection(...)`` from that module's
    globals, and ``Handshake``/``WSStream`` are created inside hypercorn's
    HTTP/1.1, HTTP/2 and HTTP/3 protocol classes, which ``Config`` cannot
    replace.  Only those two names inside hypercorn are rebound; wsproto
    itself is untouched.  The patch is idempotent: the originals are saved
    once, and :func:`uninstall_hypercorn_deflate` restores them.
    """
    from hypercorn.protocol import ws_stream

    used = ws_stream.Handshake.accept.__code__.co_names
    if not all(name in used for name in _HYPERCORN_NAMES):
        # A future hypercorn that stops looking these names up would silently
        # keep the unbounded extension; refuse instead.
        raise RuntimeError("hypercorn.protocol.ws_stream changed; cannot install BoundedDeflate")
    if not _hypercorn_originals:
        _hypercorn_originals.update({name: getattr(ws_stream, name) for name in _HYPERCORN_NAMES})
    factory: Callable[[], BoundedDeflate] = functools.partial(BoundedDeflate, max_message_size)
    replacements = {"PerMessageDeflate": factory, "Connection": _FailClosingConnection}
    for name, replacement in replacements.items():
        setattr(ws_stream, name, replacement)


def uninstall_hypercorn_deflate() -> None:
    """Undo :func:`install_hypercorn_deflate` (a no-op if it is not installed)."""
    from hypercorn.protocol import ws_stream

    for name, original in _hypercorn_originals.items():
        setattr(ws_stream, name, original)
    _hypercorn_originals.clear()
