"""``crealia loadtest``: simulated users driving a running server, and what it measured.

Users join projects ``PREFIX-0`` … ``PREFIX-(N-1)`` round-robin, each with an editor token and
a clip of its own (so edits do not conflict unless ``conflict_rate`` asks for it). For
``duration`` seconds each user moves its cursor at ``cursor_hz``, changes its clip every
``edit_every`` seconds and comments on it every ``comment_every`` seconds, phases staggered so
users do not send in lockstep. ``streams`` live sessions in relay mode (one aiortc host and one
viewer each) run beside the traffic.

What is counted, and how:

- ``sent``: messages sent during the run, by kind.
- ``offered_per_s``: each message sent times the traffic users of its project connected at the
  time, less the sender: the deliveries the traffic asks of the server.
- ``delivered_per_s``: the ``collaboration_event`` pushes of those messages that other users
  received (pushes of a message sent during the run, counted when they arrive, up to the end
  of the drain). The server coalesces a user's cursor moves within a tick, so delivered may be
  under offered for cursors without anything being lost.
- Latencies are measured on this process's clock: a cursor carries its send time in
  ``position.time``; an edit's and a comment's send times are kept by id.

The users are :class:`crealia._loadgen.Connection`: one process, one Trio thread, the lean
frame reader; the summary gives this process's own CPU, so a saturated generator shows.
"""

from __future__ import annotations

import math
import random
import secrets
import sys
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs
import orjson
import psutil
import trio
from jwt.warnings import InsecureKeyLengthWarning

from ._auth import sign_token, token_claims
from ._loadgen import (
    NET_ERRORS,
    Connection,
    HandshakeRefused,
    cpu_seconds,
    envelopes,
    now_ms,
    percentiles,
)

__all__ = ["LoadtestOptions", "Unreachable", "format_summary", "run_loadtest"]

_CONNECT_CONCURRENCY = 32
_CLOSE_S = 5.0
_STREAM_SETUP_S = 30.0
_loads = orjson.loads
_dumps = orjson.dumps


class Unreachable(Exception):
    """The server could not be reached, or refused every user; the message says why."""


@attrs.frozen(kw_only=True)
class LoadtestOptions:
    """What ``crealia loadtest`` runs (docs/protocol.md §1)."""

    #: WebSocket URLs; users are spread over them round-robin (several nodes of a cluster).
    urls: tuple[str, ...]
    #: The HS256 secret the server verifies tokens with.
    secret: str
    users: int = 50
    projects: int = 5
    duration: float = 600.0
    cursor_hz: float = 10.0
    #: Seconds between a user's edits (0: no edits).
    edit_every: float = 5.0
    #: Seconds between a user's comments (0: no comments).
    comment_every: float = 30.0
    #: The share of edits (0 to 1) written to a clip every user of the project edits, with a
    #: stale ``base``: each is a conflict once another user has written it.
    conflict_rate: float = 0.0
    streams: int = 0
    project_prefix: str = "loadtest"
    #: Addresses the streams' peers take media on (empty: every address but loopback).
    media_ips: tuple[str, ...] = ("127.0.0.1",)
    #: Seconds a user may take to connect and be welcomed.
    connect_timeout: float = 10.0
    #: A seed for the users' phases and conflict picks (None: random).
    seed: int | None = None
    #: Seconds the drain after the traffic may take (pending acks, a ping round trip per
    #: user); closing takes at most half as long again.
    settle_timeout: float = 10.0


@attrs.define
class _Window:
    """Counts since the last progress line."""

    sent: int = 0
    delivered: int = 0
    cursor: list[float] = attrs.field(factory=list)


