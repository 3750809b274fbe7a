"""The server's edge: connection caps, accept back-off and HTTP read deadlines.

Everything here runs before a connection costs the server anything but its file descriptor.

- :class:`ConnectionGate` counts the TCP connections both ports hold, in all and per client
  address, and the authenticated sessions per user. Over a cap a connection is refused: at
  accept time with ``503`` (on both ports: the fast path's handshake is HTTP too), after
  ``hello`` with close 1013. Refusals are counted per reason for ``/metrics``. A connection
  from a trusted proxy (``trusted_proxies``, :mod:`crealia._proxies`) carries other people's
  requests: it is not held to the per-address cap when it is accepted, and a WebSocket over it
  counts against its client's address once the handshake has said whose it is
  (:meth:`ConnectionGate.readdress`).
- :class:`GatedListener` wraps a listening socket for :func:`trio.serve_listeners`: it asks the
  gate before it hands a connection on, and when ``accept`` fails for lack of file descriptors
  or memory (``EMFILE`` and kin) it backs off (10 ms doubling to 1 s) instead of spinning, logs
  the episode once, and counts each failure.
- :func:`serve_http` runs hypercorn's HTTP/1.1 and WebSocket protocol over gated listeners, with
  each connection's reads under a deadline (:class:`DeadlineStream`): a request's headers must
  arrive within ``http_header_timeout`` of the connection's start or of its previous response,
  its body within ``http_body_timeout`` of its headers; a response sent before the body was read
  (a 401, say) closes the connection a second later instead of waiting for a body that may
  never come. Once a request's body is in (or it has none) reads wait as long as the response
  takes (a live feed, a WebSocket). :func:`edge_app` is the ASGI side that moves the deadlines
  and, behind a trusted proxy, puts the client's address in the scope (``scope["client"]``).

hypercorn offers no per-connection hook, so :func:`serve_http` does what ``hypercorn.trio.serve``
does (lifespan, worker context, one ``TCPServer`` per connection) with its own listeners; it
reaches into hypercorn's ``trio`` package (``TCPServer``, ``Lifespan``, ``WorkerContext``),
pinned by setup.cfg.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from ._origin import HostPolicy, header, header_values, misdirected_body
from ._proxies import TrustedProxies

log = logging.getLogger("crealia.edge")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: ``accept`` errors that mean "no resources now, try again later" (as trio counts them).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: First and longest sleep after such an error, in seconds.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 1.0
#: Refused connections being answered at once; past that they are closed without an answer.
REFUSING_MAX = 32
#: Seconds a refused connection has to read its 503 before it is closed.
REFUSAL_LINGER = 1.0
#: Seconds a connection stays open after a response sent before its request body was read.
EARLY_RESPONSE_LINGER = 1.0
#: The key of a connection's :class:`DeadlineStream` in the ASGI scope's ``state``.
STREAM_KEY = "crealia.edge.stream"

REASONS = ("global", "address", "user", "host")


def default_max_connections() -> int:
    """Three quarters of the process's file-descriptor limit (``RLIMIT_NOFILE``, soft), at least
    16: the rest is for the stores, Redis, logs and connections being refused."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(16, soft * 3 // 4)


