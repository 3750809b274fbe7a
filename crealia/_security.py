"""Suspicious-activity detection: audit rules over the audit stream raise security alerts.

Audit rules are alert rules (group ``crealia.alert_rules``) of kind ``"audit"``: the
:class:`SecurityMonitor` hands each of them every audit event as it is recorded, and a rule
answers with a :class:`SecurityFinding` when the event completes a pattern (a user refused too
often, bad tokens from one address, one user exporting many projects...). One open alert is kept
per rule, subject and project: more findings raise its ``count`` until a person resolves it.

An address is one subject whatever projects it names (anyone can name any project), so its alert
*concerns* every project named by the events that raised or repeated it, and is *server-wide*
when one of them named none. Every project it concerns sees it (with its own id as
``projectId``); a server-wide alert is seen by every owner, as server-wide (``projectId`` null),
never with the ids of the other projects it concerns.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, ClassVar, Literal

import attrs
import trio

from ._alerts import AlertNotifier, AlertRule, Finding
from ._audit import SEVERITIES, AuditEvent, Severity
from ._errors import CrealiaError, NotFound
from ._jobs import JobFailures
from ._logging import iso_time
from ._ops import OpsStore, SecurityRow
from ._storage import dumps, loads

log = logging.getLogger("crealia.security")

AlertType = Literal[
    "suspicious_activity",
    "permission_escalation",
    "data_breach",
    "unauthorized_access",
    "rate_limit_exceeded",
]
ALERT_TYPES: tuple[AlertType, ...] = (
    "suspicious_activity", "permission_escalation", "data_breach", "unauthorized_access",
    "rate_limit_exceeded",
)  # fmt: skip

#: Subjects a windowed rule tracks at once; the least recently seen go first.
MAX_SUBJECTS = 10_000
#: Open alerts kept in memory (for counting repeats); the oldest go first.
MAX_OPEN = 10_000
#: Projects one alert remembers it concerns; past that it becomes server-wide (every owner
#: sees it), so that memory stays bounded and no concerned project loses sight of it.
MAX_ALERT_PROJECTS = 100
#: Seconds between two reads of the audit events other processes stored (a shared store).
TAIL_INTERVAL = 0.25
#: Refusals one aggregated row of another process's stands for at most, to the rules.
MAX_REPLAY = 1000


@attrs.frozen(kw_only=True)
class SecurityFinding:
    """What an audit rule concluded from an event."""

    type: AlertType = attrs.field(validator=attrs.validators.in_(ALERT_TYPES))
    severity: Severity = attrs.field(validator=attrs.validators.in_(SEVERITIES))
    #: What the alert is about, e.g. ``"user:alice"`` or ``"ip:10.0.0.7"`` (one open alert each).
    subject: str
    message: str


@attrs.frozen(kw_only=True)
class AuditContext:
    """Server settings an audit rule may fall back on."""

    #: SECURITY_ALERT_THRESHOLD: how many suspicious events in the window make an alert.
    threshold: int
    #: Seconds of the sliding window.
    window: float


class AuditRule(AlertRule):
    """A rule over audit events (kind ``"audit"``). :meth:`observe` is called synchronously for
    every recorded event: it must be quick, do no I/O, and keep only bounded state."""

    kind: ClassVar[str] = "audit"

    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        return None  # audit rules do not look at metric samples

    @abstractmethod
    def observe(self, event: AuditEvent, context: AuditContext) -> SecurityFinding | None:
        """The finding this event completes, or None."""


class WindowRule(AuditRule):
    """Counts events of some actions per subject over a sliding window; at ``threshold`` of them
    (or of distinct ``distinct`` values) it finds."""

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        actions: tuple[str, ...],
        subject: Callable[[AuditEvent], str | None],
        type: AlertType,
        severity: Severity,
        describe: Callable[[str, int, float], str],
        distinct: Callable[[AuditEvent], str | None] | None = None,
        threshold: int | None = None,
    ) -> None:
        unknown = sorted(set(options) - {"threshold", "window"})
        if unknown:
            raise ValueError(f"unknown options {unknown} (known: threshold, window)")
        self.threshold = _positive(options, "threshold", threshold, integer=True)
        self.window = _positive(options, "window", None, integer=False)
        self.actions = frozenset(actions)
        self._subject = subject
        self._distinct = distinct
        self.type: AlertType = type
        self.severity: Severity = severity
        self._describe = describe
        self._seen: collections.OrderedDict[str, collections.deque[tuple[int, str]]] = (
            collections.OrderedDict()
        )

    def observe(self, event: AuditEvent, context: AuditContext) -> SecurityFinding | None:
        if event.action not in self.actions:
            return None
        subject = self._subject(event)
        if subject is None:
            return None
        threshold = int(self.threshold or context.threshold)
        window_ms = int(1000 * (self.window or context.window))
        seen = self._seen.pop(subject, None) or collections.deque()
        self._seen[subject] = seen  # most recent last
        value = self._distinct(event) if self._distinct else event.id
        seen.append((event.timestamp, value or ""))
        while seen and seen[0][0] <= event.timestamp - window_ms:
            seen.popleft()
        while len(seen) > 4 * threshold:  # enough to decide; no more
            seen.popleft()
        if len(self._seen) > MAX_SUBJECTS:
            self._seen.popitem(last=False)
        count = len({v for _at, v in seen}) if self._distinct else len(seen)
        if count < threshold:
            return None
        message = self._describe(subject, count, window_ms / 1000)
        return SecurityFinding(type=self.type, severity=self.severity, subject=subject,
                               message=message)  # fmt: skip


def _positive(
    options: Mapping[str, Any], name: str, default: float | None, *, integer: bool
) -> float | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0 or (integer and value != int(value)):  # fmt: skip
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"option {name} must be {kind}, got {value!r}")
    return value


def _user(event: AuditEvent) -> str | None:
    return f"user:{event.user_id}" if event.user_id else None


def _address(event: AuditEvent) -> str | None:
    return f"ip:{event.ip_address}" if event.ip_address else None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def refused_actions(options: Mapping[str, Any]) -> WindowRule:
    """A user refused actions above their role again and again: permission escalation."""
    return WindowRule(
        options, actions=("permission_refused",), subject=_user, type="permission_escalation",
        severity="high",
        describe=lambda who, n, w: f"{who} was refused {n} actions above their role within "
                                   f"{_minutes(w)}",
    )  # fmt: skip


def bad_tokens(options: Mapping[str, Any]) -> WindowRule:
    """Repeated bad or expired tokens from one address: unauthorized access."""
    return WindowRule(
        options, actions=("token_refused",), subject=_address, type="unauthorized_access",
        severity="high",
        describe=lambda who, n, w: f"{n} refused tokens from {who} within {_minutes(w)}",
    )  # fmt: skip


def rate_limit_abuse(options: Mapping[str, Any]) -> WindowRule:
    """A user kept hitting the rate limits."""
    return WindowRule(
        options, actions=("rate_limited",), subject=_user, type="rate_limit_exceeded",
        severity="medium",
        describe=lambda who, n, w: f"{who} was rate-limited {n} times within {_minutes(w)}",
    )  # fmt: skip


def mass_export(options: Mapping[str, Any]) -> WindowRule:
    """One user exporting many projects: a possible data breach (default: 3 projects)."""
    return WindowRule(
        options, actions=("export",), subject=_user, type="data_breach", severity="critical",
        distinct=lambda event: event.project_id, threshold=3,
        describe=lambda who, n, w: f"{who} exported data of {n} projects within {_minutes(w)}",
    )  # fmt: skip


def abuse(options: Mapping[str, Any]) -> WindowRule:
    """A session closed for abuse (4429) or a cross-site WebSocket attempt (default: one)."""
    return WindowRule(
        options, actions=("abuse_closed", "origin_refused"), subject=_address,
        type="suspicious_activity", severity="high", threshold=1,
        describe=lambda who, n, w: f"{n} abusive or cross-site connection attempts from {who} "
                                   f"within {_minutes(w)}",
    )  # fmt: skip


def _project_ids(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class SecurityAlert:
    """A security alert (the seed's SecurityAlert), open until a person resolves it."""

    id: str
    type: AlertType
    severity: Severity
    rule: str
    subject: str
    message: str
    user_id: str | None
    project_id: str | None
    ip_address: str
    count: int
    created_at: int
    updated_at: int
    resolved: bool = False
    resolved_at: int | None = None
    resolved_by: str | None = None
    note: str = ""
    #: Every project the alert concerns (the events that raised and repeated it named them).
    projects: tuple[str, ...] = attrs.field(default=(), converter=_project_ids)
    #: Some of those events named no project: every owner sees the alert, as server-wide.
    server_wide: bool = False

    def concerns(self) -> set[str]:
        """The projects this alert is about."""
        return set(self.projects) | ({self.project_id} if self.project_id else set())

    def visible_to(self, project_id: str) -> bool:
        """Whether an owner of ``project_id`` sees this alert."""
        return project_id in self.concerns() or self.is_server_wide

    @property
    def is_server_wide(self) -> bool:
        return self.server_wide or not self.concerns()

    def to_wire(self, viewer: str | None = None) -> dict[str, Any]:
        """The alert as the API shows it. To an owner of ``viewer`` its ``projectId`` is
        ``viewer`` if the alert concerns that project, else null (server-wide), and the other
        projects stay hidden; without ``viewer`` (logs, webhooks: the operator) ``projects``
        lists them all."""
        wire = self._wire()
        if viewer is None:
            wire.update(projects=sorted(self.concerns()), serverWide=self.is_server_wide)
        else:
            wire["projectId"] = viewer if viewer in self.concerns() else None
        return wire

    def _wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "category": "security",
            "type": self.type,
            "severity": self.severity,
            "rule": self.rule,
            "subject": self.subject,
            "message": self.message,
            "userId": self.user_id,
            "projectId": self.project_id,
            "ipAddress": self.ip_address,
            "count": self.count,
            "timestamp": iso_time(self.created_at / 1000),
            "updatedAt": iso_time(self.updated_at / 1000),
            "resolved": self.resolved,
            "resolvedAt": None if self.resolved_at is None else iso_time(self.resolved_at / 1000),
            "resolvedBy": self.resolved_by,
            "note": self.note,
        }


