"""Counters kept on the hot path, and the Prometheus view of them.

The hot path only adds to plain integers (:class:`Traffic`) and to a fixed-bucket
:class:`LatencyHistogram`; nothing there takes a lock or builds an object. Rates, averages and
quantiles are computed by the sampler from the difference between two snapshots, and the
Prometheus exposition is built from the same numbers at scrape time by :class:`ServerCollector`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ._live import live_figures
from ._storage import sqlite_memory_bytes

if TYPE_CHECKING:
    from ._alerts import AlertEngine, AlertNotifier
    from ._backplane import Backplane
    from ._jobs import JobFailures
    from ._ops import OpsStore

log = logging.getLogger("crealia.metrics")

#: Histogram bucket upper bounds, in seconds (Prometheus convention).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """Counts of observations per bucket, their sum and count: cheap to add to."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def copy(self) -> LatencyHistogram:
        other = LatencyHistogram()
        other.counts = list(self.counts)
        other.count = self.count
        other.total = self.total
        return other

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """The observations made after ``earlier`` (a copy of this histogram) was taken."""
        delta = LatencyHistogram()
        delta.counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        delta.count = self.count - earlier.count
        delta.total = self.total - earlier.total
        return delta

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """An estimate of quantile ``q`` (linear within its bucket), or None when empty."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for index, count in enumerate(self.counts):
            if count and seen + count >= rank:
                low = BUCKETS[index - 1] if index else 0.0
                high = BUCKETS[index] if index < len(BUCKETS) else BUCKETS[-1] * 2
                return low + (high - low) * ((rank - seen) / count)
            seen += count
        return BUCKETS[-1] * 2

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets as prometheus-client's HistogramMetricFamily takes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@attrs.define(slots=True, eq=False)
class Traffic:
    """What went through the server (or one project's room) since it started."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    frames_out: int = 0
    #: Frames that carried more than one envelope.
    frames_batched: int = 0
    bytes_out: int = 0
    errors: int = 0
    changes: int = 0
    conflicted_changes: int = 0
    conflicts_detected: int = 0
    conflicts_settled: int = 0
    slow_consumers: int = 0
    #: Of those, closed because their own progress lagged (``client_lag_timeout``).
    lagging_consumers: int = 0
    fanout: LatencyHistogram = attrs.Factory(LatencyHistogram)
    by_type: dict[str, int] = attrs.Factory(dict)
    by_error: dict[str, int] = attrs.Factory(dict)

    def received(self, kind: str, size: int) -> None:
        self.messages_in += 1
        self.bytes_in += size
        self.by_type[kind] = self.by_type.get(kind, 0) + 1

    def refused(self, code: str) -> None:
        self.errors += 1
        self.by_error[code] = self.by_error.get(code, 0) + 1

    def sent(self, count: int, size: int, latency: float | None) -> None:
        self.messages_out += count
        self.frames_out += 1
        self.bytes_out += size
        if count > 1:
            self.frames_batched += 1
        if latency is not None:
            self.fanout.observe(latency)

    def copy(self) -> Traffic:
        return attrs.evolve(self, fanout=self.fanout.copy(), by_type=dict(self.by_type),
                            by_error=dict(self.by_error))  # fmt: skip


def rates(now: Traffic, before: Traffic, seconds: float) -> dict[str, float | None]:
    """The PerformanceMetrics fields that come from traffic between two snapshots."""
    seconds = max(seconds, 1e-9)
    fanout = now.fanout.since(before.fanout)
    messages_in = now.messages_in - before.messages_in
    changes = now.changes - before.changes
    detected = now.conflicts_detected - before.conflicts_detected
    settled = now.conflicts_settled - before.conflicts_settled
    bytes_in = now.bytes_in - before.bytes_in
    bytes_out = now.bytes_out - before.bytes_out
    mean, p99 = fanout.mean(), fanout.quantile(0.99)
    return {
        "averageLatency": None if mean is None else round(mean * 1000, 3),
        "fanoutLatencyP99": None if p99 is None else round(p99 * 1000, 3),
        "networkBandwidth": round((bytes_in + bytes_out) / seconds, 1),
        "errorRate": _percent(now.errors - before.errors, messages_in),
        "conflictRate": _percent(now.conflicted_changes - before.conflicted_changes, changes),
        "resolutionRate": 100.0 if detected <= 0 else min(100.0, _percent(settled, detected)),
        "messagesIn": round(messages_in / seconds, 2),
        "messagesOut": round((now.messages_out - before.messages_out) / seconds, 2),
        "bytesIn": round(bytes_in / seconds, 1),
        "bytesOut": round(bytes_out / seconds, 1),
    }


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 3) if whole > 0 else 0.0


