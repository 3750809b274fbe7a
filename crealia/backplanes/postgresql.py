"""The PostgreSQL backplane: PostgreSQL as the store of record, for one process or a cluster.

Registered as ``postgresql`` (and ``postgres``) in the ``crealia.backplanes`` entry-point group:
``--database postgresql://user:password@host:5432/db``, ``DATABASE_URL``, or ``--backplane`` with
such a URL. Any number of processes on one database serve every project; each committed event
is in PostgreSQL (``synchronous_commit = on``) before it is acknowledged.

**Sequencing** is in the database. Each process keeps a mirror of every project it serves (the
document at some ``seq``, recent history, roles), prepares a write against it with the pure code
the other built-ins share (``crealia._sequencing``), and hands it to the writer task. The writer
commits what is queued in one transaction, a savepoint per write (a group commit), each write
doing: ``SELECT … FOR UPDATE`` on the project's row in ``projects``; refuse a used change or
comment id (``duplicate``) or a settled conflict; check the row's ``seq`` is the one the mirror
was prepared at (else the events after it come back, the mirror catches up and the write is
prepared again); check the pending-conflict quotas on the row's counters; insert the event at
``seq + 1``, the change or comment, the conflicts, the author's role; bump ``seq``;
``pg_notify``. The row lock makes two processes' writes to one project take turns, so seqs are
gap-free across the cluster and no conflict goes undetected. Writes of several projects in one
batch lock their rows in project order (no deadlock between two processes' batches).

**Fan-out.** The writer's own process hears an event when its commit returns (before the write
returns, so an ack never overtakes it). Other processes hear of it through ``LISTEN/NOTIFY`` (a
notice per write: project, seq, conflict ids, node), on a dedicated connection read by one
listener thread; a notice only says "read the table from your seq": the events themselves are
read by ``seq``, so a missed notice costs nothing but delay. A poller compares every open
project's ``seq`` with the mirror's every :attr:`PostgreSQLBackplane.poll_interval` seconds, and
every mirror catches up when the listener reconnects, so delivery is bounded with the listener
down.

**Redis beside it** (``--database`` plus ``--redis``, the recommended cluster): an optional
:class:`~crealia.backplanes._redisbus.RedisBus`, the Redis backplane's own presence, ephemeral
pub/sub and rate-limit code, carries what may be lost. Then
:attr:`~PostgreSQLBackplane.shares_presence` and :attr:`~PostgreSQLBackplane.shares_rate_limits`
are true: presence with its TTL, cursors, typing and membership announcements, and GCRA state
are in Redis for every process. Without it they stay in each process.

Committed events keep ``LISTEN/NOTIFY`` as their path between processes even with Redis beside
it, rather than a Redis publish with the database as catch-up: the notice is sent by the very
transaction that commits the event (no window between commit and publish in which a crash loses
the notice), it needs no second connection to stay up for edits to flow, and there is a single
path to reason about (a second one would need de-duplication and would still need the database
to catch up). So a Redis outage costs nothing on the durable side: edits commit, are
acknowledged and reach every process with the same delay as without Redis. What it costs while
it lasts is the ephemeral side: presence and cursors are per process (other processes' members
leave the lists and come back at the first heartbeat after Redis does), rate limits count per
process, and :meth:`~PostgreSQLBackplane.degraded` says so for ``/readyz``, which stays ready:
the server still takes writes.

**Epoch**: each project's row holds its epoch, drawn when the row is created (so a fresh
database names every history anew) and to be replaced by any rewrite.

psycopg runs only in :mod:`crealia.backplanes._pg`, the thread adapter (which also holds the
schema's migrations); its errors are :class:`~crealia.Overloaded` here.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NoReturn

import attrs
import orjson
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import _wire
from .._backplane import Backplane, HealthProbe, History
from .._config import Config, redact_url_password
from .._document import Document, Quotas
from .._errors import ConfigurationError, NotFound, Overloaded, ProtocolError, TransportError
from .._jobs import JobFailures
from .._metrics import job_metrics
from .._model import ChangeOutcome, Conflict, DurableEvent, Ephemeral, Resolution, Settled, User
from .._sequencing import (
    ChangeRecord,
    PendingLoad,
    dry_run_of,
    duplicate_of,
    now_ms,
    prepare_change,
    prepare_comment,
    prepare_settle,
    record_of,
    value_at,
)
from . import _pg, _pg_ops
from ._mirrors import Mirror, MirrorSubscriptions
from ._pg_ops import PgOps
from ._redisbus import EPHEMERAL_PATTERN, RedisBus, RedisThreads, listen, project_of

log = logging.getLogger("crealia.postgresql")

#: Attempts at one change before giving up with ``overloaded`` (each failed attempt means
#: another process took the room its conflicts needed in between).
MAX_ATTEMPTS = 64

#: Writes one transaction of the writer takes at most.
BATCH = 256

#: Batches a write may find its project's row held by another process before it waits for it.
BUSY_TRIES = 2

#: Writes queued for the writer at most (past it: ``overloaded``).
QUEUE = 10_000


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _event_from(project_id: str, row: tuple[Any, ...]) -> DurableEvent:
    seq, kind, user_id, at, payload, effects = row
    return DurableEvent(project_id=project_id, seq=int(seq), kind=kind, user_id=user_id,
                        at=int(at), payload=orjson.loads(payload),
                        effects=orjson.loads(effects))  # fmt: skip


def _conflict_from(data: bytes) -> Conflict:
    return Conflict(**orjson.loads(data))


_EVENTS_AFTER = (
    "SELECT seq, kind, user_id, at, payload, effects FROM events "
    "WHERE project_id = %s AND seq > %s ORDER BY seq"
)
_EVENTS_BETWEEN = (
    "SELECT seq, kind, user_id, at, payload, effects FROM events "
    "WHERE project_id = %s AND seq > %s AND seq <= %s ORDER BY seq"
)


def _decoded(project_id: str, rows: list[tuple[Any, ...]]) -> list[DurableEvent]:
    """In a connection's thread: the events of ``rows``, decoded and their frames encoded,
    so that the event loop does neither."""
    events = [_event_from(project_id, row) for row in rows]
    for event in events:
        _ = event.encoded
    return events


@attrs.frozen(kw_only=True)
class _Write:
    """A write prepared against a mirror at ``base_seq``, for the writer's transaction."""

    project_id: str
    mode: str  # "change", "comment" or "settle"
    base_seq: int
    #: The change id, comment id or (settle) conflict id.
    key: str
    event: DurableEvent | None
    conflicts: list[Conflict]
    #: What the write changes in the pending conflicts (count, bytes).
    pending: PendingLoad
    quotas: Quotas
    node: str
    #: change: (user_id, seq, status, conflicts, digest); comment: (user_id, element_id,
    #: time, text, at).
    row: tuple[Any, ...] = ()
    role: tuple[str, str] | None = None
    #: The epoch of the copy it was prepared on (None: not known): refused as ``rewritten``
    #: when the project's is another.
    epoch: str | None = None
    #: Called on the Trio thread when the project moved past ``base_seq``: applies the events
    #: after it (the rows) to the mirror and prepares the write again on it. It runs while the
    #: transaction holds the project's row, so the write it returns is current and commits:
    #: a process that must catch up first cannot lose the row again and again to one that
    #: keeps writing.
    redo: Callable[[list[tuple[Any, ...]]], _Write]


