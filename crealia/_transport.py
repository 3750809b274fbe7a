"""The client transport contract: :class:`Transport`, :class:`Connection` and :class:`Acceptor`.

A transport is how clients reach the session core: the trio-websocket fast path on its own port
(``crealia/transports/_trio_ws.py``), the ``/ws`` route of the HTTP app
(``crealia/transports/_asgi.py``), or one of yours passed in as
``open_server(config, transports=[...])``. The three pieces, like trio's stream ABCs:

- :class:`Connection` is one client connection as the core sees it: whole text and binary
  messages both ways, a close code, and the client's address and User-Agent. Each transport
  implements it over its socket.
- :class:`Acceptor` is what the core gives a transport, and all it gives: where to hand each
  connection (:meth:`Acceptor.serve` runs it as one session, hello to close), whether the server
  still accepts, the handshake policy (allowed hosts and origins, refusals counted and audited),
  the connection gate (caps on open connections), and the limits of the config
  (``max_frame_bytes``, ``handshake_timeout``). A transport never sees the hub, the rooms or the
  config, so none of them changes when a transport is added.
- :class:`Transport` is something the server runs in its nursery:
  ``await nursery.start(transport.serve, acceptor)``; it reports readiness through
  ``task_status`` and is cancelled when the server stops.

The life of a connection, as every transport runs it::

    accept the client         acceptor.admit(key, peer): over a cap, refuse and drop it
    read its handshake        address = acceptor.client_address(peer, x_forwarded_for_lines)
                              acceptor.readdress(key, address): over its cap, answer 503
                              acceptor.check_handshake(host=, origin=, remote=address, ...):
                              refused, answer refusal.status with refusal.body;
                              not acceptor.accepting: 503
    wrap it                   conn = MyConnection(...)
    run the session           await acceptor.serve(conn)   (returns once conn is closed)
    clean up                  acceptor.release(key); drop the socket

``crealia.testing.check_connection`` checks a :class:`Connection` implementation against the
rules below; ``crealia.testing.ConnectionCatcher`` gives a transport under test an
:class:`Acceptor` that hands each connection to the test instead of a session.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from ._edge import ConnectionGate
from ._origin import HostPolicy, OriginPolicy, misdirected_body, refusal_body

#: Longest close reason sent, in characters (WebSocket allows 123 bytes).
MAX_CLOSE_REASON = 120


class Connection(ABC):
    """One client connection as the session core sees it. Implemented by each transport.

    The core (:meth:`Acceptor.serve`) reads with one task and writes with another: ``receive``
    and ``send`` may run at the same time, each in one task at a time. ``close`` and ``abort``
    may be called while either is running (at shutdown).

    **Messages.** A message is text (``str``, a WebSocket text frame) or binary (``bytes``). The
    transport delivers whole messages, in the order the peer sent them, and enforces two rules
    before the core sees anything:

    - the size limit :attr:`Acceptor.max_frame_bytes` (characters of a text message, bytes of a
      binary one, after decompression; a message of exactly the limit is allowed): a larger one
      fails the connection with close code 1009, without buffering it whole;
    - text must be valid UTF-8: otherwise close 1007.

    A transport without frames of its own (a byte stream) defines a framing that carries text
    and binary messages and a close with its code, and applies the same limits.

    **Close codes** are WebSocket's (RFC 6455 section 7.4, docs/protocol.md section 7): the core
    closes with 1000, 1001, 1011, 1013 and its 4xxx codes, and clients act on them, so the peer
    must receive the code given to :meth:`close`.

    **Errors.** Besides :class:`trio.Cancelled`, ``receive`` and ``send`` raise only
    :class:`~crealia.ConnectionClosed`; ``close`` and ``abort`` raise nothing. A transport maps
    its library's exceptions at the boundary (``raise ConnectionClosed(code) from exc``).
    """

    #: The client's address without port (for logs, audit and per-address limits), or "":
    #: behind a trusted proxy, the one :meth:`Acceptor.client_address` gives.
    remote: str = ""
    #: The client's ``User-Agent`` (for audit), or "".
    user_agent: str = ""

    @abstractmethod
    async def receive(self) -> str | bytes:
        """The next whole message: ``str`` for a text message, ``bytes`` for a binary one.

        Messages the peer sent before it closed are returned first; then every call raises.

        Raises:
            ConnectionClosed: the connection is closed: by the peer, by the transport (a
                message over the limit, bad UTF-8), or by :meth:`close` or :meth:`abort`.
                ``code`` says what the transport knows and the core does not act on it: the
                peer's close code when the peer closed (1006 or None when it went away without
                one; hypercorn's ASGI layer says 1006 for every close it did not start itself),
                else the code the connection was closed with, when known.

        Cancellation: safe. A cancelled ``receive`` loses no message (the next call returns
        it) and leaves the connection usable.
        """

    @abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one text message holding ``frame`` (UTF-8 JSON built by the core).

        Returns once the transport has taken the frame: written it, or buffered it within a
        bound. A peer that stops reading must make ``send`` block sooner or later: the core
        closes a client that falls behind (4409) when its own bounded outbox fills, which a
        transport buffering without limit would defeat.

        Raises:
            ConnectionClosed: the connection is closed (by either side, or aborted) or broke.

        Cancellation: the frame may have been sent in part. The connection must then not be
        sent on again, and a close frame after half a frame would be garbage: call
        :meth:`abort` (the core does). A transport that cannot cancel a blocked send (hypercorn
        shields its socket writes) must let :meth:`abort`, called from another task, end it
        (return or raise): the core does that when a send outlives the session's close
        deadline.
        """

    @abstractmethod
    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` (at most :data:`MAX_CLOSE_REASON` characters).

        Sends the close so that the peer receives ``code``, waits a bounded time for the peer's
        answer where the protocol has one, and releases the connection. A peer that does not
        read must not make it wait without bound: drop the connection instead. Once the connection
        is closed (by either side, or aborted) it returns at once, so it may be called any
        number of times, also after the peer went away. Afterwards ``receive`` and ``send``
        raise :class:`~crealia.ConnectionClosed`.

        Never raises but :class:`trio.Cancelled`. Cancellation: the connection is released all
        the same (dropped, as :meth:`abort` does, when the close could not be sent); callers
        bound the wait (the core: two seconds).
        """

    @abstractmethod
    async def abort(self) -> None:
        """Drop the connection now, without a close handshake: what is left after a cancelled
        :meth:`send`, when a close frame after half a frame would be garbage.

        The peer sees the connection end (WebSocket: 1006). A ``receive`` or ``send`` blocked
        in another task ends too (returns or raises). Afterwards ``receive`` and ``send`` raise
        :class:`~crealia.ConnectionClosed`. Never raises; returns promptly, also when cancelled.
        """

    async def round_trip(self) -> float | None:
        """Send a ping and return the seconds until its answer, or None when the transport has
        no ping (the default) or the connection is gone. The caller bounds the wait."""
        return None

    def start_ping(self) -> trio.Event | None:
        """Write a ping now, if that needs no wait, and return an event set once its answer (or
        the answer to a later ping) has arrived.

        None when the transport has no ping (the default), the connection is closing, or the
        ping cannot be written at once (another write is under way, or the socket is full).
        Never blocks and never raises; a ping is never left half written. The core measures a
        client's lag with it (:mod:`crealia._lag`): a ping waits behind everything sent before
        it, so its answer says the client has read all of that.
        """
        return None

    def tcp_progress(self) -> tuple[int, int] | None:
        """``(written, unacked)``: the bytes written to the peer's TCP connection so far, and
        how many of them its TCP has not acknowledged (unsent ones included); None when the
        transport cannot tell (the default; also where the platform has no ``SIOCOUTQ``).

        Never blocks and never raises. ``written`` may leave out a few control frames. The core
        measures a client's lag with it (:mod:`crealia._lag`).
        """
        return None


@attrs.frozen(kw_only=True)
class HandshakeRefusal:
    """Why :meth:`Acceptor.check_handshake` refuses a client, and what to answer.

    Over HTTP (a WebSocket handshake) answer ``status`` with ``body`` as ``text/plain;
    charset=utf-8``; a transport without statuses closes with 1008 instead.
    """

    #: The HTTP status: 421 (host not allowed) or 403 (origin not allowed).
    status: int
    #: A short ASCII body naming what was refused (``origin not allowed: https://evil.example``).
    body: bytes
    #: ``"host"`` or ``"origin"``.
    reason: str


def _ignore_refusal(origin: str, remote: str, user_agent: str) -> None:
    return None


def _always() -> bool:
    return True


@attrs.define(eq=False, kw_only=True)
class Acceptor:
    """What the server gives a transport: where connections go and what they must pass first.

    The server builds one around its hub and passes it to every :class:`Transport` and to the
    ASGI route. A test can build its own around ``run_session`` (``crealia.testing`` has
    :class:`~crealia.testing.ConnectionCatcher`).

    Args:
        run_session: runs one connection as a session; what :meth:`serve` calls.
        is_accepting: False once the server is shutting down.
        on_origin_refused: told ``(origin, remote, user_agent)`` of every refused origin (the
            server audits it as ``origin_refused``).
        run_echo: runs one connection to the conformance echo (:func:`crealia._echo.run_echo`),
            or None (the default): the echo is off. The server passes it only with the config's
            ``conformance_echo`` on, a test aid never to enable in production.
    """

    _run_session: Callable[[Connection], Awaitable[None]]
    _is_accepting: Callable[[], bool] = _always
    _on_origin_refused: Callable[[str, str, str], None] = _ignore_refusal
    _run_echo: Callable[[Connection], Awaitable[None]] | None = None
    #: Largest message a client may send (see :class:`Connection`); the config's
    #: ``max_frame_bytes``.
    max_frame_bytes: int = 64 * 1024
    #: Seconds a client has to finish the transport's own handshake (the config's
    #: ``hello_timeout``; the session's ``hello`` then has as long again).
    handshake_timeout: float = 10.0
    #: Which browser origins may connect (the config's ``allowed_origins``).
    origins: OriginPolicy = attrs.Factory(OriginPolicy)
    #: Which ``Host`` headers a handshake may carry (the config's ``allowed_hosts``).
    hosts: HostPolicy = attrs.Factory(HostPolicy)
    #: The caps on open connections, shared by every port. crealia's own transports wrap their
    #: listeners with it (``crealia._edge.GatedListener``); others call :meth:`admit` and
    #: :meth:`release`.
    gate: ConnectionGate = attrs.Factory(ConnectionGate)
    #: The ports the server's web pages come from (the HTTP app's), same-origin on every
    #: transport: set by the server once it has bound them.
    page_ports: tuple[int, ...] = ()

    @property
    def accepting(self) -> bool:
        """False once the server is shutting down: refuse new clients (HTTP: 503)."""
        return self._is_accepting()

    def admit(self, key: object, address: str) -> str | None:
        """Count a new client connection (``key``: any object standing for it, e.g. its stream)
        from ``address`` against the caps: None when admitted, else the reason to tell the
        client before dropping it. Every admitted connection must be :meth:`release`\\ d."""
        return self.gate.admit(key, address)

    def release(self, key: object) -> None:
        """Count a connection out when it is gone (once; a key never admitted is ignored)."""
        self.gate.release(key)

    def client_address(self, peer: str, forwarded: Iterable[str]) -> str:
        """The client's address of a connection from TCP peer ``peer`` whose handshake carried
        the ``X-Forwarded-For`` lines ``forwarded`` (in order; none for a transport without
        headers): read from them when ``peer`` is one of the config's ``trusted_proxies``, else
        ``peer`` (the rules: :mod:`crealia._proxies`). Use it as :attr:`Connection.remote`."""
        return self.gate.proxies.client_address(peer, forwarded)

    def readdress(self, key: object, address: str) -> str | None:
        """Count the admitted connection ``key`` against ``address`` (what
        :meth:`client_address` gave) from now on: None, or the reason to refuse it (HTTP: 503)
        when that address is over its cap. Nothing changes when ``address`` is the peer's."""
        return self.gate.readdress(key, address)

    def check_handshake(
        self, *, host: str | None, origin: str | None, remote: str, user_agent: str = ""
    ) -> HandshakeRefusal | None:
        """The policy every browser-reachable handshake passes: None to go on, or the refusal.

        ``host`` and ``origin`` are the handshake's ``Host`` and ``Origin`` headers (None when
        absent). A host not in ``allowed_hosts`` is refused 421 (counted as a ``host``
        refusal); an origin not allowed (the rules: :mod:`crealia._origin`; same-origin is the
        ``Host``'s, or the same host on one of :attr:`page_ports`) is refused 403 and reported
        to ``on_origin_refused``. A request without ``Origin`` (not a browser) is allowed.
        """
        if not self.hosts.allows(host):
            self.gate.refused["host"] += 1
            return HandshakeRefusal(status=421, body=misdirected_body(host or ""), reason="host")
        if origin is not None and not self.origins.allows(origin, host, self.page_ports):
            self._on_origin_refused(origin, remote, user_agent)
            return HandshakeRefusal(status=403, body=refusal_body(origin), reason="origin")
        return None

    async def serve(self, conn: Connection) -> None:
        """Run ``conn`` as one session to its end: ``hello``, messages, close.

        Returns once the session is over and ``conn`` closed (or aborted). Never raises but
        :class:`trio.Cancelled`; cancelled, it closes ``conn`` (bounded) before it returns.
        """
        await self._run_session(conn)

    @property
    def echo_enabled(self) -> bool:
        """Whether the conformance echo is on: crealia's transports then answer WebSocket
        handshakes at ``crealia._echo.ECHO_PATH`` (after the same handshake policy) with
        :meth:`serve_echo` instead of a session. Other transports may ignore it."""
        return self._run_echo is not None

    async def serve_echo(self, conn: Connection) -> None:
        """Run ``conn`` as the conformance echo to its end (every message sent back), like
        :meth:`serve` runs a session: returns once ``conn`` is closed; never raises but
        :class:`trio.Cancelled`, after closing ``conn``.

        Raises:
            RuntimeError: the echo is off (:attr:`echo_enabled` is False).
        """
        if self._run_echo is None:
            raise RuntimeError("the conformance echo is off (Config.conformance_echo)")
        await self._run_echo(conn)


class Transport(ABC):
    """A way for clients to reach the server: run by ``open_server(config, transports=[...])``
    in the server's nursery, beside the built-in ones.

    A transport talks to the core only through the :class:`Acceptor` it is given (see this
    module's docstring for the life of a connection); adding one touches no core module.
    """

    @abstractmethod
    async def serve(
        self,
        acceptor: Acceptor,
        *,
        task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients and hand each to ``acceptor`` until cancelled.

        Call ``task_status.started(port)`` once clients can connect: the TCP port bound (the
        real one when port 0 was asked), or None when the transport has no port. The server's
        ``async with`` block starts only when every transport has; the values are in
        :attr:`crealia.Server.transport_ports`.

        Run each connection's ``await acceptor.serve(conn)`` in a task of a nursery this call
        owns, so that no connection outlives it.

        Raises:
            OSError: the transport cannot listen (before ``started``); ``open_server`` fails
                with it.

        Cancellation: this is how the server stops a transport, after it has closed every
        session (1001). Close the listeners and what is left of the connections (shielded and
        bounded) and return.
        """