def address_cap(per_address: int, total: int) -> int:
    """The per-address cap in force: ``per_address``, but never more than a quarter of the
    global cap ``total``, so that one address cannot take every connection (0: no cap)."""
    if not per_address or not total:
        return per_address
    return min(per_address, max(1, total // 4))


@attrs.define(eq=False)
class ConnectionGate:
    """Caps on open connections (in all, per client address) and on sessions per user.

    A cap of 0 is no cap. Counters are plain integers for ``/metrics``. A connection from one
    of ``proxies`` is counted under the proxy's address but not refused for it, until
    :meth:`readdress` moves it to its client's.
    """

    max_connections: int = 0
    max_per_address: int = 0
    max_per_user: int = 0
    #: The reverse proxies whose connections carry their clients' addresses.
    proxies: TrustedProxies = attrs.Factory(TrustedProxies)
    #: TCP connections held now (both ports), and per address.
    open: int = 0
    by_address: dict[str, int] = attrs.Factory(dict)
    by_user: dict[str, int] = attrs.Factory(dict)
    #: Connections or sessions refused since the start, by reason (:data:`REASONS`).
    refused: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(REASONS, 0))
    #: ``accept`` calls that failed for lack of file descriptors or memory.
    accept_errors: int = 0
    #: HTTP connections closed because a request's headers or body came too late.
    read_timeouts: int = 0
    _held: dict[int, str] = attrs.Factory(dict)

    def admit(self, stream: object, address: str) -> str | None:
        """Count ``stream`` from ``address`` in, or say why not (a refusal message)."""
        if self.max_connections and self.open >= self.max_connections:
            self.refused["global"] += 1
            return "server busy: too many open connections, try again later"
        held = self.by_address.get(address, 0)
        if self._over_address_cap(address, held):
            return self._address_refusal()
        self.open += 1
        self.by_address[address] = held + 1
        self._held[id(stream)] = address
        return None

    def readdress(self, stream: object, address: str) -> str | None:
        """Count the admitted ``stream`` under ``address`` from now on (its client's, read
        from a trusted proxy's ``X-Forwarded-For``), or say why not: the client's address is
        over its cap (the stream stays counted as it was; the caller refuses and drops it).
        Nothing for a stream never admitted, or already under ``address``."""
        before = self._held.get(id(stream))
        if before is None or before == address:
            return None
        held = self.by_address.get(address, 0)
        if self._over_address_cap(address, held):
            return self._address_refusal()
        self._count_out(before)
        self.by_address[address] = held + 1
        self._held[id(stream)] = address
        return None

    def _over_address_cap(self, address: str, held: int) -> bool:
        # A trusted proxy's connections carry many clients: each is held to the cap instead.
        capped = bool(self.max_per_address) and held >= self.max_per_address
        return capped and not self.proxies.trusts(address)

    def _address_refusal(self) -> str:
        self.refused["address"] += 1
        return f"too many connections from your address (at most {self.max_per_address})"

    def _count_out(self, address: str) -> None:
        left = self.by_address[address] - 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]

    def release(self, stream: object) -> None:
        """Count ``stream`` out (once; a stream never admitted is ignored)."""
        address = self._held.pop(id(stream), None)
        if address is None:
            return
        self.open -= 1
        self._count_out(address)

    def enter_user(self, user_id: str) -> bool:
        """Count one more session of ``user_id``; False (and counted) when over its cap."""
        held = self.by_user.get(user_id, 0)
        if self.max_per_user and held >= self.max_per_user:
            self.refused["user"] += 1
            return False
        self.by_user[user_id] = held + 1
        return True

    def leave_user(self, user_id: str) -> None:
        left = self.by_user.get(user_id, 0) - 1
        if left > 0:
            self.by_user[user_id] = left
        else:
            self.by_user.pop(user_id, None)


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