def _open_key(rule: str, subject: str, project_id: str | None) -> str:
    """The key of an alert's :func:`_key` as one string (a shared store keeps one open alert
    per key)."""
    rule, subject, project = _key(rule, subject, project_id)
    return f"{rule}\x1f{subject}\x1f{project or ''}"


def _key(rule: str, subject: str, project_id: str | None) -> tuple[str, str, str | None]:
    """Which open alert a finding adds to. An address is one subject whatever project it
    names (anyone can name any project)."""
    return rule, subject, None if subject.startswith("ip:") else project_id


@attrs.define(eq=False)
class SecurityMonitor:
    """Runs the audit rules over recorded events and keeps the security alerts."""

    store: OpsStore
    rules: list[AuditRule]
    context: AuditContext
    notifier: AlertNotifier | None = None
    #: Called with each new or resolved alert (the live feed).
    on_change: Callable[[SecurityAlert], None] | None = None
    _open: dict[tuple[str, str, str | None], SecurityAlert] = attrs.Factory(dict)
    #: When the alert of each key was last resolved (epoch ms; the latest :data:`MAX_OPEN`): a
    #: finding completed by events no newer was resolved with it (see :meth:`_raise`).
    _resolved: dict[tuple[str, str, str | None], int] = attrs.Factory(dict)
    _dirty: dict[str, SecurityAlert] = attrs.Factory(dict)
    _wake: trio.Event = attrs.Factory(trio.Event)
    _lock: trio.Lock = attrs.Factory(trio.Lock)
    #: Where the alert writer's failures are counted.
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: Seconds between two reads of other processes' audit events (a shared store only).
    tail_interval: float = TAIL_INTERVAL
    _cursor: Any = None
    _changes_seen: int = attrs.Factory(lambda: int(time.time() * 1000))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the open alerts, then store changes as they come until cancelled."""
        await self.reload()
        try:
            async with trio.open_nursery() as nursery:
                if self.store.shared:
                    self._cursor = (await self.store.audit_after(None))[1]
                    nursery.start_soon(partial(self.jobs.keep_running, "security_tail",
                                               self._tail, period=self.tail_interval))  # fmt: skip
                task_status.started()
                await self.jobs.keep_running("security_alerts", self._store_changes)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5), \
                    self.jobs.guard("security_alerts"):  # fmt: skip
                await self.flush()

    async def _tail(self) -> None:
        """The tail's step (a shared store only): run the rules over the audit events other
        processes stored since the last step, and take the alerts they changed.

        Why observe every process's events here rather than count in the shared table: the
        rules are plugins whose contract is synchronous, bounded and free of I/O
        (:class:`AuditRule`), and a rule's window, threshold and distinct values stay its own;
        fed the cluster's events, each process's rules find what one process would find with
        all of them (4 refused tokens on each of two processes are the 8 of one). The query is
        bounded (``audit_after``: at most a page of rows, by an index, committed rows only)
        and an aggregated refusal row counts as the ``details.refused`` refusals it stands
        for. Every process finds the same alert; the shared store keeps one open alert per
        rule, subject and project, which the others adopt (:meth:`_adopt`).

        Raises:
            CrealiaError: the store failed (logged, counted as ``security_tail``, retried).
        """
        # Overlapping by a second: a change committed late is still seen (adopting is
        # idempotent).
        since, self._changes_seen = self._changes_seen, int(time.time() * 1000) - 1000
        rows, self._cursor = await self.store.audit_after(self._cursor)
        changed = [SecurityAlert(**loads(data))
                   for data in await self.store.security_alerts_changed(since)]  # fmt: skip
        # Resolutions first: the events read may be part of what a person resolved since
        # (then they raise nothing, :meth:`_raise`).
        for alert in changed:
            if alert.resolved:
                self._note_resolved(_key(alert.rule, alert.subject, alert.project_id), alert)
        for data in rows:
            event = AuditEvent.from_row(loads(data))
            refused = event.details.get("refused", 1)
            times = refused if isinstance(refused, int) and refused > 0 else 1
            for _time in range(min(times, MAX_REPLAY)):
                self.observe(event)
        for alert in changed:
            if alert.id not in self._dirty:
                self._adopt(alert)

    async def _store_changes(self) -> None:
        """The writer's step: wait for changed alerts (unless some wait already), store them.

        Raises:
            StorageError: they stay to be stored at the next attempt.
        """
        if not self._dirty:
            await self._wake.wait()
        self._wake = trio.Event()
        await self._write()

    async def reload(self) -> None:
        """Read the open alerts again from the store (after it was rewritten)."""
        self._open = {_key(a.rule, a.subject, a.project_id): a
                      for a in await self.open_alerts()}  # fmt: skip

    def observe(self, event: AuditEvent) -> None:
        """The audit log's observer: one event through every rule."""
        for rule in self.rules:
            try:
                finding = rule.observe(event, self.context)
            except Exception:
                log.exception("audit rule %s failed", rule.name)
                continue
            if finding is not None:
                self._raise(rule, finding, event)

    def _raise(self, rule: AuditRule, finding: SecurityFinding, event: AuditEvent) -> None:
        key = _key(rule.name, finding.subject, event.project_id)
        named = event.project_id
        current = self._open.get(key)
        if current is None and event.timestamp <= self._resolved.get(key, -1):
            # Events from before the alert of this key was resolved, read late from another
            # process: they were part of what the person resolved, not a new finding (without
            # this, every process that reads them after the resolution raised it again).
            return
        if current is not None:
            projects, server_wide = current.projects, current.server_wide or named is None
            new_project = named is not None and named not in current.concerns()
            if named is not None and new_project and len(projects) < MAX_ALERT_PROJECTS:
                projects = (*projects, named)
            elif new_project:
                server_wide = True
            alert = attrs.evolve(current, count=current.count + 1, message=finding.message,
                                 updated_at=event.timestamp, projects=projects,
                                 server_wide=server_wide)  # fmt: skip
            self._open[key] = alert
            self._save(alert)
            if new_project and self.on_change is not None:
                self.on_change(alert)  # the project it now concerns hears of it
            return
        alert = SecurityAlert(
            id=uuid.uuid4().hex, type=finding.type, severity=finding.severity, rule=rule.name,
            subject=finding.subject, message=finding.message, user_id=event.user_id,
            # An address's alert is no one project's: the row is server-wide, ``projects``
            # lists the projects it concerns.
            project_id=key[2], ip_address=event.ip_address, count=1,
            created_at=event.timestamp, updated_at=event.timestamp,
            projects=() if named is None else (named,), server_wide=named is None,
        )  # fmt: skip
        self._open[key] = alert
        if len(self._open) > MAX_OPEN:
            # Forget the oldest here (it stays open in the store): bounded memory.
            del self._open[next(iter(self._open))]
        self._save(alert)
        self._announce(alert)

    def _announce(self, alert: SecurityAlert) -> None:
        level = logging.INFO if alert.resolved else logging.WARNING
        extra = {"security_alert": alert.to_wire(), "project_id": alert.project_id}
        log.log(level, "security alert %s %s: %s", alert.type,
                "resolved" if alert.resolved else "raised", alert.message, extra=extra)  # fmt: skip
        if self.notifier is not None:
            self.notifier.notify(alert)
        if self.on_change is not None:
            self.on_change(alert)

    def _save(self, alert: SecurityAlert) -> None:
        self._dirty[alert.id] = alert
        self._wake.set()

    async def flush(self) -> None:
        """Store the changed alerts now (a failing store is logged, not raised: they stay to
        be stored later)."""
        try:
            await self._write()
        except CrealiaError as exc:
            log.warning("security alerts not stored yet: %s", exc)

    async def _write(self) -> None:
        async with self._lock:
            dirty, self._dirty = self._dirty, {}
            if not dirty:
                return
            try:
                rows: list[SecurityRow] = [
                    (a.id, a.project_id, a.type, a.resolved, a.created_at,
                     _open_key(a.rule, a.subject, a.project_id), dumps(attrs.asdict(a)))
                    for a in dirty.values()
                ]  # fmt: skip
                kept = await self.store.write_security_alerts(rows)
            except BaseException:
                # Newer versions of the same alerts (changed meanwhile) win.
                self._dirty = {**dirty, **self._dirty}
                raise
            for data in kept:
                self._adopt(SecurityAlert(**loads(data)))

    def _adopt(self, stored: SecurityAlert) -> None:
        """Take the shared store's version of an alert instead of this process's: another
        process raised the open alert of the same rule, subject and project first (this one
        counts into it: the greater count, every project either concerns), or resolved it
        (a new finding opens a new one)."""
        key = _key(stored.rule, stored.subject, stored.project_id)
        current = self._open.get(key)
        if stored.resolved:
            self._note_resolved(key, stored)
            if current is not None and current.id == stored.id:
                del self._open[key]
            return
        if current is None:
            self._open[key] = stored
            return
        projects = (*stored.projects, *(p for p in current.projects if p not in stored.projects))
        merged = attrs.evolve(
            stored, count=max(stored.count, current.count),
            updated_at=max(stored.updated_at, current.updated_at),
            projects=projects[:MAX_ALERT_PROJECTS],
            server_wide=stored.server_wide or current.server_wide
            or len(projects) > MAX_ALERT_PROJECTS,
        )  # fmt: skip
        self._open[key] = merged
        if merged != stored:
            self._save(merged)

    def _note_resolved(self, key: tuple[str, str, str | None], alert: SecurityAlert) -> None:
        at = alert.resolved_at if alert.resolved_at is not None else alert.updated_at
        self._resolved[key] = max(at, self._resolved.pop(key, -1))  # most recent last
        if len(self._resolved) > MAX_OPEN:
            del self._resolved[next(iter(self._resolved))]

    async def _query(self, project_id: str | None, resolved: bool | None) -> list[SecurityAlert]:
        rows = await self.store.security_alerts(project_id, resolved)
        return [SecurityAlert(**loads(data)) for data in rows]

    async def open_alerts(self) -> list[SecurityAlert]:
        """Every open alert, of every project and of none, newest first."""
        await self.flush()
        return await self._query(None, False)

    async def alerts(self, project_id: str, status: str | None = None) -> list[SecurityAlert]:
        """The alerts an owner of ``project_id`` sees (those concerning it, and server-wide
        ones), newest first; ``status`` ``open`` or ``resolved`` filters."""
        await self.flush()
        resolved = None if status is None else status == "resolved"
        return [a for a in await self._query(project_id, resolved) if a.visible_to(project_id)]

    def _open_key_of(self, project_id: str, alert_id: str) -> tuple[str, str, str | None] | None:
        return next((k for k, a in self._open.items() if a.id == alert_id and (
            project_id in a.concerns() or not a.concerns())), None)  # fmt: skip

    async def resolve(self, project_id: str, alert_id: str, by: str, note: str) -> SecurityAlert:
        """Resolve an open alert concerning ``project_id`` (or a server-wide one that concerns
        no project): one person looked into it, so it is resolved for every project.

        Raises:
            NotFound: no open alert with that id that this project may resolve.
        """
        key = self._open_key_of(project_id, alert_id)
        if key is None and self.store.shared:
            # Raised by another process, or forgotten here (MAX_OPEN): the store has it.
            for alert in await self._query(None, False):
                if alert.id == alert_id:
                    self._adopt(alert)
            key = self._open_key_of(project_id, alert_id)
        if key is None:
            raise NotFound(f"alert_id: no open security alert {alert_id!r} in this project")
        now = int(time.time() * 1000)
        alert = attrs.evolve(self._open.pop(key), resolved=True, resolved_at=now, resolved_by=by,
                             note=note, updated_at=now)  # fmt: skip
        self._note_resolved(key, alert)
        self._save(alert)
        await self.flush()
        self._announce(alert)
        return alert
