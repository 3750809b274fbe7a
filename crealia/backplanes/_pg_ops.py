"""The PostgreSQL backplane's operations store: audit events, security alerts, metric samples
and alerts in the database every process shares (schema: migration 2 in :mod:`._pg`).

Every query means what :class:`crealia._ops.SqliteOps`'s does (same filters, order, limits,
retention), so the REST API answers alike on SQLite and from any process of a cluster. Two
connections of its own (:class:`._pg.PgConnection`), so that neither an audit batch nor a month's
report ever queues in front of the backplane's event commits: one for writes and deletions, one
for reads.

**Other processes' audit events** (:meth:`PgOps.audit_after`, read by the security monitor's
tail): rows are read in ``(txid, ord)`` order, and only rows of transactions older than the
oldest one still running (``pg_snapshot_xmin(pg_current_snapshot())``): once every transaction
below that horizon has ended, no row can appear below it any more, so a cursor past it never
misses a row committed late (a ``BIGSERIAL`` alone can: numbers are drawn before commit). A
long transaction anywhere in the cluster holds the horizon back, which delays (never loses) the
rows behind it.

**One open security alert per rule, subject and project** (a unique index on ``open_key`` over
open alerts): a process whose rules find what another's already raised adopts the stored alert
(:meth:`PgOps.write_security_alerts` returns it), and a resolved alert is never reopened by a
late write: the next finding opens a new one.

**The size cap** (``ops_max_bytes``) is checked against the live rows' bytes (rows counted,
times the average size of the newest 256, plus their indexes' share), not the tables' files:
PostgreSQL returns deleted rows' space to the table for reuse (autovacuum) rather than to the
file system.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs

from .. import _erasure, _gdpr
from .._ops import AlertRow, AuditFilter, AuditRow, OpsStore, SampleRow, SecurityRow, _scope_audit
from .._sequencing import now_ms
from .._storage import dumps, loads
from . import _pg

T = TypeVar("T")

#: Rows :meth:`PgOps.audit_after` reads per call at most.
TAIL_PAGE = 1000

#: Bytes per row counted for its index entries and tuple header (the size cap's estimate).
ROW_OVERHEAD = 160


def _bytes(value: Any) -> bytes:
    return bytes(value)


@attrs.define(eq=False)
class PgOps(OpsStore):
    """Operations data in PostgreSQL. Built by the PostgreSQL backplane (one per backplane,
    closed with it); ``node`` names the process in the rows it writes."""

    writer: _pg.PgConnection
    reader: _pg.PgConnection
    node: str
    shared: bool = True

    @property
    def name(self) -> str:
        return "ops"

    async def close(self) -> None:
        """Close both connections (shielded)."""
        await self.writer.close()
        await self.reader.close()

    # -- audit events ---------------------------------------------------------------------------

    async def write_audit(self, rows: Sequence[AuditRow]) -> None:
        node = self.node

        def write(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO audit_events (node, id, at, project_id, user_id, action, "
                    "severity, risk, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [(node, *row) for row in rows],
                )

        # Not idempotent: a connection lost in the commit may have stored the rows.
        await self.writer.run(_in_transaction(write), idempotent=False)

    async def query_audit(self, where: AuditFilter) -> list[bytes]:
        clause, params = _scope_audit(where, "%s")
        # Only fixed column conditions are joined; every value is a parameter.
        sql = (f"SELECT data FROM audit_events WHERE {clause} "  # noqa: S608
               "ORDER BY at DESC, ord DESC LIMIT %s")  # fmt: skip
        return await self._read(sql, (*params, where.limit))

    async def user_audit(self, project_id: str, user_id: str) -> list[bytes]:
        return await self._read(
            "SELECT data FROM audit_events WHERE project_id = %s AND user_id = %s ORDER BY at, ord",
            (project_id, user_id),
        )

    async def prune_audit(self, cutoff_ms: int) -> int:
        return await self._delete("DELETE FROM audit_events WHERE at < %s", (cutoff_ms,))

    async def enforce_cap(self, cap: int, low: int) -> tuple[int, int]:
        def prune(conn: Any) -> tuple[int, int]:
            with conn.transaction(), conn.cursor() as cur:
                sizes = {table: _live_bytes(cur, table) for table in _CAPPED}
                size, deleted = sum(n * avg for n, avg in sizes.values()), 0
                if not cap or size <= cap:
                    return int(size), 0
                for table in _CAPPED:
                    rows, avg = sizes[table]
                    if size <= low or not rows:
                        continue
                    batch = min(rows, int((size - low) / avg) + 1)
                    # Table names are constants here; values are parameters.
                    cur.execute(
                        f"DELETE FROM {table} WHERE ord IN (SELECT ord FROM {table} "  # noqa: S608
                        "ORDER BY ord LIMIT %s)",
                        (batch,),
                    )
                    deleted += cur.rowcount
                    size -= cur.rowcount * avg
                return int(max(0, size)), deleted

        return await self.writer.run(prune)

    async def audit_after(self, cursor: Any) -> tuple[list[bytes], Any]:
        node = self.node

        def read(conn: Any) -> tuple[list[bytes], Any]:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                horizon = cur.fetchone()[0]
                if cursor is None:
                    return [], (horizon, 0)  # from now on
                cur.execute(
                    "SELECT txid::text, ord, node, data FROM audit_events "
                    "WHERE (txid, ord) > (%s::xid8, %s) AND txid < %s::xid8 "
                    "ORDER BY txid, ord LIMIT %s",
                    (cursor[0], cursor[1], horizon, TAIL_PAGE),
                )
                rows = cur.fetchall()
                if not rows:
                    return [], cursor
                last = rows[-1]
                return [_bytes(d) for _t, _o, n, d in rows if n != node], (last[0], last[1])

        return await self.reader.run(read)

    # -- security alerts ------------------------------------------------------------------------

    async def write_security_alerts(self, rows: Sequence[SecurityRow]) -> list[bytes]:
        changed = now_ms()

        def write(conn: Any) -> list[bytes]:
            kept: list[bytes] = []
            with conn.cursor() as cur:
                for aid, project_id, kind, resolved, created_at, key, data in rows:
                    cur.execute("SELECT resolved, data FROM security_alerts WHERE id = %s "
                                "FOR UPDATE", (aid,))  # fmt: skip
                    stored = cur.fetchone()
                    if stored is not None and stored[0] and not resolved:
                        kept.append(_bytes(stored[1]))  # resolved meanwhile: stays resolved
                        continue
                    if stored is not None:
                        cur.execute(
                            "UPDATE security_alerts SET resolved = %s, changed_at = %s, "
                            "data = %s WHERE id = %s",
                            (resolved, changed, data, aid),
                        )
                        continue
                    cur.execute(
                        "INSERT INTO security_alerts (id, project_id, type, resolved, "
                        "created_at, changed_at, open_key, data) VALUES (%s, %s, %s, %s, %s, "
                        "%s, %s, %s) ON CONFLICT (open_key) WHERE NOT resolved DO NOTHING "
                        "RETURNING id",
                        (aid, project_id, kind, resolved, created_at, changed, key, data),
                    )
                    if cur.fetchone() is None:  # another process raised it first
                        cur.execute("SELECT data FROM security_alerts WHERE open_key = %s "
                                    "AND NOT resolved", (key,))  # fmt: skip
                        other = cur.fetchone()
                        if other is not None:
                            kept.append(_bytes(other[0]))
            return kept

        return await self.writer.run(_in_transaction(write), idempotent=False)

    async def security_alerts(self, project_id: str | None, resolved: bool | None) -> list[bytes]:
        clauses: list[str] = ["TRUE"]
        params: list[Any] = []
        if project_id is not None:
            clauses.append("(project_id = %s OR project_id IS NULL)")
            params.append(project_id)
        if resolved is not None:
            clauses.append("resolved = %s")
            params.append(resolved)
        # Fixed conditions only; values are parameters.
        sql = (f"SELECT data FROM security_alerts WHERE {' AND '.join(clauses)} "  # noqa: S608
               "ORDER BY created_at DESC")  # fmt: skip
        return await self._read(sql, tuple(params))

    async def security_alerts_changed(self, since_ms: int) -> list[bytes]:
        return await self._read(
            "SELECT data FROM security_alerts WHERE changed_at >= %s ORDER BY changed_at "
            "LIMIT 10000",
            (since_ms,),
        )

    # -- metric samples and alerts ------------------------------------------------------------

    async def write_metrics(self, samples: Sequence[SampleRow], alerts: Sequence[AlertRow]) -> None:
        node = self.node

        def write(conn: Any) -> None:
            with conn.cursor() as cur:
                if samples:
                    cur.executemany(
                        "INSERT INTO metric_samples (node, scope, at, data) "
                        "VALUES (%s, %s, %s, %s)",
                        [(node, *s) for s in samples],
                    )
                if alerts:
                    cur.executemany(
                        "INSERT INTO alerts (id, rule, project_id, level, state, started_at, "
                        "updated_at, resolved_at, data) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                        "%s, %s) ON CONFLICT (id) DO UPDATE SET level = EXCLUDED.level, "
                        "state = EXCLUDED.state, updated_at = EXCLUDED.updated_at, "
                        "resolved_at = EXCLUDED.resolved_at, data = EXCLUDED.data",
                        list(alerts),
                    )

        await self.writer.run(_in_transaction(write), idempotent=False)

    async def prune_metrics(self, cutoff_ms: int) -> int:
        def delete(conn: Any) -> int:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("DELETE FROM metric_samples WHERE at < %s", (cutoff_ms,))
                count = int(cur.rowcount)
                cur.execute("DELETE FROM alerts WHERE state = 'resolved' AND updated_at < %s",
                            (cutoff_ms,))  # fmt: skip
                return count

        return await self.writer.run(delete)

    async def alerts_between(
        self, project_id: str | None, start_ms: int, end_ms: int
    ) -> list[bytes]:
        return await self._read(
            "SELECT data FROM alerts WHERE project_id IS NOT DISTINCT FROM %s "
            "AND started_at < %s AND (resolved_at IS NULL OR resolved_at >= %s) "
            "ORDER BY started_at, id LIMIT 10000",
            (project_id, end_ms, start_ms),
        )

    async def aggregate_samples(
        self, scope: str, start_ms: int, end_ms: int, fn: Callable[[int, Iterable[bytes]], T]
    ) -> T:
        def aggregate(conn: Any) -> T:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                where = "FROM metric_samples WHERE scope = %s AND at >= %s AND at < %s"
                params = (scope, start_ms, end_ms)
                cur.execute(f"SELECT COUNT(*) {where}", params)
                count = int(cur.fetchone()[0])
                # A server-side cursor: a month of samples is streamed, not held at once.
                with conn.cursor(name="crealia_report") as rows:
                    rows.itersize = 2000
                    rows.execute(f"SELECT data {where} ORDER BY at, ord", params)
                    return fn(count, (_bytes(data) for (data,) in rows))

        return await self.reader.run(aggregate)

    # -- GDPR -----------------------------------------------------------------------------------

    async def erase_trail(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        alias = _erasure.Alias(user_id, pseudonym)

        def erase(conn: Any) -> dict[str, int]:
            audit = alerts = 0
            with conn.cursor() as cur:
                cur.execute("SELECT ord, user_id, data FROM audit_events WHERE project_id = %s "
                            "FOR UPDATE", (project_id,))  # fmt: skip
                for ord_, actor, data in cur.fetchall():
                    new = _erasure.erased_audit(actor, loads(_bytes(data)), alias)
                    if new is not None:
                        cur.execute("UPDATE audit_events SET user_id = %s, data = %s "
                                    "WHERE ord = %s",
                                    (new["user_id"], dumps(new), ord_))  # fmt: skip
                        audit += 1
                cur.execute("SELECT id, data FROM security_alerts WHERE project_id = %s OR "
                            "project_id IS NULL FOR UPDATE", (project_id,))  # fmt: skip
                changed = now_ms()
                for aid, data in cur.fetchall():
                    alert = _erasure.erased_alert(loads(_bytes(data)), project_id, alias)
                    if alert is not None:
                        cur.execute("UPDATE security_alerts SET data = %s, changed_at = %s "
                                    "WHERE id = %s", (dumps(alert), changed, aid))  # fmt: skip
                        alerts += 1
            return {"audit": audit, "security_alerts": alerts}

        return await self.writer.run(_in_transaction(erase))

    # -- health -----------------------------------------------------------------------------------

    async def probe(self) -> None:
        """A real write on the ops store's own connection (the backplane's ``postgresql``
        check covers the database itself)."""

        def probe(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT 1 FROM health LIMIT 1")

        await self.writer.run(probe)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[bytes]:
        def read(conn: Any) -> list[bytes]:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql, params)
                return [_bytes(row[0]) for row in cur.fetchall()]

        return await self.reader.run(read)

    async def _delete(self, sql: str, params: tuple[Any, ...]) -> int:
        def delete(conn: Any) -> int:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql, params)
                return int(cur.rowcount)

        return await self.writer.run(delete)


#: The tables the size cap deletes from, oldest rows first, in this order.
_CAPPED = ("audit_events", "metric_samples")


def _live_bytes(cur: Any, table: str) -> tuple[int, float]:
    """``(rows, estimated bytes a row)`` of a capped table."""
    cur.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - a constant name
    rows = int(cur.fetchone()[0])
    cur.execute(
        f"SELECT AVG(pg_column_size(t.*)) FROM (SELECT * FROM {table} "  # noqa: S608
        "ORDER BY ord DESC LIMIT 256) t"
    )
    avg = cur.fetchone()[0]
    return rows, float(avg or 0) + ROW_OVERHEAD


def _in_transaction(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """``fn`` in a transaction of its own (rolled back if it raises)."""

    def run(conn: Any) -> T:
        with conn.transaction():
            return fn(conn)

    return run


# -- GDPR on the projects' tables (the backplane's user_data and erase_user) -------------------


def collect(conn: Any, project_id: str, user_id: str) -> dict[str, Any]:
    """In the worker thread: what :func:`crealia._gdpr.collect` reads from SQLite (comments,
    edits authored, conflicts they were a side of), from the projects' tables, in one
    snapshot."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("SELECT comment_id, seq, element_id, time, text, at FROM comments "
                    "WHERE project_id = %s AND user_id = %s ORDER BY seq",
                    (project_id, user_id))  # fmt: skip
        comments = [
            {"id": cid, "seq": int(seq), "elementId": eid, "time": at_time, "text": text,
             "at": int(at)}
            for cid, seq, eid, at_time, text, at in cur.fetchall()
        ]  # fmt: skip
        cur.execute("SELECT seq, kind, at, payload FROM events WHERE project_id = %s AND "
                    "user_id = %s AND kind != 'comment_add' ORDER BY seq",
                    (project_id, user_id))  # fmt: skip
        edits = [{"seq": int(seq), "kind": kind, "at": int(at), "payload": loads(_bytes(p))}
                 for seq, kind, at, p in cur.fetchall()]  # fmt: skip
        cur.execute("SELECT data FROM conflicts WHERE project_id = %s ORDER BY created_at, ord",
                    (project_id,))  # fmt: skip
        conflicts = [c for c in (loads(_bytes(d)) for (d,) in cur.fetchall())
                     if user_id in _gdpr._parties(c)]  # fmt: skip
    return {"comments": comments, "edits": edits, "conflicts": conflicts}


