"""Alerting: rules over metric samples, the engine that turns findings into alerts, and the
notifier that POSTs alert changes to webhooks.

The pieces and how they meet::

    sampler ──sample──▶ AlertEngine.evaluate ──changes──▶ log_alert, AlertNotifier.notify, store
                          │
                          └─ AlertRule.check(sample) → Finding | None   (one call per rule)

**Samples.** Every ``metrics_interval`` seconds the sampler hands the engine one sample for the
whole server (``projectId`` is ``None``) and one per open project. A sample is a plain dict:
``{"at": epoch_ms, "projectId": str | None, <field>: float | None, ...}`` with camelCase fields
(``averageLatency`` in ms, ``memoryUsage`` and ``cpuUsage`` in %, ``errorRate`` in %, ...). A
field may be absent or ``None`` when it does not apply (project samples have no memory or CPU).

**Rules.** An :class:`AlertRule` looks at one sample and answers with a :class:`Finding` (a level,
the value, the threshold it passed and a plain-language message) or ``None``. Rules register in
the ``crealia.alert_rules`` entry-point group (see :mod:`crealia._plugins`); the entry point
names a factory called with the rule's options (``Config.alert_options[name]``), and the
entry-point name is the rule's public name. The built-ins (:func:`latency`, :func:`memory`,
:func:`cpu`, :func:`error_rate`, :func:`conflict_rate`, :func:`active_users`) are
:class:`ThresholdRule` instances registered through the same group.

**Alerts.** The engine keeps one state per (rule, project). A level must be seen continuously for
``hold`` seconds before the alert fires, escalates or de-escalates, and the rule must report
nothing for ``hold`` seconds before the alert resolves: a spike or a dip shorter than the hold
changes nothing. An :class:`Alert` keeps its ``id`` from firing to resolution.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import attrs
import httpx
import orjson
import trio

from ._errors import ConfigurationError
from ._jobs import JobFailures

log = logging.getLogger("crealia.alerts")

Level = Literal["warning", "critical"]
State = Literal["firing", "resolved"]
Scope = Literal["global", "project"]

LEVELS: tuple[Level, ...] = ("warning", "critical")
SCOPES: tuple[Scope, ...] = ("global", "project")


def _finite(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


@attrs.frozen(kw_only=True)
class Finding:
    """What a rule says about one sample: the level reached, the value that reached it, the
    threshold it passed, and a plain-language message (``"average latency 612 ms is above 500
    ms"``)."""

    level: Level = attrs.field(validator=attrs.validators.in_(LEVELS))
    value: float = attrs.field(validator=_finite)
    threshold: float = attrs.field(validator=_finite)
    message: str


class AlertRule(ABC):
    """A condition over metric samples. Rules are plain objects registered in the
    ``crealia.alert_rules`` entry-point group; the entry point names a factory called with the
    rule's options mapping (possibly empty), which refuses bad options with :exc:`ValueError` or
    :exc:`TypeError`.

    The contract of :meth:`check`:

    - it is synchronous, quick and pure: it must not do I/O, keep time or modify the sample (the
      engine handles hold times and state; a rule sees one sample at a time);
    - it answers ``None`` when the sample is fine, *or when the rule does not apply to it* (a
      field absent or ``None``, a scope it does not watch);
    - it answers the highest level reached, as a :class:`Finding`;
    - an exception is logged by the engine and counts as ``None`` for that sample; it does not
      affect other rules.
    """

    #: The rule's public name (set from the entry-point name when loaded).
    name: str = ""
    #: What the rule looks at: ``"metric"`` samples (the only kind the engine evaluates).
    kind: ClassVar[str] = "metric"

    @abstractmethod
    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        """The finding for ``sample``, or ``None`` when it is fine or does not apply."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"option {name} must be a finite number, got {value!r}")
    return float(value)


def _format(value: float, unit: str) -> str:
    text = f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3g}"
    if not unit:
        return text
    return f"{text}{unit}" if unit == "%" else f"{text} {unit}"


class ThresholdRule(AlertRule):
    """Fires when one sample field is at or above ``warning`` (or ``critical``, which wins); with
    ``below=True``, when it is at or below them (then ``warning >= critical``).

    ``scopes`` says which samples the rule watches: ``"global"`` (the whole server, ``projectId``
    ``None``) and/or ``"project"``.

    Raises:
        ValueError: a threshold is not a finite number, the thresholds are out of order, or a
            scope is unknown.
    """

    def __init__(
        self,
        metric: str,
        label: str,
        unit: str,
        warning: float,
        critical: float,
        *,
        scopes: Iterable[Scope] = SCOPES,
        below: bool = False,
    ) -> None:
        self.metric = metric
        self.label = label
        self.unit = unit
        self.warning = _number("warning", warning)
        self.critical = _number("critical", critical)
        self.scopes = frozenset(scopes)
        self.below = below
        unknown = sorted(set(self.scopes) - set(SCOPES))
        if unknown or not self.scopes:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)}, got {sorted(scopes)}")
        if below and self.warning < self.critical:
            raise ValueError(
                f"option warning ({_format(self.warning, unit)}) must not be below "
                f"critical ({_format(self.critical, unit)})"
            )
        if not below and self.warning > self.critical:
            raise ValueError(
                f"option warning ({_format(self.warning, unit)}) must not be above "
                f"critical ({_format(self.critical, unit)})"
            )

    def __repr__(self) -> str:
        return (
            f"ThresholdRule({self.metric!r}, warning={self.warning}, critical={self.critical}, "
            f"scopes={sorted(self.scopes)}, below={self.below})"
        )

    def _passes(self, value: float, threshold: float) -> bool:
        return value <= threshold if self.below else value >= threshold

    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        """Raises:
        TypeError: the field holds something other than a number.
        """
        scope: Scope = "global" if sample.get("projectId") is None else "project"
        if scope not in self.scopes:
            return None
        value = sample.get(self.metric)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"sample field {self.metric} is not a number: {value!r}")
        if not math.isfinite(value):
            return None
        level: Level
        if self._passes(value, self.critical):
            level, threshold = "critical", self.critical
        elif self._passes(value, self.warning):
            level, threshold = "warning", self.warning
        else:
            return None
        how = "has reached" if value == threshold else ("is below" if self.below else "is above")
        return Finding(
            level=level,
            value=float(value),
            threshold=threshold,
            message=f"{self.label} {_format(value, self.unit)} {how} "
            f"{_format(threshold, self.unit)}",
        )


def _builtin(
    name: str,
    metric: str,
    label: str,
    unit: str,
    options: Mapping[str, Any],
    warning: float,
    critical: float,
    scopes: Iterable[Scope] = SCOPES,
) -> ThresholdRule:
    unknown = sorted(set(options) - {"warning", "critical"})
    if unknown:
        raise ValueError(f"unknown options {unknown} (known: critical, warning)")
    rule = ThresholdRule(
        metric,
        label,
        unit,
        _number("warning", options.get("warning", warning)),
        _number("critical", options.get("critical", critical)),
        scopes=scopes,
    )
    rule.name = name
    return rule


def latency(options: Mapping[str, Any]) -> ThresholdRule:
    """``latency``: ``averageLatency`` at or above ``warning`` / ``critical`` ms (200 / 500),
    for the server and for each project.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("latency", "averageLatency", "average latency", "ms", options,
                    warning=200, critical=500)  # fmt: skip


def memory(options: Mapping[str, Any]) -> ThresholdRule:
    """``memory``: the process's ``memoryUsage`` at or above ``warning`` / ``critical`` % of
    the machine's memory (80 / 90); server samples only.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("memory", "memoryUsage", "memory usage", "%", options,
                    warning=80, critical=90, scopes=("global",))  # fmt: skip


def cpu(options: Mapping[str, Any]) -> ThresholdRule:
    """``cpu``: ``cpuUsage`` at or above ``warning`` / ``critical`` % of one core (70 / 90);
    server samples only.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("cpu", "cpuUsage", "CPU usage", "%", options,
                    warning=70, critical=90, scopes=("global",))  # fmt: skip


def error_rate(options: Mapping[str, Any]) -> ThresholdRule:
    """``error_rate``: ``errorRate`` at or above ``warning`` / ``critical`` % (5 / 10), for
    the server and for each project.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("error_rate", "errorRate", "error rate", "%", options,
                    warning=5, critical=10)  # fmt: skip


def conflict_rate(options: Mapping[str, Any]) -> ThresholdRule:
    """``conflict_rate``: ``conflictRate`` at or above ``warning`` / ``critical`` % (15 / 25),
    for the server and for each project.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("conflict_rate", "conflictRate", "conflict rate", "%", options,
                    warning=15, critical=25)  # fmt: skip


def active_users(options: Mapping[str, Any]) -> ThresholdRule:
    """``active_users``: ``activeUsers`` at or above ``warning`` / ``critical`` (80 / 100),
    for the server and for each project.

    Raises:
        ValueError: an option other than ``warning`` and ``critical``, or a bad value.
    """
    return _builtin("active_users", "activeUsers", "active users", "", options,
                    warning=80, critical=100)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Alerts and the engine


@attrs.frozen(kw_only=True)
class Alert:
    """One change of an alert: it fired, changed level, or resolved. ``id`` stays the same
    from firing to resolution; ``started_at`` is when it fired, ``updated_at`` when this change
    happened (epoch ms, from the samples' ``at``)."""

    id: str
    rule: str
    level: Level = attrs.field(validator=attrs.validators.in_(LEVELS))
    state: State = attrs.field(validator=attrs.validators.in_(("firing", "resolved")))
    project_id: str | None
    value: float
    threshold: float
    message: str
    started_at: int
    updated_at: int
    resolved_at: int | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of the REST API, the store and webhooks (camelCase keys)."""
        return {
            "id": self.id,
            "category": "performance",
            "rule": self.rule,
            "level": self.level,
            "state": self.state,
            "projectId": self.project_id,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "startedAt": self.started_at,
            "updatedAt": self.updated_at,
            "resolvedAt": self.resolved_at,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Alert:
        """The inverse of :meth:`to_wire`.

        Raises:
            ValueError: a key is missing or has a bad value (the message names it).
        """
        try:
            return cls(
                id=str(data["id"]),
                rule=str(data["rule"]),
                level=data["level"],
                state=data["state"],
                project_id=data.get("projectId"),
                value=float(data["value"]),
                threshold=float(data["threshold"]),
                message=str(data["message"]),
                started_at=int(data["startedAt"]),
                updated_at=int(data["updatedAt"]),
                resolved_at=None if data.get("resolvedAt") is None else int(data["resolvedAt"]),
            )
        except KeyError as exc:
            raise ValueError(f"alert: {exc.args[0]} is required") from None
        except (TypeError, ValueError) as exc:
            # attrs' validators put the message first among other args.
            raise ValueError(f"alert: {exc.args[0] if exc.args else exc}") from None


def log_alert(alert: Alert) -> None:
    """Log one alert change on ``crealia.alerts``: WARNING when firing, INFO when resolved, with
    the alert's wire form and project in the record's ``extra``."""
    where = f" in project {alert.project_id}" if alert.project_id is not None else ""
    if alert.state == "firing":
        log.warning(
            "alert %s %s%s: %s",
            alert.rule,
            alert.level,
            where,
            alert.message,
            extra={"alert": alert.to_wire(), "project_id": alert.project_id},
        )
    else:
        log.info(
            "alert %s resolved%s: %s",
            alert.rule,
            where,
            alert.message,
            extra={"alert": alert.to_wire(), "project_id": alert.project_id},
        )


# Levels as ranks: 0 is "no finding".
_RANK: dict[Level | None, int] = {None: 0, "warning": 1, "critical": 2}
_LEVEL_OF_RANK: dict[int, Level] = {1: "warning", 2: "critical"}


@attrs.define
class _Track:
    """What the engine remembers of one (rule, project)."""

    #: The firing alert, if any.
    alert: Alert | None = None
    #: Since when (engine time) findings have been at least / at most each rank, continuously;
    #: ``None`` while they are not.
    at_least: dict[int, float | None] = attrs.Factory(lambda: {1: None, 2: None})
    at_most: dict[int, float | None] = attrs.Factory(lambda: {0: None, 1: None})
    #: The latest finding of each level (what a level change reports).
    last: dict[Level, Finding] = attrs.Factory(dict)

    def observe(self, rank: int, now: float) -> None:
        for bound in self.at_least:
            if rank < bound:
                self.at_least[bound] = None
            elif self.at_least[bound] is None:
                self.at_least[bound] = now
        for bound in self.at_most:
            if rank > bound:
                self.at_most[bound] = None
            elif self.at_most[bound] is None:
                self.at_most[bound] = now

    def target(self, current: int, now: float, hold: float) -> int:
        """The rank the alert should move to now (``current`` when nothing has held long
        enough). Up: the highest rank findings have stayed at or above for ``hold``; down: the
        lowest they have stayed at or below for ``hold``."""

        def held(since: float | None) -> bool:
            return since is not None and now - since >= hold

        for bound in (2, 1):
            if bound > current and held(self.at_least[bound]):
                return bound
        for bound in (0, 1):
            if bound < current and held(self.at_most[bound]):
                return bound
        return current


class AlertEngine:
    """Turns rule findings into alert changes, one state per (rule name, project).

    Timing (``now`` in seconds, monotonic or epoch: only differences count): a level must be
    found continuously for at least ``hold`` seconds before the alert fires at it (first finding
    at ``t0``, fires at the first sample with ``now - t0 >= hold``; ``hold`` 0 fires on the first
    finding). Escalation (findings critical for ``hold``), de-escalation (findings at most warning
    for ``hold``) and resolution (no finding for ``hold``) wait the same way, so a spike or a dip
    shorter than the hold changes nothing.

    Only rules of kind ``"metric"`` are evaluated. Not thread-safe; call it from one task.

    Raises:
        ValueError: ``hold`` is negative, or two rules share a name (or one has none).
    """

    def __init__(self, rules: Sequence[AlertRule], hold: float) -> None:
        if not (math.isfinite(hold) and hold >= 0):
            raise ValueError(f"hold must be a finite number of seconds >= 0, got {hold!r}")
        names = [rule.name for rule in rules]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"alert rules need distinct, non-empty names, got {names}")
        self.rules = [rule for rule in rules if rule.kind == "metric"]
        self.hold = hold
        self._tracks: dict[tuple[str, str | None], _Track] = {}
        #: Rules whose last check raised (logged once until they succeed again).
        self._failing: set[str] = set()

    def evaluate(self, sample: Mapping[str, Any], now: float) -> list[Alert]:
        """Check every rule against ``sample`` and return the alert changes it caused: a new
        firing alert, a level change of a firing alert (same id, new level), or a resolution
        (same id, state ``resolved``).

        A rule that raises is logged (on ``crealia.alerts``) and counts as no finding.
        """
        project_id = sample.get("projectId")
        at = sample.get("at")
        at_ms = int(at) if isinstance(at, int | float) else int(time.time() * 1000)
        changes: list[Alert] = []
        for rule in self.rules:
            finding = self._check(rule, sample)
            key = (rule.name, project_id)
            track = self._tracks.get(key)
            if track is None:
                if finding is None:
                    continue  # nothing to remember for a quiet rule
                track = self._tracks[key] = _Track()
            if finding is not None:
                track.last[finding.level] = finding
            track.observe(_RANK[finding.level if finding else None], now)
            current = _RANK[track.alert.level] if track.alert is not None else 0
            target = track.target(current, now, self.hold)
            if target != current:
                change = self._move(rule.name, project_id, track, target, finding, at_ms)
                changes.append(change)
            if track.alert is None and track.at_least[1] is None:
                del self._tracks[key]  # quiet and resolved: forget it
        return changes

    def firing(self) -> list[Alert]:
        """The alerts firing now."""
        return [track.alert for track in self._tracks.values() if track.alert is not None]

    def forget(self, project_id: str) -> list[Alert]:
        """A project's room closed: resolve its firing alerts (returned as changes, resolved
        now) and drop its state."""
        at_ms = int(time.time() * 1000)
        changes: list[Alert] = []
        for key in [key for key in self._tracks if key[1] == project_id]:
            alert = self._tracks.pop(key).alert
            if alert is not None:
                changes.append(
                    attrs.evolve(
                        alert,
                        state="resolved",
                        message=f"resolved (project closed): {alert.message}",
                        updated_at=at_ms,
                        resolved_at=at_ms,
                    )
                )
        return changes

    def _check(self, rule: AlertRule, sample: Mapping[str, Any]) -> Finding | None:
        try:
            finding = rule.check(sample)
            if finding is not None and not isinstance(finding, Finding):
                raise TypeError(f"check() returned {type(finding).__name__}, not a Finding")
        except Exception:  # a broken rule must not break the others
            if rule.name not in self._failing:
                self._failing.add(rule.name)
                log.exception("alert rule %r failed; counted as no finding", rule.name)
            else:
                log.debug("alert rule %r failed again", rule.name, exc_info=True)
            return None
        self._failing.discard(rule.name)
        return finding

    @staticmethod
    def _move(
        rule: str,
        project_id: str | None,
        track: _Track,
        target: int,
        finding: Finding | None,
        at_ms: int,
    ) -> Alert:
        previous = track.alert
        if target == 0:
            assert previous is not None
            track.alert = None
            track.last.clear()
            return attrs.evolve(
                previous,
                state="resolved",
                message=f"resolved: {previous.message}",
                updated_at=at_ms,
                resolved_at=at_ms,
            )
        level = _LEVEL_OF_RANK[target]
        # The finding at this level: this sample's, or the latest one (a de-escalation may land
        # on a sample without a finding while findings have stayed at most warning long enough).
        if finding is None or finding.level != level:
            finding = track.last.get(level, finding)
        assert finding is not None
        if previous is None:
            alert = Alert(
                id=uuid.uuid4().hex,
                rule=rule,
                level=level,
                state="firing",
                project_id=project_id,
                value=finding.value,
                threshold=finding.threshold,
                message=finding.message,
                started_at=at_ms,
                updated_at=at_ms,
            )
        else:
            alert = attrs.evolve(
                previous,
                level=level,
                value=finding.value,
                threshold=finding.threshold,
                message=finding.message,
                updated_at=at_ms,
            )
        track.alert = alert
        return alert


# ---------------------------------------------------------------------------------------------
# Webhooks


class Notice(Protocol):
    """What the notifier sends: a performance :class:`Alert` or a security alert."""

    @property
    def id(self) -> str: ...

    def to_wire(self) -> dict[str, Any]: ...


class AlertNotifier:
    """POSTs every alert change as JSON ``{"alert": alert.to_wire()}`` to each webhook (its
    ``category`` says whether it is a performance or a security alert).

    :meth:`notify` queues a change (never blocking; a full queue drops it, logged);
    :meth:`run` delivers, each webhook in order and the webhooks independently of each other.
    A delivery attempt that gets no answer within ``timeout`` seconds, a connection error, a
    429 or a 5xx answer is retried up to ``retries`` times, after ``backoff``, ``2 * backoff``,
    ``4 * backoff``... seconds; other answers below 200 or from 300 are not retried. A change
    that cannot be delivered is logged and counted in :attr:`failed`, never raised.

    Raises:
        ConfigurationError: a webhook is not an http(s) URL, or a number is out of range.
    """

    def __init__(
        self,
        webhooks: Sequence[str],
        *,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 5.0,
        queue: int = 1000,
        jobs: JobFailures | None = None,
    ) -> None:
        for url in webhooks:
            try:
                scheme = httpx.URL(url).scheme
            except (httpx.InvalidURL, TypeError) as exc:
                raise ConfigurationError(f"alert webhook {url!r}: {exc}") from exc
            if scheme not in ("http", "https"):
                raise ConfigurationError(f"alert webhook {url!r}: must be an http(s) URL")
        if retries < 0 or backoff < 0 or timeout <= 0 or queue < 1:
            raise ConfigurationError(
                "alert notifier needs retries >= 0, backoff >= 0, timeout > 0 and queue >= 1"
            )
        self.webhooks = tuple(webhooks)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        #: Deliveries that got a 2xx answer / that gave up / changes dropped on a full queue
        #: (each counted per webhook).
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._queues = {url: trio.open_memory_channel[Notice](queue) for url in self.webhooks}
        #: Queued or in-flight deliveries, and the tasks waiting for there to be none.
        self._pending = 0
        self._idle = trio.lowlevel.ParkingLot()
        #: Where deliveries that failed in an unexpected way (not an HTTP error) are counted.
        self.jobs = jobs or JobFailures()

    def notify(self, alert: Notice) -> None:
        """Queue ``alert`` for every webhook. Never blocks: when a webhook's queue is full the
        change is dropped for it (and logged)."""
        for url, (send, _receive) in self._queues.items():
            try:
                send.send_nowait(alert)
            except trio.WouldBlock:
                self.dropped += 1
                log.error("alert webhook %s is behind: dropped alert %s", url, alert.id)
            else:
                self._pending += 1

    async def wait_drained(self) -> None:
        """Wait until every queued change has been delivered or given up on (e.g. before
        shutting down; bound it with ``trio.move_on_after``). Needs :meth:`run` running."""
        while self._pending:
            await self._idle.park()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued changes until cancelled (reports readiness through ``task_status``).

        Cancellation abandons the delivery in flight and leaves the rest queued.
        """
        timeout = httpx.Timeout(self.timeout)
        async with httpx.AsyncClient(timeout=timeout) as client, trio.open_nursery() as nursery:
            for url, (_send, receive) in self._queues.items():
                nursery.start_soon(self._deliver_all, client, url, receive)
            task_status.started()

    async def _deliver_all(
        self, client: httpx.AsyncClient, url: str, receive: trio.MemoryReceiveChannel[Notice]
    ) -> None:
        while True:
            alert = await receive.receive()
            delivered = False
            with self.jobs.guard("alert_webhook", url):  # a delivery failing oddly ends nothing
                delivered = await self._deliver(client, url, alert)
            if delivered:
                self.delivered += 1
            else:
                self.failed += 1
            self._pending -= 1
            if not self._pending:
                self._idle.unpark_all()

    async def _deliver(self, client: httpx.AsyncClient, url: str, alert: Notice) -> bool:
        body = {"alert": alert.to_wire()}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await trio.sleep(self.backoff * 2 ** (attempt - 1))
            status, problem = await self._attempt(client, url, body)
            if status is not None and 200 <= status < 300:
                return True
            log.info("alert webhook %s attempt %d: %s", url, attempt + 1, problem)
            if status is not None and status != 429 and status < 500:
                break
        log.error("alert webhook %s: gave up on alert %s: %s", url, alert.id, problem)
        return False

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, body: dict[str, Any]
    ) -> tuple[int | None, str]:
        """One POST: (status, "") or (None, why there is no answer)."""
        data = orjson.dumps(body)
        request = client.build_request("POST", url, content=data,
                                       headers={"Content-Type": "application/json"})  # fmt: skip
        request.stream = _Body(data)
        with trio.move_on_after(self.timeout):
            try:
                response = await client.send(request)
            except httpx.HTTPError as exc:
                return None, f"{type(exc).__name__}: {exc}"
            return response.status_code, f"HTTP {response.status_code}"
        return None, f"no answer within {self.timeout} s"


class _Body(httpx.AsyncByteStream):
    """A request body that is not an async generator. httpx's own is one, and a request
    cancelled while it is sent (a timeout, shutdown) leaves it suspended: Trio then warns
    that it was garbage collected unfinished, which a test run counts as an error."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data
