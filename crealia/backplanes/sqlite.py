"""The SQLite backplane: one process, durable state in the embedded SQLite store.

Registered as ``sqlite`` in the ``crealia.backplanes`` entry-point group: the server's default
when ``Config.backplane_url`` is unset, or with ``sqlite:`` (``Config.data_dir``) or
``sqlite:///absolute/dir``. :func:`open_backplane` opens the store (``crealia.sqlite3``) and
closes it, committing what is queued, when it ends. Its health check is ``storage`` (a real
commit and checkpoint), its metrics the store's WAL, checkpoints and background jobs; it
supports GDPR export and erasure.

Each loaded project keeps its :class:`~crealia._document.Document` and its recent history (for
resume) in memory, the history within ``history_memory_bytes`` (a resume from older kept events
reads them from the store), until its last room closes (:meth:`SQLiteBackplane.release`).
Change and comment ids are looked up in the store (by primary key, on a connection of their
own), behind a bounded cache of the recent ones and the set of those whose commit is in flight,
so opening a project costs the same whether it had a hundred changes or a million. A commit
is checked and applied to the in-memory document synchronously, so the next commit already
sees it, and its rows join the store's next grouped transaction. The store runs
``on_durable`` callbacks in queue order, which is ``seq`` order, and that is where listeners
hear of the event.

If a commit fails, the project is marked broken in the same callback pass (before any other task
runs), every later write of it fails, and the next use reloads it from the store: the document
never runs ahead of what is durable.
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, Metric

from .. import _gdpr, _wire
from .._backplane import (
    MIN_HISTORY_EVENTS,
    Backplane,
    HealthProbe,
    HeldHistory,
    History,
    Listener,
)
from .._config import Config
from .._document import Document, Quotas
from .._errors import (
    ConfigurationError,
    InternalError,
    NotFound,
    Overloaded,
    ProtocolError,
    StorageError,
)
from .._metrics import job_metrics
from .._model import ChangeOutcome, Conflict, DurableEvent, Ephemeral, Resolution, Settled, User
from .._sequencing import (
    ChangeRecord,
    PendingLoad,
    conflict_bytes,
    dry_run_of,
    duplicate_of,
    now_ms,
    prepare_change,
    prepare_comment,
    prepare_settle,
    record_of,
    value_at,
)
from .._storage import Statement, Store, WalPolicy, dumps, loads, open_store, sqlite_metrics

#: Recent change ids (and, apart, comment ids) whose outcome each loaded project keeps in memory;
#: older ones are read from the store.
ID_CACHE = 1024

V = TypeVar("V")


@attrs.define(eq=False)
class _Ids(Generic[V]):
    """The ids of a project a write must not reuse: those whose commit is in flight (all of
    them, until durable or failed) and the most recent durable ones (at most ``limit``).
    Everything else is in the store."""

    limit: int = ID_CACHE
    recent: collections.OrderedDict[str, V] = attrs.Factory(collections.OrderedDict)
    inflight: dict[str, tuple[V, trio.Event]] = attrs.Factory(dict)
    #: Ids dropped from ``recent`` so far: a store lookup that overlapped a drop is repeated.
    evicted: int = 0

    def get(self, key: str) -> tuple[V, trio.Event | None] | None:
        """The value and, while its commit is in flight, an event set when it ends."""
        pending = self.inflight.get(key)
        if pending is not None:
            return pending
        value = self.recent.get(key)
        if value is None:
            return None
        self.recent.move_to_end(key)
        return value, None

    def begin(self, key: str, value: V) -> trio.Event:
        done = trio.Event()
        self.inflight[key] = (value, done)
        return done

    def durable(self, key: str, value: V) -> None:
        # Not in flight any more if a later write of the project failed meanwhile.
        pending = self.inflight.pop(key, None)
        self.remember(key, value)
        if pending is not None:
            pending[1].set()

    def failed(self) -> None:
        for _value, done in self.inflight.values():
            done.set()
        self.inflight.clear()

    def remember(self, key: str, value: V) -> None:
        self.recent[key] = value
        self.recent.move_to_end(key)
        while len(self.recent) > self.limit:
            self.recent.popitem(last=False)
            self.evicted += 1


@attrs.define(eq=False)
class _Project:
    doc: Document
    history: History
    changes: _Ids[ChangeRecord]
    comments: _Ids[int]
    pending: dict[str, Conflict]
    snapshot_seq: int
    #: What ``pending`` holds in bytes (:func:`~crealia._sequencing.conflict_bytes`).
    pending_bytes: int = 0
    #: The history's epoch (docs/protocol.md §3); ``epoch_stored`` once the store holds it (it is
    #: written with the project's first event).
    epoch: str = attrs.Factory(_gdpr.new_epoch)
    epoch_stored: bool = False
    #: The last role seen for each author of this project (for strategies weighing roles).
    roles: dict[str, str] = attrs.Factory(dict)
    #: Highest seq known durable (the document may be ahead while a commit is in flight).
    durable_seq: int = 0
    durable_changed: trio.Event = attrs.Factory(trio.Event)
    broken: bool = False

    def advanced(self) -> None:
        self.durable_changed.set()
        self.durable_changed = trio.Event()

    async def settled(self, seq: int) -> None:
        """Wait until everything up to ``seq`` is durable.

        Raises:
            Overloaded: a commit failed; the project is reloading.
        """
        while self.durable_seq < seq:
            if self.broken:
                raise Overloaded("storage unavailable: the project is reloading")
            await self.durable_changed.wait()


@attrs.define(eq=False)
class SQLiteBackplane(Backplane):
    """The embedded backplane over a :class:`~crealia._storage.Store` (opened by whoever
    builds it: :func:`open_backplane` opens its own)."""

    store: Store
    history_limit: int = 10_000
    snapshot_every: int = 500
    quotas: Quotas = attrs.Factory(Quotas)
    #: Recent change ids (and comment ids) kept in memory per loaded project.
    id_cache: int = ID_CACHE
    _projects: dict[str, _Project] = attrs.Factory(dict)
    _loading: dict[str, trio.Lock] = attrs.Factory(dict)
    _listeners: dict[str, set[Listener]] = attrs.Factory(dict)

    # -- loading ------------------------------------------------------------------------------

    async def _project(self, project_id: str) -> _Project:
        project = self._projects.get(project_id)
        if project is not None and not project.broken:
            return project
        lock = self._loading.setdefault(project_id, trio.Lock())
        async with lock:
            project = self._projects.get(project_id)
            if project is None or project.broken:
                project = await self._load(project_id)
                self._projects[project_id] = project
            return project

    async def _load(self, project_id: str, *, history: bool = True) -> _Project:
        """Load a project from the store; without ``history``, only what rebuilds its document
        (the snapshot and the events after it), for a read that keeps nothing."""
        limit = self.history_limit
        max_bytes = self.quotas.history_bytes

        def load(conn: sqlite3.Connection) -> tuple[Any, ...]:
            # Everything is built here, in the reader's thread: the rows of up to
            # history_limit events decoded, the document rebuilt, the history filled. On the
            # event loop that took 170 ms for 10,000 events, during which nothing else ran;
            # and on the writer's connection every commit of every project waited for the
            # query (issue 17: the soak's ack stalls as rooms opened).
            row = conn.execute(
                "SELECT seq, document FROM snapshots WHERE project_id = ?", (project_id,)
            ).fetchone()
            head = (
                conn.execute(
                    "SELECT MAX(seq) FROM events WHERE project_id = ?", (project_id,)
                ).fetchone()[0]
                or 0
            )
            snap_seq = row[0] if row else 0
            start = max(0, min(snap_seq, head - limit))
            if not history:
                start = snap_seq
            elif start < snap_seq:
                # The events before the snapshot only serve resume: load no more of them than
                # the history keeps (its byte bound, beyond the last 1,000).
                start = max(start, min(snap_seq, _history_start(conn, project_id, start,
                                                                max_bytes)))  # fmt: skip
            doc = (
                Document.load(project_id, loads(row[1])) if row else Document(project_id=project_id)
            )
            doc.quotas = self.quotas
            kept = self._history()
            for stored in conn.execute(
                "SELECT seq, kind, user_id, at, payload, effects FROM events "
                "WHERE project_id = ? AND seq > ? ORDER BY seq",
                (project_id, start),
            ):
                event = _event_of(project_id, stored)
                if event.seq > doc.seq:
                    doc.apply(event.effects, event.seq, event.user_id)
                if history:
                    kept.append(event)
            pending = conn.execute(
                "SELECT data FROM conflicts WHERE project_id = ? AND status = 'pending' "
                "ORDER BY created_at",
                (project_id,),
            ).fetchall()
            conflicts = {c.id: c for c in (_conflict_from_row(loads(d)) for (d,) in pending)}
            epoch = conn.execute(
                "SELECT epoch FROM project_epochs WHERE project_id = ?", (project_id,)
            ).fetchone()
            return snap_seq, doc, kept, conflicts, epoch

        try:
            # Beside the writer: it sees every commit made before it starts, which is every
            # event up to the project's durable seq (none of it is in flight: it is not loaded).
            snap_seq, doc, kept, conflicts, epoch = await self.store.read_aside(load)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc
        return _Project(
            doc=doc,
            history=kept,
            changes=_Ids(self.id_cache),
            comments=_Ids(self.id_cache),
            pending=conflicts,
            # Stored pending conflicts count in the quotas like new ones.
            pending_bytes=PendingLoad.of(conflicts.values()).bytes,
            snapshot_seq=snap_seq,
            durable_seq=doc.seq,
            **({"epoch": epoch[0], "epoch_stored": True} if epoch else {}),
        )

    def _history(self) -> History:
        return History(limit=self.history_limit, max_bytes=self.quotas.history_bytes,
                       memory_bytes=self.quotas.history_memory)  # fmt: skip

    def held_history(self, project_id: str | None = None) -> HeldHistory:
        """What the loaded projects' histories hold in memory (or only ``project_id``'s)."""
        return HeldHistory.among(self._projects, project_id)

    def release(self, project_id: str) -> None:
        """Forget a project's in-memory state if no room listens to it (it reloads on demand);
        what is durable stays in the store."""
        if not self._listeners.get(project_id):
            self._projects.pop(project_id, None)
            self._loading.pop(project_id, None)

    # -- durable writes -----------------------------------------------------------------------

    async def _commit(
        self,
        project_id: str,
        project: _Project,
        statements: list[Statement],
        event: DurableEvent | None,
        conflicts: list[Conflict],
        *,
        change: tuple[str, ChangeRecord] | None = None,
        comment: tuple[str, int] | None = None,
    ) -> None:
        """Queue rows for the store; on success hand the event and conflicts to listeners.

        ``change``/``comment``: the id this write took and what it records (in flight in the
        project's ids until the commit ends)."""
        with _guarded(project):
            if event is not None:
                # Encode now: a failure here is caught by the guard, not in the store's callback.
                _ = event.encoded
                statements.append(
                    (
                        "INSERT INTO events (project_id, seq, kind, user_id, at, payload, effects) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            project_id,
                            event.seq,
                            event.kind,
                            event.user_id,
                            event.at,
                            dumps(event.payload),
                            dumps(event.effects),
                        ),
                    )
                )
                if not project.epoch_stored:
                    statements.append(
                        (
                            "INSERT OR IGNORE INTO project_epochs (project_id, epoch) "
                            "VALUES (?, ?)",
                            (project_id, project.epoch),
                        )
                    )
                if event.seq - project.snapshot_seq >= self.snapshot_every:
                    project.snapshot_seq = event.seq
                    statements.append(
                        (
                            "INSERT OR REPLACE INTO snapshots (project_id, seq, document) "
                            "VALUES (?, ?, ?)",
                            (project_id, event.seq, dumps(project.doc.dump())),
                        )
                    )

        def on_durable() -> None:
            if change is not None:
                project.changes.durable(*change)
            if comment is not None:
                project.comments.durable(*comment)
            listeners = list(self._listeners.get(project_id, ()))
            if event is not None:
                project.epoch_stored = True
                project.history.append(event)
                project.durable_seq = event.seq
                project.advanced()
                for listener in listeners:
                    listener.on_durable(event)
            if conflicts:
                for listener in listeners:
                    listener.on_conflicts(conflicts)

        def on_failed() -> None:
            project.broken = True
            project.changes.failed()
            project.comments.failed()
            project.advanced()

        try:
            await self.store.write(statements, on_durable, on_failed)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable, nothing was applied: {exc}") from exc

    def _check_writable(self, project: _Project) -> None:
        if project.broken:
            raise Overloaded("storage unavailable, nothing was applied: the project is reloading")

    async def commit_change(
        self, user: User, change: _wire.TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        project_id = user.project_id
        change_id = change.change_id
        while True:
            project = await self._project(project_id)
            self._check_writable(project)
            known = project.changes.get(change_id)
            if known is not None:
                return await self._duplicate(project, known, user, change)
            evicted = project.changes.evicted
            stored = await self._stored_change(project_id, change_id)
            if stored is not None:
                return duplicate_of(stored, user, change)
            # Whatever committed before the lookup began, it saw; whatever began since is in
            # memory, unless the project was reloaded or its cache dropped ids meanwhile.
            if project is self._projects.get(project_id) and project.changes.evicted == evicted:
                break
        known = project.changes.get(change_id)
        if known is not None:
            return await self._duplicate(project, known, user, change)
        self._check_writable(project)
        outcome, event = prepare_change(
            project.doc, user, change, strategy=strategy, roles=project.roles,
            lookup=value_at(project.history), at=now_ms(),
            pending=PendingLoad(len(project.pending), project.pending_bytes),
        )  # fmt: skip
        with _guarded(project):
            record = record_of(user, change, outcome)
            if event is not None:
                project.doc.apply(event.effects, event.seq, user.id)
            project.roles[user.id] = user.role
            conflicts = outcome.detected
            for conflict in conflicts:
                project.pending[conflict.id] = conflict
                project.pending_bytes += conflict_bytes(conflict)
            project.changes.begin(change_id, record)
            statements: list[Statement] = [
                (
                    "INSERT INTO changes (project_id, change_id, user_id, seq, status, conflicts, "
                    "digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (project_id, change_id, user.id, outcome.seq, outcome.status,
                     dumps(outcome.conflicts), record.digest),
                )
            ]  # fmt: skip
            statements += [_conflict_row(c) for c in conflicts]
        await self._commit(project_id, project, statements, event, conflicts,
                           change=(change_id, record))  # fmt: skip
        return outcome

    async def _duplicate(
        self,
        project: _Project,
        known: tuple[ChangeRecord, trio.Event | None],
        user: User,
        change: _wire.TimelineChange,
    ) -> ChangeOutcome:
        """The ``duplicate`` ack of a resend, once the first is durable (an ack never runs
        ahead of the store)."""
        first, done = known
        outcome = duplicate_of(first, user, change)
        if done is not None:
            await done.wait()
            if project.broken:
                raise Overloaded("storage unavailable, nothing was applied: the project is "
                                 "reloading")  # fmt: skip
        return outcome

    async def _stored_change(self, project_id: str, change_id: str) -> ChangeRecord | None:
        row = await self._lookup(
            "SELECT user_id, seq, status, conflicts, digest FROM changes "
            "WHERE project_id = ? AND change_id = ?", (project_id, change_id),
        )  # fmt: skip
        if row is None:
            return None
        user_id, seq, status, conflicts, digest = row
        outcome = ChangeOutcome(
            change_id=change_id, seq=seq, status=status, conflicts=loads(conflicts)
        )
        return ChangeRecord(outcome=outcome, user_id=user_id, digest=digest)

    async def _stored_comment(self, project_id: str, comment_id: str) -> int | None:
        row = await self._lookup(
            "SELECT seq FROM comments WHERE project_id = ? AND comment_id = ?",
            (project_id, comment_id),
        )
        return None if row is None else int(row[0])

    async def _lookup(self, sql: str, params: tuple[str, str]) -> Any:
        """One row by primary key on the store's lookup connection (None: no such row)."""
        try:
            return await self.store.lookup(lambda conn: conn.execute(sql, params).fetchone())
        except StorageError as exc:
            raise Overloaded(f"storage unavailable, nothing was applied: {exc}") from exc

    async def commit_comment(self, user: User, comment: _wire.Comment) -> tuple[int, bool]:
        project_id = user.project_id
        while True:
            project = await self._project(project_id)
            self._check_writable(project)
            known = project.comments.get(comment.id)
            if known is not None:
                return await self._comment_duplicate(project, known)
            evicted = project.comments.evicted
            stored = await self._stored_comment(project_id, comment.id)
            if stored is not None:
                return stored, True
            if project is self._projects.get(project_id) and project.comments.evicted == evicted:
                break
        known = project.comments.get(comment.id)
        if known is not None:
            return await self._comment_duplicate(project, known)
        self._check_writable(project)
        project.roles[user.id] = user.role
        with _guarded(project):
            event = prepare_comment(project.doc, user, comment, now_ms())
            seq, at = event.seq, event.at
            project.doc.apply([], seq, user.id)
            project.comments.begin(comment.id, seq)
            statements: list[Statement] = [
                (
                    "INSERT INTO comments (project_id, comment_id, seq, user_id, element_id, time, "
                    "text, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        project_id,
                        comment.id,
                        seq,
                        user.id,
                        comment.element_id,
                        comment.time,
                        comment.text,
                        at,
                    ),
                )
            ]
        await self._commit(project_id, project, statements, event, [], comment=(comment.id, seq))
        return seq, False

    async def _comment_duplicate(
        self, project: _Project, known: tuple[int, trio.Event | None]
    ) -> tuple[int, bool]:
        seq, done = known
        if done is not None:
            await done.wait()
            if project.broken:
                raise Overloaded("storage unavailable, nothing was applied: the project is "
                                 "reloading")  # fmt: skip
        return seq, True

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
        project = await self._project(project_id)
        self._check_writable(project)
        conflict = project.pending.get(conflict_id)
        if conflict is None:
            raise NotFound(f"data.conflict_id: no pending conflict {conflict_id!r} in this project")
        with _guarded(project):
            event, resolved, redetected = prepare_settle(
                project.doc, conflict, resolution, by=by, writer=writer,
                expect_seq=expect_seq, at=now_ms(), redetect=redetect,
            )  # fmt: skip
            project.doc.apply(event.effects, event.seq, writer)
            del project.pending[conflict_id]
            project.pending_bytes -= conflict_bytes(conflict)
            statements = [_conflict_row(resolved)]
            if redetected is not None:
                # It takes the settled one's place: a resolution is never refused for room.
                project.pending[redetected.id] = redetected
                project.pending_bytes += conflict_bytes(redetected)
                statements.append(_conflict_row(redetected))
        await self._commit(
            project_id, project, statements, event, [redetected] if redetected else []
        )
        return Settled(seq=event.seq, redetected=redetected)

    async def get_settings(self, project_id: str) -> dict[str, Any]:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT settings FROM project_settings WHERE project_id = ?", (project_id,)
            ).fetchone()

        try:
            row = await self.store.read(read)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc
        return dict(loads(row[0])) if row else {}

    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        statement: Statement = (
            "INSERT OR REPLACE INTO project_settings (project_id, settings) VALUES (?, ?)",
            (project_id, dumps(settings)),
        )
        try:
            await self.store.write([statement])
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc

    async def conflict(self, project_id: str, conflict_id: str) -> Conflict | None:
        project = self._projects.get(project_id)
        if project is not None and conflict_id in project.pending:
            return project.pending[conflict_id]  # maybe newer than on disk

        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT data FROM conflicts WHERE id = ? AND project_id = ?",
                (conflict_id, project_id),
            ).fetchone()

        try:
            row = await self.store.read(read)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc
        return None if row is None else _conflict_from_row(loads(row[0]))

    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        def read(conn: sqlite3.Connection) -> Any:
            if status is None:
                return conn.execute(
                    "SELECT data FROM conflicts WHERE project_id = ? "
                    "ORDER BY created_at DESC LIMIT ?",
                    (project_id, limit),
                ).fetchall()
            return conn.execute(
                "SELECT data FROM conflicts WHERE project_id = ? AND status = ? "
                "ORDER BY created_at DESC LIMIT ?",
                (project_id, status, limit),
            ).fetchall()

        try:
            rows = await self.store.read(read)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc
        stored = {c.id: c for c in (_conflict_from_row(loads(d)) for (d,) in rows)}
        # Pending ones may be newer in memory than on disk (their commit is in flight).
        project = self._projects.get(project_id)
        if project is not None and status in (None, "pending"):
            for conflict in project.pending.values():
                stored[conflict.id] = conflict
        ordered = sorted(stored.values(), key=lambda c: c.created_at, reverse=True)
        return ordered[:limit]

    async def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        project = await self._project(user.project_id)
        return dry_run_of(project.doc, project.history, user, change)

    # -- reads --------------------------------------------------------------------------------

    async def snapshot(self, project_id: str) -> dict[str, Any]:
        project = self._projects.get(project_id)
        if project is None or project.broken:
            # Not open here (a REST read): build it from the store and keep nothing resident.
            async with self._loading.setdefault(project_id, trio.Lock()):
                project = self._projects.get(project_id)
                if project is None or project.broken:
                    return (await self._load(project_id, history=False)).doc.snapshot()
        snapshot = project.doc.snapshot()
        await project.settled(snapshot["seq"])
        return snapshot

    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        project = await self._project(project_id)
        await project.settled(project.doc.seq)
        head = project.durable_seq
        if seq > head:
            return None
        if seq == head:
            return []
        return await project.history.since(seq, partial(self._stored_events, project_id))

    async def _stored_events(self, project_id: str, after: int, upto: int) -> list[DurableEvent]:
        """The stored events ``after < seq <= upto`` (every durable one is in the store).

        Raises:
            Overloaded: the store cannot be read now.
        """

        def read(conn: sqlite3.Connection) -> list[DurableEvent]:
            # Decoded and encoded in the reader's thread, beside the writer (see _load).
            events = [_event_of(project_id, row) for row in conn.execute(
                "SELECT seq, kind, user_id, at, payload, effects FROM events "
                "WHERE project_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (project_id, after, upto),
            )]  # fmt: skip
            for event in events:
                _ = event.encoded
            return events

        try:
            return await self.store.read_aside(read)
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc

    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        return list((await self._project(project_id)).pending.values())

    async def epoch(self, project_id: str) -> str:
        return (await self._project(project_id)).epoch

    # -- fan-out ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _subscription(self, project_id: str, listener: Listener) -> AsyncIterator[None]:
        await self._project(project_id)
        self._listeners.setdefault(project_id, set()).add(listener)
        try:
            yield
        finally:
            listeners = self._listeners.get(project_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[project_id]

    def subscribe(self, project_id: str, listener: Listener) -> Any:
        return self._subscription(project_id, listener)

    async def publish(self, message: Ephemeral) -> None:
        for listener in list(self._listeners.get(message.project_id, ())):
            listener.on_ephemeral(message)

    async def user_data(self, project_id: str, user_id: str) -> dict[str, Any]:
        try:
            return await self.store.read_aside(partial(_gdpr.collect, project_id=project_id,
                                                 user_id=user_id))  # fmt: skip
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc

    async def erase_user(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        if self._listeners.get(project_id):
            raise Overloaded(f"project {project_id!r} is open; close its room first")
        self._projects.pop(project_id, None)  # reloaded from the rewritten store on demand
        try:
            return await self.store.read(partial(_gdpr.erase, project_id=project_id,
                                                 user_id=user_id, pseudonym=pseudonym))  # fmt: skip
        except StorageError as exc:
            raise Overloaded(f"storage unavailable: {exc}") from exc

    @property
    def supports_gdpr(self) -> bool:
        """GDPR export and erasure work on the store, in one transaction each."""
        return True

    async def check(self) -> None:
        """The store's probe: a real commit, a WAL checkpoint, the WAL within its bound.

        Raises:
            StorageError: one of them failed (the message names the database file).
        """
        await self.store.probe()

    def health_checks(self) -> Mapping[str, HealthProbe]:
        """``storage``: folded into the server's check of its operations database."""
        return {"storage": self.check}

    def metrics(self) -> Iterable[Metric]:
        """The store's commits, WAL size and checkpoints (``db`` label ``crealia``) and its
        background jobs (``wal_checkpoint``, ``store_writer``)."""
        yield CounterMetricFamily("crealia_store_commits", "SQLite transactions committed.",
                                  value=self.store.commits)  # fmt: skip
        yield from sqlite_metrics([self.store])
        yield from job_metrics(self.store.jobs)


@asynccontextmanager
async def open_backplane(url: str, config: Config) -> AsyncIterator[SQLiteBackplane]:
    """The ``sqlite`` entry point (:class:`~crealia.abc.BackplaneFactory`): a backplane on its
    own store, ``crealia.sqlite3`` in the directory ``url`` names, for the ``async with``
    block, with the config's history limits, quotas and WAL policy.

    ``url`` is ``sqlite:`` (or ``sqlite://``) for ``config.data_dir``, or ``sqlite:///dir``
    (absolute) / ``sqlite:dir`` (relative) for another directory. On exit (also when
    cancelled) what is queued is committed and the store closed.

    Raises:
        ConfigurationError: ``url`` is not such a URL.
        StorageError: the directory or database cannot be created or opened.
    """
    wal = WalPolicy(
        interval=config.wal_checkpoint_interval,
        checkpoint_bytes=config.wal_checkpoint_bytes,
        max_bytes=config.wal_max_bytes,
    )
    durable = config.durability == "fsync"
    async with open_store(data_dir(url, config), wal=wal, durable=durable) as store:
        yield SQLiteBackplane(
            store, history_limit=config.history_limit, snapshot_every=config.snapshot_every,
            quotas=Quotas.of(config),
        )  # fmt: skip


def data_dir(url: str, config: Config) -> Path:
    """The directory a ``sqlite:`` URL names (``config.data_dir`` when it names none).

    Raises:
        ConfigurationError: not a ``sqlite:`` URL, or one with a host, query or fragment.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or parts.query or parts.fragment:
        raise ConfigurationError(
            f"backplane URL {url!r}: expected sqlite: (the data dir), sqlite:///absolute/dir "
            "or sqlite:relative/dir"
        )
    return Path(parts.path) if parts.path else Path(config.data_dir)


def _history_start(conn: sqlite3.Connection, project_id: str, after: int, max_bytes: int) -> int:
    """The seq after which the kept history starts: the last 1,000 events after ``after``,
    and older ones while the total stays within ``max_bytes``."""
    row = conn.execute(
        "SELECT MIN(seq) FROM (SELECT seq, ROW_NUMBER() OVER w AS n, "
        "SUM(length(CAST(payload AS BLOB))) OVER w AS total FROM events "
        "WHERE project_id = ? AND seq > ? WINDOW w AS (ORDER BY seq DESC)) "
        "WHERE n <= ? OR total <= ?",
        (project_id, after, MIN_HISTORY_EVENTS, max_bytes),
    ).fetchone()
    return after if row is None or row[0] is None else int(row[0]) - 1


def _event_of(project_id: str, row: tuple[Any, ...]) -> DurableEvent:
    """The event of a row of ``events`` (seq, kind, user_id, at, payload, effects)."""
    seq, kind, user_id, at, payload, effects = row
    decoded = loads(payload)
    applied = loads(effects)
    if decoded.get("changes") == applied:
        applied = decoded["changes"]  # one copy in memory, as when it was committed
    return DurableEvent(project_id=project_id, seq=seq, kind=kind, user_id=user_id, at=at,
                        payload=decoded, effects=applied)  # fmt: skip


@contextlib.contextmanager
def _guarded(project: _Project) -> Iterator[None]:
    """Mark the project broken if preparing a write fails after its state was touched.

    The in-memory document may already hold part of the write; a broken project refuses further
    writes and reloads from the store on next use, so memory never runs ahead of what is durable.
    """
    try:
        yield
    except ProtocolError:
        raise
    except Exception as exc:
        project.broken = True
        project.changes.failed()
        project.comments.failed()
        project.advanced()
        raise InternalError(f"could not record the write: {type(exc).__name__}: {exc}") from exc


def _conflict_row(conflict: Conflict) -> Statement:
    return (
        "INSERT OR REPLACE INTO conflicts (id, project_id, status, created_at, data) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            conflict.id,
            conflict.project_id,
            conflict.status,
            conflict.created_at,
            dumps(attrs.asdict(conflict)),
        ),
    )


def _conflict_from_row(data: dict[str, Any]) -> Conflict:
    return Conflict(**data)
