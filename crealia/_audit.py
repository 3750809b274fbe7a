"""The audit log: every security-relevant action as the seed's AuditEvent, stored and queryable.

:meth:`AuditLog.record` is synchronous and cheap (sessions call it on their own path): it builds
the event, hands it to the security rules (:mod:`crealia._security`), and queues it for the
writer task, which stores what is queued in one grouped commit every ``FLUSH_INTERVAL``.
Queries flush first, so an action is visible as soon as its reply is.

What a client can make the log store is bounded three ways (so that no one, authenticated or
not, can fill the disk through it):

- every field has a size: ids and addresses are clipped, ``resource`` and ``user_agent`` to
  :data:`MAX_TEXT_CHARS`, and a row whose data would exceed :data:`MAX_ROW_BYTES` keeps only the
  size of its ``details``;
- refusals (:meth:`AuditLog.refusal`: refused tokens, permissions, rate limits) are aggregated:
  of one address, action and user, one event per ``refusal_window`` seconds is stored, its
  ``details.refused`` counting them (the security rules still see each one);
- the operations database has a size cap (``max_bytes``): past it the oldest audit events, then
  the oldest metric samples, are deleted, and :attr:`AuditLog.size_pruned` counts them.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import attrs
import trio

from ._errors import CrealiaError
from ._jobs import JobFailures
from ._logging import iso_time
from ._ops import AuditFilter, AuditRow, OpsStore
from ._storage import RETENTION_INTERVAL, dumps, keep_pruning, loads

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
    # A strategy's unsure resolution held for a person (a project's ask_when_unsure).
    "conflict_held": ("low", 5),
    "conflict_revert": ("low", 10),
    "conflict_preview": ("low", 0),
    "strategy_change": ("medium", 20),
    "permission_refused": ("medium", 40),
    "rate_limited": ("medium", 30),
    "token_refused": ("high", 60),
    "origin_refused": ("high", 70),
    # Under --dev: a developer's page on an origin not allowed yet is not an attack.
    "dev_origin_refused": ("low", 5),
    "dev_token": ("medium", 20),
    "abuse_closed": ("high", 75),
    # A client that fell client_lag_timeout behind (4409): its network, not an attack.
    "slow_consumer_closed": ("low", 5),
    "export": ("medium", 35),
    "erasure": ("high", 50),
    "alert_resolution": ("low", 10),
}

#: Seconds between flushes of queued events to the store.
FLUSH_INTERVAL = 0.05
#: Events queued while the store fails before the oldest are dropped (and counted).
MAX_QUEUED = 100_000
#: Longest ``resource`` and ``user_agent`` stored, in characters.
MAX_TEXT_CHARS = 256
#: Longest user id, project id and address stored, in characters.
MAX_ID_CHARS = 128
#: Largest stored row (its JSON data); past it ``details`` is replaced by its size.
MAX_ROW_BYTES = 8192
#: Refusal windows open at once (distinct address, action, user); past it the oldest is stored.
MAX_PENDING = 10_000
#: Seconds between checks of the operations database's size against its cap.
SIZE_CHECK_INTERVAL = 10.0
#: Pruning for size goes down to this share of the cap, so it does not run at every check.
SIZE_LOW_WATER = 0.9


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


def _clip(value: str | None, limit: int) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[: limit - 1] + "…"


@attrs.define(eq=False)
class _Pending:
    """A refusal window: its first event stands for every refusal of the window."""

    event: AuditEvent
    started: float
    count: int = 1
    projects: set[str | None] = attrs.Factory(set)


@attrs.define(eq=False)
class AuditLog:
    """Records, stores, prunes and answers queries about audit events."""

    store: OpsStore
    retention_days: float
    observers: list[Observer] = attrs.Factory(list)
    #: Seconds over which refusals of one address, action and user become one stored event
    #: (0: each is stored).
    refusal_window: float = 1.0
    #: Cap of the operations database in bytes (0: none).
    max_bytes: int = 0
    dropped: int = 0
    recorded: int = 0
    #: Refusals counted into another's event instead of being stored on their own.
    aggregated: int = 0
    #: Rows deleted (audit events, metric samples) to keep the database under ``max_bytes``,
    #: the pruning runs that did, and the database's used bytes at the last check.
    size_pruned: int = 0
    size_prunes: int = 0
    db_bytes: int = 0
    _pending: dict[tuple[str, str, str | None], _Pending] = attrs.Factory(dict)
    #: Rows waiting for the writer: serialized at once, so that what waits is a few strings
    #: and bytes the garbage collector does not track (queued objects would survive into the
    #: older generations and make full collections, which pause every room, more frequent).
    _queue: collections.deque[AuditRow] = attrs.Factory(collections.deque)
    _queued: trio.Event = attrs.Factory(trio.Event)
    _flush_lock: trio.Lock = attrs.Factory(trio.Lock)
    #: Where the writer's, the pruning's and the size check's failures are counted.
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: Seconds between deletions of events past their retention.
    prune_interval: float = RETENTION_INTERVAL

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
        event = self._event(action, user_id, project_id, resource, details, ip_address,
                            user_agent, severity, risk_score)  # fmt: skip
        self._store(event)
        self._observe(event)
        return event

    def refusal(
        self,
        action: str,
        *,
        user_id: str | None,
        project_id: str | None,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
        ip_address: str = "",
        user_agent: str = "",
    ) -> AuditEvent:
        """Record a refusal (``token_refused``, ``permission_refused``, ``rate_limited``...):
        like :meth:`record`, but of one address, action and user only the first refusal of each
        ``refusal_window`` is stored, once the window is over (or at the next query), with
        ``details.refused`` = how many it stands for. If they named several projects it is
        stored server-wide (``project_id`` None, ``details.projects`` = how many). The security
        rules see every refusal as it happens."""
        event = self._event(action, user_id, project_id, resource, details, ip_address,
                            user_agent, None, None)  # fmt: skip
        self._observe(event)
        if self.refusal_window <= 0:
            self._store(event)
            return event
        key = (event.ip_address, action, event.user_id)
        now = time.monotonic()
        pending = self._pending.get(key)
        if pending is not None and now - pending.started < self.refusal_window:
            pending.count += 1
            if len(pending.projects) < 100:
                pending.projects.add(event.project_id)
            self.aggregated += 1
            return event
        if pending is not None:
            self._close(key)
        self._pending[key] = _Pending(event=event, started=now, projects={event.project_id})
        if len(self._pending) > MAX_PENDING:
            self._close(next(iter(self._pending)))
        self._queued.set()
        return event

    def _event(
        self,
        action: str,
        user_id: str | None,
        project_id: str | None,
        resource: str,
        details: Mapping[str, Any] | None,
        ip_address: str,
        user_agent: str,
        severity: Severity | None,
        risk_score: int | None,
    ) -> AuditEvent:
        default_severity, default_risk = ACTIONS.get(action, ("medium", 25))
        return AuditEvent(
            id=uuid.uuid4().hex,
            user_id=_clip(user_id, MAX_ID_CHARS),
            project_id=_clip(project_id, MAX_ID_CHARS),
            action=action,
            resource=_clip(resource, MAX_TEXT_CHARS) or "",
            details=details or {},
            timestamp=int(time.time() * 1000),
            ip_address=_clip(ip_address, MAX_ID_CHARS) or "",
            user_agent=_clip(user_agent, MAX_TEXT_CHARS) or "",
            severity=severity or default_severity,
            risk_score=default_risk if risk_score is None else max(0, min(100, risk_score)),
        )

    def _store(self, event: AuditEvent) -> None:
        self.recorded += 1
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(_row(event))
        self._queued.set()

    def _observe(self, event: AuditEvent) -> None:
        for observe in self.observers:
            try:
                observe(event)
            except Exception:  # a broken rule must not cost the action it watches
                log.exception("audit observer failed on %s", event.action)

    def _close(self, key: tuple[str, str, str | None]) -> None:
        """Store a refusal window's event, counting what it stands for."""
        pending = self._pending.pop(key)
        event = pending.event
        details = {**event.details, "refused": pending.count}
        if len(pending.projects) > 1:
            details["projects"] = len(pending.projects)
            event = attrs.evolve(event, project_id=None)
        self._store(attrs.evolve(event, details=details))

    def _close_windows(self, *, every: bool) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items()
                    if every or now - p.started >= self.refusal_window]:  # fmt: skip
            self._close(key)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store queued events and prune old ones until cancelled (then store what is left).

        None of the three jobs ends by failing: a write, a pruning or a size check that fails is
        logged, counted in :attr:`jobs` and retried with a backoff; events that could not be
        stored stay queued (up to ``MAX_QUEUED``) for the next attempt."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_pruning, self.prune, "audit_prune", self.jobs,
                               self.prune_interval)  # fmt: skip
            nursery.start_soon(partial(self.jobs.keep_running, "ops_size_cap", self.enforce_cap,
                                       period=SIZE_CHECK_INTERVAL))  # fmt: skip
            task_status.started()
            try:
                await self.jobs.keep_running("audit_writer", self._write_queued)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5), \
                        self.jobs.guard("audit_writer"):  # fmt: skip
                    await self.flush()

    async def _write_queued(self) -> None:
        """The writer's step: wait for events (unless some wait already), store them."""
        if not self._queue:
            # An open refusal window is stored once it is over.
            with trio.move_on_after(self.refusal_window if self._pending else math.inf):
                await self._queued.wait()
        self._queued = trio.Event()
        self._close_windows(every=False)
        await self._write()
        await trio.sleep(FLUSH_INTERVAL)  # gathers a group per commit

    async def flush(self) -> None:
        """Store every queued event and open refusal window (events stay queued if the store
        fails: logged, not raised)."""
        self._close_windows(every=True)
        try:
            await self._write()
        except CrealiaError as exc:
            log.warning("audit events not stored yet: %s", exc)

    async def _write(self) -> None:
        """Store what is queued in one commit.

        Raises:
            StorageError: the store failed; the events are queued again (oldest first, within
                ``MAX_QUEUED``).
        """
        async with self._flush_lock:
            if not self._queue:
                return
            events, self._queue = self._queue, collections.deque()
            try:
                await self.store.write_audit(list(events))
            except BaseException:
                # Back in front of what came meanwhile, still within the bound: a failed (or
                # cancelled) write loses nothing.
                events.extend(self._queue)
                while len(events) > MAX_QUEUED:
                    events.popleft()
                    self.dropped += 1
                self._queue = events
                raise

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete events older than the retention; returns how many went."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(self.retention_days * 86_400_000)

        return await self.store.prune_audit(cutoff)

    async def enforce_cap(self) -> int:
        """Delete the oldest audit events (then metric samples) while the database holds more
        than ``max_bytes``, down to ``SIZE_LOW_WATER`` of it; returns how many rows went.

        Raises:
            StorageError: the store failed.
        """
        cap = self.max_bytes
        low = int(cap * SIZE_LOW_WATER)

        size, deleted = await self.store.enforce_cap(cap, low)
        self.db_bytes = size
        if deleted:
            self.size_pruned += deleted
            self.size_prunes += 1
            log.warning("operations database over its cap of %d bytes: deleted the %d oldest "
                        "rows, %d bytes used now", cap, deleted, size)  # fmt: skip
        return deleted

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
        where = AuditFilter(project_id=project_id, user_id=user_id, action=action,
                            start_ms=start_ms, end_ms=end_ms, limit=limit)  # fmt: skip
        return [AuditEvent.from_row(loads(data)) for data in await self.store.query_audit(where)]


def _row(event: AuditEvent) -> AuditRow:
    data = dumps(event.to_row())
    if len(data) > MAX_ROW_BYTES:
        size = len(dumps(dict(event.details)))
        data = dumps(attrs.evolve(event, details={"truncated": True, "bytes": size}).to_row())
    return (event.id, event.timestamp, event.project_id, event.user_id, event.action,
            event.severity, event.risk_score, data)  # fmt: skip
