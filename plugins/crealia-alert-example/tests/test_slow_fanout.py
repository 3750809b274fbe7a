"""The ``slow_fanout`` rule: its options and what it finds in samples."""

from __future__ import annotations

import pytest
from crealia_alert_example import SlowFanoutRule

from crealia._alerts import AlertEngine


def sample(p99: float | None, project: str | None = None) -> dict[str, object]:
    return {"at": 1_700_000_000_000, "projectId": project, "fanoutLatencyP99": p99}


def test_slow_fanout_is_quiet_below_warning_and_without_the_field() -> None:
    rule = SlowFanoutRule()
    assert rule.check(sample(99.9)) is None
    assert rule.check(sample(None)) is None
    assert rule.check({"at": 0, "projectId": "p1"}) is None


@pytest.mark.parametrize(
    ("p99", "level", "threshold"),
    [(100, "warning", 100.0), (180, "warning", 100.0), (250, "critical", 250.0)],
)
def test_slow_fanout_finds_levels_at_or_above_thresholds(
    p99: float, level: str, threshold: float
) -> None:
    finding = SlowFanoutRule().check(sample(p99, "p1"))
    assert finding is not None
    assert (finding.level, finding.value, finding.threshold) == (level, p99, threshold)
    assert f"{p99:.0f} ms" in finding.message
    assert "this project" in finding.message


def test_slow_fanout_options_move_the_thresholds() -> None:
    rule = SlowFanoutRule({"warning": 20, "critical": 40})
    finding = rule.check(sample(30))
    assert finding is not None
    assert finding.level == "warning"
    assert "the server" in finding.message


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"colour": "blue"}, "unknown options"),
        ({"warning": "fast"}, "option warning must be a positive number"),
        ({"critical": 0}, "option critical must be a positive number"),
        ({"warning": 300}, "must not be above critical"),
    ],
)
def test_slow_fanout_refuses_bad_options(options: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        SlowFanoutRule(options)


def test_slow_fanout_fires_through_the_engine_after_the_hold() -> None:
    engine = AlertEngine([SlowFanoutRule()], hold=10)
    assert engine.evaluate(sample(300), now=0) == []
    (alert,) = engine.evaluate(sample(300), now=10)
    assert (alert.rule, alert.level, alert.state) == ("slow_fanout", "critical", "firing")
