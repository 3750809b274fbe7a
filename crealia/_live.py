"""Live sessions: a host goes live on camera or screen in a project's room, members watch
(docs/protocol.md §8).

A :class:`LiveSession` belongs to one :class:`~crealia._room.Room` and runs in the room's
nursery, in a nursery of its own: in ``relay`` mode that holds the server's WebRTC peers
(:mod:`crealia._webrtc`, the one module that speaks asyncio) and the task that reads their
statistics; in ``p2p`` mode the server only forwards signals and keeps the statistics members
report. It ends when its host stops it (or an owner does), when the host's last connection in
it leaves, when the room closes, or when the server stops; ending cancels its nursery, and the
relay closes every peer within ``live_peer_timeout``.

Membership is per connection: ``live_join`` puts the connection that sent it in the session, and
signals for a user reach only that user's connections in the session. :class:`LiveSessions` is
a room's registry of them, and the handlers' side of the protocol: each public coroutine of it
answers one message type, raising the protocol's errors.

Quality: each viewing connection has a :class:`~crealia._quality.QualityController`. In ``p2p``
mode it is fed by the viewer's ``stream_stats``; in ``relay`` mode, once a second, by the
server's own statistics of that viewer's connection (round-trip time, loss, jitter from the
viewer's RTCP reports) together with the viewer's latest report (its bitrate: what the server
sends is what its encoder chose, not what the network can carry). A change is sent as
``quality_change`` to the viewer and the host, and in ``relay`` mode applied to what the server
sends that viewer.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

from . import _wire
from ._errors import BadRequest, Forbidden, NotFound, Overloaded, TooLarge
from ._jobs import JobFailures
from ._quality import RUNGS, Decision, QualityController, Sample, rung_for_size

if TYPE_CHECKING:
    from ._config import Config
    from ._model import User
    from ._webrtc import Relay

T = TypeVar("T")


class Connection(Protocol):
    """What a live session needs of a connection (a :class:`crealia._session.Session`)."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> User: ...

    def push(self, count: int, body: bytes, since: float | None = None) -> None: ...


class Room(Protocol):
    """What live sessions need of their room (a :class:`crealia._room.Room`)."""

    project_id: str
    config: Config
    jobs: JobFailures

    @property
    def nursery(self) -> trio.Nursery | None: ...

    def broadcast(self, frame: bytes) -> None: ...


#: What a relay session costs, in percent of one core, by the rung of the host's frames:
#: decoding them once, and scaling and VP8-encoding them for each viewer, at 15 frames a second.
#: Measured with ``benchmarks/relay.py`` on a 2-core x86-64 machine (360p: 17.3 % with one
#: viewer, 27.6 % with two, 40.3 % with four; 720p: 44.0 % and 68.6 %); 480p and 1080p
#: scaled from them by pixels. ``live_relay_cpu_budget`` less the decoding, over a viewer's
#: share, is a session's viewer limit.
RELAY_DECODE_CPU: dict[str, float] = {"360p": 7.0, "480p": 10.0, "720p": 19.0, "1080p": 40.0}
RELAY_VIEWER_CPU: dict[str, float] = {"360p": 10.3, "480p": 15.0, "720p": 25.0, "1080p": 50.0}

#: The rung a session's host is expected to send before its first frame says (the viewer
#: limit of a relay session is counted at it).
EXPECTED_RUNG = {"camera": "720p", "screen": "1080p"}

#: Seconds a viewer's ``stream_stats`` counts for, in relay mode, after it was sent.
REPORT_FRESH = 3.0

#: Seconds between reads of the relay's own statistics of each viewer.
LINK_INTERVAL = 1.0

#: What signals name the server's own peer by, in ``to`` and ``from``.
SERVER = "server"

DESCRIPTION_TYPES = ("offer", "answer", "pranswer", "rollback")
CANDIDATE_KEYS = frozenset({"candidate", "sdpMid", "sdpMLineIndex", "usernameFragment"})

ENDED_REASONS = ("stopped", "host_left", "room_closed")


