"""The operations store: where audit events, security alerts, metric samples and alerts live.

:class:`OpsStore` is the seam between what the operations code does (:mod:`crealia._audit`,
:mod:`crealia._security`, :mod:`crealia._monitor`, :mod:`crealia._gdpr`) and where it is kept.
The code above it builds rows and reads them back; an ops store only stores, prunes and
answers a fixed set of queries, each with the same meaning everywhere (filters, order, limits).

Two implementations:

- :class:`SqliteOps`, the embedded default: ``ops.sqlite3`` in the data dir, one per process
  (:data:`~crealia._storage.OPS_DB`), its own grouped writer so that audit rows never queue in
  front of the project commits that acks wait for. Its data is this process's alone
  (:attr:`OpsStore.shared` is false).
- The PostgreSQL backplane's (``crealia.backplanes._pg_ops``): tables in the database every
  process of a cluster shares, so that every process answers every operator query alike
  (:attr:`OpsStore.shared` is true), and the security monitor also observes the audit events
  other processes stored (:meth:`OpsStore.audit_after`).

A backplane that has one offers it through :meth:`crealia.abc.Backplane.ops_store`; the server
opens ``ops.sqlite3`` only when it does not.

Rows cross the seam as values: an audit row is ``(id, at, project_id, user_id, action, severity,
risk, data)``, a security-alert row ``(id, project_id, type, resolved, created_at, open_key,
data)``, a metric sample ``(scope, at, data)``, an alert ``(id, rule, project_id, level, state,
started_at, updated_at, resolved_at, data)``; ``data`` is the JSON the query methods return.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from prometheus_client.core import Metric

from ._erasure import erase_trail
from ._storage import Store, sqlite_metrics

T = TypeVar("T")

AuditRow = tuple[str, int, str | None, str | None, str, str, int, bytes]
SecurityRow = tuple[str, str | None, str, bool, int, str, bytes]
SampleRow = tuple[str, int, bytes]
AlertRow = tuple[str, str, str | None, str, str, int, int, int | None, bytes]


@attrs.frozen(kw_only=True)
class AuditFilter:
    """What an audit query selects (every given field must match); newest first."""

    project_id: str | None = None
    user_id: str | None = None
    action: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    limit: int = 1000


class OpsStore(ABC):
    """Stores and answers queries about operations data. Every method may raise
    :class:`~crealia.StorageError` (the embedded store) or :class:`~crealia.Overloaded` (a
    database that cannot be reached); both are :class:`~crealia.CrealiaError`, which the
    background jobs log, count and retry. Cancellation: a write that was started commits or
    fails whole; a read is dropped."""

    #: Whether every process of a cluster shares this store (so a query answers for all).
    shared: bool = False

    @property
    @abstractmethod
    def name(self) -> str:
        """A short name for logs and metrics (``ops``)."""

    @abstractmethod
    async def write_audit(self, rows: Sequence[AuditRow]) -> None:
        """Store audit rows, in one commit."""

    @abstractmethod
    async def query_audit(self, where: AuditFilter) -> list[bytes]:
        """The data of the audit rows matching ``where``, newest first (stored order breaks
        ties), at most ``where.limit``."""

    @abstractmethod
    async def user_audit(self, project_id: str, user_id: str) -> list[bytes]:
        """The data of a user's audit rows in a project, oldest first (a GDPR export)."""

    @abstractmethod
    async def prune_audit(self, cutoff_ms: int) -> int:
        """Delete audit rows older than ``cutoff_ms``; how many went."""

    @abstractmethod
    async def enforce_cap(self, cap: int, low: int) -> tuple[int, int]:
        """While the store holds more than ``cap`` bytes, delete the oldest audit rows (then
        samples) down to ``low``; ``(bytes used, rows deleted)``."""

    async def audit_after(self, cursor: Any) -> tuple[list[bytes], Any]:
        """The audit rows other processes stored after ``cursor`` (None: from now on), and the
        cursor after them. A store no other process writes has none (the default)."""
        return [], cursor

    @abstractmethod
    async def write_security_alerts(self, rows: Sequence[SecurityRow]) -> list[bytes]:
        """Store security alerts (a row replaces the one of the same id). Returns the data of
        the alerts stored *instead* of some rows: in a shared store, an open alert another
        process raised for the same ``open_key`` (the caller adopts it), or a row another
        process resolved meanwhile."""

    @abstractmethod
    async def security_alerts(self, project_id: str | None, resolved: bool | None) -> list[bytes]:
        """Security alerts, newest first: of ``project_id`` and server-wide ones (None: of
        every project), open or resolved only when ``resolved`` says so."""

    async def security_alerts_changed(self, since_ms: int) -> list[bytes]:
        """Security alerts other processes changed since ``since_ms`` (a shared store's; none
        by default)."""
        return []

    @abstractmethod
    async def write_metrics(self, samples: Sequence[SampleRow], alerts: Sequence[AlertRow]) -> None:
        """Store metric samples and alert states (an alert row replaces the one of its id)."""

    @abstractmethod
    async def prune_metrics(self, cutoff_ms: int) -> int:
        """Delete samples, and resolved alerts, older than ``cutoff_ms``; how many samples."""

    @abstractmethod
    async def alerts_between(
        self, project_id: str | None, start_ms: int, end_ms: int
    ) -> list[bytes]:
        """Alerts of a scope (None: the server's) firing at some time in ``[start_ms,
        end_ms)``, oldest first, the first 10,000."""

    @abstractmethod
    async def aggregate_samples(
        self, scope: str, start_ms: int, end_ms: int, fn: Callable[[int, Iterable[bytes]], T]
    ) -> T:
        """``fn(count, data of each sample)`` over the samples of ``scope`` in ``[start_ms,
        end_ms)``, run in a worker thread (a month of samples must not hold the event loop)."""

    @abstractmethod
    async def erase_trail(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        """Pseudonymize a user in a project's audit events and security alerts, in one
        transaction (:func:`crealia._erasure.erased_audit`, :func:`crealia._erasure.erased_alert`);
        counts per table."""

    @abstractmethod
    async def probe(self) -> None:
        """The ``storage`` health check: a real write."""

    def metrics(self) -> Iterable[Metric]:
        """Metrics of the store itself (none by default)."""
        return ()


def _scope_audit(where: AuditFilter, mark: str) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause of an audit query with ``mark`` as parameter mark, and its values."""
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    for column, value in (("project_id", where.project_id), ("user_id", where.user_id),
                          ("action", where.action)):  # fmt: skip
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if where.start_ms is not None:
        clauses.append(f"at >= {mark}")
        params.append(where.start_ms)
    if where.end_ms is not None:
        clauses.append(f"at < {mark}")
        params.append(where.end_ms)
    return " AND ".join(clauses), params


@attrs.define(eq=False)
class SqliteOps(OpsStore):
    """The embedded operations store: ``ops.sqlite3`` through :class:`~crealia._storage.Store`."""

    store: Store

    @property
    def name(self) -> str:
        return self.store.name

    async def write_audit(self, rows: Sequence[AuditRow]) -> None:
        await self.store.write(
            [
                (
                    "INSERT INTO audit_events (id, at, project_id, user_id, action, severity, "
                    "risk, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                for row in rows
            ]
        )

    async def query_audit(self, where: AuditFilter) -> list[bytes]:
        clause, params = _scope_audit(where, "?")
        # Only fixed column conditions are joined; every value is a parameter.
        sql = (f"SELECT data FROM audit_events WHERE {clause} "  # noqa: S608
               "ORDER BY at DESC, rowid DESC LIMIT ?")  # fmt: skip

        def read(conn: sqlite3.Connection) -> list[bytes]:
            return [row[0] for row in conn.execute(sql, (*params, where.limit))]

        return await self.store.read_aside(read)

    async def user_audit(self, project_id: str, user_id: str) -> list[bytes]:
        def read(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT data FROM audit_events WHERE project_id = ? AND user_id = ? "
                "ORDER BY at, rowid",
                (project_id, user_id),
            )
            return [data for (data,) in rows]

        return await self.store.read_aside(read)

    async def prune_audit(self, cutoff_ms: int) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM audit_events WHERE at < ?", (cutoff_ms,)).rowcount

        return await self.store.read(delete)

    async def enforce_cap(self, cap: int, low: int) -> tuple[int, int]:
        def used(conn: sqlite3.Connection) -> int:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return int((pages - free) * conn.execute("PRAGMA page_size").fetchone()[0])

        def prune(conn: sqlite3.Connection) -> tuple[int, int]:
            size, deleted = used(conn), 0
            if not cap or size <= cap:
                return size, 0
            for table, order in (("audit_events", "rowid"), ("metric_samples", "at")):
                for _round in range(1000):
                    if size <= low:
                        return size, deleted
                    # Table and column names are constants here; values are parameters.
                    avg = conn.execute(
                        f"SELECT AVG(LENGTH(data)) FROM (SELECT data FROM {table} "  # noqa: S608
                        f"ORDER BY {order} LIMIT 256)"
                    ).fetchone()[0]
                    if avg is None:
                        break  # nothing left in this table
                    # Indexes and page slack: about twice the row data per row.
                    batch = max(64, int((size - low) / (2 * avg + 64)))
                    deleted += conn.execute(
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "  # noqa: S608
                        f"ORDER BY {order} LIMIT ?)",
                        (batch,),
                    ).rowcount
                    size = used(conn)
            return size, deleted

        return await self.store.read(prune)

    async def write_security_alerts(self, rows: Sequence[SecurityRow]) -> list[bytes]:
        await self.store.write(
            [
                (
                    "INSERT OR REPLACE INTO security_alerts (id, project_id, type, resolved, "
                    "created_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (aid, project_id, kind, int(resolved), created_at, data),
                )
                for aid, project_id, kind, resolved, created_at, _key, data in rows
            ]
        )
        return []

    async def security_alerts(self, project_id: str | None, resolved: bool | None) -> list[bytes]:
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        if project_id is not None:
            clauses.append("(project_id = ? OR project_id IS NULL)")
            params.append(project_id)
        if resolved is not None:
            clauses.append("resolved = ?")
            params.append(int(resolved))
        # Fixed conditions only; values are parameters.
        sql = (f"SELECT data FROM security_alerts WHERE {' AND '.join(clauses)} "  # noqa: S608
               "ORDER BY created_at DESC")  # fmt: skip

        def read(conn: sqlite3.Connection) -> list[bytes]:
            return [row[0] for row in conn.execute(sql, params)]

        return await self.store.read_aside(read)

    async def write_metrics(self, samples: Sequence[SampleRow], alerts: Sequence[AlertRow]) -> None:
        statements: list[tuple[str, Sequence[Any]]] = [
            ("INSERT INTO metric_samples (scope, at, data) VALUES (?, ?, ?)", s) for s in samples
        ]
        statements += [
            ("INSERT OR REPLACE INTO alerts (id, rule, project_id, level, state, started_at, "
             "updated_at, resolved_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", a)
            for a in alerts
        ]  # fmt: skip
        await self.store.write(statements)

    async def prune_metrics(self, cutoff_ms: int) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("DELETE FROM metric_samples WHERE at < ?", (cutoff_ms,))
            conn.execute("DELETE FROM alerts WHERE state = 'resolved' AND updated_at < ?",
                         (cutoff_ms,))  # fmt: skip
            return cursor.rowcount

        return await self.store.read(delete)

    async def alerts_between(
        self, project_id: str | None, start_ms: int, end_ms: int
    ) -> list[bytes]:
        def query(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT data FROM alerts WHERE project_id IS ? AND started_at < ? "
                "AND (resolved_at IS NULL OR resolved_at >= ?) ORDER BY started_at LIMIT 10000",
                (project_id, end_ms, start_ms),
            )
            return [row[0] for row in rows]

        return await self.store.read_aside(query)

    async def aggregate_samples(
        self, scope: str, start_ms: int, end_ms: int, fn: Callable[[int, Iterable[bytes]], T]
    ) -> T:
        def aggregate(conn: sqlite3.Connection) -> T:
            where = "FROM metric_samples WHERE scope = ? AND at >= ? AND at < ?"
            params = (scope, start_ms, end_ms)
            count = conn.execute(f"SELECT COUNT(*) {where}", params).fetchone()[0]
            rows = conn.execute(f"SELECT data {where}", params)
            return fn(int(count), (data for (data,) in rows))

        return await self.store.read_aside(aggregate)

    async def erase_trail(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        return await self.store.read(
            lambda conn: erase_trail(
                conn, project_id=project_id, user_id=user_id, pseudonym=pseudonym
            )
        )

    async def probe(self) -> None:
        await self.store.probe()

    def metrics(self) -> Iterable[Metric]:
        return sqlite_metrics([self.store])
