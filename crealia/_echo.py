"""The conformance echo: a test aid that sends every message back as it came.

RFC 6455 conformance suites (Autobahn|Testsuite's ``fuzzingclient``, tests/test_rfc6455.py)
test a server by sending it frames, good and malformed, and expecting each message back (or
the connection failed with the right close code). crealia's endpoints speak only the
collaboration protocol, so with ``conformance_echo`` on (``--conformance-echo``,
``CREALIA_CONFORMANCE_ECHO``; off by default) both endpoints also answer at :data:`ECHO_PATH`:
the fast path and the HTTP app's route. The echo runs behind the very adapters a session runs
behind, so what a conformance run finds is what clients meet:

- the handshake: the connection gate's caps, the ``Host`` and ``Origin`` policy
  (:meth:`~crealia._transport.Acceptor.check_handshake`), 503/403 during shutdown;
- the same accept: permessage-deflate (:mod:`crealia.transports._deflate`, bounded by
  ``max_frame_bytes``), the frame limit (close 1009), UTF-8 checks (close 1007), the close
  handshake of the transport's :class:`~crealia._transport.Connection`;
- text is sent back through :meth:`Connection.send`, the path every session frame takes (on the
  fast path: framed by crealia and written straight to the socket); binary through the
  adapter's ``send_binary`` (sessions send no binary).

The echo speaks no subprotocol: it answers only at :data:`ECHO_PATH`, never at ``/ws``, and it
refuses (400) a handshake that offers crealia's subprotocol, so a crealia client pointed at it
by mistake fails its handshake instead of reading its own ``hello`` back.

**Never enable it in production.** The echo asks for no token: anyone who reaches a port can
hold connections (up to the connection caps) and make the server inflate, copy and send up to
``max_frame_bytes`` per message, with no rate limit, no audit and no metric. The server logs a
warning when it starts with the echo on, and ``crealia serve`` says so on stderr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from ._errors import ConnectionClosed

if TYPE_CHECKING:
    from ._transport import Connection

#: Where both endpoints answer when the echo is on (``ws://host:ws_port/conformance/echo`` and
#: ``ws://host:port/conformance/echo``).
ECHO_PATH: Final = "/conformance/echo"
#: The body of the 400 that answers a handshake offering crealia's subprotocol at the echo.
SUBPROTOCOL_REFUSED: Final = (
    b"the conformance echo speaks no subprotocol: crealia clients connect to /ws\n"
)
#: Seconds the echo's close may take when the server stops it.
CLOSE_TIMEOUT: Final = 2.0


@runtime_checkable
class BinarySender(Protocol):
    """A connection that can also send binary messages (both of crealia's WebSocket adapters)."""

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message; raises :class:`~crealia.ConnectionClosed` like ``send``."""


async def run_echo(conn: Connection) -> None:
    """Send every message of ``conn`` back to it until the peer closes or the connection fails.

    Text goes back as text, binary as binary (1003 if ``conn`` cannot send binary). The close
    handshake is the transport's: when the peer closes, its library answers with the peer's
    code; when a frame breaks the protocol, it fails the connection with its code (1002, 1007,
    1009). Returns once ``conn`` is closed. Never raises but :class:`trio.Cancelled`; cancelled
    (the server stopping), it closes ``conn`` with 1001 (bounded) first.
    """
    # Imported here: the ``crealia`` command reads ECHO_PATH for its help without loading trio.
    import trio

    binary = conn if isinstance(conn, BinarySender) else None
    try:
        while True:
            message = await conn.receive()
            if isinstance(message, str):
                await conn.send(message.encode())
            elif binary is not None:
                await binary.send_binary(message)
            else:
                await conn.close(1003, "this transport cannot send binary messages")
                return
    except ConnectionClosed:
        pass
    except trio.Cancelled:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await conn.close(1001, "server shutting down")
        raise
    with trio.move_on_after(CLOSE_TIMEOUT):
        await conn.close(1000)  # already closed: returns at once, releasing the socket