class GatedListener(trio.abc.Listener[trio.SocketStream]):
    """A TCP listener that admits connections through a :class:`ConnectionGate`.

    Refused connections get a ``503`` naming the cap, answered in ``nursery`` (at most
    :data:`REFUSING_MAX` at once). The caller releases each stream it got from :meth:`accept`
    with :meth:`ConnectionGate.release` when the connection ends.
    """

    def __init__(
        self, inner: trio.SocketListener, gate: ConnectionGate, nursery: trio.Nursery
    ) -> None:
        self._inner = inner
        self.gate = gate
        self._nursery = nursery
        self._refusing = 0
        self._starved = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._inner.socket

    @property
    def port(self) -> int:
        return int(self._inner.socket.getsockname()[1])

    async def accept(self) -> trio.SocketStream:
        backoff = BACKOFF_FIRST
        while True:
            try:
                stream = await self._inner.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                self.gate.accept_errors += 1
                if not self._starved:
                    self._starved = True
                    log.error("accept failed (%s): backing off until resources free up",
                              errno.errorcode.get(exc.errno or 0, exc.errno))  # fmt: skip
                await trio.sleep(backoff)  # a back-off, not synchronization
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if self._starved:
                self._starved = False
                log.warning("accepting connections again")
            backoff = BACKOFF_FIRST
            reason = self.gate.admit(stream, _peer(stream))
            if reason is None:
                return stream
            if self._refusing < REFUSING_MAX:
                self._refusing += 1
                self._nursery.start_soon(self._refuse, stream, reason)
            else:
                await _refuse_at_once(stream, reason)

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        try:
            with trio.move_on_after(REFUSAL_LINGER):
                await stream.send_all(_unavailable(reason))
                await stream.send_eof()
                # Read what the client sent until it closes: closing with unread data would
                # reset the connection and could destroy the answer before it is read.
                while await stream.receive_some(4096):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            await stream.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


