"""The Python client for Trio programs: one collaboration session over docs/protocol.md.

Use :func:`open_session`; it yields a :class:`ClientSession` once the server has welcomed it::

    async with crealia.open_session("ws://127.0.0.1:3001/ws", token, "p1") as session:
        ack = await session.change([{"op": "insert", "element_id": "clip-1",
                                     "element_type": "clip", "props": {"start": 0}}])
        async for push in session:
            print(push.type, push.data)

What the session does for you:

* **Request and reply.** :meth:`ClientSession.request` numbers each request (``ref``) and returns
  the data of its reply; an ``error`` reply raises :class:`ServerError`.
  :meth:`ClientSession.send` sends without a ``ref`` and expects nothing back.
* **Pushes.** Every server envelope without ``ref`` becomes a :class:`Push`, read with
  ``async for push in session`` or :meth:`ClientSession.receive`, in the order the server sent
  them, whether they came one per frame or batched in a JSON array.
* **Sequencing.** :attr:`ClientSession.seq` is the highest durable ``seq`` handed to the push
  buffer. A durable push (``collaboration_event`` with ``seq``, ``conflict_resolved``) whose
  ``seq`` is not above it is a duplicate and is never delivered twice.
* **Reconnection.** When the connection drops, the session reconnects with jittered exponential
  backoff and sends ``hello`` with ``resume.seq`` = :attr:`ClientSession.seq` and ``resume.epoch``
  = :attr:`ClientSession.epoch` (a server whose history was rewritten since, by a GDPR erasure
  say, answers with a snapshot instead of a replay). It then delivers a
  ``welcome`` push (the new welcome's data: a ``snapshot`` there means events were missed and the
  document must be reloaded from it), then the replayed events, then live ones. Requests whose
  reply is still due are handled so: ``timeline_change``, ``comment_add``, ``users_request``,
  ``ping`` and ``conflict_dismiss`` are sent again on the new connection (a change keeps its
  ``change_id`` and a comment its ``id``, so the server acks it once, possibly with status
  ``duplicate``, and the pending call returns that ack);
  any other request raises :class:`ConnectionLost`, since it may or may not have taken effect.
  Requests and sends made while disconnected wait for the next connection. The session does not
  reconnect after :meth:`ClientSession.aclose`, after close 4401 (unauthorized), or after a
  close that says this client broke the protocol (1007, 1009, 4400): it ends, and its calls
  raise. Close 1001 (server shutting down) and 4409 (slow consumer) do reconnect; 4429 (rate
  limit abused) reconnects after ``max_backoff``.
* **The push buffer** holds at most ``max_pushes`` pushes; it never blocks the connection, so
  replies keep flowing to a program that never reads its pushes. When it is full, the oldest
  presence push (cursor, active element, typing, ``users_list``: the next one supersedes it) is
  dropped to make room. When it is full of pushes that cannot be dropped, the session stops
  taking durable events without advancing :attr:`ClientSession.seq`; once you have read half the
  buffer, it reconnects and resumes from :attr:`ClientSession.seq`, so you miss none of them (or
  get a ``welcome`` push with a ``snapshot`` if the server no longer holds them all). Pushes
  without ``seq`` that arrive while it is full (signals, errors) are lost; the resumed
  ``welcome`` carries the current users and pending conflicts. :attr:`ClientSession.dropped`
  counts the pushes the buffer has let go.

``crealia.connect`` is the former name of :func:`open_session`, kept as an alias.

Errors (all derive from :class:`crealia.CrealiaError`; defined in :mod:`crealia._errors`)::

    ClientError           base of the client's errors
    ├── ServerError       the server answered ``error`` (``code``, ``message``, ``retry_after_ms``);
    │                     also what a session ended by close 4401 raises (``code`` "unauthorized")
    ├── ConnectionLost    the connection could not be opened, or was lost and will not be
    │                     reopened, or was lost before a reply that cannot safely be asked again
    └── ClientClosed      the session was closed by its owner (:meth:`ClientSession.aclose`)

trio-websocket's and the network's exceptions are mapped into these at the boundary
(``raise ... from exc``).
"""

from __future__ import annotations

import collections
import copy
import enum
import logging
import random
import ssl
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import attrs
import orjson
import trio
import trio_websocket

from ._errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    ServerError,
    reraise,
    sole_exception,
)
from ._protocol import PRESENCE_KINDS
from ._wire import SUBPROTOCOL

__all__ = [
    "ClientClosed",
    "ClientError",
    "ClientSession",
    "ConnectionLost",
    "Push",
    "ServerError",
    "SessionState",
    "connect",
    "open_session",
]

logger = logging.getLogger("crealia.client")

#: Requests that are sent again, unchanged, when the connection drops before their reply.
#: Requests that are safe to send again: changes and comments are idempotent on their ids.
_RESENDABLE: Final = frozenset(
    {
        "timeline_change",
        "comment_add",
        "users_request",
        "ping",
        "conflict_dismiss",
        "conflict_preview",
    }
)
#: Hello errors after which trying again cannot help.
_FATAL_HELLO_CODES: Final = frozenset(
    {"unauthorized", "forbidden", "bad_request", "not_found", "too_large"}
)
#: Close codes saying this client broke the protocol: reconnecting would do it again.
_FATAL_CLOSE_CODES: Final = frozenset({1007, 1009, 4400})
_CLOSE_UNAUTHORIZED: Final = 4401
_CLOSE_RATE_LIMIT_ABUSED: Final = 4429
#: Largest server frame accepted; a welcome's snapshot can be big.
_MAX_INCOMING_BYTES: Final = 64 * 1024 * 1024
#: How many times a change or comment whose outcome the server could not tell is sent again
#: (with the same id) before its ``overloaded`` error is raised.
_UNKNOWN_OUTCOME_RESENDS: Final = 5
#: How long a close, even a cancelled one, waits for the server's closing handshake.
_CLOSE_GRACE: Final = 2.0


