"""Rooms: one per project, holding its members, presence and outbound fan-out.

A room is opened by the :class:`RoomManager` when the first connection of a project arrives; its
background tasks (the fan-out ticker, the idle watcher) run in the room's own nursery, itself a
task of the manager's nursery. When the last member leaves, the room waits ``room_grace`` and then
closes, unless someone joins again. Nothing crosses rooms: a room only hears its own project from
the backplane, and only writes to its own members' outboxes.

Fan-out is batched: durable events, conflict pushes and membership changes are appended to an
ordered list, and presence updates are coalesced per user and slot (latest wins; each presence
type's slot is in the protocol table, :mod:`crealia._protocol`). Every tick the ticker turns
those into one outbox item per member (one frame), each event encoded once and the shared batch
joined once; only members that sent something this tick get a frame of their own with their own
ephemeral updates left out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol

import attrs
import trio

from . import _wire
from ._backplane import Backplane
from ._config import Config
from ._errors import CrealiaError, Overloaded, RoomError
from ._jobs import JobFailures
from ._live import LiveSessions, LiveTotals
from ._logging import log_context
from ._metrics import Traffic
from ._model import SETTINGS_CHANGED, Conflict, DurableEvent, Ephemeral, User
from ._protocol import PRESENCE_FIELDS, Presence

log = logging.getLogger("crealia.room")


class Session(Protocol):
    """A connection in a room, as the room sees it (:class:`crealia._session.Session` is one):
    the room hands it frames and may end it, nothing more."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> User: ...

    @property
    def ended(self) -> trio.Event:
        """Set once the session has ended and left the room."""

    def push(self, count: int, body: bytes, since: float | None = None) -> None:
        """Queue ``count`` comma-joined envelopes for the client; never blocks (a session that
        cannot keep up ends itself)."""

    def kill(self, code: int, reason: str) -> None:
        """End the session with close ``code``."""


class Settler(Protocol):
    """What settles a room's conflicts (:class:`crealia._settle.Settler` is one)."""

    async def run(self, room: Room, conflict: Conflict) -> None:
        """Run the project's strategy chain on ``conflict``, in ``room``'s nursery, until it is
        settled or left to a person."""

    def forget(self, project_id: str, *, by: str | None = None) -> None:
        """Drop the project's cached chain (changed by the settler named ``by``, or its room
        closed)."""


@attrs.define(eq=False)
class Member:
    """A user present in a room through one or more connections."""

    user_id: str
    name: str
    role: str
    connections: set[str] = attrs.Factory(set)
    #: Presence by ``users_list`` field (``cursor``, ``active_element``, ``typing``: the fields
    #: of the protocol table's presence types), as the user's last presence messages set it.
    presence: dict[str, Any] = attrs.Factory(lambda: dict.fromkeys(PRESENCE_FIELDS))

    @property
    def active_element(self) -> dict[str, Any] | None:
        """The element the user has active (``element_active``'s data), if any."""
        active: dict[str, Any] | None = self.presence.get("active_element")
        return active

    def to_wire(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "name": self.name,
            "role": self.role,
            "connections": len(self.connections),
            **self.presence,
        }


@attrs.define(eq=False)
class _Joining:
    """What a joining session missed while its welcome was being prepared."""

    session: Session
    durable: list[DurableEvent] = attrs.Factory(list)
    #: (seq it follows, frame) of every other push; a ``conflict_detected`` is kept as its
    #: conflicts, so that those settled in what the welcome gives can be left out.
    other: list[tuple[int, bytes | list[Conflict]]] = attrs.Factory(list)


@attrs.frozen
class Activation:
    """What a session's welcome is followed by, and what it must leave out."""

    #: The frames to send right after the welcome: the replay and what came meanwhile.
    frames: list[bytes]
    #: Conflicts settled at or before the welcome's ``seq``: not pending, whatever a read
    #: made before the welcome's snapshot or replay said.
    settled: frozenset[str]