class _Run:
    """The state every user of one run shares."""

    def __init__(self, options: LoadtestOptions) -> None:
        self.options = options
        self.run_id = secrets.token_hex(3)
        self.user_prefix = f"lt-{self.run_id}-"
        self.members: Counter[str] = Counter()  # connected traffic users per project
        self.sent: Counter[str] = Counter({"cursor": 0, "edit": 0, "comment": 0})
        self.acked: Counter[str] = Counter({"edit": 0, "comment": 0})
        self.applied = 0
        self.offered = 0
        self.delivered: Counter[str] = Counter({"cursor": 0, "edit": 0, "comment": 0})
        self.cursor_latency = array("d")
        self.ack_latency = array("d")
        self.fanout_latency = array("d")
        self.errors: Counter[str] = Counter()
        self.error_messages: dict[str, str] = {}
        self.closes: Counter[str] = Counter()
        self.edit_sent_at: dict[str, float] = {}
        self.comment_sent_at: dict[str, float] = {}
        self.conflicts_requested = 0
        self.conflicts_detected = 0
        self.shared_base: dict[str, int] = {}
        self.connected = 0
        self.received_bytes = 0  # by the traffic users, during the run
        self.sent_bytes = 0
        self.window = _Window()
        self.traffic_end = math.inf  # trio clock
        #: Deliveries are counted until the drain ends (not while closing).
        self.counting = True
        #: This process's CPU seconds over the traffic, for the summary.
        self.cpu_seconds = 0.0

    def error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        self.error_messages.setdefault(code, message[:200])

    def user_id(self, name: str) -> str:
        return self.user_prefix + name

    def token(self, user_id: str, project: str, role: str) -> str:
        claims = token_claims(user_id=user_id, project_id=project, role=role,  # type: ignore[arg-type]
                              name=f"Load {user_id.rsplit('-', 1)[-1]}",
                              ttl=self.options.duration + 3600)  # fmt: skip
        return sign_token(claims, self.options.secret)