def ice_servers(config: Config) -> list[dict[str, Any]]:
    """The ``ice_servers`` of every session: RTCIceServer objects from the configured STUN and
    TURN URLs (the TURN ones with the configured credentials), empty when none are set."""
    servers: list[dict[str, Any]] = []
    if config.webrtc_stun_servers:
        servers.append({"urls": list(config.webrtc_stun_servers)})
    if config.webrtc_turn_servers:
        turn: dict[str, Any] = {"urls": list(config.webrtc_turn_servers)}
        if config.webrtc_turn_username is not None:
            turn["username"] = config.webrtc_turn_username
        if config.webrtc_turn_credential is not None:
            turn["credential"] = config.webrtc_turn_credential
        servers.append(turn)
    return servers


@attrs.define(eq=False)
class Participant:
    """One connection in a live session: the host's (it sends) or a viewer's (it watches)."""

    conn: Connection
    host: bool
    #: The latest ``stream_stats`` it sent (wire form, with ``at``: server ms).
    reported: dict[str, Any] | None = None
    _reported_at: float = -math.inf
    #: The server's own statistics of its connection (relay viewers), as last read.
    link: dict[str, Any] | None = None
    #: Viewers only: the rung it is sent, and what chooses it.
    controller: QualityController | None = None

    @property
    def user_id(self) -> str:
        return self.conn.user.id

    def to_wire(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "connection": self.conn.id,
            "role": "host" if self.host else "viewer",
            "quality": None if self.controller is None else self.controller.current,
            "stats": self.reported,
            "link": self.link,
        }