@attrs.define(eq=False)
class Room:
    """The live state of one project on this node."""

    project_id: str
    backplane: Backplane
    config: Config
    manager: RoomManager
    settler: Settler | None = None
    sessions: dict[str, Session] = attrs.Factory(dict)
    members: dict[str, Member] = attrs.Factory(dict)
    ready: trio.Event = attrs.Factory(trio.Event)
    #: Set once the room has closed and let go of its subscription.
    done: trio.Event = attrs.Factory(trio.Event)
    failure: Exception | None = None
    closed: bool = False
    #: Where failures of the room's jobs (ticker, presence) are counted.
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: Highest durable seq handed to this room.
    seq: int = 0
    _joining: dict[str, _Joining] = attrs.Factory(dict)
    _ordered: list[tuple[bytes, str | None]] = attrs.Factory(list)
    _coalesced: dict[tuple[str, str], tuple[bytes, str | None]] = attrs.Factory(dict)
    #: Sessions that joined since the last flush, and how much of ``_ordered`` predates them.
    _joined_mid_tick: dict[str, int] = attrs.Factory(dict)
    _dirty: trio.Event = attrs.Factory(trio.Event)
    _occupied: trio.Event = attrs.Factory(trio.Event)
    _emptied: trio.Event = attrs.Factory(trio.Event)
    _cancel: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Pending conflicts of the project, and who waits for each to be settled.
    _pending: set[str] = attrs.Factory(set)
    _settled_events: dict[str, trio.Event] = attrs.Factory(dict)
    #: Server time (ms) of recent durable events by seq (for strategies weighing recency).
    seen_at: dict[int, int] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None
    #: The other processes' members of this project (cluster presence), as last read.
    _remote: list[dict[str, Any]] = attrs.Factory(list)
    #: What this room's sessions sent and received, and its conflicts (for metrics).
    traffic: Traffic = attrs.Factory(Traffic)
    #: Trio time the room was created.
    opened_at: float = attrs.Factory(trio.current_time)
    #: Trio time the oldest message waiting for the next flush arrived, and of the last tick.
    _since: float = 0.0
    _last_tick: float = -math.inf
    #: The room's live sessions (WebRTC, docs/protocol.md §8).
    live: LiveSessions = attrs.Factory(
        lambda self: LiveSessions(self, self.manager.live_totals), takes_self=True
    )

    # -- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe to the project and run the room's tasks until it closes.

        Never raises a crealia error: a room that cannot open records ``failure`` and closes, and
        joiners waiting on ``ready`` see it.
        """
        # The room outlives the session whose join opened it: log as the project's, not theirs.
        log_context.set((self.project_id, None, None))
        try:
            with self._cancel:
                async with self.backplane.subscribe(self.project_id, self):
                    pending = await self.backplane.pending_conflicts(self.project_id)
                    try:
                        await self._run_open(pending)
                    finally:
                        # Closed to new tasks from here (leaving the subscription awaits):
                        # members leaving now are told without one (``_announce``).
                        self._nursery = None
        except CrealiaError as exc:
            self.failure = exc
        except Exception as exc:
            # A bug, or an error no adapter mapped: this project's room closes (its sessions
            # get 1011 and may join again), the server goes on.
            self.failure = exc
            self.jobs.failed("room", exc, self.project_id)
        finally:
            self.closed = True
            self.jobs.forget(self.project_id)  # a closed room's jobs are failing no more
            self.ready.set()
            self.manager._forget(self)
            for session in [*self.sessions.values(), *(j.session for j in self._joining.values())]:
                session.kill(1011, "room closed")
            self.done.set()

    async def _run_open(self, pending: list[Conflict]) -> None:
        """The open room's tasks, in its nursery, until the room closes."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.ready.set()
            if self.config.tick_ms > 0:
                nursery.start_soon(partial(
                    self.jobs.keep_running, "room_ticker", self._tick,
                    instance=self.project_id))  # fmt: skip
            nursery.start_soon(self._idle_watch, nursery.cancel_scope)
            if self.clustered:
                nursery.start_soon(partial(
                    self.jobs.keep_running, "presence", self.refresh_presence,
                    period=self.config.presence_interval,
                    instance=self.project_id))  # fmt: skip
            # Conflicts left pending when the room last closed get their chain again. In a
            # cluster, young ones are being settled by the process that detected them; only
            # those it apparently dropped are taken over.
            if self.clustered:
                cutoff = _now_ms() - 1000 * self.config.orphan_conflict_age
                pending = [c for c in pending if c.created_at < cutoff]
            self.settle(pending)

    @property
    def clustered(self) -> bool:
        """Whether other processes serve this project too (the backplane shares presence)."""
        return self.backplane.shares_presence

    def close(self) -> None:
        """Close the room now (its live sessions end, its sessions are closed with 1011). No
        one joins it from here on (:meth:`RoomManager.join` opens a new one): a session let in
        while it winds down would be closed at once and resume again."""
        self.closed = True
        self.live.end_all("room_closed")
        self.flush()  # the live_ended announcements go out before the sessions close
        self._cancel.cancel()

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where the room's tasks run (its live sessions too); None once it has closed."""
        return self._nursery

    def broadcast(self, frame: bytes) -> None:
        """Send ``frame`` to every member of the room on this process (and those joining)."""
        self._enqueue(frame, None, None)

    async def _idle_watch(self, scope: trio.CancelScope) -> None:
        while True:
            if not self.sessions and not self._joining:
                with trio.move_on_after(self.config.room_grace):
                    await self._occupied.wait()
                if not self.sessions and not self._joining:
                    self.closed = True  # no new joiner may enter from here on
                    scope.cancel()
                    return
            self._occupied = trio.Event()
            await self._wait_empty()

    async def _wait_empty(self) -> None:
        while self.sessions or self._joining:
            self._emptied = trio.Event()
            await self._emptied.wait()

    # -- membership ---------------------------------------------------------------------------

    def add_joining(self, session: Session) -> None:
        """Start buffering what ``session`` must see once its welcome is sent.

        Raises:
            RoomError: the room has closed (it closed while the session was on its way in); a
                session let in now would hear nothing. :meth:`RoomManager.join` opens a new one.
        """
        if self.closed:
            raise RoomError(f"the room of project {self.project_id!r} has closed")
        self._joining[session.id] = _Joining(session)
        self._occupied.set()

    def activate(
        self, session: Session, after_seq: int, replay: list[DurableEvent] | None = None
    ) -> Activation:
        """Make a joining session a member and return what follows its welcome: ``replay``
        (the events it missed, up to ``after_seq``) or, without one, a snapshot at
        ``after_seq``; then what happened after ``after_seq`` while the welcome was prepared.

        Synchronous on purpose: nothing may be delivered between taking the missed frames and
        the switch to live delivery. The caller sends the frames right after its welcome.
        """
        # What is already queued for the next tick predates this member (it is in the replay,
        # the snapshot or the joining buffer): the flush gives it only what comes after.
        if self.config.tick_ms > 0:
            self._joined_mid_tick[session.id] = len(self._ordered)
        joining = self._joining.pop(session.id)
        durable = [e for e in joining.durable if e.seq > after_seq]
        # Up to this seq the member has what it is given without events (its snapshot, or
        # what it had before its resume): a conflict settled there reaches it as neither a
        # detection nor a resolution.
        told = replay[0].seq - 1 if replay else after_seq
        settled_at = {e.payload["conflict_id"]: e.seq
                      for e in (*joining.durable, *(replay or ()))
                      if e.kind == "conflict_resolved"}  # fmt: skip
        # In the order they happened: each non-durable frame after the durable event it followed
        # (a conflict_detected before the conflict_resolved that settles it).
        ordered = [((e.seq, 0), e.encoded) for e in (*(replay or ()), *durable)]
        for seq, frame in joining.other:
            if isinstance(frame, list):
                live = [c for c in frame if settled_at.get(c.id, after_seq + 1) > told]
                if not live:
                    continue
                frame = _wire.envelope("conflict_detected",
                                       {"conflicts": [c.to_wire() for c in live]})  # fmt: skip
            ordered.append(((seq, 1), frame))
        ordered.sort(key=lambda item: item[0])
        frames = [frame for _key, frame in ordered]
        settled = frozenset(cid for cid, seq in settled_at.items() if seq <= after_seq)
        user = session.user
        member = self.members.get(user.id)
        first = member is None
        if member is None:
            member = self.members[user.id] = Member(user_id=user.id, name=user.name, role=user.role)
        member.connections.add(session.id)
        if session.id not in self.sessions:
            self.manager.members += 1
        self.sessions[session.id] = session
        if first:
            self._announce("user_joined", member, origin=session.id)
        return Activation(frames=frames, settled=settled)

    def remove(self, session: Session) -> None:
        """Take a session out of the room (joining or member); the last one out leaves."""
        self._joining.pop(session.id, None)
        self.live.connection_left(session)
        if self.sessions.pop(session.id, None) is not None:
            self.manager.members -= 1
            member = self.members.get(session.user.id)
            if member is not None:
                member.connections.discard(session.id)
                if not member.connections:
                    del self.members[session.user.id]
                    self._announce("user_left", member, origin=None)
        if not self.sessions and not self._joining:
            self._emptied.set()

    def admits(self, user_id: str, limit: int) -> bool:
        """Whether ``user_id`` may join with at most ``limit`` users present (0: no cap): those
        of this process, joining or in, and those of the other processes as last read. A user
        already present always may."""
        if not limit or user_id in self.members:
            return True
        present = set(self.members)
        present.update(j.session.user.id for j in self._joining.values())
        present.update(str(m.get("user_id")) for m in self._remote)
        return user_id in present or len(present) < limit

    def users(self) -> list[dict[str, Any]]:
        """Everyone present: this process's members and those of the other processes."""
        merged = {m.user_id: m.to_wire() for m in self.members.values()}
        for remote in self._remote:
            mine = merged.get(remote["user_id"])
            if mine is None:
                merged[remote["user_id"]] = dict(remote)
            else:
                mine["connections"] += remote.get("connections", 0)
        return list(merged.values())

    async def refresh_presence(self, joining: Session | None = None) -> None:
        """Share this process's members (and ``joining``, about to become one) and read the
        other processes' (cluster presence).

        Users whose process stopped answering are announced as gone to this process's members.
        """
        local = {m.user_id: m.to_wire() for m in self.members.values()}
        arriving = [j.session for j in self._joining.values()]
        if joining is not None:
            arriving.append(joining)
        for session in arriving:
            user = session.user
            if user.id not in local:
                local[user.id] = Member(user_id=user.id, name=user.name, role=user.role,
                                        connections={session.id}).to_wire()  # fmt: skip
        # Three heartbeats: a process silent for that long is taken for gone.
        await self.backplane.share_presence(self.project_id, list(local.values()),
                                            ttl=3 * self.config.presence_interval)  # fmt: skip
        remote = await self.backplane.remote_presence(self.project_id)
        before = {m["user_id"]: m for m in self._remote}
        self._remote = remote
        now = {m["user_id"] for m in remote}
        for user_id, gone in before.items():
            if user_id not in now and user_id not in self.members:
                member = Member(user_id=user_id, name=gone.get("name", user_id),
                                role=gone.get("role", "viewer"))  # fmt: skip
                self._enqueue(self._announcement("user_left", member), None, None)

    def _announce(self, kind: str, member: Member, origin: str | None) -> None:
        """Tell every member, on every process, that a user joined or left."""
        message = Ephemeral(project_id=self.project_id,
                            encoded=self._announcement(kind, member), origin=origin)  # fmt: skip
        if self._nursery is not None:
            self._nursery.start_soon(self._publish_membership, message)
        else:
            self._enqueue(message.encoded, origin, None, to_joining=False)

    async def _publish_membership(self, message: Ephemeral) -> None:
        with self.jobs.guard("presence", self.project_id):
            if self.clustered:
                # Share first: whoever hears of the change and asks for the users sees it.
                await self.refresh_presence()
            await self.backplane.publish(message)

    def _announcement(self, kind: str, member: Member) -> bytes:
        return _wire.envelope(
            "collaboration_event",
            {
                "kind": kind,
                "user_id": member.user_id,
                "at": _now_ms(),
                "payload": {"user_id": member.user_id, "name": member.name, "role": member.role},
            },
        )

    # -- presence -----------------------------------------------------------------------------

    async def publish_presence(
        self, session: Session, kind: str, payload: dict[str, Any], presence: Presence
    ) -> None:
        """Update the sender's presence as the message ``kind``'s ``presence`` says and send it
        to the others, coalesced per user and slot."""
        member = self.members.get(session.user.id)
        if member is not None:
            member.presence[presence.field] = presence.state(payload)
        frame = _wire.envelope(
            "collaboration_event",
            {"kind": kind, "user_id": session.user.id, "at": _now_ms(), "payload": payload},
        )
        await self.backplane.publish(
            Ephemeral(
                project_id=self.project_id,
                encoded=frame,
                origin=session.id,
                key=(session.user.id, presence.slot),
            )
        )

    # -- conflicts ----------------------------------------------------------------------------

    def settle(self, conflicts: list[Conflict]) -> None:
        """Run the project's strategy chain on each conflict, in the room's nursery."""
        for conflict in conflicts:
            self._pending.add(conflict.id)
            if self.settler is not None and self._nursery is not None:
                self._nursery.start_soon(self.settler.run, self, conflict)

    def is_pending(self, conflict_id: str) -> bool:
        return conflict_id in self._pending

    async def wait_settled(self, conflict_id: str) -> None:
        """Wait until the conflict is settled (the caller bounds the wait)."""
        if conflict_id not in self._pending:
            return
        event = self._settled_events.setdefault(conflict_id, trio.Event())
        try:
            await event.wait()
        finally:
            if not event.is_set():
                self._settled_events.pop(conflict_id, None)

    # -- backplane listener -------------------------------------------------------------------

    def on_durable(self, event: DurableEvent) -> None:
        if event.seq > self.seq:
            self.seq = event.seq
        self.seen_at[event.seq] = event.at
        if len(self.seen_at) > 2048:
            del self.seen_at[next(iter(self.seen_at))]
        if event.kind == "conflict_resolved":
            self.traffic.conflicts_settled += 1
            self.manager.traffic.conflicts_settled += 1
            conflict_id = event.payload["conflict_id"]
            self._pending.discard(conflict_id)
            waiter = self._settled_events.pop(conflict_id, None)
            if waiter is not None:
                waiter.set()
        for joining in self._joining.values():
            joining.durable.append(event)
        self._enqueue(event.encoded, None, None, to_joining=False)

    def on_conflicts(self, conflicts: list[Conflict]) -> None:
        self._pending.update(c.id for c in conflicts)
        self.traffic.conflicts_detected += len(conflicts)
        self.manager.traffic.conflicts_detected += len(conflicts)
        frame = _wire.envelope("conflict_detected", {"conflicts": [c.to_wire() for c in conflicts]})
        for joining in self._joining.values():
            joining.other.append((self.seq, list(conflicts)))
        self._enqueue(frame, None, None, to_joining=False)

    def on_rewritten(self) -> None:
        log.warning("project %s: its history was rewritten elsewhere; closing its room so "
                    "that its members resume with a snapshot", self.project_id)  # fmt: skip
        self.close()

    def on_ephemeral(self, message: Ephemeral) -> None:
        key = message.key
        if key is not None and key[0] == SETTINGS_CHANGED:
            if self.settler is not None:
                self.settler.forget(self.project_id, by=key[1])
            return
        self._enqueue(message.encoded, message.origin, message.key, to_joining=False)

    # -- fan-out ------------------------------------------------------------------------------

    def _enqueue(
        self,
        frame: bytes,
        origin: str | None,
        key: tuple[str, str] | None,
        *,
        to_joining: bool = True,
    ) -> None:
        if to_joining:
            for joining in self._joining.values():
                joining.other.append((self.seq, frame))
        if self.config.tick_ms <= 0:
            # Batching off: every message is its own frame, sent at once.
            for sid, session in list(self.sessions.items()):
                if sid != origin:
                    session.push(1, frame)
            return
        if not self._ordered and not self._coalesced:
            self._since = trio.current_time()
        if key is None:
            self._ordered.append((frame, origin))
        else:
            self._coalesced[key] = (frame, origin)
        self._dirty.set()

    async def _tick(self) -> None:
        """The ticker's step: once something is queued, flush it, at most once per
        :meth:`interval`. What arrives after a quiet spell goes out at once; only messages that
        come faster than the interval wait, and coalesce."""
        await self._dirty.wait()
        await trio.sleep_until(self._last_tick + self.interval())
        self._last_tick = trio.current_time()
        self._dirty = trio.Event()
        self.flush()

    def interval(self) -> float:
        """The least time between two of the room's flushes, in seconds: the process's
        members over ``batch_frames_per_s`` (a flush costs one frame per member), up to the
        tick. Every room keeping to it keeps the whole process within that many frames a
        second, however its members are spread over rooms; a small, busy room flushes almost
        every message at once, a large one coalesces up to the tick."""
        tick = self.config.tick_ms / 1000
        return min(tick, self.manager.members / self.config.batch_frames_per_s)

    def flush(self) -> None:
        """Send everything queued since the last tick: one outbox item per member."""
        ordered, self._ordered = self._ordered, []
        coalesced, self._coalesced = self._coalesced, {}
        joined, self._joined_mid_tick = self._joined_mid_tick, {}
        items = ordered + list(coalesced.values())
        if not items:
            return
        since = self._since
        origins = {origin for _frame, origin in items if origin is not None}
        shared: bytes | None = None
        for sid, session in list(self.sessions.items()):
            start = joined.get(sid)
            if start is not None:
                own = [frame for frame, origin in items[start:] if origin != sid]
                if own:
                    session.push(len(own), b",".join(own), since)
                continue
            if sid in origins:
                own = [frame for frame, origin in items if origin != sid]
                if own:
                    session.push(len(own), b",".join(own), since)
                continue
            if shared is None:
                shared = b",".join(frame for frame, _origin in items)
            session.push(len(items), shared, since)