class _Peer(Connection):
    """A connection that speaks the protocol: hello, requests with refs, pushes in order."""

    def __init__(self, run: _Run, url: str, user_id: str, project: str, role: str) -> None:
        super().__init__()
        self.run = run
        self.url = url
        self.user_id = user_id
        self.project = project
        self.role = role
        self.welcome: dict[str, Any] = {}
        self._refs = 1
        self._waiters: dict[int, list[Any]] = {}  # ref -> [event, envelope]
        self._inbox: list[dict[str, Any]] = []
        self._arrived = trio.Event()
        self.keep_pushes = False

    async def start(self, nursery: trio.Nursery) -> None:
        """Connect, start reading, say hello.

        Raises:
            HandshakeRefused, OSError: the connection failed.
            Unreachable: the server refused the hello (the message names its error).
        """
        parts = urlsplit(self.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        tls = parts.scheme == "wss"
        await self.open(parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80),
                        target, tls=tls)  # fmt: skip
        nursery.start_soon(self.read)
        token = self.run.token(self.user_id, self.project, self.role)
        reply = await self.request("hello", {"token": token, "project_id": self.project})
        if reply.get("type") != "welcome":
            data = reply.get("data") or {}
            raise Unreachable(f"the server refused the hello: {data.get('code')}: "
                              f"{data.get('message')}")  # fmt: skip
        self.welcome = reply["data"]

    async def request(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send ``kind`` with a new ref and wait for its reply ({} if the connection ends);
        the caller bounds the wait."""
        ref = self.next_ref()
        waiter: list[Any] = [trio.Event(), {}]
        self._waiters[ref] = waiter
        await self.send_json({"type": kind, "ref": ref, "data": data})
        await waiter[0].wait()
        return waiter[1]  # type: ignore[no-any-return]

    def next_ref(self) -> int:
        ref = self._refs
        self._refs += 1
        return ref

    async def expect(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first kept push ``predicate`` accepts (the caller bounds the wait)."""
        index = 0
        while True:
            while index >= len(self._inbox):
                if not self.alive:
                    raise trio.BrokenResourceError("the connection ended")
                await self._arrived.wait()
            if predicate(self._inbox[index]):
                return self._inbox.pop(index)
            index += 1

    # -- the reader's hooks --------------------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        for envelope in envelopes(_loads(payload)):
            self.on_envelope(envelope)

    def on_envelope(self, envelope: dict[str, Any]) -> None:
        ref = envelope.get("ref")
        if ref is not None:
            waiter = self._waiters.pop(ref, None)
            if waiter is not None:
                waiter[1] = envelope
                waiter[0].set()
                return
        if envelope.get("type") == "error":
            data = envelope.get("data") or {}
            self.run.error(str(data.get("code")), str(data.get("message")))
        if self.keep_pushes:
            self._inbox.append(envelope)
            del self._inbox[:-256]
            self._arrived.set()
            self._arrived = trio.Event()

    def on_close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.run.closes[str(code)] += 1

    def on_lost(self, why: str) -> None:
        self.run.closes[why] += 1

    def on_reader_error(self, exc: Exception) -> None:
        self.run.error("client", f"{type(exc).__name__}: {exc}")

    async def read(self) -> None:
        try:
            await super().read()
        finally:
            for waiter in self._waiters.values():
                waiter[0].set()
            self._waiters.clear()
            self._arrived.set()


class _User(_Peer):
    """One simulated person: cursor moves, edits of its own clip, comments on it."""

    def __init__(self, run: _Run, index: int) -> None:
        options = run.options
        project = f"{options.project_prefix}-{index % options.projects}"
        super().__init__(run, options.urls[index % len(options.urls)],
                         run.user_id(f"u{index}"), project, "editor")  # fmt: skip
        self.index = index
        self.clip = f"{run.user_prefix}clip-{index}"
        self.shared = f"{run.user_prefix}shared"
        self.base: int | None = None
        self.pending: dict[int, tuple[str, float]] = {}  # ref -> (kind, sent ms)
        self.pending_empty = trio.Event()
        self.edits = 0
        self.comments = 0
        self.member = False
        self.has_clip = False

    async def prepare(self, *, creator: bool) -> None:
        """Insert this user's clip (and, for the project's creator, the shared clip); a user
        whose clip was not acked edits and comments nothing."""
        options = self.run.options
        if creator and options.conflict_rate > 0:
            seq = await self._insert(self.shared, "shared")
            if seq is not None:
                self.run.shared_base[self.project] = seq
        if options.edit_every > 0 or options.comment_every > 0:
            self.base = await self._insert(self.clip, f"Clip {self.index}")
            self.has_clip = self.base is not None

    async def _insert(self, element_id: str, name: str) -> int | None:
        op = {"op": "insert", "element_id": element_id, "element_type": "clip",
              "props": {"name": name, "start": 0, "duration": 1000}}  # fmt: skip
        reply = await self.request("timeline_change", {"change_id": f"{element_id}-insert",
                                                       "changes": [op]})  # fmt: skip
        data = reply.get("data") or {}
        if reply.get("type") != "ack" or data.get("status") not in ("applied", "duplicate"):
            return None
        seq = data.get("seq")
        return seq if isinstance(seq, int) else None

    def join_traffic(self) -> None:
        self.member = True
        self.run.members[self.project] += 1

    def leave_traffic(self) -> None:
        if self.member:
            self.member = False
            self.run.members[self.project] -= 1

    # -- sending -------------------------------------------------------------------------------

    async def traffic(self, start: float, end: float) -> None:
        """Send from ``start`` to ``end`` (trio clock), skipping what falls behind by more than a
        period rather than bursting."""
        options = self.run.options
        seed = None if options.seed is None else options.seed * 1_000_003 + self.index
        rng = random.Random(seed)
        periods = {
            "cursor": 1 / options.cursor_hz if options.cursor_hz > 0 else math.inf,
            "edit": (options.edit_every or math.inf) if self.has_clip else math.inf,
            "comment": (options.comment_every or math.inf) if self.has_clip else math.inf,
        }
        due = {kind: start + rng.random() * period if period != math.inf else math.inf
               for kind, period in periods.items()}  # fmt: skip
        position = [rng.uniform(0, 1920), rng.uniform(0, 1080)]
        try:
            while self.alive:
                kind = min(due, key=due.__getitem__)
                when = due[kind]
                if when >= end:
                    return
                await trio.sleep_until(when)
                if not self.alive:
                    return
                period = periods[kind]
                late = trio.current_time() - when
                due[kind] = when + period * (1 + int(late / period) if late > period else 1)
                if kind == "cursor":
                    await self._cursor(rng, position)
                elif kind == "edit":
                    await self._edit(rng)
                else:
                    await self._comment()
        except NET_ERRORS:
            return  # the reader records how the connection ended

    def _offer(self, kind: str) -> None:
        run = self.run
        run.sent[kind] += 1
        run.window.sent += 1
        run.offered += max(run.members[self.project] - (1 if self.member else 0), 0)

    async def _cursor(self, rng: random.Random, position: list[float]) -> None:
        position[0] = min(1920.0, max(0.0, position[0] + rng.uniform(-20, 20)))
        position[1] = min(1080.0, max(0.0, position[1] + rng.uniform(-20, 20)))
        at = now_ms()
        await self.send_json(
            {
                "type": "cursor_update",
                "data": {
                    "position": {"x": round(position[0], 1), "y": round(position[1], 1), "time": at}
                },
            }
        )
        self._offer("cursor")

    async def _edit(self, rng: random.Random) -> None:
        run = self.run
        self.edits += 1
        change_id = f"{self.user_id}-e{self.edits}"
        shared_base = run.shared_base.get(self.project)
        if shared_base is not None and rng.random() < run.options.conflict_rate:
            run.conflicts_requested += 1
            op: dict[str, Any] = {"op": "set", "element_id": self.shared, "prop": "name",
                                  "value": f"Shared, take {self.edits} by {self.index}",
                                  "base": shared_base}  # fmt: skip
        else:
            op = {"op": "set", "element_id": self.clip, "prop": "start",
                  "value": rng.randrange(0, 600_000)}  # fmt: skip
            if self.base is not None:
                op["base"] = self.base
        await self._request("edit", "timeline_change",
                            {"change_id": change_id, "changes": [op]}, change_id)  # fmt: skip

    async def _comment(self) -> None:
        self.comments += 1
        comment_id = f"{self.user_id}-c{self.comments}"
        comment = {"id": comment_id, "text": f"Note {self.comments} from user {self.index}",
                   "element_id": self.clip, "time": self.comments * 1000}  # fmt: skip
        await self._request("comment", "comment_add", {"comment": comment}, comment_id)

    async def _request(self, kind: str, message: str, data: dict[str, Any], key: str) -> None:
        ref = self.next_ref()
        at = now_ms()
        (self.run.edit_sent_at if kind == "edit" else self.run.comment_sent_at)[key] = at
        self.pending[ref] = (kind, at)
        self.pending_empty = trio.Event()
        await self.send_json({"type": message, "ref": ref, "data": data})
        self._offer(kind)

    # -- receiving -----------------------------------------------------------------------------

    def on_envelope(self, envelope: dict[str, Any]) -> None:
        kind = envelope.get("type")
        if kind == "collaboration_event":
            self._on_event(envelope["data"])
            return
        ref = envelope.get("ref")
        pending = self.pending.pop(ref, None) if ref is not None else None
        if pending is None:  # a reply to set-up, or a push (conflicts are counted from acks)
            super().on_envelope(envelope)
            return
        run = self.run
        if kind == "ack":
            sent_kind, at = pending
            run.acked[sent_kind] += 1
            if sent_kind == "edit":
                run.ack_latency.append(self.rx_ms - at)
                data = envelope.get("data") or {}
                run.conflicts_detected += len(data.get("conflicts") or ())
                seq = data.get("seq")
                if data.get("status") in ("applied", "partial"):
                    run.applied += 1
                if (data.get("status") in ("applied", "partial") and isinstance(seq, int)
                        and (self.base is None or seq > self.base)):  # fmt: skip
                    self.base = seq
        else:
            data = envelope.get("data") or {}
            run.error(str(data.get("code")), str(data.get("message")))
        if not self.pending:
            self.pending_empty.set()

    def _on_event(self, data: dict[str, Any]) -> None:
        run = self.run
        if not run.counting:
            return
        sender = data.get("user_id")
        if sender == self.user_id or not isinstance(sender, str):
            return
        if not sender.startswith(run.user_prefix):
            return
        kind = data.get("kind")
        payload = data.get("payload") or {}
        if kind == "cursor_update":
            at = (payload.get("position") or {}).get("time")
            if isinstance(at, float):
                run.delivered["cursor"] += 1
                run.window.delivered += 1
                latency = self.rx_ms - at
                run.cursor_latency.append(latency)
                run.window.cursor.append(latency)
        elif kind == "timeline_change":
            at = run.edit_sent_at.get(payload.get("change_id"))  # type: ignore[arg-type]
            if at is not None:
                run.delivered["edit"] += 1
                run.window.delivered += 1
                run.fanout_latency.append(self.rx_ms - at)
        elif kind == "comment_add":
            comment_id = (payload.get("comment") or {}).get("id")
            if comment_id in run.comment_sent_at:
                run.delivered["comment"] += 1
                run.window.delivered += 1

    def on_close(self, code: int, reason: str) -> None:
        self.leave_traffic()
        super().on_close(code, reason)

    def on_lost(self, why: str) -> None:
        self.leave_traffic()
        super().on_lost(why)

    async def read(self) -> None:
        try:
            await super().read()
        finally:
            self.leave_traffic()
            self.pending_empty.set()


# -- live streams -------------------------------------------------------------------------------


@attrs.define
class _StreamResult:
    frames: int = 0
    seconds: float = 0.0
    received_bytes: int = 0
    error: str | None = None

    def wire(self) -> dict[str, Any]:
        fps = self.frames / self.seconds if self.seconds else 0.0
        kbps = self.received_bytes * 8 / self.seconds / 1000 if self.seconds else 0.0
        out: dict[str, Any] = {"viewer_fps": round(fps, 1), "bitrate_kbps": round(kbps, 1),
                               "frames": self.frames}  # fmt: skip
        if self.error:
            out["error"] = self.error
        return out


async def _offer_to_server(peer: Any, member: _Peer, session_id: str, **offer: Any) -> None:
    description = await peer.offer(**offer)
    reply = await member.request("webrtc_signal", {"session_id": session_id, "to": "server",
                                                   "description": description})  # fmt: skip
    if reply.get("type") != "ack":
        raise _StreamError(f"webrtc_signal: {(reply.get('data') or {}).get('message')}")
    answer = await member.expect(lambda env: env.get("type") == "webrtc_signal"
                                 and (env.get("data") or {}).get("from") == "server"
                                 and "description" in env["data"])  # fmt: skip
    await peer.accept(answer["data"]["description"])


class _StreamError(Exception):
    pass


async def _stream(run: _Run, index: int, ready: trio.Event, go: trio.Event,
                  result: _StreamResult) -> None:  # fmt: skip
    """One relay live session: a host sending synthetic video, a viewer counting what it gets.
    Sets ``ready`` once video flows (or the set-up failed, recorded in ``result``), counts from
    ``go`` until the run ends."""
    from ._webrtc import PeerError, Source, open_peer  # only loadtests with streams need aiortc

    options = run.options
    project = f"{options.project_prefix}-{index % options.projects}"
    url = options.urls[index % len(options.urls)]
    host = _Peer(run, url, run.user_id(f"host{index}"), project, "editor")
    viewer = _Peer(run, url, run.user_id(f"viewer{index}"), project, "viewer")
    deadline = trio.current_time() + _STREAM_SETUP_S
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_at(deadline):
                    for member in (host, viewer):
                        member.keep_pushes = True
                        await member.start(nursery)
                    session_id, ice = await _live(host, "live_start",
                                                  {"kind": "camera", "mode": "relay"})  # fmt: skip
                async with open_peer(ice_servers=ice, listen_ips=options.media_ips) as sending:
                    with trio.fail_at(deadline):
                        source = Source(width=640, height=360, fps=15)
                        await _offer_to_server(sending, host, session_id, send=source)
                        await _live(viewer, "live_join", {"session_id": session_id})
                    async with open_peer(ice_servers=ice, listen_ips=options.media_ips) as seeing:
                        with trio.fail_at(deadline):
                            await _offer_to_server(seeing, viewer, session_id, receive=True)
                            await seeing.frames(1)
                        ready.set()
                        await go.wait()
                        started = trio.current_time()
                        received = seeing.rtp_bytes
                        with trio.move_on_at(run.traffic_end):
                            while True:
                                result.frames += len(await seeing.frames(1))
                        result.seconds = trio.current_time() - started
                        result.received_bytes = seeing.rtp_bytes - received
                    with trio.move_on_after(_CLOSE_S):
                        await host.request("live_stop", {"session_id": session_id})
            finally:
                nursery.cancel_scope.cancel()
                for member in (host, viewer):
                    await member.aclose()
    except trio.TooSlowError:
        result.error = f"no video within {_STREAM_SETUP_S:g} s"
    except (_StreamError, PeerError, Unreachable, HandshakeRefused, *NET_ERRORS) as exc:
        result.error = str(exc) or type(exc).__name__
    finally:
        ready.set()


async def _live(member: _Peer, kind: str, data: dict[str, Any]) -> tuple[str, Any]:
    """Send a live session request; the session id and ICE servers of its ack.

    Raises:
        _StreamError: it was refused (the message is the server's).
    """
    reply = await member.request(kind, data)
    answer = reply.get("data") or {}
    if reply.get("type") != "ack":
        raise _StreamError(f"{kind}: {answer.get('code')}: {answer.get('message')}")
    return str(answer.get("session_id", data.get("session_id"))), answer.get("ice_servers") or ()


# -- the run ------------------------------------------------------------------------------------


async def run_loadtest(
    options: LoadtestOptions, *, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the load test; the summary of docs/protocol.md §1 (the ``--json`` object).

    ``progress`` is called about once a second while traffic runs.

    Raises:
        Unreachable: the first user could not connect, or was refused.
    """
    run = _Run(options)
    users = [_User(run, index) for index in range(options.users)]
    streams = [_StreamResult() for _ in range(options.streams)]
    unreachable: Unreachable | None = None
    async with trio.open_nursery() as nursery:
        try:
            await _connect(run, users, nursery)
            await _drive(run, [user for user in users if user.alive], streams, progress)
        except Unreachable as exc:  # raised here, not inside the nursery's exception group
            unreachable = exc
        finally:
            nursery.cancel_scope.cancel()
            for user in users:
                await user.aclose()
    if unreachable is not None:
        raise unreachable
    return _summary(run, streams, run.cpu_seconds / options.duration * 100)


async def _drive(
    run: _Run,
    connected: list[_User],
    streams: list[_StreamResult],
    progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Prepare the connected users' clips, start the streams, run the traffic, drain, close."""
    options = run.options
    run.connected = len(connected)
    await _prepare(run, connected)
    go = trio.Event()
    async with trio.open_nursery() as traffic:
        readiness = []
        for index, result in enumerate(streams):
            ready = trio.Event()
            readiness.append(ready)
            traffic.start_soon(_stream, run, index, ready, go, result)
        for ready in readiness:
            await ready.wait()
        start = trio.current_time() + 0.05
        run.traffic_end = start + options.duration
        for user in connected:
            if user.alive:
                user.join_traffic()
                traffic.start_soon(user.traffic, start, run.traffic_end)
        go.set()
        traffic.start_soon(_report, run, start, progress)
        me = psutil.Process()
        cpu = cpu_seconds(me, children=False)
        received = sum(user.received_bytes for user in connected)
        sent = sum(user.sent_bytes for user in connected)
        await trio.sleep_until(run.traffic_end)
        run.cpu_seconds = cpu_seconds(me, children=False) - cpu
        run.received_bytes = sum(user.received_bytes for user in connected) - received
        run.sent_bytes = sum(user.sent_bytes for user in connected) - sent
        await _drain(connected, options.settle_timeout)
        run.counting = False
        traffic.cancel_scope.cancel()
    await _close(connected, options.settle_timeout / 2)


async def _prepare(run: _Run, users: Sequence[_User]) -> None:
    """Insert the users' clips, several at a time, all within three connect timeouts; the
    first user of each project also creates the shared clip. A user whose insert was not
    acked in time sends only cursors (the summary's errors say how many)."""
    options = run.options
    limit = trio.CapacityLimiter(_CONNECT_CONCURRENCY)
    creators: set[str] = set()

    async def prepare(user: _User, creator: bool) -> None:
        async with limit:
            await user.prepare(creator=creator)

    with trio.move_on_after(3 * options.connect_timeout):
        async with trio.open_nursery() as preparing:
            for user in users:
                preparing.start_soon(prepare, user, user.project not in creators)
                creators.add(user.project)
    wanted = options.edit_every > 0 or options.comment_every > 0
    missing = sum(1 for user in users if wanted and not user.has_clip)
    if missing:
        run.errors["prepare"] += missing
        run.error_messages["prepare"] = "clips not acked in time: those users sent cursors only"


async def _connect(run: _Run, users: Sequence[_User], nursery: trio.Nursery) -> None:
    """Connect every user, the first alone so an unreachable server is said at once.

    Raises:
        Unreachable: the first user could not connect, or was refused.
    """
    options = run.options
    if not users:
        return
    first = users[0]
    try:
        with trio.fail_after(options.connect_timeout):
            await first.start(nursery)
    except trio.TooSlowError:
        raise Unreachable(f"{first.url}: no welcome within {options.connect_timeout:g} s") from None
    except (HandshakeRefused, OSError) as exc:
        raise Unreachable(f"{first.url}: {_why(exc)}") from None
    except Unreachable as exc:
        raise Unreachable(f"{first.url}: {exc}") from None
    except NET_ERRORS as exc:
        raise Unreachable(f"{first.url}: the connection failed ({_why(exc)})") from None
    limit = trio.CapacityLimiter(_CONNECT_CONCURRENCY)

    async def connect(user: _User) -> None:
        async with limit:
            try:
                with trio.fail_after(options.connect_timeout):
                    await user.start(nursery)
            except trio.TooSlowError:
                run.error("connect", f"no welcome within {options.connect_timeout:g} s")
            except (HandshakeRefused, Unreachable, *NET_ERRORS) as exc:
                run.error("connect", _why(exc))
            if not user.alive:
                await user.aclose()

    async with trio.open_nursery() as connecting:
        for user in users[1:]:
            connecting.start_soon(connect, user)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__


async def _drain(users: Sequence[_User], timeout: float) -> None:  # noqa: ASYNC109
    """Wait (up to ``timeout`` s) for every pending ack, then one ping round trip per user, so
    what the server sent before it has arrived."""
    with trio.move_on_after(timeout):
        for user in users:
            if user.pending and user.alive:
                await user.pending_empty.wait()
        async with trio.open_nursery() as pinging:
            for user in users:
                if user.alive:
                    pinging.start_soon(user.request, "ping", {})


async def _close(users: Sequence[_User], timeout: float) -> None:  # noqa: ASYNC109
    async with trio.open_nursery() as closing:
        for user in users:
            user.leave_traffic()
            closing.start_soon(user.close, timeout)


async def _report(
    run: _Run, start: float, progress: Callable[[dict[str, Any]], None] | None
) -> None:
    if progress is None:
        return
    last = start
    await trio.sleep_until(start)
    while last + 1.0 <= run.traffic_end + 0.01:  # none during the drain
        await trio.sleep_until(last + 1.0)
        now = trio.current_time()
        window, run.window = run.window, _Window()
        span = now - last
        last = now
        progress({
            "elapsed_s": now - start,
            "duration_s": run.options.duration,
            "users": sum(run.members.values()),
            "users_total": run.options.users,
            "sent_per_s": window.sent / span,
            "delivered_per_s": window.delivered / span,
            "cursor_p99_ms": percentiles(window.cursor, (99,))["p99"],
            "errors": sum(run.errors.values()),
        })  # fmt: skip


def _summary(run: _Run, streams: Sequence[_StreamResult], cpu_percent: float) -> dict[str, Any]:
    options = run.options
    duration = options.duration

    def latency(samples: array[float]) -> dict[str, Any]:
        return {key: None if value is None else round(value, 2)
                for key, value in percentiles(samples).items()}  # fmt: skip

    users = max(run.connected, 1)
    summary: dict[str, Any] = {
        "users": run.connected,
        "projects": options.projects,
        "duration_s": duration,
        "sent": dict(run.sent),
        "acked": dict(run.acked),
        "applied": run.applied,
        "offered_per_s": round(run.offered / duration, 1),
        "delivered_per_s": round(run.delivered.total() / duration, 1),
        "delivered": dict(run.delivered),
        "latency_ms": {
            "cursor": latency(run.cursor_latency),
            "edit_ack": latency(run.ack_latency),
            "edit_fanout": latency(run.fanout_latency),
        },
        "errors": dict(run.errors),
        "closes": dict(run.closes),
        "bytes_per_user_per_s": round(run.received_bytes / users / duration, 1),
        "bytes_sent_per_user_per_s": round(run.sent_bytes / users / duration, 1),
        "conflicts": {"requested": run.conflicts_requested, "detected": run.conflicts_detected},
        "loadgen_cpu_percent": round(cpu_percent, 1),
        "run_id": run.run_id,
    }
    if options.streams:
        summary["streams"] = [stream.wire() for stream in streams]
    return summary


# -- what it prints -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} x{value}" for key, value in sorted(counts.items())) or "none"


def format_summary(summary: dict[str, Any], urls: Sequence[str]) -> str:
    """The summary as the table printed at the end of a run."""
    duration = summary["duration_s"]
    sent, acked = summary["sent"], summary["acked"]
    offered, delivered = summary["offered_per_s"], summary["delivered_per_s"]
    share = f" ({100 * delivered / offered:.1f} % of offered)" if offered else ""
    lines = [
        f"crealia loadtest: {summary['users']} users in {summary['projects']} projects for "
        f"{duration:g} s against {', '.join(urls)}",
        "",
        f"  {'sent':<22}{'total':>10}{'per s':>10}",
        f"  {'cursor moves':<22}{sent['cursor']:>10,}{sent['cursor'] / duration:>10.1f}",
        f"  {'edits':<22}{sent['edit']:>10,}{sent['edit'] / duration:>10.1f}"
        f"   acked {acked['edit']:,}, applied {summary['applied']:,}",
        f"  {'comments':<22}{sent['comment']:>10,}{sent['comment'] / duration:>10.1f}"
        f"   acked {acked['comment']:,}",
        "",
        f"  deliveries offered {offered:,.1f}/s, delivered {delivered:,.1f}/s{share}",
        "",
        f"  {'latency (ms)':<22}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for key, label in (("cursor", "cursor"), ("edit_ack", "edit ack"),
                       ("edit_fanout", "edit fan-out")):  # fmt: skip
        row = summary["latency_ms"][key]
        lines.append(f"  {label:<22}{_ms(row['p50']):>10}{_ms(row['p95']):>10}"
                     f"{_ms(row['p99']):>10}")  # fmt: skip
    conflicts = summary["conflicts"]
    lines += [
        "",
        f"  errors: {_counts(summary['errors'])}",
        f"  closes by the server: {_counts(summary['closes'])}",
        f"  conflicts: {conflicts['requested']:,} asked for, {conflicts['detected']:,} detected",
        f"  bytes per user per s: {summary['bytes_per_user_per_s']:,.0f} received, "
        f"{summary['bytes_sent_per_user_per_s']:,.0f} sent",
    ]
    for index, stream in enumerate(summary.get("streams", ())):
        state = f"  ({stream['error']})" if stream.get("error") else ""
        lines.append(
            f"  stream {index}: viewer at {stream['viewer_fps']:.1f} fps, "
            f"{stream['bitrate_kbps']:,.0f} kbit/s, {stream['frames']:,} frames{state}"
        )
    if summary["errors"].get("connect") or summary["closes"].get("4429"):
        lines.append("  (users were refused: the server's per-address limits count every user "
                     "of this machine as one client; see docs/protocol.md §1)")  # fmt: skip
    lines.append(f"  load generator CPU: {summary['loadgen_cpu_percent']:.0f} % of a core"
                 + ("  (near 100 %: the generator, not the server, was the limit)"
                    if summary["loadgen_cpu_percent"] >= 90 else ""))  # fmt: skip
    return "\n".join(lines)


class Progress:
    """The live line on a terminal (rewritten in place), or a plain line every ``every``
    seconds elsewhere."""

    def __init__(self, out: TextIO, *, every: float = 5.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self._last_plain = -math.inf
        self._shown = False

    def __call__(self, figures: dict[str, Any]) -> None:
        line = (f"{figures['elapsed_s']:6.0f}/{figures['duration_s']:g} s  "
                f"users {figures['users']}/{figures['users_total']}  "
                f"sent {figures['sent_per_s']:,.0f}/s  "
                f"delivered {figures['delivered_per_s']:,.0f}/s  "
                f"cursor p99 {_ms(figures['cursor_p99_ms'])} ms  "
                f"errors {figures['errors']}")  # fmt: skip
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self._shown = True
        elif figures["elapsed_s"] - self._last_plain >= self.every:
            self._last_plain = figures["elapsed_s"]
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        """End the live line (nothing if none was shown)."""
        if self._shown:
            self.out.write("\n")
            self.out.flush()


def parse_duration(raw: str) -> float:
    """Seconds of ``raw``: a number with an optional unit, ``ms``, ``s``, ``m`` or ``h``
    (``10m``, ``5s``, ``1.5h``, ``90``).

    Raises:
        ValueError: anything else, or not more than 0.
    """
    text = raw.strip().lower()
    number, scale = text, 1.0
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], factor
            break
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ValueError(f"{raw!r} is not a duration (e.g. 90, 30s, 10m, 1h)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{raw!r} is not a duration (e.g. 90, 30s, 10m, 1h)")
    return seconds


def run_command(options: LoadtestOptions, *, as_json: bool) -> int:
    """``crealia loadtest`` once its arguments are checked: 0 when the run completed, 1 when
    the server could not be reached."""
    progress = Progress(sys.stderr)
    try:
        with warnings.catch_warnings():
            # A short secret is the server's to refuse; PyJWT's warning is noise here.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            summary = trio.run(lambda: run_loadtest(options, progress=progress))
    except Unreachable as exc:
        progress.done()
        print(f"crealia loadtest: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.done()
        print("crealia loadtest: interrupted", file=sys.stderr)
        return 130
    progress.done()
    table = format_summary(summary, options.urls)
    if as_json:
        print(table, file=sys.stderr)
        sys.stdout.write(_dumps(summary).decode() + "\n")
    else:
        print(table)
    sys.stdout.flush()
    return 0
