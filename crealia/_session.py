"""The session core: one client connection from handshake to close, whatever its transport.

Transports (the trio-websocket fast path, the ASGI route on hypercorn, any
:class:`~crealia._transport.Transport` passed to ``open_server``) wrap their socket in a
:class:`~crealia._transport.Connection` and hand it to the :class:`~crealia._transport.Acceptor`
that :meth:`Hub.acceptor` builds, which runs :meth:`Hub.serve_connection`. A session lives
exactly as long as that call: a reader task decodes, checks and handles client messages one at
a time, and a writer task drains the session's bounded outbox into frames. A full outbox means
the client cannot keep up: the session is closed with 4409 and the room never waits for it.

The outbox fills only once the kernel's socket buffers (megabytes) are full, so the hub also
watches each client's own progress (:meth:`Hub.watch_lag`, :mod:`crealia._lag`): acknowledged
bytes and ping round trips. A client more than ``client_lag_timeout`` behind is closed with
4409 too; what was queued for it is dropped, so that the close frame follows the frame being
written and reaches a client that reads again.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import inspect
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from . import _wire
from ._audit import AuditLog
from ._auth import TokenAuthority, require_role
from ._backplane import Backplane
from ._config import Config
from ._echo import run_echo
from ._edge import ConnectionGate
from ._errors import (
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unauthorized,
)

# Defined with the other errors; the transports import it from here, beside Connection.
from ._errors import ConnectionClosed as ConnectionClosed
from ._lag import SLACK_BYTES, LagMeter
from ._logging import log_context
from ._metrics import Traffic
from ._model import Resolution, User
from ._origin import ALLOW_HINT, HostPolicy, OriginPolicy, shown_origin
from ._preauth import AddressLimiter
from ._protocol import PROTOCOL, MessageType, data_classes
from ._ratelimit import RateLimiter
from ._room import Room, RoomManager
from ._sequencing import RevertChange
from ._settle import Settler, custom_value_problem
from ._transport import Acceptor, Connection

log = logging.getLogger("crealia.session")

#: Largest frame the writer builds by merging queued outbox items.
_MAX_MERGED_FRAME = 256 * 1024

#: Conflicts of one dry run whose chain is previewed; the others get ``strategies: null`` (a
#: preview runs every strategy, the ``ai`` one asking its provider).
DRY_RUN_PREVIEWS = 20

#: The change id of a conflict's revert is this and the conflict's id (clients may not use it).
REVERT_PREFIX = "revert:"


class _Parts(list[bytes]):
    """Outbox items merged while the writer was behind: their bodies, joined once when sent
    (joining on every merge copied the growing body each time)."""

    __slots__ = ("size",)

    def __init__(self, first: bytes, second: bytes) -> None:
        super().__init__((first, second))
        #: The bodies' bytes, commas not counted (as :meth:`Session.push` counts them).
        self.size = len(first) + len(second)


#: An outbox item: (envelopes in it, their comma-joined bytes, or the bodies of merged items,
#: trio time the oldest was queued).
_Item = tuple[int, bytes | _Parts, float]


def _size(body: bytes | _Parts) -> int:
    return body.size if isinstance(body, _Parts) else len(body)


class _Outbox:
    """A session's bounded queue of outbound items, read by its writer task.

    Leaner than a memory channel (no deque block, no task dictionaries): it costs a few hundred
    bytes per idle connection instead of about two kilobytes. One reader at a time.
    """

    __slots__ = ("_items", "_waiter", "closed", "limit", "merge")

    def __init__(self, limit: int, *, merge: bool = False) -> None:
        self._items: list[_Item] = []
        self._waiter: trio.lowlevel.Task | None = None
        self.closed = False
        self.limit = limit
        #: Whether items may be merged (batching on): once the outbox is half full, a new item
        #: joins the last one (as the writer would) up to a merged frame's size, so a backlog of
        #: many small flushes is bounded by bytes, not by their number.
        self.merge = merge

    def put_nowait(self, item: tuple[int, bytes, float]) -> bool:
        """Queue ``item``; False when the outbox is full or closed."""
        items = self._items
        if self.closed:
            return False
        if self.merge and len(items) >= self.limit // 2:
            count, body, since = items[-1]
            added = item[1]
            if _size(body) + len(added) < _MAX_MERGED_FRAME:
                if isinstance(body, _Parts):
                    body.append(added)
                    body.size += len(added)
                else:
                    body = _Parts(body, added)
                items[-1] = (count + item[0], body, since)
                return True
        if len(items) >= self.limit:
            return False
        items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        self.closed = True
        self._wake()

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    async def get_all(self) -> list[_Item]:
        """Everything queued, waiting for at least one item; ``[]`` once closed and empty."""
        if not self._items and not self.closed:
            self._waiter = trio.lowlevel.current_task()

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        items, self._items = self._items, []
        return items


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


@attrs.define(eq=False)
class Session:
    """One authenticated connection in a room."""

    id: str
    user: User
    conn: Connection
    config: Config
    outbox: _Outbox
    queued_bytes: int = 0
    close_code: int | None = None
    close_reason: str = ""
    #: Covers the whole session; killing it sets a deadline on it.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Covers the reader only; killing the session cancels it at once.
    reader_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: True while the writer is inside a send: cancelling it there leaves half a frame.
    sending: bool = False
    #: Set when the reader or the writer found the connection closed: nothing is left to close.
    peer_gone: bool = False
    #: When this session's recent refused messages happened (for the 4429 abuse guard).
    strikes: collections.deque[float] | None = None
    #: Where what this session sends and receives is counted: the server's and its room's.
    traffic: tuple[Traffic, ...] = ()
    #: Set once the session has ended and said so (closed, audited, out of its room).
    ended: trio.Event = attrs.Factory(trio.Event)
    #: Frames the writer sends before anything queued: a ``welcome`` too big for one frame and
    #: its ``welcome_chunk`` frames, sent as the client takes them (not counted in the outbox).
    preamble: collections.abc.Iterable[bytes] = ()
    #: True once the writer has returned; the event is made only when someone waits for it.
    writer_ended: bool = False
    _writer_done: trio.Event | None = None
    _killed: trio.Event | None = None
    #: Bytes of the frames the writer has handed to the connection.
    bytes_sent: int = 0
    #: True once the writer has sent the preamble: the lag watch leaves a welcome alone.
    welcomed: bool = False
    #: Seconds the client was behind at the last sample of :meth:`check_lag` (0: caught up).
    lag: float = 0.0
    #: What the last sample saw: bytes the client's TCP had not acknowledged (None: unknown).
    unacked: int | None = None
    _meter: LagMeter | None = None
    #: The ping in flight: trio time it was written, and the event its pong sets.
    _ping: tuple[float, trio.Event] | None = None
    #: ``bytes_sent`` when the last ping was written, and at the last sample.
    _pinged: int = 0
    _sampled: int = -1

    def strike(self) -> None:
        """Count a refused or invalid message; too many in the window close with 4429."""
        now = trio.current_time()
        if self.strikes is None:
            self.strikes = collections.deque()
        strikes = self.strikes
        strikes.append(now)
        while strikes and strikes[0] < now - self.config.abuse_window:
            strikes.popleft()
        if len(strikes) > self.config.abuse_errors:
            self.kill(4429, "too many refused messages")

    @classmethod
    def create(cls, user: User, conn: Connection, config: Config) -> Session:
        return cls(
            id=uuid.uuid4().hex,
            user=user,
            conn=conn,
            config=config,
            outbox=_Outbox(config.outbox_frames, merge=config.tick_ms > 0),
        )

    def push(self, count: int, body: bytes, since: float | None = None) -> None:
        """Queue ``count`` comma-joined envelopes for the writer, never blocking.

        ``since`` is the trio time the oldest of them entered the server (now if not given);
        fan-out latency is measured from it. A full outbox closes the session as a slow
        consumer (4409).
        """
        if self.close_code is not None or self.outbox.closed:
            return  # closing: nothing more goes out (and a closed outbox is no slow consumer)
        self.queued_bytes += len(body)
        # One item of any size may always wait; past that the byte budget applies.
        if self.queued_bytes > self.config.outbox_bytes and self.queued_bytes > len(body):
            self.kill(4409, "slow consumer: too far behind, reconnect and resume")
            return
        if since is None:
            since = trio.current_time()
        if not self.outbox.put_nowait((count, body, since)):
            self.kill(4409, "slow consumer: too far behind, reconnect and resume")

    def reply(self, frame: bytes) -> None:
        self.push(1, frame)

    def kill(self, code: int, reason: str) -> None:
        """End the session with close ``code``.

        The reader stops at once; the writer finishes the frame it is sending (a frame cut in
        half would corrupt the stream for the close that follows) and sends nothing more. A
        client that does not take even that frame within ``close_timeout`` is aborted.
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            if code == 4409:
                for traffic in self.traffic:
                    traffic.slow_consumers += 1
        if self._killed is not None:
            self._killed.set()
        self.reader_scope.cancel()
        self.outbox.close()
        self.scope.deadline = min(
            self.scope.deadline, trio.current_time() + self.config.close_timeout
        )

    def check_lag(self, now: float) -> str | None:
        """Sample the client's progress at trio time ``now`` (:meth:`Hub.watch_lag` calls it
        every quarter of ``client_lag_timeout``); return why to close it as a slow consumer,
        or None.

        The client is behind by the age of the oldest byte its TCP has not acknowledged
        (:meth:`~crealia._transport.Connection.tcp_progress`) or of its unanswered ping
        (:meth:`~crealia._transport.Connection.start_ping`, written when something was sent
        since the last one, only where TCP cannot tell), counted only while data waits for
        it. An idle session that was caught up costs nothing.
        """
        sent = self.bytes_sent
        moved = sent != self._sampled
        self._sampled = sent
        if not self.welcomed:
            return None
        if not (moved or self.sending or self._ping is not None or self.lag or len(self.outbox)):
            return None
        timeout = self.config.client_lag_timeout
        conn = self.conn
        lag = 0.0
        progress = conn.tcp_progress()
        if progress is not None:
            if self._meter is None:
                self._meter = LagMeter()
            self.unacked = progress[1]
            lag = self._meter.sample(now, *progress)
        ping = self._ping
        if ping is not None and ping[1].is_set():
            self._ping = ping = None
        if ping is not None:
            # Overdue only while data waits for the client: a late pong alone is no lag.
            waiting = (sent != self._pinged or self.sending or len(self.outbox) > 0
                       or (self.unacked or 0) > SLACK_BYTES)  # fmt: skip
            if waiting:
                lag = max(lag, now - ping[0])
        elif progress is None and sent != self._pinged:
            # Only where TCP cannot tell: a pong also waits for this session's reader, which
            # does not read while a message is being handled (an edit waiting for a slow
            # store), so a late pong may be ours, not the client's.
            pong = conn.start_ping()
            if pong is not None:
                self._ping, self._pinged = (now, pong), sent
        self.lag = lag
        if lag > timeout:
            return (f"slow consumer: {lag:.1f} s behind (over {timeout:g} s), reconnect "
                    "and resume")  # fmt: skip
        return None

    async def wait_killed(self) -> None:
        """Wait until :meth:`kill` was called (the session is closing, with ``close_code``)."""
        if self.close_code is not None:
            await trio.lowlevel.checkpoint()
            return
        if self._killed is None:
            self._killed = trio.Event()
        await self._killed.wait()

    async def writer(self) -> None:
        """Send queued items until the session is killed: merged into frames when batching."""
        try:
            await self._write()
        except ConnectionClosed:
            # The peer is gone: end the reader too, rather than raise through the session's
            # nursery (Hub.serve_connection).
            self.peer_gone = True
            self.reader_scope.cancel()
        finally:
            self.writer_ended = True
            if self._writer_done is not None:
                self._writer_done.set()

    async def wait_writer(self) -> None:
        """Wait for the writer to return.

        Cancellation: if cancelled (the session's close deadline, the server stopping) while
        the writer is inside a send, it aborts the connection before it raises: a transport
        may be unable to cancel a send (hypercorn shields its socket writes), and
        :meth:`~crealia._transport.Connection.abort` is what ends such a send.
        """
        if self.writer_ended:
            await trio.lowlevel.checkpoint()
            return
        self._writer_done = done = trio.Event()
        try:
            await done.wait()
        except trio.Cancelled:
            if self.sending:
                await self.conn.abort()
            raise

    async def _write(self) -> None:
        batching = self.config.tick_ms > 0
        timing = self.config.metrics_interval > 0
        preamble, self.preamble = self.preamble, ()
        for frame in preamble:
            if self.close_code is not None:
                return
            self.sending = True
            await self.conn.send(frame)
            self.sending = False
            self.bytes_sent += len(frame)
            for traffic in self.traffic:
                traffic.sent(1, len(frame), None)
        self.welcomed = True
        while True:
            items = await self.outbox.get_all()
            if not items or self.close_code is not None:
                return
            for frame, size, count, since in _frames(items, batching):
                if self.close_code is not None:
                    return
                self.queued_bytes -= size
                self.sending = True
                await self.conn.send(frame)
                self.sending = False
                self.bytes_sent += len(frame)
                latency = trio.current_time() - since if timing else None
                for traffic in self.traffic:
                    traffic.sent(count, len(frame), latency)