class Monitored(Protocol):
    """What :class:`ServerCollector` reads at scrape time (:class:`crealia._monitor.Monitor` is
    one: naming only this keeps the monitor above the counters it keeps)."""

    traffic: Traffic
    ping: LatencyHistogram
    #: Worst event-loop lag (seconds) seen in the last sampling period.
    loop_lag: float
    backplane: Backplane
    ops: OpsStore
    notifier: AlertNotifier
    engine: AlertEngine
    jobs: JobFailures
    hub: Any

    def live_counts(self) -> dict[str, int]:
        """Connections, sessions, users, projects and streams open now."""

    def health_ok(self) -> dict[str, bool]:
        """Whether each health check passed at its last run."""


class ServerCollector(Collector):
    """The server's metrics in Prometheus form, read from the monitor at scrape time.

    Labels are bounded: message types and error codes are the protocol's own; rule names are
    those installed. Per-project figures are in the JSON API, not here (one series per project
    would grow without bound).
    """

    def __init__(self, monitor: Monitored) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        """The server's families, with the backplane's own merged in
        (:meth:`crealia.abc.Backplane.metrics`)."""
        try:
            extra = list(self._monitor.backplane.metrics())
        except Exception:  # an adapter's bug must not take /metrics down
            log.exception("the backplane's metrics failed; scraped without them")
            extra = []
        return merge_families(self._own(), extra)

    def _own(self) -> Iterator[Metric]:
        monitor = self._monitor
        live = monitor.live_counts()
        traffic = monitor.traffic
        for name, doc, value in (
            ("connections", "Open WebSocket connections, including those before hello.",
             live["websocketConnections"]),
            ("sessions", "Authenticated sessions.", live["activeSessions"]),
            ("active_users", "Distinct users with a session on this process.",
             live["activeUsers"]),
            ("active_projects", "Projects with a session on this process.",
             live["activeProjects"]),
            ("webrtc_streams", "Live WebRTC streams.", live["webrtcStreams"]),
            ("event_loop_lag_seconds", "Worst event-loop lag in the last sampling period.",
             monitor.loop_lag),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"crealia_{name}", doc, value=value)
        for name, doc, value in (
            ("received_bytes", "Bytes of client messages received.", traffic.bytes_in),
            ("sent_bytes", "Bytes of frames sent to clients (before compression).",
             traffic.bytes_out),
            ("messages_sent", "Envelopes sent to clients.", traffic.messages_out),
            ("frames_sent", "WebSocket frames sent to clients.", traffic.frames_out),
            ("batched_frames", "Frames that carried more than one envelope.",
             traffic.frames_batched),
            ("slow_consumer_closes", "Sessions closed with 4409 (slow consumer).",
             traffic.slow_consumers),
            ("slow_consumer_lag_closes", "Of those, sessions closed because the client fell "
             "client_lag_timeout behind (unacknowledged bytes or an unanswered ping).",
             traffic.lagging_consumers),
            ("changes", "Timeline changes accepted from clients of this process.",
             traffic.changes),
            ("conflicted_changes", "Timeline changes that had at least one conflict.",
             traffic.conflicted_changes),
            ("conflicts_detected", "Conflicts announced in projects open here.",
             traffic.conflicts_detected),
            ("conflicts_resolved", "Conflict resolutions in projects open here.",
             traffic.conflicts_settled),
            ("alert_notifications_failed", "Webhook deliveries that failed after retries.",
             monitor.notifier.failed),
        ):  # fmt: skip
            yield CounterMetricFamily(f"crealia_{name}", doc, value=value)
        yield from history_metrics(monitor.backplane)
        yield from monitor.ops.metrics()
        yield _labelled(
            CounterMetricFamily,
            "crealia_messages_received",
            "Client messages received, by type.",
            "type",
            traffic.by_type,
        )
        yield _labelled(CounterMetricFamily, "crealia_errors", "Error replies sent, by code.",
                        "code", traffic.by_error)  # fmt: skip
        yield from job_metrics(monitor.jobs)
        gate = getattr(monitor.hub, "gate", None)
        if gate is not None:
            yield GaugeMetricFamily(
                "crealia_open_connections", "TCP connections open on both ports.", value=gate.open
            )
            yield _labelled(CounterMetricFamily, "crealia_connections_refused",
                            "Connections refused by a cap (global, address: 503 at accept; "
                            "user: close 1013 after hello; host: 421).", "reason",
                            gate.refused)  # fmt: skip
            for name, doc, value in (
                ("accept_errors", "Accepts that failed for lack of file descriptors or memory "
                 "(each followed by a back-off).", gate.accept_errors),
                ("http_read_timeouts", "HTTP connections closed because headers or a body "
                 "came too late.", gate.read_timeouts),
            ):  # fmt: skip
                yield CounterMetricFamily(f"crealia_{name}", doc, value=value)
        yield _labelled(GaugeMetricFamily, "crealia_health_check_up",
                        "1 when the health check passed at its last run.", "check",
                        {name: float(ok) for name, ok in monitor.health_ok().items()})  # fmt: skip
        firing = GaugeMetricFamily(
            "crealia_alerts_firing", "Alerts firing, by rule and level.", labels=["rule", "level"]
        )
        counts: dict[tuple[str, str], int] = {}
        for alert in monitor.engine.firing():
            key = (alert.rule, alert.level)
            counts[key] = counts.get(key, 0) + 1
        for (rule, level), count in sorted(counts.items()):
            firing.add_metric([rule, level], count)
        yield firing
        # --- live sessions
        rooms = getattr(monitor.hub, "rooms", None)
        if rooms is not None:
            yield from live_metrics(rooms)
        # --- hardening: audit
        audit = monitor.hub.audit
        for name, doc, value in (
            ("audit_events_stored", "Audit events queued for the store.", audit.recorded),
            ("audit_refusals_aggregated", "Refusals counted into another audit event instead of "
             "stored on their own.", audit.aggregated),
            ("ops_pruned_rows", "Rows deleted (oldest first) to keep ops.sqlite3 under "
             "ops_max_bytes.", audit.size_pruned),
            ("ops_prunes", "Times ops.sqlite3 was pruned for size.", audit.size_prunes),
            ("preauth_refused", "Handshakes and REST requests refused by the per-address "
             "limits before authentication.", sum(monitor.hub.preauth.refused.values())),
        ):  # fmt: skip
            yield CounterMetricFamily(f"crealia_{name}", doc, value=value)
        yield GaugeMetricFamily("crealia_ops_db_bytes", "Bytes used in ops.sqlite3 at the last "
                                "size check.", value=audit.db_bytes)  # fmt: skip
        for name, doc, histogram in (
            ("fanout_latency_seconds", "Time from a message entering a room (or a reply being "
             "queued) to the frame carrying it being written to the socket.", traffic.fanout),
            ("ping_rtt_seconds", "WebSocket ping round trips to sampled clients.",
             monitor.ping),
        ):  # fmt: skip
            yield HistogramMetricFamily(
                f"crealia_{name}", doc, buckets=histogram.buckets(), sum_value=histogram.total
            )


