"""The audit log: every security-relevant action as the seed's AuditEvent, stored and queryable.

:meth:`AuditLog.record` is synchronous and cheap (sessions call it on their own path): it builds
the event, hands it to the security rules (:mod:`crealia._security`), and queues it for the
writer task, which stores what is queued in one grouped commit every ``FLUSH_INTERVAL``.
Queries flush first, so an action is visible as soon as its reply is.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import trio

from ._errors import CrealiaError
from ._logging import iso_time
from ._storage import Statement, Store, dumps, keep_pruning, loads

log = logging.getLogger("crealia.audit")

Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")

#: Every audited action with its default severity and risk score (0..100).
ACTIONS: dict[str, tuple[Severity, int]] = {
    "join": ("low", 0),
    "leave": ("low", 0),
    "edit": ("low", 5),
    "comment": ("low", 5),
    "conflict_resolution": ("low", 10),
    "strategy_change": ("medium", 20),
    "permission_refused": ("medium", 40),
    "rate_limited": ("medium", 30),
    "token_refused": ("high", 60),
    "origin_refused": ("high", 70),
    "abuse_closed": ("high", 75),
    "export": ("medium", 35),
    "erasure": ("high", 50),
    "alert_resolution": ("low", 10),
}

#: Seconds between flushes of queued events to the store.
FLUSH_INTERVAL = 0.05
#: Events queued while the store fails before the oldest are dropped (and counted).
MAX_QUEUED = 100_000


@attrs.frozen(kw_only=True)
class AuditEvent:
    """One security-relevant action (the seed's AuditEvent)."""

    id: str
    user_id: str | None
    project_id: str | None
    action: str
    resource: str
    details: Mapping[str, Any]
    timestamp: int  # epoch ms
    ip_address: str
    user_agent: str
    severity: Severity
    risk_score: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "userId": self.user_id,
            "projectId": self.project_id,
            "action": self.action,
            "resource": self.resource,
            "details": dict(self.details),
            "timestamp": iso_time(self.timestamp / 1000),
            "ipAddress": self.ip_address,
            "userAgent": self.user_agent,
            "severity": self.severity,
            "riskScore": self.risk_score,
        }

    @classmethod
    def from_row(cls, data: Mapping[str, Any]) -> AuditEvent:
        return cls(**data)

    def to_row(self) -> dict[str, Any]:
        # By hand: attrs.asdict recurses and copies, and this runs for every edit.
        return {"id": self.id, "user_id": self.user_id, "project_id": self.project_id,
                "action": self.action, "resource": self.resource, "details": self.details,
                "timestamp": self.timestamp, "ip_address": self.ip_address,
                "user_agent": self.user_agent, "severity": self.severity,
                "risk_score": self.risk_score}  # fmt: skip


#: What ``record`` hands each event to (the security monitor).
Observer = Callable[[AuditEvent], None]


@attrs.define(eq=False)
class AuditLog:
    """Records, stores, prunes and answers queries about audit events."""

    store: Store
    retention_days: float
    observers: list[Observer] = attrs.Factory(list)
    dropped: int = 0
    recorded: int = 0
    #: Rows waiting for the writer: serialized at once, so that what waits is a few strings
    #: and bytes the garbage collector does not track (queued objects would survive into the
    #: older generations and make full collections, which pause every room, more frequent).
    _queue: collections.deque[Statement] = attrs.Factory(collections.deque)
    _queued: trio.Event = attrs.Factory(trio.Event)
    _flush_lock: trio.Lock = attrs.Factory(trio.Lock)

    def record(
        self,
        action: str,
        *,
        user_id: str | None,
        project_id: str | None,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
        ip_address: str = "",
        user_agent: str = "",
        severity: Severity | None = None,
        risk_score: int | None = None,
    ) -> AuditEvent:
        """Record one action now; never blocks and never raises for storage trouble."""
        default_severity, default_risk = ACTIONS.get(action, ("medium", 25))
        event = AuditEvent(
            id=uuid.uuid4().hex,
            user_id=user_id,
            project_id=project_id,
            action=action,
            resource=resource,
            details=details or {},
            timestamp=int(time.time() * 1000),
            ip_address=ip_address,
            user_agent=user_agent[:256],
            severity=severity or default_severity,
            risk_score=default_risk if risk_score is None else max(0, min(100, risk_score)),
        )
        self.recorded += 1
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(_row(event))
        self._queued.set()
        for observe in self.observers:
            try:
                observe(event)
            except Exception:  # a broken rule must not cost the action it watches
                log.exception("audit observer failed on %s", action)
        return event

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store queued events and prune old ones until cancelled (then store what is left)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_pruning, self.prune, "audit log")
            task_status.started()
            try:
                while True:
                    await self._queued.wait()
                    self._queued = trio.Event()
                    await self.flush()
                    await trio.sleep(FLUSH_INTERVAL)  # gathers a group per commit
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.flush()

    async def flush(self) -> None:
        """Store every queued event (events stay queued if the store fails)."""
        async with self._flush_lock:
            if not self._queue:
                return
            events, self._queue = self._queue, collections.deque()
            try:
                await self.store.write(list(events))
            except CrealiaError as exc:
                log.warning("audit events not stored yet: %s", exc)
                # Back in front of what came meanwhile, still within the bound.
                events.extend(self._queue)
                while len(events) > MAX_QUEUED:
                    events.popleft()
                    self.dropped += 1
                self._queue = events

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete events older than the retention; returns how many went."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(self.retention_days * 86_400_000)

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM audit_events WHERE at < ?", (cutoff,)).rowcount

        return await self.store.read(delete)

    async def query(
        self,
        *,
        project_id: str | None = None,
        user_id: str | None = None,
        action: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Stored events matching every given filter, newest first, at most ``limit``."""
        await self.flush()
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column, value in (("project_id", project_id), ("user_id", user_id),
                              ("action", action)):  # fmt: skip
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if start_ms is not None:
            where.append("at >= ?")
            params.append(start_ms)
        if end_ms is not None:
            where.append("at < ?")
            params.append(end_ms)
        # Only fixed column conditions are joined; every value is a parameter.
        sql = (f"SELECT data FROM audit_events WHERE {' AND '.join(where)} "  # noqa: S608
               "ORDER BY at DESC, rowid DESC LIMIT ?")  # fmt: skip

        def read(conn: sqlite3.Connection) -> list[bytes]:
            return [row[0] for row in conn.execute(sql, (*params, limit))]

        return [AuditEvent.from_row(loads(data)) for data in await self.store.read_aside(read)]


def _row(event: AuditEvent) -> Statement:
    return (
        "INSERT INTO audit_events (id, at, project_id, user_id, action, severity, risk, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (event.id, event.timestamp, event.project_id, event.user_id, event.action,
         event.severity, event.risk_score, dumps(event.to_row())),
    )  # fmt: skip
