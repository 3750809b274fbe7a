"""Operations: the metric sampler, health checks, alert evaluation and the live feed.

A :class:`Monitor` belongs to a server and runs its tasks in its own nursery (a task of the
server's): every ``metrics_interval`` seconds it turns the hot-path counters into one sample for
the server and one per open project (the seed's PerformanceMetrics fields and a few more), keeps
them in a short in-memory ring and in the store, runs the alert rules over them, and pushes both
to live-feed subscribers. Health checks run every ``health_interval`` seconds and on each
``/readyz``. Nothing here is on a message's path: the sessions and rooms only add to counters.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

from . import _wire
from ._alerts import Alert, AlertEngine, AlertNotifier, log_alert
from ._backplane import Backplane, HealthProbe
from ._config import Config
from ._errors import CrealiaError
from ._jobs import JobFailures
from ._logging import iso_time
from ._metrics import LatencyHistogram, Traffic, rates
from ._ops import AlertRow, OpsStore, SampleRow
from ._storage import dumps, keep_pruning, loads

log = logging.getLogger("crealia.monitor")

#: Samples kept in memory per scope for live views (ten minutes at the default interval).
RING = 120
#: Projects whose recent samples are kept in memory after their room closed.
RING_PROJECTS = 256
#: Seconds between event-loop lag probes.
LAG_PROBE = 0.25
#: Values per field a report's p95 is computed from exactly (past that, an even subsample).
P95_EXACT = 20_000
#: Connections whose WebSocket ping round trip is measured each sampling period.
PING_SAMPLE = 16
#: Seconds the sampler waits for those pings at most (less when the sampling period is shorter).
PING_DEADLINE = 5.0

GLOBAL = ""  # the scope key of server-wide samples

#: The seed's PerformanceMetrics fields, then crealia's own, in report order.
FIELDS = (
    "activeUsers", "activeProjects", "activeSessions", "websocketConnections", "webrtcStreams",
    "averageLatency", "memoryUsage", "cpuUsage", "networkBandwidth", "errorRate",
    "conflictRate", "resolutionRate", "eventLoopLag", "fanoutLatencyP99", "pingRtt",
    "memoryRss", "messagesIn", "messagesOut", "bytesIn", "bytesOut", "historyBytes",
    "historyEvents",
)  # fmt: skip


@attrs.frozen(kw_only=True)
class HealthCheck:
    name: str
    ok: bool
    detail: str
    at: int

    def to_wire(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "at": self.at}


@attrs.define(eq=False)
class _Subscriber:
    """A live-feed reader (server-sent events): what it may see and its bounded queue."""

    project_id: str
    send: trio.MemorySendChannel[tuple[str, dict[str, Any]]]


@attrs.define(eq=False)
class Monitor:
    """Samples, health, alerts and the live feed of one server."""

    config: Config
    #: The operations store (samples, alerts; the ``storage`` health check).
    ops: OpsStore
    #: Its health checks and metrics are merged with the server's.
    backplane: Backplane
    hub: Any  # the session Hub (typed loosely: the hub module imports nothing of this one)
    engine: AlertEngine
    notifier: AlertNotifier
    traffic: Traffic
    ping: LatencyHistogram = attrs.Factory(LatencyHistogram)
    #: Worst event-loop lag (seconds) seen in the last sampling period.
    loop_lag: float = 0.0
    health: dict[str, HealthCheck] = attrs.Factory(dict)
    rings: dict[str, collections.deque[dict[str, Any]]] = attrs.Factory(dict)
    _lag_max: float = 0.0
    _started: float = attrs.Factory(trio.current_time)
    _checking: trio.Event | None = None
    _previous: dict[str, tuple[Traffic, float]] = attrs.Factory(dict)
    _ping_mark: LatencyHistogram = attrs.Factory(LatencyHistogram)
    _process: psutil.Process = attrs.Factory(psutil.Process)
    _memory_limit: int = attrs.Factory(lambda: _memory_limit())
    _subscribers: set[_Subscriber] = attrs.Factory(set)
    #: The server's background-job failures (this monitor's jobs: sample, health, prune).
    jobs: JobFailures = attrs.Factory(JobFailures)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the monitor's tasks until cancelled. None of them ends by failing: a failing
        sample, health check or pruning is logged, counted in :attr:`jobs` and tried again
        (a server out of file descriptors must keep serving)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.notifier.run)
            try:
                self._process.cpu_percent(None)  # the first call only starts the measurement
            except (OSError, psutil.Error) as exc:
                self.jobs.failed("sample", exc)
            nursery.start_soon(keep_pruning, self.prune, "prune", self.jobs,
                               self.config.retention_interval)  # fmt: skip
            nursery.start_soon(partial(self.jobs.keep_running, "health", self.check_health,
                                       period=self.config.health_interval))  # fmt: skip
            if self.config.metrics_interval > 0:
                nursery.start_soon(self._lag_probe)
                nursery.start_soon(self._sampler)
            task_status.started()

    # -- the sampler --------------------------------------------------------------------------

    async def _sampler(self) -> None:
        interval = self.config.metrics_interval
        while True:
            with trio.move_on_after(interval):
                try:
                    with trio.move_on_after(min(interval, PING_DEADLINE)):
                        await self.probe_pings()
                except Exception as exc:
                    self.jobs.failed("sample", exc)
                await trio.sleep_forever()  # the rest of the period
            try:
                await self.take_sample()
            except Exception as exc:
                self.jobs.failed("sample", exc)
            else:
                self.jobs.succeeded("sample")

    async def take_sample(self) -> list[dict[str, Any]]:
        """Take one sample of the server and of every open project, store them, run the alert
        rules and feed subscribers; returns the samples (the server's first)."""
        now = time.time()
        samples = [self._global_sample(now)]
        rooms = dict(self.hub.rooms.rooms)
        for project_id, room in rooms.items():
            samples.append(self._project_sample(project_id, room, now))
        gone = [p for p in self._previous if p != GLOBAL and p not in rooms]
        changes: list[Alert] = []
        for project_id in gone:
            del self._previous[project_id]
            changes += self.engine.forget(project_id)
        for sample in samples:
            scope = sample["projectId"] or GLOBAL
            ring = self.rings.get(scope)
            if ring is None:
                ring = self.rings[scope] = collections.deque(maxlen=RING)
                if len(self.rings) > RING_PROJECTS + len(rooms):
                    # Only closed projects' rings go (oldest first): open ones keep theirs.
                    closed = [k for k in self.rings if k != GLOBAL and k not in rooms]
                    for key in closed[: len(self.rings) - RING_PROJECTS - len(rooms)]:
                        del self.rings[key]
            ring.append(sample)
            changes += self.engine.evaluate(sample, now)
        rows: list[SampleRow] = [(s["projectId"] or GLOBAL, s["at"], dumps(s)) for s in samples]
        try:
            await self.ops.write_metrics(rows, [_alert_row(alert) for alert in changes])
        except CrealiaError as exc:
            log.warning("metric samples not stored: %s", exc)
        for sample in samples:
            self._publish("metrics", sample)
        for alert in changes:
            log_alert(alert)
            self.notifier.notify(alert)
            self._publish("alert", alert.to_wire())
        return samples

    def live_counts(self) -> dict[str, int]:
        hub = self.hub
        rooms = list(hub.rooms.rooms.values())
        users: set[str] = set()
        sessions = projects = streams = 0
        for room in rooms:
            streams += len(room.live.open())
            if room.sessions:
                projects += 1
                sessions += len(room.sessions)
                users.update(room.members)
        return {
            "activeUsers": len(users),
            "activeProjects": projects,
            "activeSessions": sessions,
            "websocketConnections": len(hub.live),
            "webrtcStreams": streams,
        }

    def _global_sample(self, now: float) -> dict[str, Any]:
        sample: dict[str, Any] = {"at": int(now * 1000), "projectId": None, **self.live_counts()}
        sample.update(self._rates(GLOBAL, self.traffic, self._started))
        rss = self._process.memory_info().rss
        pings = self.ping.since(self._ping_mark)
        self._ping_mark = self.ping.copy()
        lag, self._lag_max = self._lag_max, 0.0
        self.loop_lag = lag
        ping = pings.mean()
        sample.update(
            memoryUsage=round(100.0 * rss / self._memory_limit, 2),
            memoryRss=rss,
            cpuUsage=round(self._process.cpu_percent(None), 1),
            eventLoopLag=round(lag * 1000, 2),
            pingRtt=None if ping is None else round(ping * 1000, 3),
        )
        sample.update(self._history(None))
        return sample

    def _history(self, project_id: str | None) -> dict[str, int | None]:
        """``historyBytes`` and ``historyEvents``: what the histories hold in memory."""
        try:
            held = self.backplane.held_history(project_id)
        except Exception:  # an adapter's bug must not stop the samples
            log.exception("the backplane's held_history failed")
            return {"historyBytes": None, "historyEvents": None}
        return {"historyBytes": held.bytes, "historyEvents": held.events}

    def _project_sample(self, project_id: str, room: Any, now: float) -> dict[str, Any]:
        live = room.live.open()
        sample: dict[str, Any] = {
            "at": int(now * 1000),
            "projectId": project_id,
            "activeUsers": len(room.users()),
            "activeSessions": len(room.sessions),
            "websocketConnections": len(room.sessions),
            "webrtcStreams": len(live),
            "webrtc": [session.summary() for session in live],
        }
        sample.update(self._rates(project_id, room.traffic, room.opened_at))
        sample.update(self._history(project_id))
        return sample

    def _rates(self, scope: str, traffic: Traffic, started: float) -> dict[str, float | None]:
        """Rates since the previous sample of ``scope``, or since it ``started`` (trio time)."""
        clock = trio.current_time()
        before, then = self._previous.get(scope, (Traffic(), started))
        self._previous[scope] = (traffic.copy(), clock)
        return rates(traffic, before, clock - then)

    async def _lag_probe(self) -> None:
        """How late the event loop wakes a sleeper: a probe with a period, not synchronization."""
        while True:
            start = trio.current_time()
            await trio.sleep(LAG_PROBE)
            self._lag_max = max(self._lag_max, trio.current_time() - start - LAG_PROBE)

    async def probe_pings(self) -> None:
        """Measure the WebSocket ping round trip of a few random connections, all at once.

        The caller bounds the wait (the sampler gives it :data:`PING_DEADLINE` at most); pings
        still unanswered when it is cancelled are not counted.
        """
        sessions = [s for _conn, s in list(self.hub.live.values()) if s is not None]
        chosen = random.sample(sessions, min(PING_SAMPLE, len(sessions)))
        if not chosen:
            return

        async def one(conn: Any) -> None:
            try:
                rtt = await conn.round_trip()
            except CrealiaError:
                return
            if rtt is not None:
                self.ping.observe(rtt)

        async with trio.open_nursery() as nursery:
            for session in chosen:
                nursery.start_soon(one, session.conn)

    # -- health -------------------------------------------------------------------------------

    async def check_health(self) -> dict[str, HealthCheck]:
        """Run every health check now: the operations store writable (``storage``), the
        backplane's own checks (:meth:`~crealia.abc.Backplane.health_checks`: the SQLite
        backplane's store is folded into ``storage``) and the event loop's lag; the results are
        kept for /readyz and /metrics."""
        if self._checking is not None:
            # One check at a time: a burst of /readyz calls shares the one in flight.
            await self._checking.wait()
            return self.health
        self._checking = trio.Event()
        try:
            return await self._run_checks()
        finally:
            self._checking.set()
            self._checking = None

    async def _run_checks(self) -> dict[str, HealthCheck]:
        checks = self._checks()
        results: dict[str, HealthCheck] = {}
        for name, probe in checks.items():
            ok, detail = True, "ok"
            with trio.move_on_after(5) as scope:
                try:
                    await probe()
                except Exception as exc:  # a probe failing in any way is a failing check
                    ok, detail = False, str(exc) or type(exc).__name__
            if scope.cancelled_caught:
                ok, detail = False, "no answer within 5 s"
            results[name] = HealthCheck(name=name, ok=ok, detail=detail, at=_now_ms())
        lag = max(self.loop_lag, self._lag_max)
        lag_ok = lag <= self.config.max_loop_lag
        results["event_loop"] = HealthCheck(
            name="event_loop",
            ok=lag_ok,
            detail=f"lag {lag * 1000:.1f} ms" + ("" if lag_ok else
                   f" is over {self.config.max_loop_lag * 1000:.0f} ms"),
            at=_now_ms(),
        )  # fmt: skip
        for result in results.values():
            previous = self.health.get(result.name)
            if previous is not None and previous.ok != result.ok:
                level = logging.INFO if result.ok else logging.ERROR
                log.log(level, "health check %s: %s", result.name, result.detail)
        self.health = results
        return results

    def _checks(self) -> dict[str, HealthProbe]:
        """The server's checks and the backplane's, by name; a name both have runs the
        backplane's probe, then the server's (the first failure is the check's)."""
        checks = dict(self.backplane.health_checks())
        own: dict[str, HealthProbe] = {"storage": self.ops.probe}
        for name, probe in own.items():
            theirs = checks.get(name)
            checks[name] = probe if theirs is None else partial(_both, theirs, probe)
        # The server's own check first, as /readyz has always listed it.
        return {**{name: checks[name] for name in own}, **checks}

    def health_ok(self) -> dict[str, bool]:
        return {name: check.ok for name, check in self.health.items()}

    # -- retention ----------------------------------------------------------------------------

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete samples and resolved alerts older than ``metrics_retention_days``; returns
        how many samples went."""
        now_ms = _now_ms() if now_ms is None else now_ms
        cutoff = now_ms - int(self.config.metrics_retention_days * 86_400_000)

        return await self.ops.prune_metrics(cutoff)

    # -- the live feed ------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self, project_id: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, dict[str, Any]]]]:
        """Receive ``("metrics", sample)`` and ``("alert", alert)`` as they happen: the server's
        and ``project_id``'s. A reader that falls behind loses the oldest news, not the server
        its memory."""
        send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](64)
        subscriber = _Subscriber(project_id=project_id, send=send)
        self._subscribers.add(subscriber)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(subscriber)
            send.close()

    def publish_security_alert(self, alert: Any) -> None:
        """Feed a new or resolved security alert to the subscribers of each project it concerns,
        as that project sees it (alerts about no project, e.g. cross-site attempts, go to logs
        and webhooks only)."""
        for project_id in sorted(alert.concerns()):
            self._publish("security_alert", alert.to_wire(project_id))

    def _publish(self, kind: str, data: dict[str, Any]) -> None:
        project_id = data.get("projectId")
        for subscriber in list(self._subscribers):
            if project_id is None or project_id == subscriber.project_id:
                try:
                    subscriber.send.send_nowait((kind, data))
                except trio.WouldBlock:
                    pass  # a reader that is behind misses this one
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self._subscribers.discard(subscriber)
        push = {"metrics": "metrics_sample"}.get(kind, kind)
        envelope = _wire.envelope(push, data)
        for session in list(self.hub.metric_subscribers.values()):
            if project_id is None or project_id == session.user.project_id:
                session.push(1, envelope)

    # -- queries ------------------------------------------------------------------------------

    def recent(self, project_id: str | None) -> list[dict[str, Any]]:
        """The samples kept in memory for a project (None: the server), oldest first."""
        return list(self.rings.get(project_id or GLOBAL, ()))

    async def alerts(self, project_id: str | None, start_ms: int, end_ms: int) -> list[Alert]:
        """Alerts of a scope that were firing at some time in ``[start_ms, end_ms)`` (the
        first 10,000)."""

        rows = await self.ops.alerts_between(project_id, start_ms, end_ms)
        return [Alert.from_wire(loads(d)) for d in rows]

    async def report(self, project_id: str | None, start_ms: int, end_ms: int) -> dict[str, Any]:
        """Per-field min/avg/p95/max over the stored samples of a range, and its alerts.

        The samples are read and summed on the store's second connection, in its thread: a
        month of them neither holds back commits nor the event loop. Min, max and average are
        exact; p95 is exact up to ``P95_EXACT`` values per field, then taken from an even
        subsample of that many.
        """
        scope = project_id or GLOBAL

        def aggregate(
            count: int, rows: Iterable[bytes]
        ) -> tuple[int, dict[str, dict[str, float | int]]]:
            step = max(1, math.ceil(count / P95_EXACT))
            stats: dict[str, list[float]] = {}  # field: [min, max, total, n]
            kept: dict[str, list[float]] = {}
            for index, data in enumerate(rows):
                sample = loads(data)
                for field in FIELDS:
                    value = sample.get(field)
                    if value is None:
                        continue
                    value = float(value)
                    acc = stats.get(field)
                    if acc is None:
                        stats[field] = [value, value, value, 1]
                        kept[field] = []
                    else:
                        acc[0], acc[1] = min(acc[0], value), max(acc[1], value)
                        acc[2] += value
                        acc[3] += 1
                    if index % step == 0:
                        kept[field].append(value)
            metrics: dict[str, dict[str, float | int]] = {}
            for field in FIELDS:
                if field in stats:
                    low, high, total, n = stats[field]
                    values = sorted(kept[field])
                    metrics[field] = {
                        "min": low,
                        "avg": round(total / n, 3),
                        "p95": values[max(0, math.ceil(0.95 * len(values)) - 1)],
                        "max": high,
                        "samples": int(n),
                    }
            return count, metrics

        count, metrics = await self.ops.aggregate_samples(scope, start_ms, end_ms, aggregate)
        return {
            "projectId": project_id,
            "startDate": iso_time(start_ms / 1000),
            "endDate": iso_time(end_ms / 1000),
            "samples": count,
            "metrics": metrics,
            "alerts": [a.to_wire() for a in await self.alerts(project_id, start_ms, end_ms)],
        }


def _alert_row(alert: Alert) -> AlertRow:
    return (alert.id, alert.rule, alert.project_id, alert.level, alert.state, alert.started_at,
            alert.updated_at, alert.resolved_at, dumps(alert.to_wire()))  # fmt: skip


def _memory_limit() -> int:
    """Bytes of memory this process may use: its cgroup's limit if it has one, else the RAM."""
    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            return int(raw)
    return total


async def _both(first: HealthProbe, second: HealthProbe) -> None:
    await first()
    await second()


def _now_ms() -> int:
    return int(time.time() * 1000)