def history_metrics(backplane: Backplane) -> Iterator[Metric]:
    """What the projects' histories hold in memory in this process
    (:meth:`~crealia.abc.Backplane.held_history`): bytes, events and projects."""
    try:
        held = backplane.held_history()
    except Exception:  # an adapter's bug must not take /metrics down
        log.exception("the backplane's held_history failed; scraped without it")
        return
    for name, doc, value in (
        ("history_bytes", "Bytes of memory the projects' histories hold (events kept for "
         "resume: encoded frames and event objects), at most history_memory_bytes each.",
         held.bytes),
        ("history_events", "Durable events the projects' histories hold in memory.",
         held.events),
        ("history_projects", "Projects whose history is loaded in memory.", held.projects),
    ):  # fmt: skip
        yield GaugeMetricFamily(f"crealia_{name}", doc, value=value)
    sqlite = sqlite_memory_bytes()
    if sqlite is not None:
        yield GaugeMetricFamily("crealia_sqlite_memory_bytes", "Bytes SQLite's allocator holds "
                                "in this process (page caches of every connection, statements; "
                                "sqlite3_memory_used).", value=sqlite)  # fmt: skip


def job_metrics(jobs: JobFailures) -> Iterator[Metric]:
    """The background-job families of one :class:`~crealia._jobs.JobFailures` (the server's,
    or the jobs of a backplane's own, merged into the server's by :func:`merge_families`)."""
    yield _labelled(CounterMetricFamily, "crealia_background_failures",
                    "Attempts of background jobs (samples, health checks, pruning, the "
                    "audit writer, checkpoints, ...) that failed and were retried, by job.",
                    "job", jobs.counts)  # fmt: skip
    yield _labelled(GaugeMetricFamily, "crealia_background_job_failing",
                    "1 while a background job's last attempt failed.", "job",
                    {job: float(job in jobs.failing) for job in jobs.counts})  # fmt: skip