class SessionState(enum.Enum):
    """Where a :class:`ClientSession`'s connection stands."""

    #: Opening the first connection (never seen from inside ``async with open_session(...)``).
    CONNECTING = "connecting"
    #: Welcomed; requests go out at once.
    CONNECTED = "connected"
    #: The connection dropped; the session is opening a new one. Requests wait.
    RECONNECTING = "reconnecting"
    #: Ended, by :meth:`ClientSession.aclose` or by an error that reconnecting cannot fix.
    CLOSED = "closed"


@attrs.frozen(kw_only=True)
class Push:
    """One server push: an envelope without ``ref``, or a ``welcome`` after a reconnection.

    Attributes:
        type: the event name (``collaboration_event``, ``users_list``, ``conflict_detected``,
            ``conflict_resolved``, ``webrtc_signal``, ``quality_change``, ``error``, or
            ``welcome`` after each reconnection).
        data: the envelope's ``data``, as decoded from JSON.
    """

    type: str
    data: dict[str, Any]

    @property
    def seq(self) -> int | None:
        """The durable ``seq`` this push carries, or ``None`` for an ephemeral one."""
        if self.type not in ("collaboration_event", "conflict_resolved"):
            return None
        seq = self.data.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    @property
    def droppable(self) -> bool:
        """Whether a newer push supersedes this one (presence), so a full buffer may drop it."""
        if self.type == "users_list":
            return True
        return (
            self.type == "collaboration_event"
            and self.seq is None
            and self.data.get("kind") in PRESENCE_KINDS
        )


@attrs.define(eq=False)
class _Request:
    """A request waiting for its reply."""

    ref: int
    type: str
    frame: str
    resendable: bool
    #: Generation of the connection it was last sent on; ``None`` while not sent on any.
    sent_on: int | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    reply: dict[str, Any] | None = None
    error: ClientError | None = None

    def settle(
        self, *, reply: dict[str, Any] | None = None, error: ClientError | None = None
    ) -> None:
        if self.done.is_set():
            return
        self.reply = reply
        self.error = error
        self.done.set()


@attrs.define(eq=False)
class _Connection:
    """One WebSocket connection of the session, from ``hello`` to its close."""

    ws: trio_websocket.WebSocketConnection
    generation: int
    hello_ref: int
    #: Cancelled by the reader when the connection ends, or to resynchronize.
    wait_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Set once the ``hello`` has its reply (welcome or error).
    answered: trio.Event = attrs.Factory(trio.Event)
    welcomed: bool = False
    hello_error: ClientError | None = None
    lost: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    opened_at: float = 0.0
    #: A ``welcome`` whose big parts come in ``welcome_chunk`` frames, and the pieces so far.
    chunked_welcome: dict[str, Any] | None = None
    chunks: list[str] = attrs.Factory(list)


@attrs.frozen(kw_only=True)
class _Ending:
    """Why a connection attempt ended."""

    #: What the session raises if it ends here; ``None`` for a close asked for or a resync.
    error: ClientError | None
    welcomed: bool
    fatal: bool = False
    min_delay: float = 0.0


@attrs.frozen
class _Target:
    """Where a WebSocket URL points."""

    host: str
    port: int
    host_header: str
    resource: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"a WebSocket URL starts with ws:// or wss://, not {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.hostname if port in (80, 443) else f"{parts.hostname}:{port}"
        if secure:
            context = ssl_context or ssl.create_default_context()
        elif ssl_context is not None:
            raise ValueError("ssl_context is only for wss:// URLs")
        else:
            context = None
        return cls(parts.hostname, port, host_header, resource, context)