def _frames(items: list[_Item], batching: bool) -> list[tuple[bytes, int, int, float]]:
    """Turn queued items into frames, merging when batching: (frame, queued bytes, envelopes,
    when the oldest of them was queued)."""
    if not batching:  # never merged: every body is bytes
        return [(body, len(body), count, since) for count, body, since in items]  # type: ignore[misc]
    frames: list[tuple[bytes, int, int, float]] = []
    parts: list[bytes] = []
    total = size = 0
    oldest = math.inf
    for count, body, since in items:
        body_size = _size(body)
        if parts and size + body_size > _MAX_MERGED_FRAME:
            frames.append((_join(parts, total), size, total, oldest))
            parts, total, size, oldest = [], 0, 0, math.inf
        if isinstance(body, _Parts):
            parts.extend(body)
        else:
            parts.append(body)
        total += count
        size += body_size
        oldest = min(oldest, since)
    if parts:
        frames.append((_join(parts, total), size, total, oldest))
    return frames


def _join(parts: list[bytes], count: int) -> bytes:
    return parts[0] if count == 1 else b"[" + b",".join(parts) + b"]"


#: A message handler: a :class:`Hub` method an entry of the protocol table names, called with
#: the session, its room and the decoded envelope once the sender's role and rate were checked;
#: it returns the reply (type and data) sent when the message has a ``ref``.
Handler = Callable[[Session, Room, _wire.Envelope], Awaitable[tuple[str, Any]]]