@attrs.define(eq=False)
class _Queued:
    write: _Write
    #: The mirror it was prepared on (held under its lock by the writing task).
    mirror: _Mirror
    #: Batches it was answered ``busy`` in (its row held by another process's transaction).
    busy: int = 0
    done: trio.Event = attrs.Factory(trio.Event)
    #: ``(status, value)``: ok (seq), dup (the first's row), gone, behind (the database's seq),
    #: quota ((count, bytes)), refused (the error preparing it again raised), rewritten (the
    #: project's epoch); or an error. (``busy`` ones go in the next batch, never here.)
    result: tuple[str, Any] | None = None
    error: Overloaded | None = None


def _new_epoch() -> str:
    return uuid.uuid4().hex


def _write_json(w: _Write, blobs: list[bytes], wait: bool) -> dict[str, Any]:
    """``w`` as ``crealia_write`` (the schema's migration 3) reads it; its bytes go to
    ``blobs``, named by their (1-based) index."""

    def blob(data: bytes) -> int:
        blobs.append(data)
        return len(blobs)

    row: list[Any] = list(w.row)
    if w.mode == "change":
        user_id, _seq, status, conflict_ids, digest = w.row
        row = [user_id, status, blob(_dumps(conflict_ids)), digest]
    event = w.event
    return {
        "p": w.project_id, "mode": w.mode, "base": w.base_seq, "key": w.key, "wait": wait,
        "copy_epoch": w.epoch, "node": w.node, "pending": [w.pending.count, w.pending.bytes],
        "max_pending": w.quotas.pending_conflicts, "max_pending_bytes": w.quotas.pending_bytes,
        "event": None if event is None else {
            "kind": event.kind, "user_id": event.user_id, "at": event.at,
            "payload": blob(_dumps(event.payload)), "effects": blob(_dumps(event.effects)),
        },
        "row": row,
        "conflicts": [[c.id, c.status, c.created_at, blob(_dumps(attrs.asdict(c)))]
                      for c in w.conflicts],
        "role": None if w.role is None else list(w.role),
        "notice_conflicts": [c.id for c in w.conflicts if c.status == "pending"],
    }  # fmt: skip


class _WriteFailed(Exception):
    """The database undid one write of a batch (the others stand)."""


#: A write's result and the write as stored, or why the database undid it.
_Result = tuple[tuple[str, Any], _Write] | _WriteFailed


def _commit_batch(writes: list[_Write], waits: list[bool], conn: Any) -> list[_Result]:
    """In the writer thread: one transaction; each write's result (or why it was undone).
    A write without ``wait`` whose row another process holds is answered ``busy``."""
    _pg.begin(conn)  # on a connection lost while idle, the batch runs again on a new one
    try:
        results = _write_all(conn, writes, waits)
    except BaseException:
        if not conn.broken and not conn.closed:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return results


def _write_all(conn: Any, writes: list[_Write], waits: list[bool]) -> list[_Result]:
    """The batch in one call of ``crealia_write_batch``; then the stale writes (the project
    moved past their base), prepared again on the Trio thread (``_Write.redo``) while their
    rows stay locked, in a second call, which stores them."""
    results: dict[int, _Result] = {}
    todo = dict(enumerate(writes))
    with conn.cursor() as cur:
        for _call in range(2):
            blobs: list[bytes] = []
            calls = orjson.dumps([_write_json(w, blobs, waits[i] or _call > 0)
                                  for i, w in todo.items()]).decode()  # fmt: skip
            cur.execute("SELECT crealia_write_batch(%s::jsonb, %s::bytea[])", (calls, blobs))
            (answers,) = cur.fetchone()
            stale: dict[int, _Write] = {}
            for (i, w), answer in zip(todo.items(), answers, strict=True):
                status, value = answer["s"], answer.get("v")
                if status == "stale":
                    cur.execute(_EVENTS_AFTER, (w.project_id, w.base_seq))
                    try:
                        stale[i] = trio.from_thread.run_sync(w.redo, cur.fetchall())
                    except ProtocolError as exc:  # the write no longer fits the document
                        results[i] = (("refused", exc), w)
                elif status == "error":
                    results[i] = _WriteFailed(value)
                else:
                    results[i] = ((status, value), w)
            todo = stale
            if not todo:
                break
    for i, w in todo.items():  # its row was locked all along: cannot happen
        results[i] = _WriteFailed(f"project {w.project_id!r} moved while its row was locked")
    return [results[i] for i in range(len(writes))]


@attrs.define(eq=False)
class _Mirror(Mirror):
    #: Conflicts other processes announced, to read and tell the listeners: the seq of the
    #: event whose commit detected them, and their ids.
    announced: list[tuple[int, list[str]]] = attrs.Factory(list)
    #: The project's epoch when it was loaded (None only if the row was gone by then: the
    #: poller keeps the first one it reads).
    epoch: str | None = None