class _ReaderWatch:
    """Stands in for the nursery that trio-websocket starts a connection's reader task in.

    When that task ends before the upgrade completed (the server closed the stream, or
    rejected the upgrade), it cancels ``handshake_scope`` so the upgrade stops waiting, and
    keeps a rejection in ``error`` instead of letting it crash the nursery.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.handshake_scope = trio.CancelScope()
        self.error: trio_websocket.HandshakeError | None = None

    def start_soon(self, function: Callable[[], Awaitable[None]], *, name: object = None) -> None:
        async def watched() -> None:
            try:
                await function()
            except trio_websocket.HandshakeError as exc:
                self.error = exc
            finally:
                self.handshake_scope.cancel()

        self._nursery.start_soon(watched, name=name)


def _encode(envelope: Mapping[str, Any]) -> str:
    return orjson.dumps(envelope).decode()


def _server_error(data: Mapping[str, Any]) -> ServerError:
    retry = data.get("retry_after_ms")
    outcome = data.get("outcome")
    return ServerError(
        str(data.get("code", "internal")),
        str(data.get("message", "")),
        retry if isinstance(retry, int) else None,
        outcome if isinstance(outcome, str) else None,
    )


def _clone(exc: ClientError) -> ClientError:
    """A fresh copy of a stored error, so each raise gets its own traceback."""
    fresh = copy.copy(exc)
    fresh.__traceback__ = None
    fresh.__cause__ = exc.__cause__
    return fresh


class ClientSession:
    """A collaboration session on one project, kept connected across drops.

    Made by :func:`open_session`, which owns its background task; do not construct it yourself.
    Use it from any task of the program; only one task should read its pushes (each push goes
    to one reader).
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        project_id: str,
        resume_seq: int | None,
        resume_epoch: str | None = None,
        subprotocols: Sequence[str],
        reconnect: bool,
        min_backoff: float,
        max_backoff: float,
        handshake_timeout: float,
        max_pushes: int,
        max_frame_size: int,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        if max_pushes < 2:
            raise ValueError("max_pushes must be at least 2")
        self._url = url
        self._target = _Target.parse(url, ssl_context)
        self._token = token
        self._project_id = project_id
        self._subprotocols = tuple(subprotocols)
        self._reconnect = reconnect
        self._min_backoff = min_backoff
        self._max_backoff = max(max_backoff, min_backoff)
        self._handshake_timeout = handshake_timeout
        self._max_pushes = max_pushes
        self._max_frame_size = max_frame_size

        self._seq: int | None = resume_seq
        self._epoch: str | None = resume_epoch
        self._welcome: dict[str, Any] = {}
        self._state = SessionState.CONNECTING
        self._state_lot = trio.lowlevel.ParkingLot()
        self._conn: _Connection | None = None
        self._generation = 0
        self._next_ref = 0
        self._pending: dict[int, _Request] = {}
        self._pushes: collections.deque[Push] = collections.deque()
        self._push_lot = trio.lowlevel.ParkingLot()
        self._overflowed = False
        self._resync_wanted = False
        self._closed = False
        self._fatal: ClientError | None = None
        self._loop_scope: trio.CancelScope | None = None
        self._loop_done = trio.Event()
        self._ready = False
        self._dropped = 0
        self._reconnects = 0

    # ----------------------------------------------------------------------------- state

    @property
    def state(self) -> SessionState:
        """Where the connection stands now."""
        return self._state

    @property
    def welcome(self) -> dict[str, Any]:
        """The data of the latest ``welcome`` (``session_id``, ``user``, ``users``, ``seq``, …)."""
        return self._welcome

    @property
    def seq(self) -> int | None:
        """The highest durable ``seq`` handed to the push buffer (what a resume starts from)."""
        return self._seq

    @property
    def epoch(self) -> str | None:
        """The ``epoch`` of the latest ``welcome`` (what a resume sends with :attr:`seq`)."""
        return self._epoch

    @property
    def reconnects(self) -> int:
        """How many times the session has been welcomed again after its first connection."""
        return self._reconnects

    @property
    def dropped(self) -> int:
        """How many pushes the full buffer let go (superseded presence, or lost signals)."""
        return self._dropped

    async def wait_connected(self) -> None:
        """Return once the session is connected (at once if it is).

        Raises:
            ClientClosed: the session was closed by its owner.
            ServerError, ConnectionLost: the session ended on its own; the error says why.
        """
        await self._wait_connected()

    async def wait_disconnected(self) -> None:
        """Return once the session is not connected (at once if it is not).

        Useful to observe a drop; combine with :meth:`wait_connected` to await the reconnection.
        """
        await trio.lowlevel.checkpoint()
        while self._state is SessionState.CONNECTED:
            await self._state_lot.park()

    # ----------------------------------------------------------------------------- requests

    async def request(self, type: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send a client message with a ``ref`` and return the ``data`` of its reply.

        Waits for the connection if the session is reconnecting. If the connection drops before
        the reply, an idempotent request (``timeline_change``, ``comment_add``,
        ``users_request``, ``ping``, ``conflict_dismiss``) is sent again on the next connection;
        any other request raises :class:`ConnectionLost`.

        Cancelling the call stops waiting; the request may still take effect, and it is not
        sent again after a reconnection.

        Raises:
            ServerError: the server answered ``error``.
            ConnectionLost: the connection dropped before the reply of a request that cannot
                safely be sent again, or the session ended for good.
            ClientClosed: the session was closed by its owner.
            ValueError: ``type`` is ``hello`` (the session sends it), or the frame is larger
                than ``max_frame_size``.
        """
        self._check_type(type)
        self._raise_if_ended()
        ref = self._new_ref()
        envelope = {"type": type, "ref": ref, "data": dict(data or {})}
        req = _Request(
            ref=ref,
            type=type,
            frame=self._checked_frame(envelope),
            resendable=type in _RESENDABLE,
        )
        self._pending[ref] = req
        try:
            await self._transmit(req)
            await req.done.wait()
        finally:
            self._pending.pop(ref, None)
        if req.error is not None:
            raise req.error
        assert req.reply is not None
        return req.reply

    async def send(self, type: str, data: Mapping[str, Any] | None = None) -> None:
        """Send a client message without ``ref``: no reply comes back (errors come as pushes).

        Waits for the connection if the session is reconnecting; a message whose send failed
        because the connection dropped is sent on the next one. Nothing tells whether it was
        applied.

        Raises:
            ConnectionLost, ServerError: the session ended for good.
            ClientClosed: the session was closed by its owner.
            ValueError: as for :meth:`request`.
        """
        self._check_type(type)
        frame = self._checked_frame({"type": type, "data": dict(data or {})})
        while True:
            conn = await self._wait_connected()
            try:
                await conn.ws.send_message(frame)
            except trio_websocket.ConnectionClosed:
                await self._wait_gone(conn)
            else:
                return

    async def change(
        self, changes: Sequence[Mapping[str, Any]], *, change_id: str | None = None
    ) -> dict[str, Any]:
        """Send a ``timeline_change`` and return its ack (``change_id``, ``seq``, ``status``, …).

        ``change_id`` defaults to a new UUID. The change is sent again with the same
        ``change_id`` if the connection drops before the ack, so it is applied at most once;
        the ack may then say ``duplicate`` (with the first ack's ``seq``). A status of
        ``conflict`` or ``partial`` is an ack, not an error.

        Raises:
            ServerError: the change was refused (``forbidden``, ``bad_request``, …).
            ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        data = {"change_id": change_id or str(uuid.uuid4()), "changes": list(changes)}
        return await self._request_idempotent("timeline_change", data)

    async def revert_conflict(self, conflict_id: str, side: str | None = None) -> dict[str, Any]:
        """Send a ``conflict_revert``: undo a settled conflict's resolution by a new change that
        restores ``side``'s value (``"current"`` or ``"incoming"``; by default the side the
        resolution did not choose, required when it was ``custom``). Returns its ack, like a
        change's (``change_id``, ``seq``, ``status``, ``conflicts``): status ``conflict`` when
        the property was written since and the revert became a new conflict.

        Not sent again after a reconnection (a second revert is refused as such).

        Raises:
            ServerError: refused (``not_found``, ``bad_request`` naming why, ``forbidden``, …).
            ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        data: dict[str, Any] = {"conflict_id": conflict_id}
        if side is not None:
            data["side"] = side
        return await self.request("conflict_revert", data)

    async def preview_changes(self, changes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Send a ``conflict_preview``: what ``changes`` would do now, applying nothing
        (``applies``, and ``conflicts`` with what each strategy of the chain would answer).

        Raises:
            ServerError: refused (``bad_request``, ``not_found``, ``forbidden``, …).
            ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        return await self.request("conflict_preview", {"changes": list(changes)})

    async def _request_idempotent(self, type: str, data: dict[str, Any]) -> dict[str, Any]:
        """:meth:`request`, sent again (same id) while the server answers ``overloaded`` with
        outcome ``unknown``: the first ack, or ``duplicate``, settles whether it was applied."""
        delay = self._min_backoff
        for _attempt in range(_UNKNOWN_OUTCOME_RESENDS):
            try:
                return await self.request(type, data)
            except ServerError as exc:
                if exc.code != "overloaded" or exc.outcome != "unknown":
                    raise
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._max_backoff)
        return await self.request(type, data)

    async def comment(
        self,
        text: str,
        *,
        element_id: str | None = None,
        time: float | None = None,
        comment_id: str | None = None,
    ) -> dict[str, Any]:
        """Add a comment (``comment_add``) and return its ack, which carries its ``seq``.

        ``comment_id`` defaults to a new UUID. A comment is not sent again after a drop.

        Raises:
            ServerError, ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        comment: dict[str, Any] = {"id": comment_id or str(uuid.uuid4()), "text": text}
        if element_id is not None:
            comment["element_id"] = element_id
        if time is not None:
            comment["time"] = time
        return await self._request_idempotent("comment_add", {"comment": comment})

    async def cursor(
        self, x: float, y: float, *, time: float | None = None, track: str | None = None
    ) -> None:
        """Tell the others where this user's cursor is (``cursor_update``, no reply).

        Raises:
            ConnectionLost, ServerError, ClientClosed: the session ended.
        """
        position: dict[str, Any] = {"x": x, "y": y}
        if time is not None:
            position["time"] = time
        if track is not None:
            position["track"] = track
        await self.send("cursor_update", {"position": position})

    async def users(self) -> list[dict[str, Any]]:
        """Ask for the project's current users (``users_request``) and return them.

        Raises:
            ServerError, ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        reply = await self.request("users_request")
        users = reply.get("users", [])
        return list(users) if isinstance(users, list) else []

    async def ping(self) -> float:
        """Send a ``ping`` and return the round trip in seconds.

        The time includes waiting for a connection if the session is reconnecting.

        Raises:
            ConnectionLost: the connection dropped before the ``pong``.
            ServerError, ClientClosed: as for :meth:`request`.
        """
        start = trio.current_time()
        await self.request("ping", {"t": int(time.time() * 1000)})
        return trio.current_time() - start

    # ------------------------------------------------------------------------ live sessions

    async def live_start(self, kind: str = "camera", mode: str = "p2p") -> dict[str, Any]:
        """Go live (``live_start``): ``kind`` ``camera`` or ``screen``, ``mode`` ``p2p`` (the
        server only signals) or ``relay`` (the server is a peer). Returns the ack:
        ``session_id``, ``kind``, ``mode``, ``ice_servers``. Needs the editor role.

        Raises:
            ServerError: e.g. ``forbidden`` (a viewer or commenter), ``overloaded`` (the
                project has as many live sessions as it may). ConnectionLost, ClientClosed: as
                for :meth:`request`.
        """
        return await self.request("live_start", {"kind": kind, "mode": mode})

    async def live_join(self, session_id: str) -> dict[str, Any]:
        """Watch a live session (``live_join``). Returns the ack: ``session_id``, ``host``,
        ``kind``, ``mode``, ``ice_servers``, ``viewers``.

        Raises:
            ServerError: ``not_found`` (no such session), ``overloaded`` (at its viewer limit).
                ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        return await self.request("live_join", {"session_id": session_id})

    async def live_leave(self, session_id: str) -> None:
        """Stop watching a live session (``live_leave``); the host leaving ends it.

        Raises:
            ServerError, ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        await self.request("live_leave", {"session_id": session_id})

    async def live_stop(self, session_id: str) -> None:
        """End a live session (``live_stop``): its host or an owner.

        Raises:
            ServerError: ``forbidden`` (neither host nor owner), ``not_found``.
                ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        await self.request("live_stop", {"session_id": session_id})

    async def signal(
        self,
        session_id: str,
        to: str,
        *,
        description: Mapping[str, Any] | None = None,
        candidate: Mapping[str, Any] | None = None,
    ) -> None:
        """Send a WebRTC description (``{"type", "sdp"}``) or ICE candidate to a member of a
        live session, or to ``"server"`` in a relay session (``webrtc_signal``, acked).
        Signals sent to this session arrive as ``webrtc_signal`` pushes with ``from``.

        Raises:
            ServerError: ``not_found`` (``to`` is not in the session), ``forbidden`` (this
                connection is not), ``bad_request``/``too_large`` (not a description or
                candidate). ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        data: dict[str, Any] = {"session_id": session_id, "to": to}
        if description is not None:
            data["description"] = dict(description)
        if candidate is not None:
            data["candidate"] = dict(candidate)
        await self.request("webrtc_signal", data)

    async def stream_stats(
        self,
        session_id: str,
        *,
        bitrate_kbps: float,
        rtt_ms: float,
        packet_loss: float,
        fps: float = 0.0,
        width: int = 0,
        height: int = 0,
    ) -> None:
        """Report this connection's media statistics (``stream_stats``, about once a second);
        a viewer's feed the server's quality choice, answered with ``quality_change`` pushes.

        Raises:
            ServerError, ConnectionLost, ClientClosed: as for :meth:`request`.
        """
        await self.request("stream_stats", {
            "session_id": session_id, "bitrate_kbps": bitrate_kbps, "rtt_ms": rtt_ms,
            "packet_loss": packet_loss, "fps": fps, "width": width, "height": height,
        })  # fmt: skip

    # ----------------------------------------------------------------------------- pushes

    async def receive(self) -> Push:
        """Return the next push, waiting for one if none is buffered.

        Raises:
            ClientClosed: the session was closed by its owner (buffered pushes are discarded).
            ServerError, ConnectionLost: the session ended on its own, and every push that
                arrived before that has been returned.
        """
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise ClientClosed("the session is closed")
            if self._pushes:
                break
            self._raise_if_ended()
            await self._push_lot.park()
        push = self._pushes.popleft()
        if self._overflowed and len(self._pushes) <= self._max_pushes // 2:
            self._request_resync()
        return push

    def __aiter__(self) -> ClientSession:
        return self

    async def __anext__(self) -> Push:
        """The next push; iteration stops when the session is closed by its owner."""
        try:
            return await self.receive()
        except ClientClosed:
            raise StopAsyncIteration from None

    # ----------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close the session: fail what is pending, close the WebSocket with 1000, stop.

        Pending requests raise :class:`ClientClosed`; a change whose ack had not arrived may or
        may not have been applied. Idempotent. Even when cancelled, it tries a graceful close
        for a short while, then closes the socket forcefully.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._fail_pending(ClientClosed("the session was closed"))
        self._pushes.clear()
        self._push_lot.unpark_all()
        self._state_lot.unpark_all()
        with trio.move_on_after(_CLOSE_GRACE, shield=True):
            conn = self._conn
            if conn is not None and not conn.lost:
                await conn.ws.aclose()
            if self._loop_scope is not None:
                self._loop_scope.cancel()
            await self._loop_done.wait()
        if self._loop_scope is not None:
            self._loop_scope.cancel()

    # ----------------------------------------------------------------------------- internals

    def _new_ref(self) -> int:
        self._next_ref += 1
        return self._next_ref

    @staticmethod
    def _check_type(type: str) -> None:
        if type == "hello":
            raise ValueError("the session sends hello itself")

    def _checked_frame(self, envelope: Mapping[str, Any]) -> str:
        frame = _encode(envelope)
        size = len(frame.encode())
        if size > self._max_frame_size:
            raise ValueError(
                f"{envelope['type']} frame of {size} bytes is over max_frame_size "
                f"({self._max_frame_size})"
            )
        return frame

    def _raise_if_ended(self) -> None:
        if self._closed:
            raise ClientClosed("the session is closed")
        if self._fatal is not None:
            raise _clone(self._fatal)

    def _set_state(self, state: SessionState) -> None:
        self._state = state
        self._state_lot.unpark_all()

    async def _wait_connected(self) -> _Connection:
        await trio.lowlevel.checkpoint()
        while True:
            self._raise_if_ended()
            conn = self._conn
            if self._state is SessionState.CONNECTED and conn is not None and not conn.lost:
                return conn
            await self._state_lot.park()

    async def _wait_gone(self, conn: _Connection) -> None:
        """Wait until the session has noticed that ``conn`` is gone."""
        while self._conn is conn and self._state is SessionState.CONNECTED:
            self._raise_if_ended()
            await self._state_lot.park()

    async def _transmit(self, req: _Request) -> None:
        """Send ``req`` once, on the current connection or the next one."""
        while not req.done.is_set():
            conn = await self._wait_connected()
            req.sent_on = conn.generation
            try:
                await conn.ws.send_message(req.frame)
            except trio_websocket.ConnectionClosed:
                if req.done.is_set():
                    return
                # Not delivered: this task sends it again on the next connection.
                req.sent_on = None
                await self._wait_gone(conn)
            else:
                return

    def _fail_pending(self, error: ClientError) -> None:
        for req in list(self._pending.values()):
            req.settle(error=_clone(error))

    def _request_resync(self) -> None:
        conn = self._conn
        if self._resync_wanted or conn is None or self._state is not SessionState.CONNECTED:
            return
        self._resync_wanted = True
        conn.wait_scope.cancel()

    def _end(self, error: ClientError) -> None:
        """End the session for good: every pending and later call raises ``error``."""
        self._fatal = error
        self._fail_pending(error)
        self._push_lot.unpark_all()

    # -- the connection loop ---------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the session connected until it is closed or ends; started by :func:`open_session`.

        Reports ready once the first connection is welcomed; if that fails, raises its error.
        """
        try:
            with trio.CancelScope() as self._loop_scope:
                await self._connection_loop(task_status)
        finally:
            self._set_state(SessionState.CLOSED)
            self._push_lot.unpark_all()
            self._loop_done.set()

    async def _connection_loop(self, task_status: trio.TaskStatus[None]) -> None:
        failures = 0
        while True:
            ending = await self._attempt(task_status if not self._ready else None)
            started = self._ready
            if ending.welcomed:
                conn = self._conn
                if conn is not None and trio.current_time() - conn.opened_at >= self._max_backoff:
                    failures = 0
            if self._closed:
                return
            if not started:
                assert ending.error is not None
                raise ending.error
            if ending.error is not None and (ending.fatal or not self._reconnect):
                self._end(ending.error)
                return
            if ending.welcomed:
                self._after_loss()
            self._set_state(SessionState.RECONNECTING)
            if ending.error is None:
                continue  # resynchronizing after a push overflow: reconnect at once
            cap = min(self._max_backoff, self._min_backoff * 2.0**failures)
            delay = max(ending.min_delay, random.uniform(0.0, cap))
            failures += 1
            logger.info("reconnecting to %s in %.2fs: %s", self._url, delay, ending.error)
            await trio.sleep(delay)

    def _after_loss(self) -> None:
        """Fail the requests that the lost connection carried and that cannot be resent."""
        lost = self._generation
        for req in list(self._pending.values()):
            if req.sent_on == lost and not req.resendable:
                req.settle(
                    error=ConnectionLost(
                        f"the connection dropped before the reply to {req.type}; "
                        "it may or may not have taken effect"
                    )
                )

    async def _attempt(self, task_status: trio.TaskStatus[None] | None) -> _Ending:
        """Open one connection, say hello, and serve it until it ends."""
        self._generation += 1
        self._overflowed = False
        self._resync_wanted = False
        # Holds trio-websocket's reader task and ours; neither raises into it.
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self._handshake_timeout):
                    ws, stream = await self._open_websocket(nursery)
            except (ConnectionLost, trio.TooSlowError) as exc:
                error = (
                    exc
                    if isinstance(exc, ConnectionLost)
                    else ConnectionLost(
                        f"could not open {self._url} within {self._handshake_timeout}s"
                    )
                )
                nursery.cancel_scope.cancel()
                return _Ending(error=error, welcomed=False)
            conn = _Connection(
                ws=ws,
                generation=self._generation,
                hello_ref=self._new_ref(),
                opened_at=trio.current_time(),
            )
            self._conn = conn
            try:
                nursery.start_soon(self._read, conn)
                ending = await self._drive(conn, task_status)
            finally:
                with trio.move_on_after(_CLOSE_GRACE, shield=True):
                    await ws.aclose()
                # trio-websocket leaves the stream open after an abnormal closure.
                await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
        return ending

    async def _open_websocket(
        self, nursery: trio.Nursery
    ) -> tuple[trio_websocket.WebSocketConnection, trio.abc.Stream]:
        """Open the TCP (or TLS) stream and upgrade it to a WebSocket; return both.

        Unlike ``open_websocket_url``, this notices at once when the server closes the stream
        during the upgrade, and it closes the stream whenever the upgrade fails.

        Raises:
            ConnectionLost: the stream could not be opened or the upgrade failed.
        """
        target = self._target
        try:
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
            if target.ssl_context is None:
                stream = await trio.open_tcp_stream(target.host, target.port)
            else:
                stream = await trio.open_ssl_over_tcp_stream(
                    target.host, target.port, ssl_context=target.ssl_context, https_compatible=True
                )
        except OSError as exc:
            raise ConnectionLost(f"could not connect to {self._url}: {exc}") from exc
        watch = _ReaderWatch(nursery)
        ws = None
        try:
            with watch.handshake_scope:
                ws = await trio_websocket.wrap_client_stream(
                    cast(trio.Nursery, watch),
                    stream,
                    target.host_header,
                    target.resource,
                    subprotocols=self._subprotocols,
                    max_message_size=_MAX_INCOMING_BYTES,
                )
        finally:
            if ws is None:
                await trio.aclose_forcefully(stream)
        if watch.handshake_scope.cancelled_caught:
            rejected = watch.error
            if isinstance(rejected, trio_websocket.ConnectionRejected):
                message = f"the server refused the WebSocket upgrade (HTTP {rejected.status_code})"
            else:
                message = f"{self._url} closed the connection during the WebSocket upgrade"
            raise ConnectionLost(message) from rejected
        assert ws is not None
        return ws, stream

    async def _drive(self, conn: _Connection, task_status: trio.TaskStatus[None] | None) -> _Ending:
        hello_data: dict[str, Any] = {"token": self._token, "project_id": self._project_id}
        if self._seq is not None:
            hello_data["resume"] = {"seq": self._seq}
            if self._epoch is not None:
                hello_data["resume"]["epoch"] = self._epoch
        hello = _encode({"type": "hello", "ref": conn.hello_ref, "data": hello_data})
        with conn.wait_scope:
            with trio.move_on_after(self._handshake_timeout) as deadline:
                try:
                    await conn.ws.send_message(hello)
                except trio_websocket.ConnectionClosed:
                    await trio.sleep_forever()  # the reader reports the close
                await conn.answered.wait()
            if deadline.cancelled_caught:
                await self._close_quietly(conn)
                return _Ending(
                    error=ConnectionLost(f"no welcome within {self._handshake_timeout}s"),
                    welcomed=False,
                )
            if conn.hello_error is not None:
                await self._close_quietly(conn)
                return self._ending_for(conn)
            await self._resend(conn)
            self._set_state(SessionState.CONNECTED)
            if task_status is not None:
                task_status.started()
                self._ready = True
            else:
                self._reconnects += 1
            await trio.sleep_forever()
        if not conn.lost and self._resync_wanted:
            # Stop taking new requests, let those in flight get their replies, then leave.
            self._set_state(SessionState.RECONNECTING)
            with trio.move_on_after(self._handshake_timeout):
                for req in list(self._pending.values()):
                    if req.sent_on == conn.generation and not req.resendable:
                        await req.done.wait()
            await self._close_quietly(conn)
            return _Ending(error=None, welcomed=True)
        return self._ending_for(conn)

    async def _resend(self, conn: _Connection) -> None:
        for req in sorted(self._pending.values(), key=lambda r: r.ref):
            if req.done.is_set() or req.sent_on is None or req.sent_on == conn.generation:
                continue
            req.sent_on = conn.generation
            try:
                await conn.ws.send_message(req.frame)
            except trio_websocket.ConnectionClosed:
                await trio.sleep_forever()  # the reader reports the close

    async def _close_quietly(self, conn: _Connection) -> None:
        with trio.move_on_after(_CLOSE_GRACE):
            await conn.ws.aclose()

    def _ending_for(self, conn: _Connection) -> _Ending:
        """What the end of ``conn`` means for the session."""
        welcomed = conn.welcomed
        hello_error = conn.hello_error
        if isinstance(hello_error, ServerError):
            fatal = hello_error.code in _FATAL_HELLO_CODES
            delay = (hello_error.retry_after_ms or 0) / 1000
            return _Ending(error=hello_error, welcomed=welcomed, fatal=fatal, min_delay=delay)
        if hello_error is not None:
            return _Ending(error=hello_error, welcomed=welcomed)
        code, reason = conn.close_code, conn.close_reason
        if code == _CLOSE_UNAUTHORIZED:
            error: ClientError = ServerError("unauthorized", reason or "closed with 4401")
            return _Ending(error=error, welcomed=welcomed, fatal=True)
        error = ConnectionLost(
            f"the connection closed with {code}" + (f": {reason}" if reason else ""),
            close_code=code,
            reason=reason,
        )
        if code in _FATAL_CLOSE_CODES:
            return _Ending(error=error, welcomed=welcomed, fatal=True)
        if code == _CLOSE_RATE_LIMIT_ABUSED:
            return _Ending(error=error, welcomed=welcomed, min_delay=self._max_backoff)
        return _Ending(error=error, welcomed=welcomed)

    # -- reading -----------------------------------------------------------------------

    async def _read(self, conn: _Connection) -> None:
        try:
            while True:
                message = await conn.ws.get_message()
                self._on_message(conn, message)
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None:
                conn.close_code = exc.reason.code
                conn.close_reason = exc.reason.reason
        conn.lost = True
        conn.wait_scope.cancel()
        self._state_lot.unpark_all()

    def _on_message(self, conn: _Connection, message: str | bytes) -> None:
        if isinstance(message, bytes):
            logger.warning("ignoring a binary frame from the server")
            return
        try:
            payload = orjson.loads(message)
        except orjson.JSONDecodeError:
            logger.warning("ignoring a frame that is not JSON: %.80r", message)
            return
        for envelope in payload if isinstance(payload, list) else [payload]:
            self._on_envelope(conn, envelope)

    def _on_envelope(self, conn: _Connection, envelope: object) -> None:
        if not isinstance(envelope, dict) or not isinstance(envelope.get("type"), str):
            logger.warning("ignoring an envelope without type: %.80r", envelope)
            return
        type_: str = envelope["type"]
        data = envelope.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            logger.warning("ignoring a %s envelope whose data is not an object", type_)
            return
        ref = envelope.get("ref")
        if conn.chunked_welcome is not None and type_ == "welcome_chunk":
            self._on_welcome_chunk(conn, data)
        elif ref is None:
            self._on_push(Push(type=type_, data=data))
        elif ref == conn.hello_ref:
            self._on_hello_reply(conn, type_, data)
        else:
            req = self._pending.get(ref)
            if req is None or req.sent_on != conn.generation:
                return  # its caller gave up
            if type_ == "error":
                req.settle(error=_server_error(data))
            else:
                req.settle(reply=data)

    def _on_welcome_chunk(self, conn: _Connection, data: dict[str, Any]) -> None:
        """One piece of a chunked welcome; the last one completes it (the pieces form a JSON
        object of the welcome's parts that did not fit its frame)."""
        welcome = conn.chunked_welcome
        assert welcome is not None
        piece = data.get("data")
        if data.get("index") != len(conn.chunks) or not isinstance(piece, str):
            conn.chunked_welcome = None
            conn.hello_error = ConnectionLost("the server sent a welcome chunk out of order")
            conn.answered.set()
            return
        conn.chunks.append(piece)
        if len(conn.chunks) < welcome.get("welcome_chunks", 0):
            return
        text, conn.chunks, conn.chunked_welcome = "".join(conn.chunks), [], None
        try:
            parts = orjson.loads(text)
        except orjson.JSONDecodeError:
            parts = None
        if not isinstance(parts, dict):
            conn.hello_error = ConnectionLost("the server's chunked welcome is not a JSON object")
            conn.answered.set()
            return
        welcome.update(parts)
        del welcome["welcome_chunks"]
        self._on_hello_reply(conn, "welcome", welcome)

    def _on_hello_reply(self, conn: _Connection, type_: str, data: dict[str, Any]) -> None:
        chunks = data.get("welcome_chunks") if type_ == "welcome" else None
        if isinstance(chunks, int) and chunks > 0 and conn.chunked_welcome is None:
            # Its big parts follow in ``chunks`` frames: the welcome is complete with the last.
            conn.chunked_welcome = data
            return
        if type_ == "welcome":
            self._welcome = data
            if isinstance(data.get("epoch"), str):
                self._epoch = data["epoch"]
            snapshot = data.get("snapshot")
            if isinstance(snapshot, dict):
                # A full state: replay was not possible (or not asked for); go on from it.
                seq = snapshot.get("seq", data.get("seq"))
                self._seq = seq if isinstance(seq, int) else self._seq
            elif self._seq is None and isinstance(data.get("seq"), int):
                self._seq = data["seq"]
            conn.welcomed = True
            if conn.generation > 1:
                # Comes before the replayed events that follow it in this frame.
                self._on_push(Push(type="welcome", data=data))
        elif type_ == "error":
            conn.hello_error = _server_error(data)
        else:
            conn.hello_error = ConnectionLost(f"the server answered hello with {type_!r}")
        conn.answered.set()

    def _on_push(self, push: Push) -> None:
        if self._closed:
            return
        seq = push.seq
        if seq is not None:
            if self._seq is not None and seq <= self._seq:
                return  # already delivered (replay overlap)
            if self._overflowed or not self._make_room(push):
                # Left for the resync to fetch again; seq stays put.
                self._overflowed = True
                return
            self._seq = seq
        elif not self._make_room(push):
            self._dropped += 1
            if not push.droppable:
                self._overflowed = True
            return
        self._pushes.append(push)
        self._push_lot.unpark()

    def _make_room(self, push: Push) -> bool:
        """Whether ``push`` fits, after dropping the oldest presence push if the buffer is full."""
        if len(self._pushes) < self._max_pushes:
            return True
        for index, queued in enumerate(self._pushes):
            if queued.droppable:
                del self._pushes[index]
                self._dropped += 1
                return True
        return False


@asynccontextmanager
async def open_session(
    url: str,
    token: str,
    project_id: str,
    *,
    resume_seq: int | None = None,
    resume_epoch: str | None = None,
    subprotocols: Sequence[str] = (SUBPROTOCOL,),
    reconnect: bool = True,
    min_backoff: float = 0.1,
    max_backoff: float = 10.0,
    handshake_timeout: float = 10.0,
    max_pushes: int = 10_000,
    max_frame_size: int = 64 * 1024,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ClientSession]:
    """Open a collaboration session on ``project_id`` and yield it once welcomed.

    The session's background task lives in a nursery that this context manager owns; leaving
    the block closes the session (:meth:`ClientSession.aclose`). The block is not cancelled
    when the session ends on its own: its calls and its push iteration raise the reason.

    Args:
        url: the WebSocket endpoint, e.g. ``ws://127.0.0.1:3001/ws``.
        token: a JWT for this project (``crealia token``).
        project_id: the project to join.
        resume_seq: the highest ``seq`` already applied, to have the server replay what came
            after it (as pushes) instead of sending a snapshot; if it no longer holds them all,
            :attr:`ClientSession.welcome` carries a ``snapshot`` all the same.
        resume_epoch: the ``epoch`` of the welcome ``resume_seq`` came from
            (:attr:`ClientSession.epoch`): if the server's history was rewritten since, it
            answers with a snapshot rather than replay events that do not match.
        subprotocols: offered in the handshake.
        reconnect: reconnect when the connection drops. If false, a drop ends the session.
        min_backoff, max_backoff: the bounds, in seconds, of the jittered exponential delay
            between reconnection attempts.
        handshake_timeout: seconds one attempt may take to connect and get its ``welcome``.
        max_pushes: how many unread pushes the session buffers (see the module docstring).
        max_frame_size: the server's frame limit in bytes; a larger request raises
            :exc:`ValueError` instead of getting the connection closed with 1009.
        ssl_context: for ``wss://`` URLs; the default verifies the server as browsers do.

    Raises:
        ValueError: ``url`` is not a ``ws://`` or ``wss://`` URL.
        ServerError: the server refused the ``hello`` (``unauthorized`` for a bad, expired or
            foreign token).
        ConnectionLost: the first connection could not be opened or ended before ``welcome``
            (no retry for the first one).
    """
    session = ClientSession(
        url=url,
        token=token,
        project_id=project_id,
        resume_seq=resume_seq,
        resume_epoch=resume_epoch,
        subprotocols=subprotocols,
        reconnect=reconnect,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        handshake_timeout=handshake_timeout,
        max_pushes=max_pushes,
        max_frame_size=max_frame_size,
        ssl_context=ssl_context,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._run)
            try:
                yield session
            finally:
                await session.aclose()
    except BaseExceptionGroup as group:
        # Our task reports through the session and never raises after it started, so a group
        # here wraps the body's exception or the first connection's error: raise it as itself.
        sole = sole_exception(group)
        if sole is None:
            raise
        reraise(sole)


#: The former name of :func:`open_session`, kept as an alias for existing programs (an async
#: context manager that owns what it starts is an ``open_*``, in trio's naming).
connect = open_session