@attrs.define(eq=False)
class Hub:
    """What every connection shares: config, tokens, rooms and the backplane.

    Client messages are decoded, checked and dispatched through ``protocol``
    (:data:`crealia._protocol.PROTOCOL` unless given): each entry names its handler, a method
    of this class (``handle_*``), bound when the hub is built.

    Raises:
        TypeError: (when built) an entry of ``protocol`` names no coroutine method of the hub
            or is handled as presence without a slot, or ``protocol`` has no ``hello``.
    """

    config: Config
    auth: TokenAuthority
    backplane: Backplane
    rooms: RoomManager
    settler: Settler
    audit: AuditLog
    limiter: RateLimiter
    #: Everything the server's sessions sent and received (each room keeps its own too).
    traffic: Traffic = attrs.Factory(Traffic)
    accepting: bool = True
    #: Per (user, class): when a rate-limited refusal was last audited, and refusals since.
    _limited: dict[tuple[str, str], tuple[float, int]] = attrs.Factory(dict)
    #: Sessions that asked for the live metrics feed, by session id.
    metric_subscribers: dict[str, Session] = attrs.Factory(dict)
    #: Every live connection (also before ``hello``), for shutdown.
    live: dict[int, tuple[Connection, Session | None]] = attrs.Factory(dict)
    _drained: trio.Event = attrs.Factory(trio.Event)
    connections_total: int = 0
    #: Connection and session caps (crealia._edge); sessions per user are counted here.
    gate: ConnectionGate = attrs.Factory(ConnectionGate)
    #: Limits per client address before authentication (handshakes, REST requests).
    preauth: AddressLimiter = attrs.Factory(
        lambda self: AddressLimiter.from_strings(
            self.config.preauth_handshake_limit, self.config.preauth_rest_limit
        ),
        takes_self=True,
    )
    #: The protocol table the hub decodes and dispatches with.
    protocol: Mapping[str, MessageType] = PROTOCOL
    #: Each type's bound handler, and the class its ``data`` decodes into (from ``protocol``).
    _handlers: dict[str, Handler] = attrs.field(init=False, factory=dict)
    _classes: dict[str, type[Any]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if "hello" not in self.protocol:
            raise TypeError("protocol table: no hello, the message every session starts with")
        for name, entry in self.protocol.items():
            method = getattr(self, entry.handler, None)
            if method is None or not inspect.iscoroutinefunction(method):
                raise TypeError(
                    f"protocol table: {name!r} is handled by {entry.handler!r}, which is no "
                    f"coroutine method of {type(self).__name__}"
                )
            if entry.handler == "handle_presence" and entry.presence is None:
                raise TypeError(f"protocol table: {name!r} is handled as presence but has no "
                                "presence slot")  # fmt: skip
            self._handlers[name] = method
        self._classes = data_classes(self.protocol)

    async def serve_connection(self, conn: Connection) -> None:
        """Run one client connection to its end. Never raises but for cancellation."""
        key = id(conn)
        self.live[key] = (conn, None)
        self.connections_total += 1
        code, reason = 1000, ""
        session: Session | None = None
        room: Room | None = None
        joined = False
        entered: str | None = None  # the user counted against max_sessions_per_user
        try:
            if not self.accepting:
                raise _Close(1001, "server shutting down")
            user, hello, ref = await self._handshake(conn)
            try:
                # Each accepted hello counts: a reconnect loop is limited like pings.
                await self.wait_rate(user, self.protocol["hello"].rate_class)
            except RateLimited as exc:
                self.audit.record("rate_limited", user_id=user.id, project_id=user.project_id,
                                  resource="hello", details={"message": exc.message},
                                  ip_address=conn.remote, user_agent=conn.user_agent)  # fmt: skip
                await conn.send(_wire.error_envelope(exc, ref))
                raise _Close(4429, "reconnecting too often") from None
            if not self.gate.enter_user(user.id):
                limit = self.gate.max_per_user
                busy = Overloaded(f"too many sessions for this user (at most {limit}); "
                                  "close one and try again")  # fmt: skip
                await conn.send(_wire.error_envelope(busy, ref))
                raise _Close(1013, f"too many sessions for this user (at most {limit})")
            entered = user.id
            session = Session.create(user, conn, self.config)
            log_context.set((user.project_id, user.id, session.id))
            self.live[key] = (conn, session)
            room = await self.rooms.join(user.project_id)
            while self.config.max_members_per_project and room.clustered:
                await room.refresh_presence()  # count the other processes' users as they are
                if not room.closed:
                    break
                # It closed meanwhile (it was empty, and this session not in it yet): entering
                # it would raise RoomError; the next join opens a new one.
                room = await self.rooms.join(user.project_id)
            if not room.admits(user.id, self.config.max_members_per_project):
                limit = self.config.max_members_per_project
                full = Overloaded(f"too many users in this project (at most {limit}); try again "
                                  "later")  # fmt: skip
                await conn.send(_wire.error_envelope(full, ref))
                raise _Close(1013, f"too many users in this project (at most {limit})")
            session.traffic = (self.traffic, room.traffic)
            log.info("session opened", extra={"remote": conn.remote, "role": user.role})
            with session.scope:
                room.add_joining(session)  # nothing awaited since join: the room is open
                await self._welcome(session, room, hello, ref)
                joined = True
                self._audit(session, "join", f"project:{user.project_id}",
                            {"session_id": session.id, "role": user.role})  # fmt: skip
                # A closed connection ends the reader or the writer without raising through
                # the nursery: an exception there would hold the session in a reference
                # cycle (its traceback's frames), alive until the next full collection.
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(session.writer)
                        # The reader runs in this task: one task less per connection.
                        try:
                            await self._reader(session, room)
                        except ConnectionClosed:
                            session.peer_gone = True
                            nursery.cancel_scope.cancel()
                        else:
                            # The reader ended: the session was killed (4409, 4429, 1001...)
                            # or its writer found the peer gone. Out of the room now, not once
                            # its last frame is taken (a stalled client takes close_timeout):
                            # the others see it leave at once.
                            self._let_go(session, room)
                            session.outbox.close()  # let the writer finish
                            await session.wait_writer()
                except* ConnectionClosed:
                    session.peer_gone = True
                if session.peer_gone:
                    code = -1  # the peer is gone: nothing to close
        except _Close as exc:
            code, reason = exc.code, exc.reason
        except ConnectionClosed:
            code = -1
        except ProtocolError as exc:
            # The room could not open (overloaded): tell the client, then close.
            with trio.move_on_after(1):
                await _send_quietly(conn, _wire.error_envelope(exc))
            code, reason = 1013, exc.message
        finally:
            if entered is not None:
                self.gate.leave_user(entered)
            if room is not None and session is not None:
                self._let_go(session, room)  # a second time is a no-op
            self.live.pop(key, None)
            if session is not None and session.close_code is not None:
                code, reason = session.close_code, session.close_reason
            if session is not None:
                log.info("session closed", extra={"code": code, "reason": reason})
                if joined:
                    self._audit(session, "leave", f"project:{session.user.project_id}",
                                {"session_id": session.id, "code": code})  # fmt: skip
            if session is not None and session.sending:
                # Cancelled in the middle of a frame: a close frame now would be garbage.
                await conn.abort()
            elif code != -1:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await conn.close(code, reason)
            if not self.live:
                self._drained.set()
            if session is not None:
                session.ended.set()

    def _let_go(self, session: Session, room: Room) -> None:
        """Take ``session`` out of its room and of the metrics subscribers (idempotent)."""
        room.remove(session)
        self.metric_subscribers.pop(session.id, None)

    async def _handshake(self, conn: Connection) -> tuple[User, _wire.Hello, int | None]:
        with trio.move_on_after(self.config.hello_timeout):
            frame = await conn.receive()
            try:
                envelope = _wire.decode_client_frame(frame, self._classes)
            except ProtocolError as exc:
                await conn.send(_wire.error_envelope(exc, _wire.error_ref(exc)))
                raise _Close(4400, "expected hello") from None
            if envelope.type != "hello":
                refused = BadRequest(f"type: expected hello first, got {envelope.type}")
                await conn.send(_wire.error_envelope(refused, envelope.ref))
                raise _Close(4400, "expected hello")
            hello: _wire.Hello = envelope.data
            wait = self.preauth.check(conn.remote, "handshake")
            if wait:
                limited = RateLimited(f"too many handshakes from {conn.remote}: retry in {wait} ms",
                                      retry_after_ms=wait)  # fmt: skip
                self.audit.refusal("rate_limited", user_id=None, project_id=hello.project_id,
                                   resource="websocket", details={"message": limited.message},
                                   ip_address=conn.remote, user_agent=conn.user_agent)  # fmt: skip
                await conn.send(_wire.error_envelope(limited, envelope.ref))
                raise _Close(4429, "too many handshakes")
            try:
                user = self.auth.verify(hello.token, hello.project_id)
            except Unauthorized as exc:
                self.audit.refusal("token_refused", user_id=None, project_id=hello.project_id,
                                   resource="websocket", details={"reason": exc.message},
                                   ip_address=conn.remote, user_agent=conn.user_agent)  # fmt: skip
                await conn.send(_wire.error_envelope(exc, envelope.ref))
                raise _Close(4401, "unauthorized") from None
            return user, hello, envelope.ref
        raise _Close(4408, "no hello in time")

    async def _welcome(
        self, session: Session, room: Room, hello: _wire.Hello, ref: int | None
    ) -> None:
        backplane, project_id = self.backplane, session.user.project_id
        conflicts = await backplane.pending_conflicts(project_id)
        epoch = await backplane.epoch(project_id)
        events = None
        # Another epoch: the history was rewritten since (docs/protocol.md §6): a snapshot, always.
        resume = hello.resume
        if resume is not None and resume.epoch in (None, epoch):
            events = await backplane.events_since(project_id, resume.seq)
            budget = min(self.config.replay_max_bytes, self.config.outbox_bytes // 2)
            if events and sum(len(e.encoded) for e in events) > budget:
                # More than the client can be sent at once: a snapshot instead (never a 4409).
                events = None
        data: dict[str, Any] = {
            "session_id": session.id,
            "user": session.user.to_wire(),
            "project_id": project_id,
            "epoch": epoch,
        }
        if events is None:
            snapshot = await backplane.snapshot(project_id)
            seq = snapshot["seq"]
        else:
            assert hello.resume is not None
            seq = events[-1].seq if events else hello.resume.seq
        if room.clustered:
            # Before the switch to live: the welcome lists users on every process, and they can
            # see this one in theirs.
            await room.refresh_presence(joining=session)
        # From here to the last push nothing awaits: the replay and the live stream meet exactly.
        after = room.activate(session, seq, events)
        data["seq"] = seq
        data["users"] = room.users()
        # Read before the snapshot or the replay: without what was settled since.
        pending = [c for c in conflicts if c.status == "pending" and c.id not in after.settled]
        data["pending_conflicts"] = [c.to_wire() for c in pending]
        data["live_sessions"] = room.live.to_wire()
        if events is None:
            data["snapshot"] = snapshot
        else:
            data["replayed"] = len(events)
        welcome = _wire.envelope("welcome", data, ref)
        if len(welcome) > self.config.welcome_frame_bytes:
            # Too big for one frame a client can take: its big parts follow in chunks.
            moved = {key: data.pop(key) for key in _CHUNKED_PARTS if key in data}
            session.preamble = _chunked_welcome(data, ref, _wire.dumps(moved),
                                                self.config.welcome_frame_bytes)  # fmt: skip
        else:
            session.push(1, welcome)
        for chunk in _chunks(after.frames):
            session.push(len(chunk), b",".join(chunk))

    async def _reader(self, session: Session, room: Room) -> None:
        with session.reader_scope:
            await self._read_loop(session, room)

    async def _read_loop(self, session: Session, room: Room) -> None:
        conn = session.conn
        traffic, room_traffic = self.traffic, room.traffic
        while True:
            frame = await conn.receive()
            ref = None
            kind = "invalid"
            try:
                envelope = _wire.decode_client_frame(frame, self._classes)
                ref, kind = envelope.ref, envelope.type
                reply = await self._handle(session, room, envelope)
            except ProtocolError as exc:
                session.reply(_wire.error_envelope(exc, ref if ref else _wire.error_ref(exc)))
                for counted in (traffic, room_traffic):
                    counted.received(kind, len(frame))
                    counted.refused(exc.code)
                if isinstance(exc, Forbidden):
                    self._audit(session, "permission_refused", kind, {"message": exc.message})
                elif isinstance(exc, RateLimited):
                    self._audit_rate_limited(session, kind, exc)
                if not isinstance(exc, Overloaded):
                    session.strike()
                    if session.close_code == 4429:
                        self._audit(session, "abuse_closed", "websocket",
                                    {"reason": session.close_reason})  # fmt: skip
                continue
            except Exception as exc:
                # A bug must cost one reply, not the session or the server.
                log.exception("internal error handling %s from %s", ref, session.user.id)
                error = InternalError(f"{type(exc).__name__}: {exc}"[:500])
                session.reply(_wire.error_envelope(error, ref))
                for counted in (traffic, room_traffic):
                    counted.received(kind, len(frame))
                    counted.refused(error.code)
                continue
            traffic.received(kind, len(frame))
            room_traffic.received(kind, len(frame))
            if ref is not None:
                kind, data = reply
                session.reply(_wire.envelope(kind, data, ref))

    async def _handle(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """Check the sender's role and rate for the message's type, then run its handler."""
        entry = self.protocol[envelope.type]  # decoding admits only the table's types
        if entry.role is not None:
            require_role(session.user, entry.name, entry.role)
            await self.wait_rate(session.user, entry.rate_class)
        return await self._handlers[entry.name](session, room, envelope)

    # -- message handlers (named by the protocol table) -------------------------------------

    async def handle_hello(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """Refuse a second ``hello``: the handshake took the first one.

        Raises:
            BadRequest: always.
        """
        raise BadRequest("type: hello was already accepted on this connection")

    async def handle_presence(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """Any presence type: the room keeps and fans out what its entry's presence says."""
        presence = self.protocol[envelope.type].presence
        if presence is None:  # refused when the hub was built
            raise InternalError(f"{envelope.type} is handled as presence but has no slot")
        data = _wire.unstructure(envelope.data)
        await room.publish_presence(session, envelope.type, data, presence)
        return "ack", {}

    async def handle_ping(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``ping``: ``pong`` with the server's clock (pushed too when there is no ``ref``)."""
        pong: dict[str, Any] = {"timestamp": int(time.time() * 1000)}
        if envelope.data.t is not None:
            pong["t"] = envelope.data.t
        if envelope.ref is None:
            session.reply(_wire.envelope("pong", pong))
        return "pong", pong

    async def handle_users_request(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``users_request``: ``users_list`` of everyone present (pushed too when there is no
        ``ref``); in a cluster the other processes' members are read first."""
        if room.clustered:
            await room.refresh_presence()
        users = {"users": room.users()}
        if envelope.ref is None:
            session.reply(_wire.envelope("users_list", users))
        return "users_list", users

    async def handle_timeline_change(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``timeline_change``: commit it through the backplane (conflicts go to the room's
        strategy chain), audit it, and ack the outcome.

        Raises:
            ProtocolError: what the backplane refuses (``overloaded``, ``too_large``, ...).
        """
        user, data = session.user, envelope.data
        if data.change_id.startswith(REVERT_PREFIX):
            raise BadRequest(
                f"data.change_id: ids starting with {REVERT_PREFIX!r} name the "
                "server's reverts (conflict_revert); choose another change_id"
            )
        strategy = await self.settler.first(user.project_id)
        outcome = await self.backplane.commit_change(user, data, strategy=strategy)
        room.settle(outcome.detected)
        conflicted = int(bool(outcome.detected))
        for counted in (self.traffic, room.traffic):
            counted.changes += 1
            counted.conflicted_changes += conflicted
        details = {
            "status": outcome.status,
            "seq": outcome.seq,
            "operations": len(data.changes),
            "conflicts": outcome.conflicts,
        }
        self._audit(session, "edit", f"timeline:{data.change_id}", details)
        return "ack", outcome.to_wire()

    async def handle_comment_add(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``comment_add``: commit the comment (idempotent on its id), audit it, ack its seq.

        Raises:
            TooLarge: the text is longer than ``comment_max_chars``.
        """
        comment = envelope.data.comment
        if len(comment.text) > self.config.comment_max_chars:
            raise TooLarge(
                f"data.comment.text: longer than {self.config.comment_max_chars} characters"
            )
        seq, duplicate = await self.backplane.commit_comment(session.user, comment)
        status = "duplicate" if duplicate else "applied"
        self._audit(session, "comment", f"comment:{comment.id}",
                    {"seq": seq, "status": status})  # fmt: skip
        return "ack", {"seq": seq, "status": status}

    async def handle_conflict_resolve(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``conflict_resolve``: settle a pending conflict by hand (:meth:`resolve_by_hand`).

        Raises:
            NotFound, BadRequest, TooLarge: as :meth:`resolve_by_hand`.
        """
        data = envelope.data
        value = None if data.value is _wire.MISSING else data.value
        await self.resolve_by_hand(session.user, data.conflict_id, data.choice, value,
                                   origin=_origin(session))  # fmt: skip
        return "ack", {}

    async def handle_conflict_dismiss(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``conflict_dismiss``: settle a pending conflict keeping the current value.

        Raises:
            NotFound: as :meth:`resolve_by_hand`.
        """
        await self.resolve_by_hand(session.user, envelope.data.conflict_id, "current", None,
                                   dismiss=True, origin=_origin(session))  # fmt: skip
        return "ack", {}

    async def handle_conflict_revert(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``conflict_revert``: undo a settled conflict's resolution by a new change
        (:meth:`revert_conflict`); the ack is the change's.

        Raises:
            NotFound, BadRequest: as :meth:`revert_conflict`.
        """
        data = envelope.data
        ack = await self.revert_conflict(session.user, data.conflict_id, data.side,
                                         origin=_origin(session))  # fmt: skip
        return "ack", ack

    async def handle_conflict_preview(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``conflict_preview``: the dry run of ``POST /api/collaboration/conflicts/detect``
        (:meth:`preview_change`); the ack's data is that call's answer.

        Raises:
            BadRequest, NotFound, TooLarge: as :meth:`preview_change`.
        """
        return "ack", await self.preview_change(session.user, envelope.data.changes,
                                                origin=_origin(session))  # fmt: skip

    async def handle_metrics_subscribe(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``metrics_subscribe``: start the session's live metrics feed."""
        self.metric_subscribers[session.id] = session
        return "ack", {}

    async def handle_metrics_unsubscribe(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``metrics_unsubscribe``: stop the session's live metrics feed."""
        self.metric_subscribers.pop(session.id, None)
        return "ack", {}

    async def handle_live_start(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``live_start``: a live session hosted by this connection (docs/protocol.md §8).

        Raises:
            Overloaded: the project has as many live sessions as it may.
        """
        live = await room.live.start(session, envelope.data)
        self._audit(session, "live_start", f"live:{live.id}", {"kind": live.kind,
                                                                "mode": live.mode})  # fmt: skip
        return "ack", live.description()

    async def handle_live_join(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``live_join``: this connection watches the session.

        Raises:
            NotFound: no such session. Overloaded: it is at its viewer limit.
        """
        live = room.live.join(session, envelope.data.session_id)
        self._audit(session, "live_join", f"live:{live.id}", {"host": live.host})
        return "ack", {**live.description(), "host": live.host, "viewers": live.viewers()}

    async def handle_live_leave(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``live_leave``: this connection stops watching (the host's last one ends it).

        Raises:
            NotFound: no such session. Forbidden: this connection is not in it.
        """
        room.live.leave(session, envelope.data.session_id)
        self._audit(session, "live_leave", f"live:{envelope.data.session_id}", {})
        return "ack", {}

    async def handle_live_stop(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``live_stop``: the host or an owner ends the session.

        Raises:
            NotFound: no such session. Forbidden: neither its host nor an owner.
        """
        live = room.live.stop(session, envelope.data.session_id)
        self._audit(session, "live_stop", f"live:{live.id}", {"host": live.host})
        return "ack", {}

    async def handle_webrtc_signal(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``webrtc_signal``: forwarded to its target's connections in the session, or taken
        by the server's peer in a relay session.

        Raises:
            NotFound, Forbidden, BadRequest, TooLarge, Overloaded: as
            :meth:`crealia._live.LiveSessions.signal`.
        """
        await room.live.signal(session, envelope.data)
        return "ack", {}

    async def handle_stream_stats(
        self, session: Session, room: Room, envelope: _wire.Envelope
    ) -> tuple[str, Any]:
        """``stream_stats``: a member's statistics, kept and fed to its quality controller.

        Raises:
            NotFound, Forbidden, BadRequest: as :meth:`crealia._live.LiveSessions.stats`.
        """
        room.live.stats(session, envelope.data)
        return "ack", {}

    async def resolve_by_hand(
        self,
        user: User,
        conflict_id: str,
        choice: str,
        value: Any,
        *,
        dismiss: bool = False,
        origin: tuple[str, str] = ("", ""),
    ) -> int:
        """Settle a pending conflict as a person (WebSocket or REST); returns its seq.

        Raises:
            NotFound: no pending conflict with that id in the user's project.
            BadRequest, TooLarge: a custom value that a client could not write either.
        """
        if choice == "custom":
            _wire.check_value(value, path="data.value", max_bytes=self.config.value_max_bytes)
        pending = await self.backplane.pending_conflicts(user.project_id)
        conflict = next((c for c in pending if c.id == conflict_id), None)
        if conflict is None:
            raise NotFound(f"data.conflict_id: no pending conflict {conflict_id!r} in this project")
        if choice == "current":
            value = conflict.current["value"]
        elif choice == "incoming":
            value = conflict.incoming["value"]
        else:
            problem = custom_value_problem(conflict, value)
            if problem is not None:
                raise BadRequest(f"data.value: {problem}")
        if dismiss:
            explanation = f"Dismissed by {user.name}: the current value stays."
        else:
            side = {"current": "kept the current value", "incoming": "took the incoming change",
                    "custom": "set a value of their own"}[choice]  # fmt: skip
            explanation = f"Settled by hand: {user.name} {side}."
        resolution = Resolution(value=value, choice=choice, strategy="manual",  # type: ignore[arg-type]
                                confidence=1.0, explanation=explanation)  # fmt: skip
        # No choice may write over an edit newer than the conflict: the backplane then keeps the
        # newest value, and a value taken from the incoming side or given by hand conflicts
        # with it anew (a person chose without seeing it).
        settled = await self.backplane.settle(
            user.project_id, conflict_id, resolution, by=user.id, writer=user.id,
            expect_seq=conflict.current.get("seq"), redetect=choice != "current",
        )  # fmt: skip
        self.audit.record(
            "conflict_resolution", user_id=user.id, project_id=user.project_id,
            resource=f"conflict:{conflict_id}", ip_address=origin[0], user_agent=origin[1],
            details={"choice": choice, "dismissed": dismiss, "strategy": "manual",
                     "seq": settled.seq},
        )  # fmt: skip
        return settled.seq

    async def revert_conflict(
        self,
        user: User,
        conflict_id: str,
        side: str | None,
        *,
        origin: tuple[str, str] = ("", ""),
    ) -> dict[str, Any]:
        """Undo a settled conflict's resolution (WebSocket or REST): a new change, checked like
        any other against writes newer than the resolution, restoring ``side``'s value (by
        default the side the resolution did not choose). Returns the change's ack data.

        Raises:
            NotFound: no conflict with that id in the user's project, or its element is gone.
            BadRequest: the conflict is pending, dismissed or already reverted, ``side`` is
                missing (a custom resolution) or names the side the resolution chose, or what
                it would restore cannot be (docs/protocol.md §5, "Reverting a resolution").
        """
        project_id, where = user.project_id, "data.conflict_id"
        pending = await self.backplane.pending_conflicts(project_id)
        if any(c.id == conflict_id for c in pending):
            raise BadRequest(
                f"{where}: conflict {conflict_id!r} is still pending: settle it "
                "(conflict_resolve), there is no resolution to revert"
            )
        conflict = await self.backplane.conflict(project_id, conflict_id)
        if conflict is None or conflict.status != "resolved" or conflict.resolution is None:
            raise NotFound(f"{where}: no settled conflict {conflict_id!r} in this project")
        resolution = conflict.resolution
        seq = resolution.get("seq")
        if not isinstance(seq, int):
            raise BadRequest(
                f"{where}: conflict {conflict_id!r} was settled before resolutions "
                "recorded their seq; it cannot be reverted"
            )
        # Dismissals are told apart by the explanation resolve_by_hand gives them.
        if resolution.get("strategy") == "manual" and str(
            resolution.get("explanation", "")
        ).startswith("Dismissed by "):
            raise BadRequest(
                f"{where}: conflict {conflict_id!r} was dismissed (the current "
                "value stayed); a dismissal has nothing to revert"
            )
        chosen = resolution.get("choice")
        if side is None:
            if chosen not in ("current", "incoming"):
                raise BadRequest(
                    "data.side: required, the resolution set a value of its own "
                    "(custom): name the side to restore, current or incoming"
                )
            side = "incoming" if chosen == "current" else "current"
        elif side == chosen:
            raise BadRequest(
                f"data.side: the resolution chose {side!r} already; a revert "
                "restores the value it did not choose"
            )
        value = (conflict.current if side == "current" else conflict.incoming).get("value")
        change = RevertChange(change_id=f"{REVERT_PREFIX}{conflict_id}", revert_of=conflict_id,
                              conflict=conflict, side=side,  # type: ignore[arg-type]
                              value=value, resolution_seq=seq)  # fmt: skip
        strategy = await self.settler.first(project_id)
        reverted = f"{where}: conflict {conflict_id!r} was reverted already"
        try:
            outcome = await self.backplane.commit_change(user, change, strategy=strategy)
        except BadRequest as exc:
            if exc.message.startswith("data.change_id:"):  # the revert's id: taken
                raise BadRequest(f"{reverted}, by another user") from exc
            raise
        if outcome.status == "duplicate":
            at = f"at seq {outcome.seq}" if outcome.seq is not None else "as a new conflict"
            raise BadRequest(f"{reverted} ({at})")
        # A revert that conflicts goes through the chain like a change's conflict (over REST
        # with the project's room closed here, when the room next opens).
        room = self.rooms.rooms.get(project_id)
        counters = [self.traffic]
        if room is not None:
            room.settle(outcome.detected)
            counters.append(room.traffic)
        for counted in counters:
            counted.changes += 1
            counted.conflicted_changes += int(bool(outcome.detected))
        self.audit.record(
            "conflict_revert", user_id=user.id, project_id=project_id,
            resource=f"conflict:{conflict_id}", ip_address=origin[0], user_agent=origin[1],
            details={"side": side, "seq": outcome.seq, "status": outcome.status,
                     "conflicts": outcome.conflicts, "resolution_seq": seq},
        )  # fmt: skip
        return outcome.to_wire()

    async def preview_change(
        self,
        user: User,
        changes: list[_wire.Op],
        *,
        origin: tuple[str, str] = ("", ""),
    ) -> dict[str, Any]:
        """A dry run of ``changes`` in the user's project (WebSocket or REST): ``{"applies",
        "conflicts"}``, each conflict with what every strategy of the chain would answer (the
        first :data:`DRY_RUN_PREVIEWS`); nothing is stored or applied. Audited.

        Raises:
            BadRequest, NotFound: the changes contradict the document.
            TooLarge: they would be past a quota.
        """
        change = _wire.TimelineChange(change_id="dry-run", changes=changes)
        result = await self.backplane.dry_run(user, change)
        # What the chain would do with each conflict, nothing applied (the room's members,
        # when it is open here, are who the strategies weigh).
        room = self.rooms.rooms.get(user.project_id)
        for index, found in enumerate(result["conflicts"]):
            if index >= DRY_RUN_PREVIEWS:  # each preview may cost a provider call per strategy
                found.update(strategies=None, settled_by=None)
                continue
            roles: dict[str, str] = {user.id: user.role}
            found.update(await self.settler.preview(user.project_id, found, roles, room))
        self.audit.record(
            "conflict_preview", user_id=user.id, project_id=user.project_id,
            resource=f"project:{user.project_id}", ip_address=origin[0], user_agent=origin[1],
            details={"operations": len(changes), "applies": len(result["applies"]),
                     "conflicts": len(result["conflicts"])},
        )  # fmt: skip
        return result

    def check_rate(self, user: User, cls: str) -> None:
        """Raises:
        RateLimited: ``user`` is over the limit of event class ``cls``.
        """
        wait = self.limiter.check(user.id, cls)
        if wait:
            raise RateLimited(f"too many {cls} requests: retry in {wait} ms", retry_after_ms=wait)

    async def wait_rate(self, user: User, cls: str) -> None:
        """:meth:`check_rate`, but in a cluster it waits out a sync round trip rather than
        refuse an event that only ran ahead of the cluster's count (``RateLimiter.admit``).

        Raises:
            RateLimited: ``user`` is over the limit of event class ``cls``.
        """
        wait = await self.limiter.admit(user.id, cls)
        if wait:
            raise RateLimited(f"too many {cls} requests: retry in {wait} ms", retry_after_ms=wait)

    def _audit_rate_limited(self, session: Session, kind: str, exc: RateLimited) -> None:
        """Audit a refusal for rate, at most once per ``audit_rate_limited_every`` seconds per
        user and class (with how many refusals it stands for)."""
        key = (session.user.id, self.protocol[kind].rate_class)
        now = trio.current_time()
        last, count = self._limited.get(key, (-math.inf, 0))
        if now - last < self.config.audit_rate_limited_every:
            self._limited[key] = (last, count + 1)
            return
        if len(self._limited) > 10_000:
            self._limited.clear()  # bounded; only costs a few extra audit events
        self._limited[key] = (now, 0)
        self._audit(session, "rate_limited", kind,
                    {"message": exc.message, "refused": count + 1})  # fmt: skip

    def _audit(self, session: Session, action: str, resource: str,
               details: dict[str, Any]) -> None:  # fmt: skip
        user, conn = session.user, session.conn
        self.audit.record(action, user_id=user.id, project_id=user.project_id, resource=resource,
                          details=details, ip_address=conn.remote,
                          user_agent=conn.user_agent)  # fmt: skip

    def on_origin_refused(self, origin: str, remote: str, user_agent: str = "") -> None:
        """A transport refused a WebSocket from a site not allowed (cross-site hijacking).
        Under ``dev`` it is audited as ``dev_origin_refused`` (low: no security alert)."""
        log.warning("refused a WebSocket from origin %s at %s: %s", shown_origin(origin), remote,
                    ALLOW_HINT)  # fmt: skip
        action = "dev_origin_refused" if self.config.dev else "origin_refused"
        self.audit.refusal(action, user_id=None, project_id=None, resource="websocket",
                           details={"origin": origin[:200]}, ip_address=remote,
                           user_agent=user_agent)  # fmt: skip

    def acceptor(self) -> Acceptor:
        """What this hub gives its transports: sessions run by :meth:`serve_connection`, the
        config's limits and handshake policy, the connection gate, refused origins audited."""
        config = self.config
        return Acceptor(
            run_session=self.serve_connection,
            is_accepting=lambda: self.accepting,
            on_origin_refused=self.on_origin_refused,
            run_echo=run_echo if config.conformance_echo else None,
            max_frame_bytes=config.max_frame_bytes,
            handshake_timeout=config.hello_timeout,
            origins=OriginPolicy.from_origins(config.allowed_origins, dev=config.dev),
            hosts=HostPolicy.from_hosts(config.allowed_hosts),
            gate=self.gate,
            page_ports=(config.port,) if config.port else (),
        )

    async def watch_lag(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:  # fmt: skip
        """Close the clients that fall behind: every quarter of ``client_lag_timeout``, sample
        each session's progress (:meth:`Session.check_lag`) and close one more than
        ``client_lag_timeout`` behind with 4409 (logged, audited as ``slow_consumer_closed``,
        counted in ``slow_consumer_closes`` and ``slow_consumer_lag_closes``).

        Runs until cancelled (a task of the server's nursery); with ``client_lag_timeout`` 0
        it returns once started.
        """
        task_status.started()
        timeout = self.config.client_lag_timeout
        if not timeout:
            return
        while True:
            await trio.sleep(timeout / 4)  # a sampling period, not synchronization
            now = trio.current_time()
            for _conn, session in list(self.live.values()):
                if session is None or session.close_code is not None:
                    continue
                reason = session.check_lag(now)
                if reason is not None:
                    self._close_lagging(session, reason)

    def _close_lagging(self, session: Session, reason: str) -> None:
        lag_ms, unacked = round(session.lag * 1000), session.unacked
        log.warning("closing a slow consumer: %s", reason,
                    extra={"remote": session.conn.remote, "lag_ms": lag_ms,
                           "unacked_bytes": unacked})  # fmt: skip
        session.kill(4409, reason)
        for traffic in session.traffic:
            traffic.lagging_consumers += 1
        self._audit(session, "slow_consumer_closed", "websocket",
                    {"reason": reason, "lag_ms": lag_ms, "unacked_bytes": unacked})  # fmt: skip

    async def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001, wait for them (bounded)."""
        self.accepting = False
        for conn, session in list(self.live.values()):
            if session is not None:
                session.kill(1001, "server shutting down")
            else:
                # Not yet past hello: closing it makes its pending receive fail at once.
                with trio.move_on_after(1):
                    await conn.close(1001, "server shutting down")
        if self.live:
            with trio.move_on_after(self.config.shutdown_grace):
                await self._drained.wait()


def _chunks(frames: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for frame in frames:
        if current and size + len(frame) > _MAX_MERGED_FRAME:
            out.append(current)
            current, size = [], 0
        current.append(frame)
        size += len(frame)
    if current:
        out.append(current)
    return out


#: Room in a ``welcome_chunk`` frame for everything but its text.
_CHUNK_OVERHEAD = 128

#: The parts of a ``welcome`` whose size has no small bound: moved into its chunks when the
#: welcome would not fit one frame.
_CHUNKED_PARTS = ("snapshot", "pending_conflicts", "users")


def _chunked_welcome(
    data: dict[str, Any], ref: int | None, text: bytes, frame_bytes: int
) -> collections.abc.Iterator[bytes]:
    """The ``welcome`` (with ``welcome_chunks``: n, without the parts moved out) and its n
    ``welcome_chunk`` frames, each at most ``frame_bytes``: ``text`` (the JSON object of the
    parts moved out) cut into pieces at character boundaries (``{"index": i, "count": n,
    "data": piece}``).

    The pieces are encoded one at a time, as the writer sends them.
    """
    # A piece encodes to at most twice its UTF-8 bytes (a quote or backslash gains one byte).
    step = max(1, (frame_bytes - _CHUNK_OVERHEAD) // 2)
    bounds = [0]
    while bounds[-1] < len(text):
        end = min(bounds[-1] + step, len(text))
        while end < len(text) and text[end] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
            end -= 1
        bounds.append(end)
    count = len(bounds) - 1
    data["welcome_chunks"] = count

    def frames() -> collections.abc.Iterator[bytes]:
        yield _wire.envelope("welcome", data, ref)
        for i in range(count):
            piece = text[bounds[i] : bounds[i + 1]].decode()
            yield _wire.envelope("welcome_chunk", {"index": i, "count": count, "data": piece})

    return frames()


def _origin(session: Session) -> tuple[str, str]:
    """Where a session's messages come from: (remote address, User-Agent)."""
    return session.conn.remote, session.conn.user_agent


async def _send_quietly(conn: Connection, frame: bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await conn.send(frame)