def _unavailable(reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8"
            b"\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip


async def _refuse_at_once(stream: trio.SocketStream, reason: str) -> None:
    """Refuse without waiting: the answer goes into the empty send buffer of the new socket,
    what the client sent so far is read (so the close is a FIN, not a reset), and it closes."""
    fd = stream.socket.fileno()
    try:
        os.write(fd, _unavailable(reason))
        stream.socket.shutdown(trio.socket.SHUT_WR)
        # What is buffered now, bounded: a client streaming into it must not hold the loop.
        for _ in range(4):
            if not os.read(fd, 65536):
                break
    except OSError:  # BlockingIOError: nothing more to read now; others: the client is gone
        pass
    await stream.aclose()


class DeadlineStream(trio.abc.HalfCloseableStream):
    """A socket stream whose reads fail with :class:`trio.TooSlowError` past :attr:`deadline`
    (trio time), which may move while a read waits."""

    def __init__(self, stream: trio.SocketStream, deadline: float, gate: ConnectionGate) -> None:
        self._stream = stream
        self.socket = stream.socket
        self.deadline = deadline
        self._gate = gate
        self._scope: trio.CancelScope | None = None
        #: Bytes handed to :meth:`send_all` (for the client's lag: ``crealia._lag``).
        self.written = 0

    @property
    def accepted(self) -> trio.SocketStream:
        """The accepted stream, which the gate counts the connection by."""
        return self._stream

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.CancelScope(deadline=self.deadline) as scope:
            self._scope = scope
            try:
                return await self._stream.receive_some(max_bytes)
            finally:
                self._scope = None
        self._gate.read_timeouts += 1
        raise trio.TooSlowError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def edge_app(
    app: ASGIApp,
    *,
    hosts: HostPolicy,
    header_timeout: float,
    body_timeout: float,
    gate: ConnectionGate | None = None,
) -> ASGIApp:
    """Wrap ``app``: refuse requests for hosts ``hosts`` does not allow (421 on HTTP, on a
    WebSocket handshake too), and move the connection's read deadline (see the module
    docstring) as requests come and go.

    From a peer the gate's ``proxies`` trust, ``scope["client"]`` becomes the client's address
    (read from ``X-Forwarded-For``, port 0), so that the app, its audit and its limits see the
    client; a WebSocket handshake then counts against the client's address, and is refused
    503 when that is over its cap."""
    proxies = gate.proxies if gate is not None else TrustedProxies()

    def refused_host(scope: Scope) -> str | None:
        host = header(scope.get("headers") or [], b"host")
        if hosts.allows(host):
            return None
        if gate is not None:
            gate.refused["host"] += 1
        return host or ""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        stream: DeadlineStream | None = (scope.get("state") or {}).get(STREAM_KEY)
        host = refused_host(scope)
        if proxies:
            scope = forwarded_scope(scope, proxies)
        if kind == "websocket":
            refusal = None
            if host is None and proxies and gate is not None and stream is not None:
                refusal = gate.readdress(stream.accepted, scope["client"][0])
            if host is not None or refusal is not None:
                body = misdirected_body(host) if host is not None else f"{refusal}\n".encode()
                await _refuse_websocket(scope, receive, send, body, 503 if host is None else 421)
                if stream is not None:
                    stream.set_deadline(trio.current_time() + EARLY_RESPONSE_LINGER)
                return
            if stream is not None:
                stream.set_deadline(math.inf)  # the hub's hello timeout takes over
            await app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        length = header(headers, b"content-length")
        complete = not (header(headers, b"transfer-encoding") or (length or "0").strip() != "0")

        def set_deadline(deadline: float) -> None:
            if stream is not None:
                stream.set_deadline(deadline)

        set_deadline(math.inf if complete else trio.current_time() + body_timeout)

        async def tracked_receive() -> Message:
            nonlocal complete
            message = await receive()
            done = message["type"] == "http.request" and not message.get("more_body")
            if done and not complete:
                complete = True
                set_deadline(math.inf)
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                # Answered before its body was read, the connection serves no other request (it
                # closes after the linger): say so, or a client that reuses it loses the next.
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                linger = header_timeout if complete else EARLY_RESPONSE_LINGER
                set_deadline(trio.current_time() + linger)

        try:
            if host is not None:
                await _misdirected(send, host)
                set_deadline(trio.current_time() + EARLY_RESPONSE_LINGER)
                return
            await app(scope, tracked_receive, tracked_send)
        finally:
            if not complete:
                set_deadline(min(stream.deadline if stream else math.inf,
                                 trio.current_time() + EARLY_RESPONSE_LINGER))  # fmt: skip

    return route


async def _misdirected(send: Send, host: str) -> None:
    body = misdirected_body(host)
    await send({"type": "http.response.start", "status": 421,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def forwarded_scope(scope: Scope, proxies: TrustedProxies) -> Scope:
    """``scope`` with ``client`` the client's address when its peer is a trusted proxy
    (``(address, 0)``: the client's port is not known), else ``scope`` itself."""
    client = scope.get("client")
    peer = str(client[0]) if client else ""
    address = proxies.client_address(
        peer, header_values(scope.get("headers") or [], b"x-forwarded-for")
    )
    if address == peer:
        return scope
    return {**scope, "client": (address, 0)}


async def _refuse_websocket(
    scope: Scope, receive: Receive, send: Send, body: bytes, status: int = 421
) -> None:
    """Answer a WebSocket handshake with ``status`` (with the denial-response extension; a
    plain close before accept, which hypercorn answers 403, without it)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "websocket.http.response.body", "body": body})


async def serve_http(
    app: ASGIApp,
    config: hypercorn.config.Config,
    gate: ConnectionGate,
    host: str,
    port: int,
    *,
    header_timeout: float,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (ASGI) with hypercorn on ``host:port`` over gated listeners until
    ``shutdown_trigger`` returns; reports the bound port. Connections still open then get
    ``config.graceful_timeout`` seconds to finish."""
    lifespan_state: dict[str, Any] = {}
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            bound = await trio.open_tcp_listeners(port, host=host)
            listeners = [GatedListener(listener, gate, server_nursery) for listener in bound]

            async def handle(stream: trio.SocketStream) -> None:
                guarded = DeadlineStream(stream, trio.current_time() + header_timeout, gate)
                state: Any = {**lifespan_state, STREAM_KEY: guarded}
                server = TCPServer(wrapped, config, context, state, guarded)  # type: ignore[arg-type]
                try:
                    await server
                finally:
                    gate.release(stream)
                    # hypercorn's connection objects refer to each other (the server to its
                    # protocol, the protocol back to the server's send): let the connection go
                    # when it ends, not at the next full collection.
                    vars(server).clear()

            task_status.started(listeners[0].port)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners, handle, listeners, handler_nursery=server_nursery
                        )
                    )
                    await shutdown_trigger()
                    nursery.cancel_scope.cancel()
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