@attrs.define(eq=False)
class RoomManager:
    """Opens rooms on demand in its own nursery and forgets them when they close."""

    backplane: Backplane
    config: Config
    settler: Settler | None = None
    #: The server's counters (the hub counts into the same object).
    traffic: Traffic = attrs.Factory(Traffic)
    rooms: dict[str, Room] = attrs.Factory(dict)
    #: Projects that may not open now (a GDPR erasure is rewriting them).
    blocked: set[str] = attrs.Factory(set)
    #: Where the rooms' job failures are counted.
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: The live sessions' counters, over every room.
    live_totals: LiveTotals = attrs.Factory(LiveTotals)
    #: Sessions that are members of a room, over every room (the fan-out's frames per flush).
    members: int = 0
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the rooms' nursery until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def join(self, project_id: str) -> Room:
        """The open room of ``project_id``, opening it if needed.

        Raises:
            Overloaded: the room could not open (storage or backplane unavailable).
        """
        while True:
            if project_id in self.blocked:
                raise Overloaded(f"project {project_id!r} is being rewritten; retry shortly")
            room = self.rooms.get(project_id)
            if room is None or room.closed:
                if self._nursery is None:
                    raise Overloaded("server is not accepting connections")
                room = Room(
                    project_id=project_id,
                    backplane=self.backplane,
                    config=self.config,
                    manager=self,
                    settler=self.settler,
                    jobs=self.jobs,
                )
                self.rooms[project_id] = room
                self._nursery.start_soon(room.run)
            await room.ready.wait()
            if room.failure is not None:
                raise Overloaded(f"cannot open project {project_id!r}: {room.failure}")
            if not room.closed:
                return room

    async def close(self, project_id: str) -> None:
        """Close the project's room (its sessions get 1011) and wait (10 s at most) until it
        let go and its sessions have ended."""
        room = self.rooms.get(project_id)
        if room is not None:
            sessions = [*room.sessions.values(), *(j.session for j in room._joining.values())]
            room.close()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await room.done.wait()
                for session in sessions:
                    await session.ended.wait()

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.project_id) is room:
            del self.rooms[room.project_id]
        if room.project_id not in self.rooms:
            self.backplane.release(room.project_id)
            if self.settler is not None:  # no notice of a change reaches a closed room
                self.settler.forget(room.project_id)

    def all_sessions(self) -> Iterable[Session]:
        for room in list(self.rooms.values()):
            yield from list(room.sessions.values())
            yield from [j.session for j in room._joining.values()]


def _now_ms() -> int:
    return int(time.time() * 1000)
