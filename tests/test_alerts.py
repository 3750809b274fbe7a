"""Alert rules as plugins: the built-in rules, the engine's hold times and per-project state,
the registry of the ``crealia.alert_rules`` entry points (with the example plugin installed),
and webhook delivery with retries.

Policy: loopback only, port 0, a deadline on every I/O test, real HTTP receivers; no sleeps.
Engine time is passed explicitly, so hold times need no clock.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from crealia import ConfigurationError
from crealia._alerts import (
    Alert,
    AlertEngine,
    AlertNotifier,
    AlertRule,
    Finding,
    ThresholdRule,
    active_users,
    conflict_rate,
    cpu,
    error_rate,
    latency,
    log_alert,
    memory,
)
from crealia._plugins import ALERT_RULE_GROUP, AlertRuleRegistry

from ._http_receiver import closed_port, start_receiver
from ._plugin_install import install_plugin, normalized

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "crealia-alert-example"
AT = 1_700_000_000_000

Factory = Callable[[Mapping[str, Any]], ThresholdRule]


@attrs.frozen
class Builtin:
    """A built-in rule and values of its field: below warning, at warning, at critical."""

    name: str
    factory: Factory
    field: str
    ok: float
    warning: float
    critical: float
    global_only: bool = False


BUILTINS = [
    Builtin("latency", latency, "averageLatency", 120, 200, 500),
    Builtin("memory", memory, "memoryUsage", 50, 80, 90, global_only=True),
    Builtin("cpu", cpu, "cpuUsage", 35, 70, 90, global_only=True),
    Builtin("error_rate", error_rate, "errorRate", 0.5, 5, 10),
    Builtin("conflict_rate", conflict_rate, "conflictRate", 3, 15, 25),
    Builtin("active_users", active_users, "activeUsers", 12, 80, 100),
]


def sample(project: str | None = None, at: int = AT, **fields: float | None) -> dict[str, Any]:
    return {"at": at, "projectId": project, **fields}


# -- rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
def test_builtin_rule_finds_warning_and_critical_at_or_above_thresholds(builtin: Builtin) -> None:
    rule = builtin.factory({})
    assert rule.name == builtin.name
    assert rule.check(sample(**{builtin.field: builtin.ok})) is None
    assert rule.check(sample(**{builtin.field: math.nextafter(builtin.warning, 0)})) is None
    for value, level, threshold in [
        (builtin.warning, "warning", builtin.warning),
        (math.nextafter(builtin.critical, 0), "warning", builtin.warning),
        (builtin.critical, "critical", builtin.critical),
        (builtin.critical * 3, "critical", builtin.critical),
    ]:
        finding = rule.check(sample(**{builtin.field: value}))
        assert finding is not None, value
        assert (finding.level, finding.value, finding.threshold) == (level, value, threshold)


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
def test_builtin_rule_ignores_samples_without_its_field(builtin: Builtin) -> None:
    rule = builtin.factory({})
    assert rule.check(sample()) is None
    assert rule.check(sample(**{builtin.field: None})) is None
    assert rule.check(sample(**{builtin.field: math.nan})) is None


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
def test_builtin_rule_scopes(builtin: Builtin) -> None:
    rule = builtin.factory({})
    finding = rule.check(sample("p1", **{builtin.field: builtin.critical}))
    if builtin.global_only:
        assert finding is None
    else:
        assert finding is not None
        assert finding.level == "critical"


def test_threshold_rule_messages_are_plain_language() -> None:
    finding = latency({}).check(sample(averageLatency=612.4))
    assert finding is not None
    assert finding.message == "average latency 612 ms is above 500 ms"
    finding = memory({}).check(sample(memoryUsage=91.25))
    assert finding is not None
    assert finding.message == "memory usage 91.2% is above 90%"
    finding = active_users({}).check(sample(activeUsers=80))
    assert finding is not None
    assert finding.message == "active users 80 has reached 80"


def test_threshold_rule_below_fires_at_or_below() -> None:
    rule = ThresholdRule("resolutionRate", "resolution rate", "%", 80, 50, below=True)
    assert rule.check(sample(resolutionRate=95)) is None
    finding = rule.check(sample(resolutionRate=70))
    assert finding is not None
    assert (finding.level, finding.threshold) == ("warning", 80)
    assert finding.message == "resolution rate 70% is below 80%"
    finding = rule.check(sample(resolutionRate=50))
    assert finding is not None
    assert finding.level == "critical"
    with pytest.raises(ValueError, match=r"warning .* must not be below critical"):
        ThresholdRule("resolutionRate", "resolution rate", "%", 40, 50, below=True)


def test_threshold_rule_refuses_a_field_that_is_not_a_number() -> None:
    with pytest.raises(TypeError, match="averageLatency is not a number"):
        latency({}).check(sample(averageLatency="slow"))  # type: ignore[arg-type]


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
def test_builtin_rule_takes_warning_and_critical_options(builtin: Builtin) -> None:
    rule = builtin.factory({"warning": 1, "critical": 2})
    finding = rule.check(sample(**{builtin.field: 1.5}))
    assert finding is not None
    assert (finding.level, finding.threshold) == ("warning", 1)
    assert builtin.factory({"critical": builtin.critical * 2}).critical == builtin.critical * 2


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"warn": 1}, r"unknown options \['warn'\] \(known: critical, warning\)"),
        ({"warning": "high"}, "option warning must be a finite number, got 'high'"),
        ({"critical": True}, "option critical must be a finite number, got True"),
        ({"critical": math.inf}, "option critical must be a finite number, got inf"),
        ({"warning": 1e9, "critical": 2}, r"option warning \(.*\) must not be above critical"),
    ],
)
def test_builtin_rule_refuses_bad_options(
    builtin: Builtin, options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        builtin.factory(options)


# -- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.name)
def test_engine_fires_escalates_and_resolves_each_builtin(builtin: Builtin) -> None:
    engine = AlertEngine([builtin.factory({})], hold=10)

    def at(now: float, value: float) -> list[Alert]:
        return engine.evaluate(sample(at=AT + int(now * 1000), **{builtin.field: value}), now)

    assert at(0, builtin.warning) == []
    assert at(9.999, builtin.warning) == []
    (fired,) = at(10, builtin.warning)
    assert (fired.rule, fired.level, fired.state) == (builtin.name, "warning", "firing")
    assert (fired.value, fired.threshold) == (builtin.warning, builtin.warning)
    assert fired.project_id is None
    assert fired.started_at == fired.updated_at == AT + 10_000
    assert fired.resolved_at is None
    assert engine.firing() == [fired]

    assert at(12, builtin.critical) == []
    (escalated,) = at(22, builtin.critical)
    assert escalated.id == fired.id
    assert (escalated.level, escalated.state) == ("critical", "firing")
    assert escalated.threshold == builtin.critical
    assert escalated.started_at == fired.started_at
    assert escalated.updated_at == AT + 22_000

    assert at(25, builtin.ok) == []
    assert at(34.9, builtin.ok) == []
    (resolved,) = at(35, builtin.ok)
    assert resolved.id == fired.id
    assert resolved.state == "resolved"
    assert resolved.resolved_at == resolved.updated_at == AT + 35_000
    assert resolved.message.startswith("resolved: ")
    assert engine.firing() == []
    assert at(36, builtin.ok) == []


def test_engine_spike_shorter_than_hold_never_fires_and_dip_never_resolves() -> None:
    engine = AlertEngine([latency({})], hold=10)
    for now, value in [(0, 600), (5, 600), (9, 600), (10, 100), (20, 100)]:
        assert engine.evaluate(sample(averageLatency=value), now) == []
    assert engine.evaluate(sample(averageLatency=600), 30) == []
    (fired,) = engine.evaluate(sample(averageLatency=600), 40)
    for now, value in [(41, 100), (50, None), (50.5, 600), (60, 100), (69, 100)]:
        assert engine.evaluate(sample(averageLatency=value), now) == []
    assert engine.firing() == [fired]


def test_engine_hold_zero_fires_and_resolves_on_the_first_sample() -> None:
    engine = AlertEngine([latency({})], hold=0)
    (fired,) = engine.evaluate(sample(averageLatency=250), 0)
    assert fired.level == "warning"
    (escalated,) = engine.evaluate(sample(averageLatency=900), 1)
    assert escalated.level == "critical"
    (resolved,) = engine.evaluate(sample(averageLatency=20), 2)
    assert resolved.state == "resolved"


def test_engine_fires_critical_straight_away_when_critical_held() -> None:
    engine = AlertEngine([latency({})], hold=10)
    assert engine.evaluate(sample(averageLatency=700), 0) == []
    (fired,) = engine.evaluate(sample(averageLatency=800), 10)
    assert (fired.level, fired.value, fired.threshold) == ("critical", 800, 500)


def test_engine_fires_warning_when_a_breach_held_but_critical_did_not() -> None:
    engine = AlertEngine([latency({})], hold=10)
    assert engine.evaluate(sample(averageLatency=300), 0) == []
    assert engine.evaluate(sample(averageLatency=700), 5) == []
    (fired,) = engine.evaluate(sample(averageLatency=700), 10)
    # A breach held 10 s, critical only 5 s: it fires at warning (with the latest warning's
    # numbers), and escalates once critical has held too.
    assert (fired.level, fired.value, fired.threshold) == ("warning", 300, 200)
    (escalated,) = engine.evaluate(sample(averageLatency=700), 15)
    assert (escalated.id, escalated.level) == (fired.id, "critical")


def test_engine_de_escalates_after_the_hold() -> None:
    engine = AlertEngine([error_rate({})], hold=10)
    engine.evaluate(sample(errorRate=20), 0)
    (fired,) = engine.evaluate(sample(errorRate=20), 10)
    assert fired.level == "critical"
    assert engine.evaluate(sample(errorRate=6), 11) == []
    assert engine.evaluate(sample(errorRate=12), 15) == []  # a critical spike restarts the wait
    assert engine.evaluate(sample(errorRate=6), 16) == []
    assert engine.evaluate(sample(errorRate=6), 25.9) == []
    (lowered,) = engine.evaluate(sample(errorRate=6), 26)
    assert (lowered.id, lowered.level, lowered.state) == (fired.id, "warning", "firing")
    assert (lowered.value, lowered.threshold) == (6, 5)
    assert "error rate 6% is above 5%" in lowered.message


def test_engine_resolves_from_critical_without_passing_through_warning() -> None:
    engine = AlertEngine([error_rate({})], hold=10)
    engine.evaluate(sample(errorRate=20), 0)
    (fired,) = engine.evaluate(sample(errorRate=20), 10)
    assert engine.evaluate(sample(errorRate=1), 11) == []
    (resolved,) = engine.evaluate(sample(errorRate=1), 21)
    assert (resolved.id, resolved.level, resolved.state) == (fired.id, "critical", "resolved")


def test_engine_keeps_state_per_project() -> None:
    engine = AlertEngine([conflict_rate({}), memory({})], hold=5)
    for project, fields in [("p1", {"conflictRate": 30}), ("p2", {"conflictRate": 18}),
                            (None, {"conflictRate": 2, "memoryUsage": 95})]:  # fmt: skip
        assert engine.evaluate(sample(project, **fields), 0) == []
        (fired,) = engine.evaluate(sample(project, **fields), 5)
        assert fired.project_id == project
    firing = {(a.rule, a.project_id): a for a in engine.firing()}
    assert set(firing) == {("conflict_rate", "p1"), ("conflict_rate", "p2"), ("memory", None)}
    assert firing["conflict_rate", "p1"].level == "critical"
    assert len({a.id for a in firing.values()}) == 3

    # p1 calms down; p2 and the server do not notice.
    engine.evaluate(sample("p1", conflictRate=0), 6)
    (resolved,) = engine.evaluate(sample("p1", conflictRate=0), 11)
    assert (resolved.project_id, resolved.state) == ("p1", "resolved")
    assert {(a.rule, a.project_id) for a in engine.firing()} == {
        ("conflict_rate", "p2"),
        ("memory", None),
    }


def test_engine_global_only_rules_ignore_project_samples() -> None:
    engine = AlertEngine([memory({}), cpu({})], hold=0)
    assert engine.evaluate(sample("p1", memoryUsage=99, cpuUsage=99), 0) == []
    assert engine.firing() == []
    assert {a.rule for a in engine.evaluate(sample(memoryUsage=99, cpuUsage=99), 0)} == {
        "memory",
        "cpu",
    }


def test_engine_forget_resolves_a_closed_project() -> None:
    engine = AlertEngine([latency({}), active_users({})], hold=0)
    engine.evaluate(sample("p1", averageLatency=900, activeUsers=100), 0)
    engine.evaluate(sample("p2", averageLatency=900), 0)
    resolved = engine.forget("p1")
    assert {(a.rule, a.state, a.project_id) for a in resolved} == {
        ("latency", "resolved", "p1"),
        ("active_users", "resolved", "p1"),
    }
    assert all(a.resolved_at is not None for a in resolved)
    assert [a.project_id for a in engine.firing()] == ["p2"]
    assert engine.forget("p1") == []
    # The project comes back: a new alert, with a new id.
    (again,) = engine.evaluate(sample("p1", averageLatency=900), 1)
    assert again.id not in {a.id for a in resolved}


class Exploding(AlertRule):
    def __init__(self) -> None:
        self.calls = 0

    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        self.calls += 1
        raise RuntimeError("the rule is broken")


class NotAFinding(AlertRule):
    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        return "high"  # type: ignore[return-value]


def test_engine_rule_that_raises_does_not_break_others(caplog: pytest.LogCaptureFixture) -> None:
    exploding = Exploding()
    exploding.name = "exploding"
    wrong = NotAFinding()
    wrong.name = "wrong"
    engine = AlertEngine([exploding, wrong, latency({})], hold=0)
    with caplog.at_level(logging.DEBUG, logger="crealia.alerts"):
        (fired,) = engine.evaluate(sample(averageLatency=900), 0)
        assert fired.rule == "latency"
        assert engine.evaluate(sample(averageLatency=900), 1) == []
    assert exploding.calls == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # Logged once each, with the traceback; again only at DEBUG.
    assert [r.getMessage() for r in errors] == [
        "alert rule 'exploding' failed; counted as no finding",
        "alert rule 'wrong' failed; counted as no finding",
    ]
    assert errors[0].exc_info is not None
    assert "NotAFinding" not in errors[1].getMessage()
    assert "not a Finding" in str(errors[1].exc_info[1])  # type: ignore[index]


def test_engine_refuses_unnamed_or_duplicate_rules_and_bad_hold() -> None:
    with pytest.raises(ValueError, match="distinct, non-empty names"):
        AlertEngine([latency({}), latency({})], hold=1)
    with pytest.raises(ValueError, match="distinct, non-empty names"):
        AlertEngine([ThresholdRule("x", "x", "", 1, 2)], hold=1)
    with pytest.raises(ValueError, match="hold must be"):
        AlertEngine([], hold=-1)


def test_engine_evaluates_only_metric_rules() -> None:
    class AuditRule(Exploding):
        kind = "audit"

    rule = AuditRule()
    rule.name = "audit"
    engine = AlertEngine([rule], hold=0)
    assert engine.evaluate(sample(), 0) == []
    assert rule.calls == 0


# -- alerts on the wire and in the log ----------------------------------------------------------


def firing_alert(**changes: Any) -> Alert:
    engine = AlertEngine([latency({})], hold=0)
    (alert,) = engine.evaluate(sample("p1", averageLatency=612), 0)
    return attrs.evolve(alert, **changes)


def test_alert_wire_form_round_trips() -> None:
    alert = firing_alert()
    wire = alert.to_wire()
    assert wire == {
        "id": alert.id,
        "category": "performance",
        "rule": "latency",
        "level": "critical",
        "state": "firing",
        "projectId": "p1",
        "value": 612.0,
        "threshold": 500.0,
        "message": "average latency 612 ms is above 500 ms",
        "startedAt": AT,
        "updatedAt": AT,
        "resolvedAt": None,
    }
    assert len(alert.id) == 32
    assert Alert.from_wire(json.loads(json.dumps(wire))) == alert
    resolved = attrs.evolve(alert, state="resolved", resolved_at=AT + 1)
    assert Alert.from_wire(resolved.to_wire()) == resolved


def test_alert_from_wire_names_what_is_wrong() -> None:
    wire = firing_alert().to_wire()
    with pytest.raises(ValueError, match="alert: startedAt is required"):
        Alert.from_wire({k: v for k, v in wire.items() if k != "startedAt"})
    with pytest.raises(ValueError, match="alert: 'level' must be in"):
        Alert.from_wire({**wire, "level": "panic"})


def test_log_alert_warns_when_firing_and_informs_when_resolved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alert = firing_alert()
    with caplog.at_level(logging.INFO, logger="crealia.alerts"):
        log_alert(alert)
        log_alert(attrs.evolve(alert, state="resolved", resolved_at=AT))
    firing, resolved = caplog.records
    assert firing.levelno == logging.WARNING
    assert firing.getMessage() == (
        "alert latency critical in project p1: average latency 612 ms is above 500 ms"
    )
    assert firing.alert == alert.to_wire()  # type: ignore[attr-defined]
    assert firing.project_id == "p1"  # type: ignore[attr-defined]
    assert resolved.levelno == logging.INFO
    assert resolved.alert["state"] == "resolved"  # type: ignore[attr-defined]


# -- the registry -------------------------------------------------------------------------------


def test_registry_discovers_the_builtins_through_entry_points() -> None:
    registry = AlertRuleRegistry.discover()
    builtins = {b.name: b for b in BUILTINS}
    infos = {p.name: p for p in registry.plugins if p.name in builtins}
    assert set(infos) == set(builtins)
    for name, info in infos.items():
        assert (info.group, info.distribution, info.error) == (ALERT_RULE_GROUP, "crealia", None)
        assert info.target == f"crealia._alerts:{name}"
        assert registry.factories[name] is builtins[name].factory
    names = [p.name for p in registry.plugins if p.distribution == "crealia"]
    assert names == sorted(names)


def test_registry_creates_rules_with_their_options() -> None:
    registry = AlertRuleRegistry.discover()
    rule = registry.create("latency", {"warning": 150, "critical": 400})
    assert isinstance(rule, ThresholdRule)
    assert (rule.name, rule.warning, rule.critical) == ("latency", 150, 400)
    rules = registry.create_all({"cpu": {"warning": 50}})
    assert [r.name for r in rules] == registry.names()
    (cpu_rule,) = [r for r in rules if r.name == "cpu"]
    assert isinstance(cpu_rule, ThresholdRule)
    assert cpu_rule.warning == 50


def test_registry_refuses_bad_options_and_unknown_rules_by_name() -> None:
    registry = AlertRuleRegistry.discover()
    with pytest.raises(ConfigurationError, match=r"alert rule 'memory': unknown options \['x'\]"):
        registry.create("memory", {"x": 1})
    with pytest.raises(ConfigurationError, match=r"alert rule 'cpu': option warning .* above"):
        registry.create_all({"cpu": {"warning": 95}})
    with pytest.raises(ConfigurationError, match=r"unknown alert rule 'lag'; known: .*latency"):
        registry.create_all({"lag": {}})


def test_registry_code_registrations_win_and_must_make_rules() -> None:
    def strict_latency(options: Mapping[str, Any]) -> AlertRule:
        return latency({"warning": 1, "critical": 2})

    def not_a_rule(options: Mapping[str, Any]) -> AlertRule:
        return object()  # type: ignore[return-value]

    registry = AlertRuleRegistry.discover({"latency": strict_latency, "odd": not_a_rule})
    assert registry.factories["latency"] is strict_latency
    (mine,) = [p for p in registry.plugins if p.name == "odd"]
    assert mine.distribution == "(registered in code)"
    assert mine.target.endswith("not_a_rule")
    assert registry.create("latency").check(sample(averageLatency=1)) is not None
    with pytest.raises(ConfigurationError, match="alert rule 'odd': factory did not return"):
        registry.create("odd")


@pytest.fixture
def broken_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A throwaway distribution whose one alert rule fails on import."""
    dist_info = tmp_path / "crealia_broken_rule-2.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crealia-broken-rule\nVersion: 2.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[crealia.alert_rules]\nbroken = crealia_broken_rule:Rule\n"
    )
    (tmp_path / "crealia_broken_rule.py").write_text("raise ImportError('no numpy')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("crealia_broken_rule", None)


def test_registry_reports_a_broken_rule_and_loads_the_rest(broken_rule: None) -> None:
    registry = AlertRuleRegistry.discover()
    (info,) = [p for p in registry.plugins if p.name == "broken"]
    assert (info.distribution, info.version) == ("crealia-broken-rule", "2.0")
    assert info.error == "ImportError: no numpy"
    assert "broken" not in registry.names()
    assert "latency" in registry.names()
    with pytest.raises(ConfigurationError, match=r"'broken' \(it failed to load: ImportError"):
        registry.create("broken")
    assert "broken" not in [r.name for r in registry.create_all()]


# -- the example plugin -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def alert_plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """plugins/crealia-alert-example, pip-installed into this venv: (name, version)."""
    return install_plugin(PLUGIN, tmp_path_factory)


def test_example_plugin_is_discovered_and_fires_through_the_engine(
    alert_plugin: tuple[str, str],
) -> None:
    name, version = alert_plugin
    registry = AlertRuleRegistry.discover()
    (info,) = [p for p in registry.plugins if p.name == "slow_fanout"]
    assert normalized(info.distribution) == normalized(name)
    assert (info.version, info.error) == (version, None)
    assert info.target == "crealia_alert_example:SlowFanoutRule"

    rules = registry.create_all({"slow_fanout": {"warning": 50}})
    engine = AlertEngine(rules, hold=5)
    assert engine.evaluate(sample("p1", fanoutLatencyP99=80, averageLatency=20), 0) == []
    (fired,) = engine.evaluate(sample("p1", fanoutLatencyP99=90, averageLatency=20), 5)
    assert (fired.rule, fired.level, fired.project_id) == ("slow_fanout", "warning", "p1")
    assert (fired.value, fired.threshold) == (90, 50)
    assert "p99 fan-out latency 90 ms" in fired.message
    engine.evaluate(sample("p1", fanoutLatencyP99=300), 6)
    (escalated,) = engine.evaluate(sample("p1", fanoutLatencyP99=300), 11)
    assert (escalated.id, escalated.level) == (fired.id, "critical")

    with pytest.raises(ConfigurationError, match="alert rule 'slow_fanout': unknown options"):
        registry.create("slow_fanout", {"p": 99})


# -- webhooks -----------------------------------------------------------------------------------


async def test_notifier_posts_each_change_to_every_webhook(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        first = await start_receiver(nursery)
        second = await start_receiver(nursery)
        notifier = AlertNotifier([first.url, second.url], backoff=0.01)
        await nursery.start(notifier.run)
        alert = firing_alert()
        resolved = attrs.evolve(alert, state="resolved", resolved_at=AT + 5)
        notifier.notify(alert)
        notifier.notify(resolved)
        await notifier.wait_drained()
    for receiver in (first, second):
        assert receiver.received == [{"alert": alert.to_wire()}, {"alert": resolved.to_wire()}]
        assert receiver.paths == ["/hooks/alerts", "/hooks/alerts"]
    assert (notifier.delivered, notifier.failed, notifier.dropped) == (4, 0, 0)


async def test_notifier_retries_5xx_and_429_with_backoff(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        receiver = await start_receiver(nursery, statuses=[500, 503, 200, 429, 200])
        notifier = AlertNotifier([receiver.url], retries=3, backoff=0.01)
        await nursery.start(notifier.run)
        alert = firing_alert()
        notifier.notify(alert)
        await receiver.wait_received(1)
        assert receiver.attempts == 3  # the third try got it
        notifier.notify(alert)
        await notifier.wait_drained()
    assert receiver.attempts == 5
    assert receiver.received == [{"alert": alert.to_wire()}] * 2
    assert (notifier.delivered, notifier.failed) == (2, 0)


async def test_notifier_does_not_retry_other_4xx(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        receiver = await start_receiver(nursery, statuses=[404])
        notifier = AlertNotifier([receiver.url], retries=3, backoff=0.01)
        await nursery.start(notifier.run)
        notifier.notify(firing_alert())
        await notifier.wait_drained()
    assert (receiver.attempts, receiver.received) == (1, [])
    assert (notifier.delivered, notifier.failed) == (0, 1)
    assert any("gave up" in r.getMessage() and "HTTP 404" in r.getMessage()
               for r in caplog.records)  # fmt: skip


async def test_notifier_gives_up_on_an_unreachable_webhook(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/hook"
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="crealia.alerts"):
        notifier = AlertNotifier([url], retries=2, backoff=0.01)
        await nursery.start(notifier.run)
        notifier.notify(firing_alert())
        await notifier.wait_drained()
    assert (notifier.delivered, notifier.failed) == (0, 1)
    attempts = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [m.split(": ")[0] for m in attempts] == [
        f"alert webhook {url} attempt {n}" for n in (1, 2, 3)
    ]
    (gave_up,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "gave up" in gave_up.getMessage()
    assert "ConnectError" in gave_up.getMessage()


async def test_notifier_bounds_each_attempt_and_keeps_webhooks_independent(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        silent = await start_receiver(nursery, hang=True)
        fine = await start_receiver(nursery)
        notifier = AlertNotifier([silent.url, fine.url], retries=1, backoff=0.01, timeout=0.2)
        await nursery.start(notifier.run)
        alert = firing_alert()
        notifier.notify(alert)
        await fine.wait_received(1)
        await notifier.wait_drained()
    assert silent.attempts == 2
    assert fine.received == [{"alert": alert.to_wire()}]
    assert (notifier.delivered, notifier.failed) == (1, 1)


async def test_notifier_never_blocks_on_a_full_queue(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        receiver = await start_receiver(nursery)
        notifier = AlertNotifier([receiver.url], queue=2)
        alerts = [firing_alert(id=str(n)) for n in range(5)]
        for alert in alerts:  # before run(): nothing consumes the queue yet
            notifier.notify(alert)
        assert notifier.dropped == 3
        dropped = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert dropped == [f"alert webhook {receiver.url} is behind: dropped alert {n}"
                           for n in (2, 3, 4)]  # fmt: skip
        await nursery.start(notifier.run)
        await notifier.wait_drained()
    assert [body["alert"]["id"] for body in receiver.received] == ["0", "1"]


def test_notifier_refuses_bad_webhooks() -> None:
    with pytest.raises(ConfigurationError, match="alert webhook 'ftp://x/': must be an http"):
        AlertNotifier(["ftp://x/"])
    with pytest.raises(ConfigurationError, match="retries >= 0"):
        AlertNotifier([], retries=-1)
    AlertNotifier([]).notify(firing_alert())  # no webhooks: nothing to do
