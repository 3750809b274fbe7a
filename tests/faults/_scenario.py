"""What every fault scenario shares: writers that survive faults, replicas, and the checks.

A :class:`Writer` is a client that keeps editing through faults, the way docs/protocol.md §6
asks a client to: it keeps a window of unacknowledged changes, and after a reconnect it sends
``hello`` with ``resume`` (its replica's ``seq`` and its welcome's ``epoch``) and resends every
unacknowledged change with the same ``change_id``. A ``duplicate`` ack counts as the change's
(one) ack. ``overloaded`` and ``rate_limited`` answers are resent after a short wait.

A :class:`Replica` is a member's document: the welcome's snapshot plus every durable event
after it. It counts the gaps (a ``seq`` skipped) and the duplicates (a ``seq`` applied twice)
it sees, including across resumes, so "exact resume" is checked on every reconnect.

:func:`verify` ends a scenario: every writer drains its window and catches up with the head;
then a fresh member's snapshot, a full replay from 0 and a replay from the middle are compared
with what was acknowledged. :func:`report` prints the counts and writes them to
``test-artifacts/faults/<name>.json``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import statistics
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from crealia import TokenAuthority

from .._wsclient import RawClient

SECRET = "faults-test-secret-0123456789abcdef"
PROJECT = "p1"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "faults"
#: Full versions run with CREALIA_FAULTS_FULL=1 (make test-faults).
FULL = os.environ.get("CREALIA_FAULTS_FULL") == "1"

#: What a broken or refused connection raises, whichever layer notices first.
LOST = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
)


def token(user: str, role: str = "editor", project: str = PROJECT) -> str:
    return TokenAuthority(SECRET).issue(user_id=user, project_id=project, role=role)


class Refused(Exception):
    """The server answered ``hello`` with an error (overloaded while it starts, ...)."""


@attrs.define(eq=False)
class Replica:
    """A member's document from its welcome snapshot and every durable event after it.

    It keeps what a snapshot holds (``elements`` and their ``versions``, docs/protocol.md §5),
    applying a ``conflict_resolved``'s ``changes`` as a ``timeline_change``'s operations, so
    that at the same ``seq`` it equals the server's snapshot exactly, versions included.
    """

    seq: int = 0
    elements: dict[str, Any] = attrs.Factory(dict)
    #: element id -> prop -> the seq that last wrote it (a snapshot's ``versions``).
    versions: dict[str, dict[str, int]] = attrs.Factory(dict)
    loaded: bool = False
    gaps: int = 0
    duplicates: int = 0
    #: seq -> change id of every timeline change applied (not those in a loaded snapshot).
    log: dict[int, str] = attrs.Factory(dict)
    #: seq -> comment id of every comment applied, and -> conflict id of every resolution.
    comments: dict[int, str] = attrs.Factory(dict)
    resolutions: dict[int, str] = attrs.Factory(dict)

    def load(self, snapshot: dict[str, Any]) -> None:
        self.seq = snapshot["seq"]
        self.elements = copy.deepcopy(snapshot["elements"])
        self.versions = copy.deepcopy(snapshot.get("versions", {}))
        self.loaded = True

    def snapshot_view(self) -> dict[str, Any]:
        """What a snapshot of the server at :attr:`seq` holds (without ``project_id``)."""
        return {"seq": self.seq, "elements": self.elements, "versions": self.versions}

    def apply(self, envelope: dict[str, Any]) -> bool:
        """Apply a durable event; True if ``envelope`` was one."""
        kind, data = envelope.get("type"), envelope.get("data") or {}
        durable = kind == "conflict_resolved" or (
            kind == "collaboration_event" and data.get("seq") is not None
        )
        if not durable:
            return False
        seq = data["seq"]
        if seq <= self.seq:
            self.duplicates += 1
            return True
        self.gaps += seq - self.seq - 1
        self.seq = seq
        if kind == "conflict_resolved":
            self.resolutions[seq] = data["conflict_id"]
            if "changes" in data:
                self._ops(data["changes"], seq)
                return True
            # A resolution stored before they carried their changes: its value only.
            value = data["resolution"]["value"]
            if data["prop"] is not None:
                self.elements[data["element_id"]]["props"][data["prop"]] = value
            elif value is None:
                self.elements.pop(data["element_id"], None)
            else:
                self.elements[data["element_id"]]["props"] = dict(value)
        elif data["kind"] == "timeline_change":
            self.log[seq] = data["payload"]["change_id"]
            self._ops(data["payload"]["changes"], seq)
        elif data["kind"] == "comment_add":
            self.comments[seq] = data["payload"]["comment"]["id"]
        return True

    def _ops(self, ops: list[dict[str, Any]], seq: int) -> None:
        for op in ops:
            eid = op["element_id"]
            if op["op"] == "insert":
                self.elements[eid] = {"type": op["element_type"], "props": dict(op["props"])}
                self.versions[eid] = dict.fromkeys(op["props"], seq)
            elif op["op"] == "set":
                if eid in self.elements:  # as the server's document: a set on nothing is none
                    self.elements[eid]["props"][op["prop"]] = op["value"]
                    self.versions[eid][op["prop"]] = seq
            else:
                self.elements.pop(eid, None)
                self.versions.pop(eid, None)


async def connect(nursery: trio.Nursery, url: str) -> RawClient:
    """A raw client, its WebSocket's reader task in ``nursery``, within 2 s.

    The TCP stream is opened here so that a handshake that never completes (a proxy that
    accepted and closed, a stalled link) is bounded and its socket closed.
    """
    rest = url.removeprefix("ws://")
    address, _, path = rest.partition("/")
    host, _, port = address.rpartition(":")
    with trio.fail_after(2):
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            ws = await nursery.start(_websocket, stream, host, "/" + path)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return RawClient(ws)


async def _websocket(
    stream: trio.SocketStream,
    host: str,
    resource: str,
    *,
    task_status: trio.TaskStatus[trio_websocket.WebSocketConnection],
) -> None:
    """The WebSocket on ``stream``, its reader in a nursery of its own for as long as it runs.

    trio-websocket's reader answers a ping that arrives while our close handshake is under way
    with a pong that wsproto refuses (``LocalProtocolError``, python-trio/trio-websocket#184):
    that ends this connection (its close then times out), not the whole scenario."""
    ws: trio_websocket.WebSocketConnection | None = None
    try:
        async with trio.open_nursery() as own:
            ws = await trio_websocket.wrap_client_stream(
                own, stream, host, resource, max_message_size=64 << 20
            )
            task_status.started(ws)
    except* LocalProtocolError:
        if ws is None or ws._wsproto.state is not ConnectionState.LOCAL_CLOSING:
            raise


async def close(client: RawClient) -> None:
    """Close politely if the peer answers soon, else drop the TCP stream."""
    with trio.move_on_after(1):
        await client.ws.aclose()
    await client.ws._close_stream()


async def join(
    client: RawClient,
    user: str,
    resume: int | None = None,
    epoch: str | None = None,
    *,
    project: str = PROJECT,
    role: str = "editor",
) -> dict[str, Any]:
    """``hello`` and its welcome's data (raises :class:`Refused` on an error)."""
    data: dict[str, Any] = {"token": token(user, role, project), "project_id": project}
    if resume is not None:
        data["resume"] = {"seq": resume} | ({"epoch": epoch} if epoch else {})
    await client.send("hello", data, ref=1)
    reply = await client.expect(lambda env: env.get("ref") == 1)
    if reply["type"] != "welcome":
        raise Refused(reply)
    welcome = dict(reply["data"])
    # A big welcome comes in chunks (docs/protocol.md §3): nothing else comes between them.
    parts = [(await client.next())["data"]["data"] for _ in range(welcome.pop("welcome_chunks", 0))]
    if parts:
        welcome.update(orjson.loads("".join(parts)))
    return welcome


def edit(change_id: str, prop: str, value: Any) -> dict[str, Any]:
    op = {"op": "set", "element_id": "clip", "prop": prop, "value": value}
    return {"change_id": change_id, "changes": [op]}


SETUP = {
    "change_id": "setup",
    "changes": [{"op": "insert", "element_id": "clip", "element_type": "clip", "props": {}}],
}


@attrs.define(eq=False)
class Writer:
    """A client that edits through faults (see the module docstring).

    ``url`` is asked again on every connection (a restarted server has new ports). Changes are
    sent at most ``rate`` a second (pacing, so a scenario loads the machine evenly), at most
    ``window`` unacknowledged at once. Change ``k`` sets ``clip.<name>-<k>`` to ``k`` (with
    ``pad``, to ``[k, "x" * pad]``, to make the traffic heavy). ``window=0``: a reader only.
    """

    name: str
    url: Callable[[], str]
    window: int = 8
    rate: float = 25.0
    pad: int = 0
    replica: Replica = attrs.Factory(Replica)
    epoch: str | None = None
    #: change id -> the seq of its ack (the first; a duplicate must say the same).
    acked: dict[str, int] = attrs.Factory(dict)
    ack_times: list[float] = attrs.Factory(list)
    #: The URL of the connection each ack (of ``ack_times``) came through.
    ack_urls: list[str] = attrs.Factory(list)
    #: The URL of the current (or last) connection.
    connected_to: str = ""
    #: Unacknowledged changes, oldest first, kept across reconnects.
    pending: dict[str, dict[str, Any]] = attrs.Factory(dict)
    duplicate_acks: int = 0
    #: Acks of one change id with two different seqs (an acknowledged edit duplicated).
    conflicting_acks: int = 0
    errors: list[dict[str, Any]] = attrs.Factory(list)
    connections: int = 0
    resumes: int = 0
    snapshot_resumes: int = 0
    #: For each resume in turn: whether it came with a snapshot (else a replay).
    resumed_with_snapshot: list[bool] = attrs.Factory(list)
    replayed: int = 0
    retried: int = 0
    #: The close code of every connection that ended (None: closed without a close frame).
    close_codes: list[int | None] = attrs.Factory(list)
    stop_writing: trio.Event = attrs.Factory(trio.Event)
    finish: trio.Event = attrs.Factory(trio.Event)
    _next: int = 0
    _refs: dict[int, str] = attrs.Factory(dict)
    _retry: collections.deque[str] = attrs.Factory(collections.deque)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, rechecked on every change of this writer."""
        while not predicate():
            await self._changed.wait()

    def value(self, change_id: str) -> Any:
        k = int(change_id.rsplit("-", 1)[1])
        return k if not self.pad else [k, "x" * self.pad]

    def first_ack_after(self, moment: float, via: Container[str] | None = None) -> float | None:
        """When the first ack after ``moment`` came (through one of the URLs ``via``)."""
        return next((t for t, url in zip(self.ack_times, self.ack_urls, strict=True)
                     if t > moment and (via is None or url in via)), None)  # fmt: skip

    async def run(self) -> None:
        """Connect, edit, reconnect after every fault, until :attr:`finish` is set."""
        while not self.finish.is_set():
            try:
                async with trio.open_nursery() as nursery:
                    url = self.url()
                    client = await connect(nursery, url)
                    self.connected_to = url
                    try:
                        await self._session(client)
                    finally:
                        with trio.CancelScope(shield=True):
                            await close(client)
            except* LOST:
                pass
            except* Refused:
                pass
            self._refs.clear()
            self._retry.clear()
            self._notify()
            if not self.finish.is_set():
                await trio.sleep(0.05)  # reconnect backoff, not synchronization

    async def _session(self, client: RawClient) -> None:
        resume = self.replica.seq if self.replica.loaded else None
        with trio.fail_after(10):
            welcome = await join(client, self.name, resume, self.epoch)
        self.connections += 1
        if resume is not None:
            self.resumes += 1
        if resume is not None:
            self.resumed_with_snapshot.append("snapshot" in welcome)
        if "snapshot" in welcome:
            if resume is not None:
                self.snapshot_resumes += 1
            self.replica.load(welcome["snapshot"])
        else:
            self.replayed += welcome["replayed"]
        self.epoch = welcome["epoch"]
        self._retry.extend(self.pending)
        self._notify()
        async with trio.open_nursery() as inner:
            inner.start_soon(self._read, client, inner)
            inner.start_soon(self._write, client, inner)

    async def _read(self, client: RawClient, inner: trio.Nursery) -> None:
        try:
            while True:
                envelope = await client.next()
                self._take(envelope, inner)
                self._notify()
        except trio_websocket.ConnectionClosed as exc:
            self.close_codes.append(exc.reason.code if exc.reason else None)
            inner.cancel_scope.cancel()
        except LOST:
            inner.cancel_scope.cancel()

    def _take(self, envelope: dict[str, Any], inner: trio.Nursery) -> None:
        if self.replica.apply(envelope):
            return
        ref = envelope.get("ref")
        change_id = self._refs.pop(ref, None) if ref is not None else None
        if change_id is None:
            return
        data = envelope.get("data") or {}
        if envelope["type"] == "ack" and data.get("status") in ("applied", "duplicate"):
            seq = data["seq"]
            first = self.acked.get(change_id)
            if first is None:
                self.acked[change_id] = seq
                self.ack_times.append(trio.current_time())
                self.ack_urls.append(self.connected_to)
            elif first != seq:
                self.conflicting_acks += 1
            if data["status"] == "duplicate":
                self.duplicate_acks += 1
            self.pending.pop(change_id, None)
        elif envelope["type"] == "error" and data.get("code") in ("overloaded", "rate_limited"):
            self.retried += 1
            wait = max(0.05, data.get("retry_after_ms", 0) / 1000)
            inner.start_soon(self._retry_later, change_id, wait)
        else:
            self.errors.append(envelope)

    async def _retry_later(self, change_id: str, wait: float) -> None:
        await trio.sleep(wait)  # the server's own retry_after, or a short backoff
        if change_id in self.pending:
            self._retry.append(change_id)
            self._notify()

    async def _write(self, client: RawClient, inner: trio.Nursery) -> None:
        refs = iter(range(2, 2**53))
        pace = 1 / self.rate
        try:
            while not self.finish.is_set():
                if self._retry:
                    change_id = self._retry.popleft()
                    if change_id not in self.pending:
                        continue
                elif not self.stop_writing.is_set() and len(self.pending) < self.window:
                    change_id = f"{self.name}-{self._next}"
                    self.pending[change_id] = edit(change_id, change_id, self.value(change_id))
                    self._next += 1
                    await trio.sleep(pace)  # pacing, not synchronization
                else:
                    await self._changed.wait()
                    continue
                ref = next(refs)
                self._refs[ref] = change_id
                await client.send("timeline_change", self.pending[change_id], ref=ref)
            inner.cancel_scope.cancel()
        except LOST:
            inner.cancel_scope.cancel()


async def setup_project(url: str) -> int:
    """Insert the ``clip`` every writer edits; returns its seq (retried until acked)."""
    with trio.fail_after(20):
        while True:
            reply: dict[str, Any] = {}
            try:
                async with trio.open_nursery() as nursery:
                    client = await connect(nursery, url)
                    try:
                        await join(client, "setup")
                        reply = await client.request("timeline_change", SETUP)
                    finally:
                        await close(client)
            except* (*LOST, Refused):
                pass
            if reply.get("type") == "ack":
                return int(reply["data"]["seq"])
            await trio.sleep(0.1)  # retry backoff


async def wait_acks(writers: list[Writer], more: int) -> None:
    """Wait until every writer has ``more`` acks past what it had when called."""
    for writer in writers:
        target = len(writer.acked) + more
        await writer.wait_until(lambda w=writer, n=target: len(w.acked) >= n)  # type: ignore[misc]


async def recovery_time(writers: list[Writer], since: float) -> float:
    """Seconds from ``since`` until every writer had an ack again (the slowest's)."""
    for writer in writers:
        await writer.wait_until(lambda w=writer: w.first_ack_after(since) is not None)  # type: ignore[misc]
    return max(w.first_ack_after(since) or since for w in writers) - since


@attrs.define
class Counts:
    """What a scenario measured; every count but ``acked`` must be 0."""

    name: str
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    gaps: int = 0
    replica_duplicates: int = 0
    replicas_diverged: int = 0
    inexact_resumes: int = 0
    unexpected_errors: int = 0
    head: int = 0
    duplicate_acks: int = 0
    retried: int = 0
    resumes: int = 0
    snapshot_resumes: int = 0
    replayed: int = 0
    recovery_s: list[float] = attrs.Factory(list)
    extra: dict[str, Any] = attrs.Factory(dict)

    def failures(self) -> dict[str, int]:
        keys = ("lost", "duplicated", "gaps", "replica_duplicates", "replicas_diverged",
                "inexact_resumes", "unexpected_errors")  # fmt: skip
        return {key: getattr(self, key) for key in keys if getattr(self, key)}


async def read_durable(client: RawClient, count: int) -> list[dict[str, Any]]:
    """The next ``count`` durable envelopes ``client`` receives (the others are skipped)."""
    events: list[dict[str, Any]] = []
    while len(events) < count:
        envelope = await client.next()
        if envelope["type"] == "conflict_resolved" or envelope["data"].get("seq") is not None:
            events.append(envelope)
    return events


async def replay_from(
    nursery: trio.Nursery, url: str, since: int, epoch: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A member resuming from ``since`` with ``epoch``: its welcome and the events replayed."""
    client = await connect(nursery, url)
    welcome = await join(client, "auditor", resume=since, epoch=epoch)
    log = await read_durable(client, welcome.get("replayed", 0))
    await close(client)
    return welcome, log


def _timeline(log: list[dict[str, Any]]) -> tuple[dict[int, str], collections.Counter[str]]:
    """The change id of every timeline change in ``log`` by seq, and how often each came."""
    by_seq: dict[int, str] = {}
    seen: collections.Counter[str] = collections.Counter()
    for envelope in log:
        change_id = envelope["data"].get("payload", {}).get("change_id")
        if envelope["type"] == "collaboration_event" and change_id is not None:
            by_seq[envelope["data"]["seq"]] = change_id
            seen[change_id] += 1
    return by_seq, seen


def _lost(
    writers: list[Writer],
    snapshot: dict[str, Any],
    by_seq: dict[int, str],
    setup_seq: int | None,
    *,
    covered: bool = False,
) -> tuple[int, int]:
    """``(acked, lost)``: the acknowledged edits (with ``covered``, only those the snapshot
    covers: ``seq`` up to its own), and those of them missing from the log at their seq or
    from the snapshot."""
    acked: dict[str, int] = {} if setup_seq is None else {"setup": setup_seq}
    expected: dict[str, Any] = {}
    for writer in writers:
        acked.update(writer.acked)
        expected.update((change_id, writer.value(change_id)) for change_id in writer.acked)
    props = snapshot["elements"].get("clip", {}).get("props", {})
    versions = snapshot["versions"].get("clip", {})
    if covered:
        acked = {change_id: seq for change_id, seq in acked.items() if seq <= snapshot["seq"]}
    lost = 0
    for change_id, seq in acked.items():
        in_log = by_seq.get(seq) == change_id
        in_snapshot = change_id == "setup" or (
            props.get(change_id) == expected[change_id] and versions.get(change_id) == seq
        )
        lost += not (in_log and in_snapshot)
    return len(acked), lost


async def checkpoint(
    url: str, writers: list[Writer], *, setup_seq: int | None = None
) -> dict[str, int]:
    """While the writers go on: a fresh member's snapshot and a replay of the whole log from 0
    (through ``url``) against every edit acknowledged so far that the snapshot covers.

    Returns ``acked`` (those edits), ``lost``, ``duplicated`` (a seq or a change twice in the
    log, a change acked with two seqs), ``gaps`` (seqs missing from the log), ``inexact`` (1
    when the replay's count is not its head) and ``head``."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fresh = await connect(nursery, url)
            welcome = await join(fresh, "auditor")
            await close(fresh)
            snapshot = welcome["snapshot"]
            full, log = await replay_from(nursery, url, 0, welcome["epoch"])
    assert "snapshot" not in full, (
        f"the log up to {full['seq']} came as a snapshot: raise the server's history_limit "
        "and replay_max_bytes above it for checkpoints"
    )
    seqs = [e["data"]["seq"] for e in log]
    by_seq, seen = _timeline(log)
    acked, lost = _lost(writers, snapshot, by_seq, setup_seq, covered=True)
    twice = len(seqs) - len(set(seqs)) + sum(n - 1 for n in seen.values())
    return {
        "acked": acked,
        "lost": lost,
        "duplicated": twice + sum(w.conflicting_acks for w in writers),
        "gaps": len(set(range(1, full["seq"] + 1)) - set(seqs)),
        "inexact": int(full.get("replayed") != full["seq"]),
        "head": snapshot["seq"],
    }


async def verify(
    url: str,
    writers: list[Writer],
    counts: Counts,
    *,
    setup_seq: int | None = None,
    replay: bool = True,
    resume_back: int | None = None,
) -> Counts:
    """Drain and stop every writer, then check what was acked against the server (see the
    module docstring). Fills ``counts``; the caller asserts ``counts.failures() == {}``.

    ``replay=False``: the log is not read with a resume from 0 (a server whose replays are
    capped below the log's size answers it with a snapshot) but put together from the
    writers' replicas. The exact-resume probe resumes ``resume_back`` events before the head
    (half the log by default)."""
    with trio.fail_after(60):
        for writer in writers:
            writer.stop_writing.set()
            writer._notify()
        for writer in writers:
            await writer.wait_until(lambda w=writer: not w.pending)  # type: ignore[misc]
        async with trio.open_nursery() as nursery:
            fresh = await connect(nursery, url)
            welcome = await join(fresh, "auditor")
            snapshot, epoch = welcome["snapshot"], welcome["epoch"]
            head = counts.head = snapshot["seq"]
            for writer in writers:
                await writer.wait_until(lambda w=writer: w.replica.seq >= head)  # type: ignore[misc]
                writer.finish.set()
                writer._notify()
            by_seq: dict[int, str] = {}
            seen: collections.Counter[str] = collections.Counter()
            if replay:
                # The whole log, from 0: one event per seq, 1..head.
                full, log = await replay_from(nursery, url, 0, epoch)
                counts.inexact_resumes += full.get("replayed") != head
                seqs = [e["data"]["seq"] for e in log]
                counts.duplicated += len(seqs) - len(set(seqs))
                by_seq, seen = _timeline(log)
            else:
                for writer in writers:
                    by_seq.update(writer.replica.log)
                if setup_seq is not None:
                    by_seq.setdefault(setup_seq, "setup")
                seqs = list(by_seq)
                seen.update(by_seq.values())
            counts.gaps += len(set(range(1, head + 1)) - set(seqs))
            counts.duplicated += sum(n - 1 for n in seen.values())
            # From the middle: exactly the missing events.
            middle = head // 2 if resume_back is None else max(0, head - resume_back)
            _resumed, tail = await replay_from(nursery, url, middle, epoch)
            counts.inexact_resumes += [e["data"]["seq"] for e in tail] != list(
                range(middle + 1, head + 1)
            )
            await close(fresh)
    for writer in writers:
        counts.duplicated += writer.conflicting_acks
        counts.gaps += writer.replica.gaps
        counts.replica_duplicates += writer.replica.duplicates
        counts.replicas_diverged += writer.replica.elements != snapshot["elements"]
        counts.unexpected_errors += len(writer.errors)
        counts.duplicate_acks += writer.duplicate_acks
        counts.retried += writer.retried
        counts.resumes += writer.resumes
        counts.snapshot_resumes += writer.snapshot_resumes
        counts.replayed += writer.replayed
    counts.acked, lost = _lost(writers, snapshot, by_seq, setup_seq)
    counts.lost += lost
    return counts


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(counts: Counts) -> dict[str, Any]:
    """Print ``counts`` (seen with ``-s``) and write them to test-artifacts/faults/."""
    body = attrs.asdict(counts)
    if counts.recovery_s:
        body["recovery_max_s"] = round(max(counts.recovery_s), 3)
        body["recovery_median_s"] = round(statistics.median(counts.recovery_s), 3)
    body["recovery_s"] = [round(value, 3) for value in counts.recovery_s]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{counts.name}.json").write_bytes(
        orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    )
    print(f"\n[faults] {counts.name}: {json.dumps(body, sort_keys=True)}")
    return body