@attrs.define(eq=False)
class PostgreSQLBackplane(MirrorSubscriptions, Backplane):
    """The PostgreSQL backplane. Open it with :func:`open_postgresql_backplane`."""

    url: str
    #: The writer's connection (group commits), the readers' (loads, catch-ups, lists).
    writer_conn: _pg.PgConnection
    reader_conn: _pg.PgConnection
    history_limit: int = 10_000
    snapshot_every: int = 500
    quotas: Quotas = attrs.Factory(Quotas)
    #: Seconds between two checks of every open project's seq (the fallback for lost notices).
    poll_interval: float = 1.0
    node_id: str = attrs.Factory(lambda: uuid.uuid4().hex[:12])
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: Transactions the writer committed, and writes in them.
    commits: int = 0
    writes: int = 0
    #: Writes prepared again under the project's row lock (another process wrote first).
    redone: int = 0
    #: Writes put off to the next batch (another process's transaction held their row).
    busy: int = 0
    #: Notices heard from the listener, and catch-ups run.
    notices: int = 0
    catch_ups: int = 0
    #: False while the listener has lost its connection.
    listening: bool = False
    _listening_event: trio.Event = attrs.Factory(trio.Event)
    _mirrors: dict[str, _Mirror] = attrs.Factory(dict)
    _loading: dict[str, trio.Lock] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None
    _send: trio.MemorySendChannel[_Queued] | None = None
    #: Audit events, security alerts, metric samples and alerts, shared by every process.
    ops: PgOps | None = None

    def ops_store(self) -> PgOps | None:
        """The operations data in this database (:mod:`._pg_ops`): every process on it
        answers every operator query alike."""
        return self.ops

    #: Redis beside PostgreSQL for presence, ephemeral messages and rate limits, or None.
    bus: RedisBus | None = None
    #: Whether the bus's pub/sub listener is subscribed (always False without a bus).
    bus_connected: bool = False
    _bus_event: trio.Event = attrs.Factory(trio.Event)
    #: Why Redis last failed a presence call, until one works again.
    _bus_error: str | None = None
    #: Why the bus's listener last lost Redis (one line), while it is reconnecting.
    _bus_lost: str | None = None

    # -- mirrors ------------------------------------------------------------------------------

    async def _mirror(self, project_id: str) -> _Mirror:
        mirror = self._mirrors.get(project_id)
        if mirror is not None:
            return mirror
        lock = self._loading.setdefault(project_id, trio.Lock())
        async with lock:
            mirror = self._mirrors.get(project_id)
            if mirror is None:
                mirror = await self._load(project_id)
                self._mirrors[project_id] = mirror
            return mirror

    async def _load(self, project_id: str) -> _Mirror:
        limit = self.history_limit

        def load(conn: Any) -> tuple[Any, Any, Any, Any]:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute("SELECT seq, document FROM snapshots WHERE project_id = %s",
                            (project_id,))  # fmt: skip
                snap = cur.fetchone()
                cur.execute("SELECT seq, epoch FROM projects WHERE project_id = %s",
                            (project_id,))  # fmt: skip
                head_row = cur.fetchone()
                head = int(head_row[0]) if head_row else 0
                snap_seq = int(snap[0]) if snap else 0
                start = max(0, min(snap_seq, head - limit))
                cur.execute(_EVENTS_AFTER, (project_id, start))
                events = _decoded(project_id, cur.fetchall())
                cur.execute("SELECT user_id, role FROM project_roles WHERE project_id = %s",
                            (project_id,))  # fmt: skip
                roles = cur.fetchall()
                return snap, events, roles, head_row[1] if head_row else None

        snap, events, roles, epoch = await self.reader_conn.run(load)
        if epoch is None:
            # No row yet: made now (outside the snapshot, which must not write), so that a
            # rewrite before the project's first write (an erasure) is seen as one.
            epoch = await self.epoch(project_id)
        doc = (
            Document.load(project_id, orjson.loads(snap[1]))
            if snap
            else Document(project_id=project_id)
        )
        doc.quotas = self.quotas
        history = History(limit=self.history_limit, max_bytes=self.quotas.history_bytes,
                          memory_bytes=self.quotas.history_memory)  # fmt: skip
        for event in events:
            if event.seq == doc.seq + 1:
                doc.apply(event.effects, event.seq, event.user_id)
            history.append(event)
        return _Mirror(doc=doc, history=history, roles=dict(roles), epoch=epoch)

    def _apply(self, mirror: _Mirror, event: DurableEvent) -> None:
        """Apply the project's next event to the mirror and tell its listeners (an event it
        holds already is skipped)."""
        if event.seq <= mirror.doc.seq:
            return
        if event.seq > mirror.doc.seq + 1:
            # The table has every event: a gap means a bug or a database rewritten under us.
            raise Overloaded(f"project {event.project_id!r}: event {event.seq} came after "
                             f"{mirror.doc.seq}; reloading")  # fmt: skip
        mirror.doc.apply(event.effects, event.seq, event.user_id)
        mirror.history.append(event)
        for listener in list(mirror.listeners):
            listener.on_durable(event)

    async def _catch_up(
        self, project_id: str, mirror: _Mirror, detected: dict[int, list[Conflict]] | None = None
    ) -> None:
        """Read the events after the mirror's seq and apply them, in order (under its lock);
        the conflicts in ``detected`` are told right after the event of their seq."""
        start = mirror.doc.seq

        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(_EVENTS_AFTER, (project_id, start))
                return cur.fetchall()

        rows = await self.reader_conn.run(read)
        self.catch_ups += 1
        for row in rows:
            event = _event_from(project_id, row)
            self._apply(mirror, event)
            if detected and event.seq in detected:
                self._tell_detected(mirror, detected.pop(event.seq))

    async def _fresh(self, project_id: str, *, keep: bool = True) -> _Mirror:
        """The project's mirror, caught up with the database; without ``keep``, a project not
        held here is read for the call and not kept (a REST read of a closed project)."""
        if not keep and project_id not in self._mirrors:
            return await self._load(project_id)
        mirror = await self._mirror(project_id)
        async with mirror.lock:
            await self._catch_up(project_id, mirror)
        return mirror

    def _schedule_catch_up(self, project_id: str, mirror: _Mirror) -> None:
        if mirror.catching_up or self._nursery is None:
            return
        mirror.catching_up = True
        self._nursery.start_soon(self._catch_up_task, project_id, mirror)

    async def _catch_up_task(self, project_id: str, mirror: _Mirror) -> None:
        try:
            with self.jobs.guard("pg_catch_up"):
                for _round in range(10):
                    async with mirror.lock:
                        detected = await self._announced(project_id, mirror)
                        start = mirror.doc.seq
                        # Those whose event this process applied already: first, unless their
                        # settlement was applied too (a detection after it would show a
                        # conflict that is gone).
                        early = [c for seq in sorted(detected) if seq <= start
                                 for c in detected.pop(seq)
                                 if c.status == "pending"
                                 or (c.resolution or {}).get("seq", 0) > start]  # fmt: skip
                        self._tell_detected(mirror, early)
                        await self._catch_up(project_id, mirror, detected)
                        for seq, conflicts in detected.items():  # their events come later
                            mirror.announced.append((seq, [c.id for c in conflicts]))
                    # A notice that came while reading: read again until it is in.
                    if mirror.doc.seq >= mirror.wanted and not mirror.announced:
                        break
        finally:
            mirror.catching_up = False

    def _tell_detected(self, mirror: _Mirror, conflicts: list[Conflict]) -> None:
        """Tell the listeners of ``conflicts`` as they were detected (pending): an event this
        process applies after may settle them."""
        if conflicts:
            as_detected = [attrs.evolve(c, status="pending", resolution=None) for c in conflicts]
            for listener in list(mirror.listeners):
                listener.on_conflicts(as_detected)

    async def _announced(self, project_id: str, mirror: _Mirror) -> dict[int, list[Conflict]]:
        """The conflicts other processes announced, by the seq of the event that detected
        them, read before the events after it, so that each is told in its place: after its
        event, before the one that settles it. Before, they were told after every event read,
        so a member heard a conflict resolved, then detected (with status ``resolved``)."""
        announced, mirror.announced = mirror.announced, []
        ids = [conflict_id for _seq, group in announced for conflict_id in group]
        if not ids:
            return {}
        found = {c.id: c for c in await self._conflicts_by_id(project_id, ids)}
        detected: dict[int, list[Conflict]] = {}
        for seq, group in announced:
            known = [found[i] for i in group if i in found]
            if known:
                detected.setdefault(seq, []).extend(known)
        return detected

    async def _conflicts_by_id(self, project_id: str, ids: list[str]) -> list[Conflict]:
        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT data FROM conflicts WHERE project_id = %s AND id = ANY(%s) "
                            "ORDER BY created_at, ord", (project_id, ids))  # fmt: skip
                return cur.fetchall()

        return [_conflict_from(data) for (data,) in await self.reader_conn.run(read)]

    # -- the writer ---------------------------------------------------------------------------

    async def _submit(self, write: _Write, mirror: _Mirror) -> tuple[str, Any]:
        """Queue a write for the writer's next transaction and wait for its result (shielded:
        a queued write commits or fails whether or not its caller is cancelled).

        Raises:
            Overloaded: the transaction failed (``outcome="unknown"`` when it may have
                committed), or the queue is full or closed.
        """
        item = _Queued(write, mirror)
        if self._send is None:
            raise Overloaded("postgresql backplane is closed")
        try:
            self._send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise Overloaded("postgresql backplane is closed") from None
        except trio.WouldBlock:
            raise Overloaded("postgresql write queue is full") from None
        with trio.CancelScope(shield=True):
            await item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    async def _writer(self, recv: trio.MemoryReceiveChannel[_Queued]) -> None:
        batch: list[_Queued] = []
        try:
            while True:
                if not batch:  # else: the writes found busy, again with what has come since
                    try:
                        batch = [await recv.receive()]
                    except trio.EndOfChannel:
                        break
                while len(batch) < BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                batch = await self._commit(batch)
        finally:
            closed = Overloaded("postgresql backplane is closed")
            for item in batch:
                if not item.done.is_set():
                    item.error = closed
                    item.done.set()
            while True:
                try:
                    item = recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                item.error = closed
                item.done.set()

    async def _commit(self, batch: list[_Queued]) -> list[_Queued]:
        """Commit ``batch``; the writes found busy, for the next one."""
        # Rows are locked in project order: two processes' batches never wait on each other
        # in a cycle. A write waits for a row another process holds only once it found it
        # busy twice (so that it cannot be kept out); before, it goes in the next batch.
        batch.sort(key=lambda item: item.write.project_id)
        writes = [item.write for item in batch]
        waits = [item.busy >= BUSY_TRIES for item in batch]
        try:
            results = await self.writer_conn.run(
                lambda conn: _commit_batch(writes, waits, conn), idempotent=False
            )
        except Overloaded as exc:
            # The commit may have happened before its answer was lost: the client cannot know
            # either, it must resend with the same id; a catch-up brings what did commit.
            failure = Overloaded(
                f"postgresql did not answer the write, which may have been applied: resend it "
                f"with the same id ({exc})",
                outcome="unknown",
            )
            for item in batch:
                item.error = failure
                mirror = self._mirrors.get(item.write.project_id)
                if mirror is not None:
                    self._schedule_catch_up(item.write.project_id, mirror)
                item.done.set()
            return []
        self.commits += 1
        busy: list[_Queued] = []
        for item, outcome in zip(batch, results, strict=True):
            if isinstance(outcome, _WriteFailed):
                log.error("a write to project %s failed: %s", item.write.project_id, outcome)
                item.error = Overloaded(f"postgresql refused the write, nothing was applied: "
                                        f"{outcome}")  # fmt: skip
            elif outcome[0][0] == "busy":
                item.busy += 1
                self.busy += 1
                busy.append(item)
                continue  # not done: in the next batch
            else:
                item.result, stored = outcome
                if item.result[0] == "ok":
                    with self.jobs.guard("pg_writer"):  # a bug there must not stop the writer
                        self._committed(stored, item.mirror)
            item.done.set()
        self.writes += len(batch) - len(busy)
        return busy

    def _committed(self, write: _Write, mirror: _Mirror) -> None:
        """On the Trio thread, right after the transaction: apply the write's event to the
        mirror it was prepared on, and tell its listeners of the conflicts it stored."""
        if write.event is not None:
            self._apply(mirror, write.event)
            if write.event.seq % self.snapshot_every == 0 and self._nursery is not None:
                self._nursery.start_soon(self._write_snapshot, write.project_id, mirror)
        new = [c for c in write.conflicts if c.status == "pending"]
        if new:
            for listener in list(mirror.listeners):
                listener.on_conflicts(new)

    def _caught_up(self, mirror: _Mirror, project_id: str, rows: list[tuple[Any, ...]]) -> None:
        """For a write's ``redo``, on the Trio thread: apply the events it was prepared
        without."""
        self.redone += 1
        for row in rows:
            self._apply(mirror, _event_from(project_id, row))

    async def _write_snapshot(self, project_id: str, mirror: _Mirror) -> None:
        seq, doc = mirror.doc.seq, orjson.dumps(mirror.doc.dump())

        def write(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("INSERT INTO snapshots (project_id, seq, document) VALUES (%s, %s, %s) "
                            "ON CONFLICT (project_id) DO UPDATE SET seq = EXCLUDED.seq, "
                            "document = EXCLUDED.document WHERE snapshots.seq < EXCLUDED.seq",
                            (project_id, seq, doc))  # fmt: skip

        with self.jobs.guard("pg_snapshot"):
            await self.reader_conn.run(write)

    def _write_of(
        self,
        project_id: str,
        mode: str,
        mirror: _Mirror,
        key: str,
        prepare: Callable[[], _Write],
        **kw: Any,
    ) -> _Write:
        """A write prepared on the mirror now; ``prepare`` makes it again (see ``_Write.redo``)."""

        def redo(rows: list[tuple[Any, ...]]) -> _Write:
            self._caught_up(mirror, project_id, rows)
            return prepare()

        return _Write(project_id=project_id, mode=mode, base_seq=mirror.doc.seq, key=key,
                      quotas=self.quotas, node=self.node_id, redo=redo, epoch=mirror.epoch,
                      **kw)  # fmt: skip

    # -- durable writes -----------------------------------------------------------------------

    async def commit_change(
        self, user: User, change: _wire.TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        project_id = user.project_id
        mirror = await self._mirror(project_id)
        outcome: ChangeOutcome

        def prepare(pending: PendingLoad | None = None) -> _Write:
            nonlocal outcome
            outcome, event = prepare_change(
                mirror.doc, user, change, strategy=strategy, roles=mirror.roles,
                lookup=value_at(mirror.history), at=now_ms(), pending=pending,
            )  # fmt: skip
            record = record_of(user, change, outcome)
            return self._write_of(
                project_id, "change", mirror, change.change_id, prepare, event=event,
                conflicts=list(outcome.detected), pending=PendingLoad.of(outcome.detected),
                row=(user.id, outcome.seq, outcome.status, outcome.conflicts, record.digest),
                role=(user.id, user.role),
            )  # fmt: skip

        for _attempt in range(MAX_ATTEMPTS):
            async with mirror.lock:
                try:
                    write = prepare()
                except ProtocolError:
                    # A resend of an accepted change may no longer fit the document (its insert
                    # exists now): a duplicate, not an error.
                    first = await self._stored_change(project_id, change.change_id)
                    if first is not None:
                        return duplicate_of(first, user, change)
                    raise
                status, value = await self._submit(write, mirror)
                if status == "dup":
                    return duplicate_of(_record_from(change.change_id, value), user, change)
                if status == "quota":
                    count, held = value
                    # Raises the same ``too_large`` as the embedded backplane.
                    prepare(PendingLoad(count, held))
                    continue  # room was made meanwhile
                if status == "ok":
                    mirror.roles[user.id] = user.role
                    return outcome
                self._refused(status, value, write)
        raise Overloaded("too many concurrent writes to this project; retry")

    def _refused(self, status: str, value: Any, write: _Write) -> NoReturn:
        """Raise what a write that was not stored tells its caller.

        Raises:
            ProtocolError: prepared again on the project's newer events, it no longer fits.
            Overloaded: the database is behind this process (it lost acknowledged writes), or
                the project's history was rewritten since the write was prepared.
        """
        if status == "refused":
            raise value
        if status == "rewritten":
            self._rewritten(write.project_id)  # the room closes; its members resume
            raise Overloaded(
                f"project {write.project_id!r}: its history was rewritten meanwhile (an "
                "erasure or a restore), nothing was applied; resend"
            )
        assert status == "behind", status
        raise Overloaded(
            f"postgresql is behind this process (seq {value} there, {write.base_seq} here: "
            "it lost acknowledged writes, or was restored), nothing was applied"
        )

    async def _stored_change(self, project_id: str, change_id: str) -> ChangeRecord | None:
        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT user_id, seq, status, conflicts, digest FROM changes "
                            "WHERE project_id = %s AND change_id = %s",
                            (project_id, change_id))  # fmt: skip
                return cur.fetchone()

        row = await self.reader_conn.run(read)
        return None if row is None else _record_from(change_id, row)

    async def commit_comment(self, user: User, comment: _wire.Comment) -> tuple[int, bool]:
        project_id = user.project_id
        mirror = await self._mirror(project_id)
        event: DurableEvent

        def prepare() -> _Write:
            nonlocal event
            event = prepare_comment(mirror.doc, user, comment, now_ms())
            return self._write_of(
                project_id, "comment", mirror, comment.id, prepare, event=event, conflicts=[],
                pending=PendingLoad(),
                row=(user.id, comment.element_id, comment.time, comment.text, event.at),
                role=(user.id, user.role),
            )  # fmt: skip

        async with mirror.lock:
            write = prepare()
            status, value = await self._submit(write, mirror)
            if status == "dup":
                return int(value), True
            if status == "ok":
                mirror.roles[user.id] = user.role
                return event.seq, False
            self._refused(status, value, write)

    async def settle(
        self,
        project_id: str,
        conflict_id: str,
        resolution: Resolution,
        *,
        by: str,
        writer: str,
        expect_seq: int | None = None,
        redetect: bool = True,
    ) -> Settled:
        mirror = await self._mirror(project_id)
        settled: Settled

        def prepare() -> _Write:
            nonlocal settled
            event, resolved, redetected = prepare_settle(
                mirror.doc, conflict, resolution, by=by, writer=writer,
                expect_seq=expect_seq, at=now_ms(), redetect=redetect,
            )  # fmt: skip
            settled = Settled(seq=event.seq, redetected=redetected)
            written = [resolved] + ([redetected] if redetected else [])
            # The redetected one takes the settled one's place: never refused for room.
            freed, taken = PendingLoad.of([conflict]), PendingLoad.of(written)
            return self._write_of(
                project_id, "settle", mirror, conflict_id, prepare, event=event,
                conflicts=written,
                pending=PendingLoad(taken.count - freed.count, taken.bytes - freed.bytes),
            )  # fmt: skip

        async with mirror.lock:
            conflict = await self._pending_one(project_id, conflict_id)
            write = prepare()
            status, value = await self._submit(write, mirror)
            if status == "gone":
                raise NotFound(
                    f"data.conflict_id: no pending conflict {conflict_id!r} in this project"
                )
            if status == "ok":
                return settled
            self._refused(status, value, write)

    async def _pending_one(self, project_id: str, conflict_id: str) -> Conflict:
        found = await self._conflicts_by_id(project_id, [conflict_id])
        if not found or found[0].status != "pending":
            raise NotFound(f"data.conflict_id: no pending conflict {conflict_id!r} in this project")
        return found[0]

    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        data = _dumps(settings)

        def write(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("INSERT INTO project_settings (project_id, settings) VALUES (%s, %s) "
                            "ON CONFLICT (project_id) DO UPDATE SET settings = EXCLUDED.settings",
                            (project_id, data))  # fmt: skip

        await self.writer_conn.run(write)

    # -- reads --------------------------------------------------------------------------------

    async def get_settings(self, project_id: str) -> dict[str, Any]:
        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT settings FROM project_settings WHERE project_id = %s",
                            (project_id,))  # fmt: skip
                return cur.fetchone()

        row = await self.reader_conn.run(read)
        return dict(orjson.loads(row[0])) if row else {}

    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                if status is None:
                    cur.execute("SELECT data FROM conflicts WHERE project_id = %s "
                                "ORDER BY created_at DESC, ord DESC LIMIT %s",
                                (project_id, limit))  # fmt: skip
                else:
                    cur.execute("SELECT data FROM conflicts WHERE project_id = %s AND status = %s "
                                "ORDER BY created_at DESC, ord DESC LIMIT %s",
                                (project_id, status, limit))  # fmt: skip
                return cur.fetchall()

        return [_conflict_from(data) for (data,) in await self.reader_conn.run(read)]

    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    "SELECT data FROM conflicts WHERE project_id = %s AND status = 'pending' "
                    "ORDER BY created_at, ord",
                    (project_id,),
                )
                return cur.fetchall()

        return [_conflict_from(data) for (data,) in await self.reader_conn.run(read)]

    async def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        mirror = await self._fresh(user.project_id, keep=False)
        return dry_run_of(mirror.doc, mirror.history, user, change)

    async def snapshot(self, project_id: str) -> dict[str, Any]:
        return (await self._fresh(project_id, keep=False)).doc.snapshot()

    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        mirror = await self._fresh(project_id, keep=False)
        head = mirror.doc.seq
        if seq > head:
            return None
        if seq == head:
            return []
        return await mirror.history.since(seq, partial(self._stored_events, project_id))

    async def _stored_events(self, project_id: str, after: int, upto: int) -> list[DurableEvent]:
        """The stored events ``after < seq <= upto``, for a resume from events the mirror's
        history no longer holds in memory (``history_memory_bytes``)."""

        def read(conn: Any) -> list[DurableEvent]:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(_EVENTS_BETWEEN, (project_id, after, upto))
                return _decoded(project_id, cur.fetchall())

        return await self.reader_conn.run(read)

    async def epoch(self, project_id: str) -> str:
        fresh = _new_epoch()

        def read(conn: Any) -> Any:
            # Whichever process asks first draws it: every process answers the same.
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT epoch FROM projects WHERE project_id = %s", (project_id,))
                row = cur.fetchone()
                if row is not None:
                    return row
                cur.execute("INSERT INTO projects (project_id, epoch) VALUES (%s, %s) "
                            "ON CONFLICT DO NOTHING", (project_id, fresh))  # fmt: skip
                cur.execute("SELECT epoch FROM projects WHERE project_id = %s", (project_id,))
                return cur.fetchone()

        row = await self.reader_conn.run(read)
        return str(row[0]) if row else fresh

    # -- fan-out ------------------------------------------------------------------------------

    async def publish(self, message: Ephemeral) -> None:
        # Delivered here at once; to the other processes through Redis when it is beside
        # PostgreSQL (batched by the bus's publisher, dropped while Redis is away).
        self._deliver_here(message)
        if self.bus is not None and self.bus_connected:
            self.bus.enqueue(message)  # (dropped while Redis is away, as ephemeral traffic may be)
        await trio.lowlevel.checkpoint()

    # -- Redis beside it: presence, ephemeral messages, rate limits ---------------------------

    @property
    def shares_presence(self) -> bool:
        """True with Redis beside PostgreSQL: presence and ephemeral messages cross
        processes."""
        return self.bus is not None

    @property
    def shares_rate_limits(self) -> bool:
        """True with Redis beside PostgreSQL: rate limits are counted in Redis, on its clock."""
        return self.bus is not None

    async def share_presence(
        self, project_id: str, members: list[dict[str, Any]], *, ttl: float
    ) -> None:
        """Share this process's members through Redis. With Redis away this does nothing and
        raises nothing (unlike the contract's ``Overloaded``: the room would otherwise keep a
        remote list nobody refreshes): skipped while the listener is reconnecting, counted as a
        ``redis_presence`` failure when a call fails. Presence is per process until Redis is
        back; the next heartbeat after it shares again."""
        if self.bus is None or not self.bus_connected:
            # Without a subscribed listener Redis is away: no call that would wait for its
            # timeouts (an unreachable host) on every heartbeat of every room.
            return
        try:
            await self.bus.share_presence(project_id, members, ttl=ttl)
        except Overloaded as exc:
            self._bus_failed(exc)
            return
        self._bus_worked()

    async def remote_presence(self, project_id: str) -> list[dict[str, Any]]:
        """The other processes' members, from Redis; ``[]`` while Redis is away (presence
        degrades to this process's members, rather than keeping a list nobody refreshes)."""
        if self.bus is None or not self.bus_connected:
            return []
        try:
            members = await self.bus.remote_presence(project_id)
        except Overloaded as exc:
            self._bus_failed(exc)
            return []
        self._bus_worked()
        return members

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float] | None:
        """GCRA in Redis for the cluster; ``None`` without Redis (one process's limits).

        Raises:
            Overloaded: Redis is away (the limiter counts in this process meanwhile).
        """
        if self.bus is None:
            return None
        if not self.bus_connected:
            raise Overloaded("redis unavailable (pub/sub is reconnecting), nothing was applied")
        return await self.bus.sync_rate_limits(updates)

    def _bus_failed(self, exc: Overloaded) -> None:
        self._bus_error = str(exc.__cause__ or exc)
        self.jobs.failed("redis_presence", exc)

    def _bus_worked(self) -> None:
        if self._bus_error is not None:
            self._bus_error = None
            self.jobs.succeeded("redis_presence")

    def _on_bus_messages(self, batch: list[dict[str, Any]]) -> None:
        """On the Trio thread: ephemeral messages other processes published."""
        assert self.bus is not None
        for message in batch:
            # A bad message (another version's, a stray PUBLISH) or a listener's bug must not
            # end the listener.
            with self.jobs.guard("redis_listener"):
                project_id, _kind = project_of(bytes(message["channel"]).decode())
                mirror = self._mirrors.get(project_id)
                if mirror is None:
                    continue
                ephemeral = self.bus.ephemeral_of(project_id, bytes(message["data"]))
                if ephemeral is None:
                    continue  # our own, delivered here already
                for listener in list(mirror.listeners):
                    listener.on_ephemeral(ephemeral)

    def _on_bus_state(self, up: bool, exc: BaseException | None) -> None:
        """On the Trio thread: the bus's listener subscribed, or lost Redis."""
        if up:
            self.bus_connected = True
            self._bus_error = None
            self._bus_event.set()
            self.jobs.succeeded("redis_listener")
        else:
            self.bus_connected = False
            self._bus_event = trio.Event()
            # The cause, for /readyz (a wrong password is not "unreachable" to an operator).
            self._bus_lost = " ".join(str(exc).split())[:200] if exc is not None else None
            self.jobs.failed("redis_listener", exc or RuntimeError("connection lost"))

    async def wait_bus_connected(self) -> None:
        """Wait until the Redis listener is subscribed (at start, or after losing Redis).

        Raises:
            RuntimeError: there is no Redis beside this backplane.
        """
        if self.bus is None:
            raise RuntimeError("this PostgreSQL backplane has no Redis beside it")
        while not self.bus_connected:
            await self._bus_event.wait()

    def _listen_bus(self, stop: list[bool], token: trio.lowlevel.TrioToken) -> None:
        """The bus's listener thread: every project's ephemeral channel."""
        assert self.bus is not None

        def on_messages(batch: list[dict[str, Any]]) -> None:
            trio.from_thread.run_sync(self._on_bus_messages, batch, trio_token=token)

        def on_state(up: bool, exc: BaseException | None) -> None:
            trio.from_thread.run_sync(self._on_bus_state, up, exc, trio_token=token)

        listen(self.bus.redis.client, (EPHEMERAL_PATTERN,), stop, on_messages, on_state)

    def release(self, project_id: str) -> None:
        """Forget the project's mirror if no room listens to it (it reloads on demand)."""
        mirror = self._mirrors.get(project_id)
        if mirror is not None and not mirror.listeners and not mirror.lock.locked():
            del self._mirrors[project_id]
            self._loading.pop(project_id, None)

    # -- GDPR ---------------------------------------------------------------------------------

    @property
    def supports_gdpr(self) -> bool:
        """GDPR export and erasure work on the database, in one transaction each."""
        return True

    async def user_data(self, project_id: str, user_id: str) -> dict[str, Any]:
        return await self.reader_conn.run(lambda conn: _pg_ops.collect(conn, project_id, user_id))

    async def erase_user(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        """Rewrite the project's history in one transaction holding its row, with a new
        epoch; every process drops its mirror of the project (a notice with the epoch), so
        the next reader loads the rewritten one.

        Raises:
            Overloaded: the project is open in this process, or the database failed.
        """
        mirror = self._mirrors.get(project_id)
        if mirror is not None and mirror.listeners:
            raise Overloaded(f"project {project_id!r} is open; close its room first")
        epoch = _new_epoch()
        self._mirrors.pop(project_id, None)
        self._loading.pop(project_id, None)
        # Not idempotent: a lost answer may hide a commit (then the retry finds nothing new).
        return await self.writer_conn.run(
            lambda conn: _pg_ops.erase(conn, project_id, user_id, pseudonym, epoch),
            idempotent=False,
        )

    def _on_notices(self, payloads: list[str]) -> None:
        """On the Trio thread: notices of commits (from any process, this one's too)."""
        self.notices += len(payloads)
        for payload in payloads:
            try:
                notice = orjson.loads(payload)
                project_id, seq = str(notice["p"]), int(notice["s"])
                own = notice.get("n") == self.node_id
                ids = [str(c) for c in notice.get("c") or ()]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignored a malformed notice on %s: %r", _pg.CHANNEL, payload[:200])
                continue
            if notice.get("e"):
                held = self._mirrors.get(project_id)
                # Not a mirror loaded from the rewritten history already: the erasing process's
                # room opens again before its own notice comes (closing it again would make
                # its members resume twice).
                if held is None or held.epoch != notice["e"]:
                    self._rewritten(project_id)  # reloaded on demand
                continue
            mirror = self._mirrors.get(project_id)
            if mirror is None:
                continue
            if seq > mirror.doc.seq or (ids and not own):
                # Our own events were applied when their commit returned; one whose answer was
                # lost comes back here.
                mirror.wanted = max(mirror.wanted, seq)
                if not own:
                    mirror.announced.append((seq, ids))
                self._schedule_catch_up(project_id, mirror)

    def _heard(self, payloads: list[str]) -> None:
        # A bug here must not end the listener thread (nor, through it, the server).
        with self.jobs.guard("pg_listener"):
            self._on_notices(payloads)

    def _on_listen_state(self, up: bool, exc: BaseException | None) -> None:
        """On the Trio thread: the listener (re)connected, or lost its connection."""
        if not up:
            self.listening = False
            self._listening_event = trio.Event()
            self.jobs.failed("pg_listener", exc or RuntimeError("connection lost"))
            return
        self.listening = True
        self._listening_event.set()
        self.jobs.succeeded("pg_listener")
        # Notices may have been missed while it was away.
        for project_id, mirror in list(self._mirrors.items()):
            self._schedule_catch_up(project_id, mirror)

    async def wait_listening(self) -> None:
        """Wait until the listener is listening (at start, or after it lost its connection)."""
        while not self.listening:
            await self._listening_event.wait()

    def _listen(self, stop: list[bool], token: trio.lowlevel.TrioToken) -> None:
        """The listener thread (see :func:`crealia.backplanes._pg.listen`)."""

        def on_notices(batch: list[str]) -> None:
            trio.from_thread.run_sync(self._heard, batch, trio_token=token)

        def on_state(up: bool, exc: BaseException | None) -> None:
            if not up:
                log.warning("postgresql LISTEN connection lost (%s); reconnecting", exc)
            trio.from_thread.run_sync(self._on_listen_state, up, exc, trio_token=token)

        _pg.listen(self.url, stop, on_notices, on_state)

    async def _poll(self) -> None:
        """One pass of the poller: every open project's seq and epoch in the database against
        its mirror's. Those behind catch up; one whose epoch changed, or that the database is
        behind (it lost writes this process saw committed: a restore, a failover), was
        rewritten (``_rewritten``), even when the notice saying so was lost."""
        mirrors = {p: m for p, m in self._mirrors.items() if m.listeners}
        if not mirrors:
            return
        # Before the read: what the mirrors hold was committed before it started.
        seen = {project_id: mirror.doc.seq for project_id, mirror in mirrors.items()}

        def read(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT project_id, seq, epoch FROM projects "
                            "WHERE project_id = ANY(%s)", (list(mirrors),))  # fmt: skip
                return cur.fetchall()

        for project_id, seq, epoch in await self.reader_conn.run(read):
            mirror = self._mirrors.get(project_id)
            if mirror is not mirrors[project_id]:
                continue  # dropped or reloaded meanwhile
            if mirror.epoch is None:
                mirror.epoch = epoch
            if epoch != mirror.epoch or int(seq) < seen[project_id]:
                log.warning("project %s: the database's history is not the one this process "
                            "holds (epoch %s, seq %d; here %s, %d)", project_id, epoch,
                            int(seq), mirror.epoch, seen[project_id])  # fmt: skip
                self._rewritten(project_id)
            elif int(seq) > mirror.doc.seq:
                mirror.wanted = max(mirror.wanted, int(seq))
                self._schedule_catch_up(project_id, mirror)

    # -- health and metrics -------------------------------------------------------------------

    async def check(self) -> None:
        """A real commit on the writer's connection, every open project's seq in the database
        not behind this process's, and the listener connected.

        Raises:
            TransportError: one of them fails.
        """
        mirrors = list(self._mirrors.items())
        ids = [project_id for project_id, _mirror in mirrors]

        def probe(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("INSERT INTO health (id, at) VALUES (1, %s) ON CONFLICT (id) "
                            "DO UPDATE SET at = EXCLUDED.at", (now_ms(),))  # fmt: skip
                cur.execute("SELECT project_id, seq FROM projects WHERE project_id = ANY(%s)",
                            (ids,))  # fmt: skip
                return dict(cur.fetchall())

        try:
            seqs = await self.writer_conn.run(probe)
        except Overloaded as exc:
            raise TransportError(f"postgresql cannot take writes: {exc}") from exc
        behind = [(p, int(seqs.get(p, 0)), m.doc.seq) for p, m in mirrors
                  if int(seqs.get(p, 0)) < m.doc.seq]  # fmt: skip
        if behind:
            for project_id, stored, here in behind:
                log.error("project %s is at seq %d in postgresql but %d here: the database "
                          "lost acknowledged writes", project_id, stored, here)  # fmt: skip
            raise TransportError(
                f"postgresql lost acknowledged writes (restored from an older copy?): "
                f"{len(behind)} open project(s) are behind this process"
            )
        if not self.listening:
            raise TransportError("postgresql LISTEN connection is reconnecting")

    def health_checks(self) -> Mapping[str, HealthProbe]:
        """``postgresql``: a real commit, no open project behind, the listener up. Redis beside
        it is not a health check (an outage does not stop writes): see :meth:`degraded`."""
        return {"postgresql": self.check}

    def degraded(self) -> Mapping[str, str | None]:
        """``redis`` (with Redis beside PostgreSQL): ``None`` while it carries presence,
        ephemeral messages and rate limits; else what is per process until it is back."""
        if self.bus is None:
            return {}
        if self.bus_connected and self._bus_error is None:
            return {"redis": None}
        why = self._bus_error or (
            f"pub/sub is reconnecting: {self._bus_lost}" if self._bus_lost else
            "pub/sub is reconnecting"
        )  # fmt: skip
        return {
            "redis": f"redis unreachable ({why}): presence, cursors and rate limits are per "
            "process; edits commit and reach every process through PostgreSQL"
        }

    def metrics(self) -> Iterable[Metric]:
        """The writer's transactions and writes, notices heard, catch-ups, and the
        backplane's background jobs (``pg_listener``, ``pg_poll``, ``pg_catch_up``,
        ``pg_snapshot``, ``pg_writer``)."""
        yield CounterMetricFamily("crealia_postgresql_commits",
                                  "PostgreSQL transactions the writer committed.",
                                  value=self.commits)  # fmt: skip
        yield CounterMetricFamily("crealia_postgresql_writes",
                                  "Durable writes committed to PostgreSQL (several a "
                                  "transaction under load).", value=self.writes)  # fmt: skip
        yield CounterMetricFamily("crealia_postgresql_notices",
                                  "LISTEN/NOTIFY notices of commits heard.",
                                  value=self.notices)  # fmt: skip
        if self.bus is not None:
            yield GaugeMetricFamily(
                "crealia_redis_up",
                "1 while the Redis beside PostgreSQL carries presence, "
                "ephemeral messages and rate limits.",
                value=float(self.bus_connected and self._bus_error is None),
            )
        yield from job_metrics(self.jobs)


def _record_from(change_id: str, row: tuple[Any, ...]) -> ChangeRecord:
    user_id, seq, status, conflicts, digest = row
    outcome = ChangeOutcome(change_id=change_id, seq=None if seq is None else int(seq),
                            status=status, conflicts=orjson.loads(conflicts))  # fmt: skip
    return ChangeRecord(outcome=outcome, user_id=user_id, digest=digest)


@asynccontextmanager
async def open_backplane(url: str, config: Config) -> AsyncIterator[PostgreSQLBackplane]:
    """The ``postgresql`` entry point (:class:`~crealia.abc.BackplaneFactory`): a backplane on
    the database ``url`` names, with the config's history limits and quotas, for the ``async
    with`` block. The schema is migrated first when the database is empty or older. With
    ``config.redis_url`` set too (``--database`` plus ``--redis``), Redis beside it carries
    presence, ephemeral messages and rate limits.

    Raises:
        ConfigurationError: ``url`` is not a PostgreSQL URL, or the database's schema is newer
            than this crealia's.
        TransportError: the database cannot be reached (one line).
    """
    async with open_postgresql_backplane(
        url, history_limit=config.history_limit, snapshot_every=config.snapshot_every,
        quotas=Quotas.of(config), redis_url=config.redis_url,
    ) as backplane:  # fmt: skip
        yield backplane


#: The URL schemes :func:`open_backplane` serves besides its entry point's name.
open_backplane.schemes = ("postgres",)  # type: ignore[attr-defined]


async def _migrate_command(url: str) -> tuple[int, int]:
    return await _pg.migrate(url)


#: ``crealia migrate --database URL`` calls it: ``(version before, version after)``.
open_backplane.migrate = _migrate_command  # type: ignore[attr-defined]


@asynccontextmanager
async def open_postgresql_backplane(
    url: str,
    *,
    history_limit: int = 10_000,
    snapshot_every: int = 500,
    quotas: Quotas | None = None,
    poll_interval: float = 1.0,
    redis_url: str | None = None,
) -> AsyncIterator[PostgreSQLBackplane]:
    """A PostgreSQL backplane on ``url`` with its writer, listener and poller, for the
    ``async with`` block (schema migrated first when the database is empty or older).

    With ``redis_url``, Redis beside it carries presence, ephemeral messages and rate limits
    (a :class:`~crealia.backplanes._redisbus.RedisBus` with its publisher task and listener
    thread in the backplane's nursery). A Redis that cannot be reached at start is not an
    error: the backplane starts degraded (logged, and :meth:`~PostgreSQLBackplane.degraded`)
    and shares presence once Redis answers.

    On exit (also when cancelled) the queued writes fail as ``overloaded`` once the writer is
    cancelled, the listener thread ends within its 0.1 s read timeout, and the connections
    close.

    Raises:
        ConfigurationError: ``url`` is not a PostgreSQL URL, or the schema is newer.
        TransportError: the database cannot be reached.
    """
    _pg.check_url(url)
    threads = None
    if redis_url:
        try:
            threads = RedisThreads(redis_url)
        except ValueError as exc:  # redis-py's word for a URL it cannot use
            raise ConfigurationError(
                f"redis URL {redact_url_password(redis_url)!r}: {exc}"
            ) from exc
    writer = _pg.PgConnection(url, name="crealia-write")
    reader = _pg.PgConnection(url, name="crealia-read")
    ops = PgOps(writer=_pg.PgConnection(url, name="crealia-ops-write"),
                reader=_pg.PgConnection(url, name="crealia-ops-read"), node="")  # fmt: skip
    try:
        await writer.open()
        try:
            await writer.run(lambda conn: _pg.migrate_sync(conn, url))
        except Overloaded as exc:
            raise TransportError(f"database {redact_url_password(url)!r}: cannot migrate its "
                                 f"schema: {exc}") from exc  # fmt: skip
        # Before any other statement of this process, and again on every reconnect.
        await writer.run(_pg.check_identity)
        writer.on_connect = reader.on_connect = _pg.check_identity
        await reader.open()
        backplane = PostgreSQLBackplane(
            url=url, writer_conn=writer, reader_conn=reader, history_limit=history_limit,
            snapshot_every=snapshot_every, quotas=quotas or Quotas(),
            poll_interval=poll_interval,
        )  # fmt: skip
        ops.node = backplane.node_id
        backplane.ops = ops
        if threads is not None:
            backplane.bus = RedisBus(threads, backplane.node_id)
        send, recv = trio.open_memory_channel[_Queued](QUEUE)
        stop = [False]
        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            backplane._nursery = nursery
            backplane._send = send
            nursery.start_soon(backplane._writer, recv)
            nursery.start_soon(lambda: trio.to_thread.run_sync(backplane._listen, stop, token))
            nursery.start_soon(
                lambda: backplane.jobs.keep_running(
                    "pg_poll", backplane._poll, period=backplane.poll_interval
                )
            )
            if backplane.bus is not None:
                bus = backplane.bus
                nursery.start_soon(
                    lambda: backplane.jobs.keep_running("redis_publisher", bus.publisher)
                )
                nursery.start_soon(
                    lambda: trio.to_thread.run_sync(backplane._listen_bus, stop, token)
                )
            try:
                with trio.fail_after(10):
                    await backplane.wait_listening()
                if backplane.bus is not None:
                    # Not required: the backplane works without Redis, degraded.
                    with trio.move_on_after(3) as waited:
                        await backplane.wait_bus_connected()
                    if waited.cancelled_caught:
                        log.warning("redis %r beside postgresql cannot be reached yet: presence, "
                                    "cursors and rate limits are per process until it can",
                                    redact_url_password(redis_url or ""))  # fmt: skip
                yield backplane
            finally:
                stop[0] = True
                send.close()
                nursery.cancel_scope.cancel()
    finally:
        if threads is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await trio.to_thread.run_sync(threads.close)
        with contextlib.suppress(Exception):
            await ops.close()
        with contextlib.suppress(Exception):
            await writer.close()
        with contextlib.suppress(Exception):
            await reader.close()