@attrs.define(eq=False)
class LiveSession:
    """One live session of a room (docs/protocol.md §8)."""

    id: str
    project_id: str
    host: str
    kind: str
    mode: str
    ice_servers: list[dict[str, Any]]
    config: Config
    #: What tells every member of the room (the room's fan-out).
    broadcast: Callable[[bytes], None]
    #: Where failures of its jobs (reading the relay's statistics) are counted, and the
    #: server's live counters.
    jobs: JobFailures = attrs.Factory(JobFailures)
    totals: LiveTotals = attrs.Factory(lambda: LiveTotals())
    started_at: int = attrs.Factory(lambda: int(time.time() * 1000))
    participants: dict[str, Participant] = attrs.Factory(dict)
    #: Set when the session has ended (announced) and once its peers are closed.
    ended: bool = False
    reason: str | None = None
    closed: trio.Event = attrs.Factory(trio.Event)
    relay: Relay | None = None
    #: True once the session takes signals (its relay is up).
    ready: bool = False
    #: The size of the host's frames, once known (the relay's decoded frames, else the host's
    #: ``stream_stats``).
    host_size: tuple[int, int] | None = None
    quality_changes: int = 0
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _calls: set[trio.CancelScope] = attrs.Factory(set)
    _nursery: trio.Nursery | None = None

    # -- lifetime -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the session until it ends: in relay mode, its peers and their statistics.

        Ready (``task_status``) once a relay can take offers. Cancelled (the room closing, the
        server stopping) it closes its peers first, within the relay's deadline.
        """
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.mode == "relay":
                        from ._webrtc import open_relay  # asyncio and aiortc: only if relayed

                        async with open_relay(
                            ice_servers=self.ice_servers,
                            listen_ips=self.config.webrtc_listen_ips,
                            close_timeout=self.config.live_peer_timeout,
                        ) as relay:
                            self.relay = relay
                            self.ready = True
                            task_status.started()
                            await self._watch_links(relay)
                    else:
                        self.ready = True
                        task_status.started()
                        await trio.sleep_forever()
        finally:
            self.relay = None
            self._nursery = None
            self.closed.set()

    def end(self, reason: str) -> None:
        """End the session: every member of the room is told (``live_ended``), every call in
        flight is cancelled, and the relay closes its peers. Idempotent."""
        if self.ended:
            return
        self.ended, self.reason = True, reason
        self.broadcast(self._event("live_ended", self.host,
                                   {"session_id": self.id, "reason": reason}))  # fmt: skip
        for scope in self._calls:
            scope.cancel()
        self._scope.cancel()

    # -- members ------------------------------------------------------------------------------

    def viewers(self) -> list[str]:
        """The users watching (not the host), each once."""
        return list(dict.fromkeys(p.user_id for p in self.participants.values() if not p.host))

    def connections_of(self, user_id: str) -> list[Participant]:
        return [p for p in self.participants.values() if p.user_id == user_id]

    def add(self, conn: Connection, *, host: bool) -> Participant:
        participant = Participant(conn=conn, host=host)
        if not host:
            ceiling = rung_for_size(*self.host_size) if self.host_size else None
            start = ceiling.name if ceiling else EXPECTED_RUNG[self.kind]
            period = self.config.live_stable_period
            participant.controller = QualityController(
                ceiling=start, stable_for=period, max_stable_for=max(80.0, 8 * period)
            )
        self.participants[conn.id] = participant
        return participant

    def remove(self, conn: Connection) -> Participant | None:
        """Take a connection out; its user's last one out is announced, the host's ends the
        session. Returns what was removed."""
        participant = self.participants.pop(conn.id, None)
        if participant is None or self.ended:
            return participant
        if participant.host:
            if not any(p.host for p in self.participants.values()):
                self.end("host_left")
            return participant
        if self.relay is not None and self._nursery is not None:
            self._nursery.start_soon(self._drop, self.relay, conn.id)
        if not self.connections_of(participant.user_id):
            payload = {"session_id": self.id, "user_id": participant.user_id}
            self.tell_members(self._event("live_left", participant.user_id, payload))
        return participant

    async def _drop(self, relay: Relay, key: str) -> None:
        with (
            self.jobs.guard("live_drop", self.project_id),
            trio.move_on_after(self.config.live_peer_timeout),
        ):
            await relay.drop(key)

    def tell_members(self, frame: bytes, *, but: str | None = None) -> None:
        """Send ``frame`` to every connection in the session (but the one named)."""
        for participant in self.participants.values():
            if participant.conn.id != but:
                participant.conn.push(1, frame)

    def description(self) -> dict[str, Any]:
        """What ``live_start``'s ack says of the session (``live_join``'s and ``live_started``
        add to it)."""
        return {"session_id": self.id, "kind": self.kind, "mode": self.mode,
                "ice_servers": self.ice_servers}  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        """What members are told of the session (``welcome``'s ``live_sessions``)."""
        return {
            "session_id": self.id,
            "host": self.host,
            "kind": self.kind,
            "mode": self.mode,
            "viewers": self.viewers(),
            "started_at": self.started_at,
        }

    def summary(self) -> dict[str, Any]:
        """The session in a project's metrics sample: its viewers' rungs and statistics."""
        viewers = []
        for participant in self.participants.values():
            if participant.controller is None:
                continue
            stats = participant.reported or participant.link or {}
            viewers.append({
                "userId": participant.user_id,
                "quality": participant.controller.current,
                **{key: stats.get(key) for key in ("bitrate_kbps", "rtt_ms", "packet_loss", "fps")},
            })  # fmt: skip
        return {"sessionId": self.id, "mode": self.mode, "kind": self.kind, "host": self.host,
                "viewers": viewers}  # fmt: skip

    def details(self) -> dict[str, Any]:
        """The session with its members and their latest statistics (the JSON API)."""
        return {
            **self.to_wire(),
            "host_size": list(self.host_size) if self.host_size else None,
            "quality_changes": self.quality_changes,
            "members": [p.to_wire() for p in self.participants.values()],
        }

    def _event(self, kind: str, user_id: str, payload: dict[str, Any]) -> bytes:
        return _wire.envelope(
            "collaboration_event",
            {"kind": kind, "user_id": user_id, "at": int(time.time() * 1000), "payload": payload},
        )

    # -- the relay ----------------------------------------------------------------------------

    async def call(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run one call into the relay, bounded by ``live_peer_timeout`` and cancelled if the
        session ends meanwhile.

        Raises:
            NotFound: the session ended (or has no relay).
            Overloaded: the server's peer did not answer in time.
        """
        if self.ended or self.relay is None:
            raise NotFound(f"data.session_id: the live session {self.id!r} has ended")
        with trio.CancelScope() as scope:
            self._calls.add(scope)
            try:
                with trio.fail_after(self.config.live_peer_timeout):
                    return await action()
            except trio.TooSlowError:
                raise Overloaded(
                    f"the server's WebRTC peer took more than {self.config.live_peer_timeout} s; "
                    "try again"
                ) from None
            finally:
                self._calls.discard(scope)
        raise NotFound(f"data.session_id: the live session {self.id!r} has ended")

    async def _watch_links(self, relay: Relay) -> None:
        """Once a second: the host's frame size, and each viewer's link statistics into its
        quality controller."""
        while True:
            await trio.sleep(LINK_INTERVAL)
            if relay.host_size is not None and relay.host_size != self.host_size:
                self.set_host_size(relay.host_size)
            now = trio.current_time()
            for key, participant in list(self.participants.items()):
                if not participant.host:
                    with (
                        self.jobs.guard("live_stats", self.project_id),
                        trio.move_on_after(self.config.live_peer_timeout),
                    ):
                        await self._watch_link(relay, key, participant, now)

    async def _watch_link(
        self, relay: Relay, key: str, participant: Participant, now: float
    ) -> None:
        link = await relay.stats(key)
        controller = participant.controller
        if link is None or controller is None or key not in self.participants:
            return
        participant.link = {
            "bitrate_kbps": round(link.bitrate_kbps, 1),
            "rtt_ms": round(link.rtt_ms, 1),
            "packet_loss": round(link.packet_loss, 4),
            "jitter_ms": round(link.jitter_ms, 1),
            "frames_sent": link.frames_sent,
            "width": link.width,
            "height": link.height,
        }
        report = participant.reported
        if report is None or now - participant._reported_at > REPORT_FRESH:
            # The server's own bitrate is its encoder's choice, not the network's limit:
            # without the viewer's word, bandwidth is not judged (the rung's cap stands in).
            report = {"bitrate_kbps": RUNGS[controller.current].max_kbps, "rtt_ms": 0.0,
                      "packet_loss": 0.0}  # fmt: skip
        sample = Sample(
            at=now,
            bitrate_kbps=float(report["bitrate_kbps"]),
            rtt_ms=max(link.rtt_ms, float(report["rtt_ms"])),
            packet_loss=max(link.packet_loss, float(report["packet_loss"])),
            jitter_ms=link.jitter_ms,
        )
        self._decided(participant, controller.observe(sample))

    def set_host_size(self, size: tuple[int, int]) -> None:
        """The host's frames are ``size`` now: each viewer's rung may be at most theirs."""
        self.host_size = size
        ceiling = rung_for_size(*size).name
        for participant in self.participants.values():
            if participant.controller is not None:
                participant.controller.set_ceiling(ceiling)
                self._apply(participant)

    # -- statistics and quality ---------------------------------------------------------------

    def report(self, participant: Participant, stats: _wire.StreamStats) -> None:
        """A member's ``stream_stats``: kept, and in p2p mode fed to its quality controller (the
        host's own report gives the size of its frames)."""
        participant.reported = {
            "bitrate_kbps": stats.bitrate_kbps,
            "rtt_ms": stats.rtt_ms,
            "packet_loss": stats.packet_loss,
            "fps": stats.fps,
            "width": stats.width,
            "height": stats.height,
            "at": int(time.time() * 1000),
        }
        participant._reported_at = trio.current_time()
        if participant.host:
            size = (stats.width, stats.height)
            known = stats.width > 0 and stats.height > 0
            if self.relay is None and known and size != self.host_size:
                self.set_host_size(size)
            return
        if self.mode == "p2p" and participant.controller is not None:
            sample = Sample(at=trio.current_time(), bitrate_kbps=stats.bitrate_kbps,
                            rtt_ms=stats.rtt_ms, packet_loss=stats.packet_loss)  # fmt: skip
            self._decided(participant, participant.controller.observe(sample))

    def _decided(self, participant: Participant, decision: Decision | None) -> None:
        if decision is None:
            return
        self.quality_changes += 1
        self.totals.quality_changes[decision.reason] += 1
        frame = _wire.envelope("quality_change", {
            "session_id": self.id,
            "quality": decision.quality,
            "max_bitrate_kbps": decision.max_bitrate_kbps,
            "reason": decision.reason,
            "viewer": participant.user_id,
        })  # fmt: skip
        participant.conn.push(1, frame)
        for other in self.participants.values():
            if other.host:
                other.conn.push(1, frame)
        self._apply(participant)

    def _apply(self, participant: Participant) -> None:
        """Relay mode: send the viewer what its rung says (frame size and bitrate cap)."""
        if self.relay is None or participant.controller is None:
            return
        rung = RUNGS[participant.controller.current]
        self.relay.set_quality(participant.conn.id, quality=rung.name,
                               max_bitrate_kbps=rung.max_kbps)  # fmt: skip

    def viewer_limit(self) -> int:
        """How many viewing connections the session takes: ``live_p2p_viewers`` in p2p mode; in
        relay mode what the CPU budget pays for at the host's rung (at least one)."""
        if self.mode == "p2p":
            return self.config.live_p2p_viewers
        rung = rung_for_size(*self.host_size).name if self.host_size else EXPECTED_RUNG[self.kind]
        left = self.config.live_relay_cpu_budget - RELAY_DECODE_CPU[rung]
        return max(1, int(left // RELAY_VIEWER_CPU[rung]))


@attrs.define(eq=False)
class LiveTotals:
    """The server's live-session counters (``/metrics``), kept by its room manager."""

    #: Sessions started, by mode; ended, by reason; quality changes, by reason.
    started: dict[str, int] = attrs.Factory(lambda: {"p2p": 0, "relay": 0})
    ended: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(ENDED_REASONS, 0))
    quality_changes: dict[str, int] = attrs.Factory(
        lambda: dict.fromkeys(("loss", "rtt", "bandwidth", "stable"), 0)
    )
    #: Signals forwarded member to member, and offers the server's peers answered.
    signals: int = 0
    answered: int = 0


def live_figures(sessions: Iterable[LiveSession]) -> dict[str, Any]:
    """What live sessions open now add up to (``/metrics``, bounded labels): sessions by mode,
    viewing connections by rung, and the average and worst of the viewers' latest statistics
    (their own reports, else the relay's)."""
    by_mode = {"p2p": 0, "relay": 0}
    by_rung = dict.fromkeys(RUNGS, 0)
    values: dict[str, list[float]] = {"bitrate_kbps": [], "rtt_ms": [], "packet_loss": []}
    for live in sessions:
        by_mode[live.mode] += 1
        for participant in live.participants.values():
            if participant.controller is None:
                continue
            by_rung[participant.controller.current] += 1
            stats = participant.reported or participant.link
            if stats is not None:
                for name, kept in values.items():
                    kept.append(float(stats[name]))
    summary = {name: (sum(v) / len(v), max(v)) if v else (0.0, 0.0)
               for name, v in values.items()}  # fmt: skip
    return {"sessions": by_mode, "viewers": by_rung, "stats": summary}


@attrs.define(eq=False)
class LiveSessions:
    """A room's live sessions, and the protocol's side of them (one coroutine per message)."""

    room: Room
    #: The server's counters (its room manager's).
    totals: LiveTotals = attrs.Factory(LiveTotals)
    sessions: dict[str, LiveSession] = attrs.Factory(dict)

    @property
    def config(self) -> Config:
        return self.room.config

    def get(self, session_id: str) -> LiveSession:
        """Raises: NotFound: no such session in this room."""
        live = self.sessions.get(session_id)
        if live is None or live.ended:
            raise NotFound(f"data.session_id: no live session {session_id!r} in this project")
        return live

    def participant(self, live: LiveSession, conn: Connection) -> Participant:
        """Raises: Forbidden: ``conn`` has not joined ``live``."""
        participant = live.participants.get(conn.id)
        if participant is None:
            raise Forbidden(f"data.session_id: this connection is not in live session {live.id!r}"
                            " (live_join first)")  # fmt: skip
        return participant

    async def start(self, conn: Connection, data: _wire.LiveStart) -> LiveSession:
        """``live_start``: a new session hosted by ``conn``, announced to every member.

        Raises:
            Overloaded: the project has ``live_sessions_per_project`` sessions already, or the
                room is closing.
        """
        room = self.room
        _not_reserved(conn)
        limit = self.config.live_sessions_per_project
        open_now = len(self.open())
        if open_now >= limit:
            raise Overloaded(f"this project has {open_now} live sessions already (at most "
                             f"{limit}); stop one first")  # fmt: skip
        nursery = room.nursery
        if nursery is None:
            raise Overloaded("the project's room is closing; try again")
        live = LiveSession(
            id=uuid.uuid4().hex,
            project_id=room.project_id,
            host=conn.user.id,
            kind=data.kind,
            mode=data.mode,
            ice_servers=ice_servers(self.config),
            config=self.config,
            broadcast=room.broadcast,
            jobs=room.jobs,
            totals=self.totals,
        )
        live.add(conn, host=True)
        self.sessions[live.id] = live
        try:
            await nursery.start(self._run, live)
        except Exception as exc:
            # The relay could not start (counted and logged by _run): refused, nothing announced.
            why = f"{type(exc).__name__}: {exc}"[:300]
            raise Overloaded(f"data.mode: the relay could not start ({why}); try again, or "
                             "p2p") from None  # fmt: skip
        finally:
            if not live.ready:
                self.sessions.pop(live.id, None)
        self.totals.started[live.mode] += 1
        payload = {**live.description(), "host": live.host}
        room.broadcast(live._event("live_started", live.host, payload))
        return live

    async def _run(self, live: LiveSession, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await live.run(task_status=task_status)
        except Exception as exc:
            # The relay failed (a bug, aiortc): this session ends, the room goes on.
            self.room.jobs.failed("live_session", exc, live.id)
            if not live.ready:
                raise
            live.end("stopped")
        finally:
            self.sessions.pop(live.id, None)
            if live.ready:  # a relay that never started was refused, not ended
                if live.reason is None:
                    live.reason = "room_closed"  # cancelled: the room or the server closing
                self.totals.ended[live.reason] += 1

    def join(self, conn: Connection, session_id: str) -> LiveSession:
        """``live_join``: ``conn`` watches (the host's own connections join as host).

        Raises:
            NotFound: no such session. Overloaded: it is at its viewer limit.
        """
        live = self.get(session_id)
        _not_reserved(conn)
        if conn.id in live.participants:
            return live  # joined already: the same answer again
        host = conn.user.id == live.host
        if not host:
            watching = sum(1 for p in live.participants.values() if not p.host)
            limit = live.viewer_limit()
            if watching >= limit:
                what = ("what live_relay_cpu_budget pays for at the host's frame size"
                        if live.mode == "relay" else "live_p2p_viewers")  # fmt: skip
                raise Overloaded(f"live session {live.id!r} is full: {watching} viewers, at most "
                                 f"{limit} ({what}); try again later")  # fmt: skip
        first = not live.connections_of(conn.user.id)
        live.add(conn, host=host)
        if first:
            live.tell_members(live._event("live_joined", conn.user.id,
                                          {"session_id": live.id, "user_id": conn.user.id}),
                              but=conn.id)  # fmt: skip
        return live

    def leave(self, conn: Connection, session_id: str) -> None:
        """``live_leave``: ``conn`` stops watching (the host's last connection ends it).

        Raises:
            NotFound: no such session. Forbidden: ``conn`` is not in it.
        """
        live = self.get(session_id)
        self.participant(live, conn)
        live.remove(conn)

    def stop(self, conn: Connection, session_id: str) -> LiveSession:
        """``live_stop``: the host (any of its connections) or an owner ends the session.

        Raises:
            NotFound: no such session. Forbidden: neither the host nor an owner.
        """
        live = self.get(session_id)
        user = conn.user
        if user.id != live.host and user.role != "owner":
            raise Forbidden("live_stop: only the session's host or an owner may stop it")
        live.end("stopped")
        return live

    def connection_left(self, conn: Connection) -> None:
        """A connection left the room: out of every session it was in."""
        for live in list(self.sessions.values()):
            live.remove(conn)

    def end_all(self, reason: str) -> None:
        for live in list(self.sessions.values()):
            live.end(reason)

    async def signal(self, conn: Connection, data: _wire.WebrtcSignal) -> None:
        """``webrtc_signal``: forwarded to the connections of ``to`` in the session, or, in
        relay mode with ``to: "server"``, taken by the server's peer (its answer comes back as
        a ``webrtc_signal`` from ``"server"``).

        Raises:
            NotFound: no such session, ``to`` not in it, or ``"server"`` in a p2p session.
            Forbidden: the sender is not in the session.
            BadRequest, TooLarge: a description or candidate that is not one.
        """
        live = self.get(data.session_id)
        participant = self.participant(live, conn)
        description = check_description(data.description, self.config.live_sdp_max_bytes)
        candidate = check_candidate(data.candidate, self.config.live_candidate_max_bytes)
        if description is None and candidate is None:
            raise BadRequest("data: a webrtc_signal carries a description or a candidate")
        if data.to == SERVER:
            if live.mode != "relay":
                raise NotFound("data.to: the server is a peer only in relay sessions; signal "
                               "the host")  # fmt: skip
            await self._to_relay(live, participant, description, candidate)
            return
        targets = live.connections_of(data.to)
        if not targets:
            raise NotFound(f"data.to: user {data.to!r} is not in live session {live.id!r}")
        forwarded: dict[str, Any] = {"session_id": live.id, "to": data.to,
                                     "from": conn.user.id}  # fmt: skip
        if description is not None:
            forwarded["description"] = description
        if candidate is not None:
            forwarded["candidate"] = candidate
        frame = _wire.envelope("webrtc_signal", forwarded)
        self.totals.signals += 1
        for target in targets:
            if target.conn.id != conn.id:
                target.conn.push(1, frame)

    async def _to_relay(
        self,
        live: LiveSession,
        participant: Participant,
        description: dict[str, Any] | None,
        candidate: dict[str, Any] | None,
    ) -> None:
        from ._webrtc import PeerError

        key = "host" if participant.host else participant.conn.id
        relay = live.relay
        if relay is None:
            raise NotFound(f"data.session_id: the live session {live.id!r} has ended")
        try:
            if description is not None:
                if description["type"] != "offer":
                    raise BadRequest(f"data.description.type: the server answers offers; it "
                                     f"got {description['type']!r}")  # fmt: skip
                if participant.host:
                    answer = await live.call(lambda: relay.accept_host(description))
                else:
                    answer = await live.call(lambda: relay.accept_viewer(key, description))
                    live._apply(participant)
                self.totals.answered += 1
                participant.conn.push(1, _wire.envelope("webrtc_signal", {
                    "session_id": live.id, "to": participant.user_id, "from": "server",
                    "description": answer,
                }))  # fmt: skip
            if candidate is not None:
                await live.call(lambda: relay.add_candidate(key, candidate))
        except PeerError as exc:
            field = "data.description" if description is not None else "data.candidate"
            raise BadRequest(f"{field}: the server's peer refused it: {exc}") from None

    def stats(self, conn: Connection, data: _wire.StreamStats) -> None:
        """``stream_stats``: kept for the member, fed to its quality controller.

        Raises:
            NotFound: no such session. Forbidden: the sender is not in it.
            BadRequest: a value out of its range.
        """
        live = self.get(data.session_id)
        participant = self.participant(live, conn)
        for name in ("bitrate_kbps", "rtt_ms", "fps"):
            if getattr(data, name) < 0:
                raise BadRequest(f"data.{name}: must be 0 or more")
        if not 0 <= data.packet_loss <= 1:
            raise BadRequest("data.packet_loss: a fraction from 0 to 1")
        for name in ("width", "height"):
            if not 0 <= getattr(data, name) <= 16384:
                raise BadRequest(f"data.{name}: from 0 to 16384 pixels")
        live.report(participant, data)

    def open(self) -> list[LiveSession]:
        """The sessions not ended (those still closing their peers no longer count)."""
        return [live for live in self.sessions.values() if not live.ended]

    def to_wire(self) -> list[dict[str, Any]]:
        return [live.to_wire() for live in self.open()]


def _not_reserved(conn: Connection) -> None:
    """Raises: Forbidden: the user's id is ``server``, which names the server's own peer in
    signals (a member with it could pass its signals off as the server's)."""
    if conn.user.id == SERVER:
        raise Forbidden(f"user id {SERVER!r} is reserved for the server's peer in live sessions")


def check_description(value: Any, max_bytes: int) -> dict[str, Any] | None:
    """A ``webrtc_signal``'s ``description``: ``{"type", "sdp"}`` as RTCSessionDescription has
    them (``sdp`` may be absent for ``rollback``), the SDP at most ``max_bytes``.

    Raises:
        BadRequest: naming the field. TooLarge: the SDP is over ``max_bytes``.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("data.description: expected an object {type, sdp}")
    unknown = sorted(set(value) - {"type", "sdp"})
    if unknown:
        raise BadRequest(f"data.description: unknown field {unknown[0]!r} (type and sdp only)")
    kind = value.get("type")
    if kind not in DESCRIPTION_TYPES:
        raise BadRequest(f"data.description.type: one of {', '.join(DESCRIPTION_TYPES)}, got "
                         f"{kind!r}")  # fmt: skip
    sdp = value.get("sdp", "")
    if not isinstance(sdp, str):
        raise BadRequest("data.description.sdp: expected a string")
    if len(sdp.encode()) > max_bytes:
        raise TooLarge(f"data.description.sdp: longer than {max_bytes} bytes")
    if kind != "rollback" and not sdp.startswith("v=0"):
        raise BadRequest("data.description.sdp: not an SDP (it starts with v=0)")
    return {"type": kind, "sdp": sdp}


def check_candidate(value: Any, max_bytes: int) -> dict[str, Any] | None:
    """A ``webrtc_signal``'s ``candidate``: RTCIceCandidateInit (``candidate``, ``sdpMid``,
    ``sdpMLineIndex``, ``usernameFragment``); an empty ``candidate`` says the sender's
    candidates are complete.

    Raises:
        BadRequest: naming the field. TooLarge: the candidate line is over ``max_bytes``.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("data.candidate: expected an object {candidate, sdpMid, sdpMLineIndex}")
    unknown = sorted(set(value) - CANDIDATE_KEYS)
    if unknown:
        raise BadRequest(f"data.candidate: unknown field {unknown[0]!r}")
    line = value.get("candidate")
    if not isinstance(line, str):
        raise BadRequest("data.candidate.candidate: expected a string (empty: no more)")
    if len(line.encode()) > max_bytes:
        raise TooLarge(f"data.candidate.candidate: longer than {max_bytes} bytes")
    if line and not line.removeprefix("a=").startswith("candidate:"):
        raise BadRequest("data.candidate.candidate: not an ICE candidate (candidate:...)")
    mid = value.get("sdpMid")
    if mid is not None and (not isinstance(mid, str) or len(mid) > 64):
        raise BadRequest("data.candidate.sdpMid: expected a string of at most 64 characters")
    index = value.get("sdpMLineIndex")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                              or not 0 <= index < 1024):  # fmt: skip
        raise BadRequest("data.candidate.sdpMLineIndex: expected an integer from 0 to 1023")
    fragment = value.get("usernameFragment")
    if fragment is not None and (not isinstance(fragment, str) or len(fragment) > 256):
        raise BadRequest("data.candidate.usernameFragment: expected a string")
    if mid is None and index is None and line:
        raise BadRequest("data.candidate: sdpMid or sdpMLineIndex names its media section")
    return {k: value[k] for k in ("candidate", "sdpMid", "sdpMLineIndex", "usernameFragment")
            if k in value}  # fmt: skip