def merge_families(own: Iterable[Metric], extra: Iterable[Metric]) -> Iterator[Metric]:
    """``own`` families with ``extra`` ones merged in: a family of a new name is added; one
    named like one of ``own`` (and of its type) adds its samples to it, a sample with the same
    name and labels being combined (gauges take the larger value, counters and histograms add
    up). A family of another type under a taken name is dropped, with a warning."""
    families = {family.name: family for family in own}
    for family in extra:
        mine = families.get(family.name)
        if mine is None:
            families[family.name] = family
            continue
        if mine.type != family.type:
            log.warning("backplane metric %s is a %s, the server's a %s: dropped", family.name,
                        family.type, mine.type)  # fmt: skip
            continue
        index = {_sample_key(sample): i for i, sample in enumerate(mine.samples)}
        for sample in family.samples:
            key = _sample_key(sample)
            at = index.get(key)
            if at is None:
                index[key] = len(mine.samples)
                mine.samples.append(sample)
                continue
            old = mine.samples[at]
            value = (max(old.value, sample.value) if family.type == "gauge"
                     else old.value + sample.value)  # fmt: skip
            mine.samples[at] = old._replace(value=value)
    yield from families.values()


def _sample_key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))


def _labelled(family: Any, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    metric = family(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)
    return metric  # type: ignore[no-any-return]


def live_metrics(rooms: Any) -> Iterator[Metric]:
    """The live sessions' families: open now (by mode, viewers by rung, their statistics) and
    the counters since start (labels: modes, reasons and rungs, all the protocol's own)."""
    figures = live_figures(live for room in list(rooms.rooms.values())
                           for live in room.live.open())  # fmt: skip
    totals = rooms.live_totals
    yield _labelled(GaugeMetricFamily, "crealia_live_sessions", "Live sessions open, by mode.",
                    "mode", figures["sessions"])  # fmt: skip
    yield _labelled(GaugeMetricFamily, "crealia_live_viewers",
                    "Connections watching a live session, by the rung they are sent.", "quality",
                    figures["viewers"])  # fmt: skip
    stats = GaugeMetricFamily("crealia_live_viewer_stat", "Live viewers' latest statistics: "
                              "average and worst (bitrate_kbps, rtt_ms, packet_loss).",
                              labels=["stat", "of"])  # fmt: skip
    for name, (average, worst) in figures["stats"].items():
        stats.add_metric([name, "avg"], average)
        stats.add_metric([name, "max"], worst)
    yield stats
    yield _labelled(CounterMetricFamily, "crealia_live_sessions_started",
                    "Live sessions started, by mode.", "mode", totals.started)  # fmt: skip
    yield _labelled(CounterMetricFamily, "crealia_live_sessions_ended",
                    "Live sessions ended, by reason.", "reason", totals.ended)  # fmt: skip
    yield _labelled(CounterMetricFamily, "crealia_live_quality_changes",
                    "Quality changes sent to viewers, by reason.", "reason",
                    totals.quality_changes)  # fmt: skip
    for name, doc, value in (
        ("live_signals_forwarded", "WebRTC signals forwarded between members.", totals.signals),
        ("live_offers_answered", "Offers the server's relay peers answered.", totals.answered),
    ):  # fmt: skip
        yield CounterMetricFamily(f"crealia_{name}", doc, value=value)
