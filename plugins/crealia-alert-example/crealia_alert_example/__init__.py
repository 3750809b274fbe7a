"""``slow_fanout``: a crealia alert rule that fires when message fan-out gets slow.

Every metric sample carries ``fanoutLatencyP99``: the 99th percentile, in milliseconds, of the
time between the server accepting a change and the last member's connection taking it. When it
grows, collaborators see each other's edits late even though the average latency looks fine.
This rule finds a ``warning`` when it is at or above the ``warning`` option (default 100 ms) and
a ``critical`` one at or above ``critical`` (default 250 ms), for the whole server and for each
project. crealia's alert engine adds the hold time and the alert's life (firing, escalated,
resolved); the rule only looks at one sample.

Options: ``warning`` and ``critical`` (milliseconds, ``0 < warning <= critical``), e.g.
``[alerts.slow_fanout]`` with ``warning = 80`` in crealia's config file, or
``CREALIA_ALERT_SLOW_FANOUT_CRITICAL=400``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The alert-rule contract; crealia does not re-export it publicly yet.
from crealia import Finding
from crealia.abc import AlertRule

__all__ = ["SlowFanoutRule"]
__version__ = "0.1.0"

FIELD = "fanoutLatencyP99"


class SlowFanoutRule(AlertRule):
    """Finds slow fan-out: ``fanoutLatencyP99`` at or above ``warning`` / ``critical`` ms.

    Registered as ``slow_fanout`` in the ``crealia.alert_rules`` entry-point group; crealia
    calls the class with the rule's options.

    Raises:
        ValueError: an unknown option, a threshold that is not a positive number, or
            ``warning`` above ``critical``.
    """

    name = "slow_fanout"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        warning = options.pop("warning", 100.0)
        critical = options.pop("critical", 250.0)
        if options:
            raise ValueError(f"unknown options {sorted(options)} (known: critical, warning)")
        for key, value in (("warning", warning), ("critical", critical)):
            if not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            ):
                raise ValueError(f"option {key} must be a positive number of ms, got {value!r}")
        if warning > critical:
            raise ValueError(f"option warning ({warning} ms) must not be above critical "
                             f"({critical} ms)")  # fmt: skip
        self.warning = float(warning)
        self.critical = float(critical)

    def check(self, sample: Mapping[str, Any]) -> Finding | None:
        """A finding when the sample's p99 fan-out latency reaches a threshold; ``None`` when it
        is below, or the sample has no such field (fan-out not measured)."""
        value = sample.get(FIELD)
        if value is None or not math.isfinite(value):
            return None
        if value >= self.critical:
            level, threshold = "critical", self.critical
        elif value >= self.warning:
            level, threshold = "warning", self.warning
        else:
            return None
        where = "the server" if sample.get("projectId") is None else "this project"
        return Finding(
            level=level,
            value=float(value),
            threshold=threshold,
            message=f"p99 fan-out latency {value:.0f} ms is at or above {threshold:.0f} ms: "
            f"1 change in 100 takes that long to reach every member of {where}",
        )