def erase(conn: Any, project_id: str, user_id: str, pseudonym: str, epoch: str) -> dict[str, int]:
    """In the worker thread: :func:`crealia._gdpr.erase` on the projects' tables, in one
    transaction holding the project's row (so no write of any process interleaves), and
    ``epoch`` as the project's new one; counts per table."""
    alias = _erasure.Alias(user_id, pseudonym)
    counts: dict[str, int] = {}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("INSERT INTO projects (project_id, epoch) VALUES (%s, %s) "
                    "ON CONFLICT (project_id) DO UPDATE SET epoch = EXCLUDED.epoch "
                    "RETURNING seq", (project_id, epoch))  # fmt: skip
        seq = int(cur.fetchone()[0])
        cur.execute("DELETE FROM comments WHERE project_id = %s AND user_id = %s",
                    (project_id, user_id))  # fmt: skip
        counts["comments"] = int(cur.rowcount)
        cur.execute("SELECT id, data FROM conflicts WHERE project_id = %s", (project_id,))
        conflicts = [(cid, _bytes(data)) for cid, data in cur.fetchall()]
        cur.execute("SELECT seq, kind, user_id, payload, effects FROM events "
                    "WHERE project_id = %s ORDER BY seq", (project_id,))  # fmt: skip
        rows = [(int(s), k, u, _bytes(p), _bytes(e)) for s, k, u, p, e in cur.fetchall()]
        involved = {cid for cid, data in conflicts if user_id in _gdpr._parties(loads(data))}
        for _seq, kind, author, payload, _effects in rows:
            if kind == "conflict_resolved" and author == user_id:
                involved.add(loads(payload).get("conflict_id"))
        changed = 0
        for event_seq, kind, author, payload, effects in rows:
            new_payload = _gdpr._event_payload(kind, loads(payload), alias, involved)
            if kind == "comment_add" and author == user_id:
                new_payload["comment"]["text"] = _gdpr.ERASED_TEXT
            new_effects = dumps([_gdpr._effect(op, alias) for op in loads(effects)])
            new_author = alias.id(author)
            if (new_author, dumps(new_payload), new_effects) != (author, payload, effects):
                cur.execute("UPDATE events SET user_id = %s, payload = %s, effects = %s "
                            "WHERE project_id = %s AND seq = %s",
                            (new_author, dumps(new_payload), new_effects, project_id,
                             event_seq))  # fmt: skip
                changed += 1
        counts["events"] = changed
        cur.execute("UPDATE changes SET user_id = %s WHERE project_id = %s AND user_id = %s",
                    (pseudonym, project_id, user_id))  # fmt: skip
        counts["changes"] = int(cur.rowcount)
        changed = 0
        for cid, data in conflicts:
            if cid in involved:
                new = dumps(_gdpr._conflict(loads(data), alias))
                if new != data:
                    cur.execute("UPDATE conflicts SET data = %s WHERE id = %s", (new, cid))
                    changed += 1
        counts["conflicts"] = changed
        cur.execute("SELECT document FROM snapshots WHERE project_id = %s", (project_id,))
        changed = 0
        for (data,) in cur.fetchall():
            new = dumps(_gdpr._document(loads(_bytes(data)), alias))
            if new != _bytes(data):
                cur.execute("UPDATE snapshots SET document = %s WHERE project_id = %s",
                            (new, project_id))  # fmt: skip
                changed += 1
        counts["snapshots"] = changed
        cur.execute(
            "SELECT pg_notify(%s, %s)",
            (_pg.CHANNEL, dumps({"p": project_id, "s": seq, "e": epoch}).decode()),
        )
        # The role a member wrote under is attribution too.
        cur.execute("UPDATE project_roles SET user_id = %s WHERE project_id = %s AND "
                    "user_id = %s", (pseudonym, project_id, user_id))  # fmt: skip
    return counts
