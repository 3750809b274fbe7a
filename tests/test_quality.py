"""The quality ladder and controller (docs/protocol.md §8), against stat sequences a second apart.

Pure computation: no I/O, no clock. A sequence is a small table of ``(seconds, bitrate, rtt,
loss)`` rows, each row held for its seconds; where the measured bitrate must follow the viewer's
rung (a recovering viewer cannot measure more than its rung sends), the table gives the link's
capacity instead and :func:`replay_link` measures ``min(capacity, 95 % of the rung's cap)``.
Every expectation is an exact list of ``(time, quality, reason)``, worked out by hand from the
rules in the comments beside it.
"""

from __future__ import annotations

import math

import attrs
import pytest

from crealia._quality import (
    LADDER,
    LOSS_DOWN,
    RTT_DOWN_MS,
    RUNGS,
    Decision,
    QualityController,
    Sample,
    calculate_optimal_quality,
    fit,
    rung_for_size,
)

Row = tuple[int, float, float, float]  # seconds held, bitrate (or link) kbps, rtt ms, loss
Change = tuple[float, str, str]  # at, quality, reason


def samples(rows: list[Row]) -> list[Sample]:
    """One sample a second from t=0, each row held for its seconds."""
    out: list[Sample] = []
    for seconds, kbps, rtt, loss in rows:
        for _ in range(seconds):
            out.append(Sample(at=float(len(out)), bitrate_kbps=kbps, rtt_ms=rtt, packet_loss=loss))
    return out


def replay(controller: QualityController, sequence: list[Sample]) -> list[Change]:
    """Feed every sample; the changes they caused."""
    changes: list[Change] = []
    for sample in sequence:
        decision = controller.observe(sample)
        if decision is not None:
            assert decision.max_bitrate_kbps == RUNGS[decision.quality].max_kbps
            changes.append((sample.at, decision.quality, decision.reason))
    return changes


def replay_link(controller: QualityController, rows: list[Row]) -> list[Change]:
    """Like :func:`replay`, the bitrate measured from the link's capacity and the current rung."""
    changes: list[Change] = []
    for link in samples(rows):
        kbps = min(link.bitrate_kbps, 0.95 * RUNGS[controller.current].max_kbps)
        changes.extend(replay(controller, [attrs.evolve(link, bitrate_kbps=kbps)]))
    return changes


def clean(at: float, kbps: float = 3000.0) -> Sample:
    return Sample(at=at, bitrate_kbps=kbps, rtt_ms=40.0, packet_loss=0.0)


def decide(sample: Sample, current: str, ceiling: str = "1080p") -> Decision | None:
    """The decision on one sample alone (the up-rule cannot fire on it)."""
    return calculate_optimal_quality(
        [sample], current, ceiling=ceiling, since_change=0.0, stable_for=10.0
    )


# -- recorded sequences -----------------------------------------------------------------------


def test_controller_steady_network_keeps_720p_for_a_minute() -> None:
    controller = QualityController(ceiling="720p")
    wobble: list[Row] = [
        (1, 2410, 38, 0.002),
        (1, 2380, 45, 0.0),
        (1, 2450, 41, 0.001),
        (1, 2320, 52, 0.003),
    ]
    assert replay(controller, samples(wobble * 16)[:61]) == []  # t = 0..60
    assert controller.current == "720p"
    assert controller.stable_period == 10.0


def test_controller_degrading_network_steps_down_at_once() -> None:
    controller = QualityController(ceiling="1080p")
    rows: list[Row] = [
        (1, 3000, 40, 0.00),
        (1, 2800, 45, 0.01),
        (1, 2600, 50, 0.01),
        (1, 2300, 60, 0.02),  # t=3: under 1080p's need 2500; 2300 meets 720p's 1200
        (1, 2000, 70, 0.02),
        (1, 1700, 80, 0.03),
        (1, 1400, 90, 0.04),
        (1, 1100, 110, 0.04),  # t=7: under 720p's 1200; meets 480p's 800
        (1, 900, 130, 0.06),  # t=8: loss, so at least one rung below 480p
        (1, 750, 150, 0.08),  # at 360p: nothing lower
        (1, 600, 200, 0.10),
    ]
    assert replay(controller, samples(rows)) == [
        (3.0, "720p", "bandwidth"),
        (7.0, "480p", "bandwidth"),
        (8.0, "360p", "loss"),
    ]
    assert controller.current == "360p"
    assert controller.stable_period == 10.0


# Congestion for 2 s out of every 25: good at t mod 25 in 0..22, bad at 23 and 24.
_GOOD: Row = (23, 2200, 50, 0.0)
_BAD: Row = (2, 900, 80, 0.09)


def test_controller_flapping_network_doubles_the_stable_period() -> None:
    controller = QualityController(ceiling="720p")
    assert replay(controller, samples([_GOOD, _BAD] * 8)) == [
        (23.0, "480p", "loss"),
        (24.0, "360p", "loss"),
        (34.0, "480p", "stable"),  # (24, 34] clean
        (44.0, "720p", "stable"),
        (48.0, "480p", "loss"),  # 4 s after the up: premature, the period becomes 20
        (49.0, "360p", "loss"),
        (69.0, "480p", "stable"),  # (49, 69] clean
        (73.0, "360p", "loss"),  # premature again: 40, longer than any calm stretch (23 s)
    ]
    assert controller.stable_period == 40.0
    assert controller.current == "360p"


def test_controller_flapping_network_without_hysteresis_switches_four_times_a_cycle() -> None:
    controller = QualityController(ceiling="720p", max_stable_for=10.0)
    changes = replay(controller, samples([_GOOD, _BAD] * 8))
    assert len(changes) == 30
    assert {quality for _, quality, _ in changes} == {"360p", "480p", "720p"}
    assert controller.stable_period == 10.0


def test_controller_flapping_network_period_stops_at_its_cap() -> None:
    controller = QualityController(ceiling="720p", max_stable_for=20.0)
    changes = replay(controller, samples([_GOOD, _BAD] * 8))
    assert controller.stable_period == 20.0
    # At 20 s the calm stretches (23 s) still allow one up a cycle, each undone by the next loss.
    assert changes[6:10] == [
        (69.0, "480p", "stable"),
        (73.0, "360p", "loss"),
        (94.0, "480p", "stable"),
        (98.0, "360p", "loss"),
    ]


def test_controller_recovering_network_climbs_one_rung_per_stable_period() -> None:
    controller = QualityController(ceiling="1080p")
    rows: list[Row] = [(5, 6000, 40, 0.001), (4, 700, 350, 0.12), (62, 6000, 40, 0.001)]
    assert replay_link(controller, rows) == [
        (5.0, "360p", "loss"),  # loss (before rtt); 700 kbps meets only 360p: three rungs
        (18.0, "480p", "stable"),  # last bad sample at 8: (8, 18] clean
        (28.0, "720p", "stable"),
        (38.0, "1080p", "stable"),  # the ceiling: no higher to t=70
    ]
    assert controller.current == "1080p"


# -- the rule ---------------------------------------------------------------------------------


def test_calculate_precedence_is_loss_then_rtt_then_bandwidth() -> None:
    every = Sample(at=0, bitrate_kbps=100, rtt_ms=400, packet_loss=0.2)
    assert decide(every, "720p") == Decision(quality="360p", max_bitrate_kbps=800, reason="loss")
    no_loss = Sample(at=0, bitrate_kbps=100, rtt_ms=400, packet_loss=0.0)
    assert decide(no_loss, "720p") == Decision(quality="360p", max_bitrate_kbps=800, reason="rtt")
    slow = Sample(at=0, bitrate_kbps=100, rtt_ms=40, packet_loss=0.0)
    assert decide(slow, "720p") == Decision(
        quality="360p", max_bitrate_kbps=800, reason="bandwidth"
    )


def test_calculate_loss_and_rtt_go_down_one_rung_when_the_bitrate_is_fine() -> None:
    lossy = Sample(at=0, bitrate_kbps=4000, rtt_ms=40, packet_loss=0.06)
    assert decide(lossy, "1080p") == Decision(quality="720p", max_bitrate_kbps=2500, reason="loss")
    late = Sample(at=0, bitrate_kbps=4000, rtt_ms=301, packet_loss=0.0)
    assert decide(late, "1080p") == Decision(quality="720p", max_bitrate_kbps=2500, reason="rtt")


def test_calculate_bandwidth_drops_several_rungs_at_once() -> None:
    assert decide(clean(0, kbps=1000), "1080p") == Decision(
        quality="480p", max_bitrate_kbps=1200, reason="bandwidth"
    )
    assert decide(clean(0, kbps=500), "1080p") == Decision(
        quality="360p", max_bitrate_kbps=800, reason="bandwidth"
    )
    assert decide(clean(0, kbps=-1), "480p") == Decision(
        quality="360p", max_bitrate_kbps=800, reason="bandwidth"
    )


def test_calculate_thresholds_are_strict() -> None:
    edge = Sample(at=0, bitrate_kbps=2500, rtt_ms=RTT_DOWN_MS, packet_loss=LOSS_DOWN)
    assert decide(edge, "1080p") is None


def test_calculate_never_below_360p() -> None:
    awful = Sample(at=0, bitrate_kbps=50, rtt_ms=2000, packet_loss=0.5)
    assert decide(awful, "360p") is None
    controller = QualityController(ceiling="360p")
    assert replay(controller, [awful, clean(1)]) == []
    assert controller.current == "360p"


def test_calculate_up_needs_the_whole_stable_period_clean() -> None:
    def up_from_720p(window: list[Sample], since_change: float = 10.0) -> Decision | None:
        return calculate_optimal_quality(
            window, "720p", ceiling="1080p", since_change=since_change, stable_for=10.0
        )

    window = [clean(float(t)) for t in range(11)]  # 0..10
    up = Decision(quality="1080p", max_bitrate_kbps=4500, reason="stable")
    assert up_from_720p(window) == up
    assert up_from_720p(window, since_change=9.9) is None
    # The window does not reach back 10 s (stats missing): not yet.
    assert up_from_720p(window[1:]) is None
    # One sample under 720p's need within (0, 10]; one at 0 is outside the period.
    dip = Sample(at=4, bitrate_kbps=1100, rtt_ms=40, packet_loss=0.0)
    assert up_from_720p([*window[:4], dip, *window[5:]]) is None
    old = Sample(at=0, bitrate_kbps=1100, rtt_ms=40, packet_loss=0.2)
    assert up_from_720p([old, *window[1:]]) == up


def test_calculate_up_never_above_the_ceiling() -> None:
    def up_to_720p(current: str) -> Decision | None:
        window = [clean(float(t)) for t in range(30)]
        return calculate_optimal_quality(
            window, current, ceiling="720p", since_change=30.0, stable_for=10.0
        )

    assert up_to_720p("720p") is None
    assert up_to_720p("1080p") is None
    assert up_to_720p("480p") == Decision(quality="720p", max_bitrate_kbps=2500, reason="stable")


def test_calculate_empty_window_and_unknown_names() -> None:
    assert (
        calculate_optimal_quality([], "720p", ceiling="720p", since_change=0, stable_for=10) is None
    )
    with pytest.raises(ValueError, match="'4k'; known: 360p, 480p, 720p, 1080p"):
        decide(clean(0), "4k")
    with pytest.raises(ValueError, match="'8k'"):
        decide(clean(0), "720p", ceiling="8k")


# -- the controller ---------------------------------------------------------------------------


def test_controller_period_resets_after_holding_calmly_twice_as_long() -> None:
    controller = QualityController(ceiling="480p")
    lossy = Sample(at=0, bitrate_kbps=1000, rtt_ms=40, packet_loss=0.1)
    sequence = [lossy, *(clean(t) for t in range(1, 11))]
    sequence += [Sample(at=11, bitrate_kbps=1000, rtt_ms=40, packet_loss=0.1)]
    sequence += [clean(t) for t in range(12, 71)]
    assert replay(controller, sequence) == [
        (0.0, "360p", "loss"),
        (10.0, "480p", "stable"),
        (11.0, "360p", "loss"),  # 1 s after the up: the period becomes 20
        (31.0, "480p", "stable"),  # (11, 31] clean
    ]
    assert controller.stable_period == 20.0  # held calmly from 31 to 70: 39 s
    assert controller.observe(clean(71)) is None
    assert controller.stable_period == 10.0
    # A loss long after the up proves nothing premature: the period stays.
    assert controller.observe(Sample(at=72, bitrate_kbps=1000, rtt_ms=40, packet_loss=0.1)) == (
        Decision(quality="360p", max_bitrate_kbps=800, reason="loss")
    )
    assert controller.stable_period == 10.0


def test_controller_ignores_repeated_times_and_non_finite_values() -> None:
    controller = QualityController(ceiling="720p")
    bad = Sample(at=5, bitrate_kbps=100, rtt_ms=40, packet_loss=0.5)
    assert controller.observe(clean(5)) is None
    assert controller.observe(bad) is None  # the same time again
    assert controller.observe(attrs.evolve(bad, at=4)) is None  # back in time
    for field in ("bitrate_kbps", "rtt_ms", "packet_loss", "jitter_ms", "at"):
        for value in (math.nan, math.inf, -math.inf):
            assert controller.observe(attrs.evolve(bad, **({"at": 6.0} | {field: value}))) is None
    assert controller.current == "720p"
    # None of those was kept: t=6 is still new.
    assert controller.observe(attrs.evolve(bad, at=6)) == Decision(
        quality="360p", max_bitrate_kbps=800, reason="loss"
    )


def test_controller_set_ceiling_drops_at_once_and_climbs_back_by_stable_periods() -> None:
    controller = QualityController(ceiling="1080p")
    assert replay(controller, [clean(float(t), kbps=5000) for t in range(21)]) == []
    assert controller.set_ceiling("480p") == Decision(
        quality="480p", max_bitrate_kbps=1200, reason="ceiling"
    )
    assert (controller.current, controller.ceiling) == ("480p", "480p")
    assert controller.set_ceiling("480p") is None
    assert controller.set_ceiling("1080p") is None
    assert controller.current == "480p"
    assert replay(controller, [clean(float(t), kbps=5000) for t in range(21, 52)]) == [
        (31.0, "720p", "stable"),  # the clock restarted at the first sample after the drop
        (41.0, "1080p", "stable"),
    ]


def test_controller_keeps_samples_for_the_whole_stable_period() -> None:
    controller = QualityController(ceiling="480p", stable_for=10.0, window=5.0)
    lossy = Sample(at=0, bitrate_kbps=1000, rtt_ms=40, packet_loss=0.1)
    assert replay(controller, [lossy, *(clean(float(t)) for t in range(1, 12))]) == [
        (0.0, "360p", "loss"),
        (10.0, "480p", "stable"),  # the 5 s window alone would never reach back 10 s
    ]


def test_controller_set_ceiling_leaves_a_viewer_below_it() -> None:
    controller = QualityController(ceiling="720p")
    controller.observe(Sample(at=0, bitrate_kbps=500, rtt_ms=40, packet_loss=0.0))
    assert controller.current == "360p"
    assert controller.set_ceiling("480p") is None
    assert controller.current == "360p"
    with pytest.raises(ValueError, match="known: 360p"):
        controller.set_ceiling("2160p")


def test_controller_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="known"):
        QualityController(ceiling="huge")
    with pytest.raises(ValueError, match="stable_for"):
        QualityController(ceiling="720p", stable_for=0)
    with pytest.raises(ValueError, match="stable_for"):
        QualityController(ceiling="720p", stable_for=20, max_stable_for=10)
    with pytest.raises(ValueError, match="stable_for"):
        QualityController(ceiling="720p", window=math.nan)


# -- the ladder and frame sizes ---------------------------------------------------------------


def test_ladder_needs_are_the_caps_below() -> None:
    assert [r.name for r in LADDER] == ["360p", "480p", "720p", "1080p"]
    assert [r.need_kbps for r in LADDER] == [0, *(r.max_kbps for r in LADDER[:-1])]
    assert [(r.width, r.height, r.max_kbps) for r in LADDER] == [
        (640, 360, 800),
        (854, 480, 1200),
        (1280, 720, 2500),
        (1920, 1080, 4500),
    ]


@pytest.mark.parametrize(
    ("size", "name"),
    [
        ((1920, 1080), "1080p"),
        ((3840, 2160), "1080p"),
        ((1280, 720), "720p"),
        ((720, 1280), "720p"),  # portrait: the shorter side
        ((1920, 800), "720p"),  # cinema-wide
        ((1919, 1079), "720p"),
        ((854, 480), "480p"),
        ((640, 480), "480p"),
        ((640, 360), "360p"),
        ((320, 240), "360p"),
        ((1, 1), "360p"),
    ],
)
def test_rung_for_size(size: tuple[int, int], name: str) -> None:
    assert rung_for_size(*size).name == name


@pytest.mark.parametrize(
    ("name", "size", "sent"),
    [
        ("1080p", (1920, 1080), (1920, 1080)),
        ("720p", (1920, 1080), (1280, 720)),
        ("480p", (1920, 1080), (852, 480)),  # 853.3 wide, made even
        ("360p", (1920, 1080), (640, 360)),
        ("720p", (720, 1280), (720, 1280)),  # portrait fits the turned box
        ("360p", (720, 1280), (360, 640)),
        ("720p", (1000, 1000), (720, 720)),
        ("720p", (2560, 1080), (1280, 540)),
        ("1080p", (641, 361), (640, 360)),  # odd: down to even, never up
        ("1080p", (320, 240), (320, 240)),
        ("360p", (1, 1), (2, 2)),
        ("360p", (3, 5), (2, 4)),
        ("360p", (4000, 3), (640, 2)),
    ],
)
def test_fit(name: str, size: tuple[int, int], sent: tuple[int, int]) -> None:
    assert fit(RUNGS[name], *size) == sent


def test_frame_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="0x720"):
        rung_for_size(0, 720)
    with pytest.raises(ValueError, match="1280x-1"):
        fit(RUNGS["720p"], 1280, -1)


def test_controller_gives_a_rise_time_to_ramp_before_judging_its_bitrate() -> None:
    # At 360p (cap 800) a viewer receives at most ~790 kbps; the rise to 480p needs 800. Judged
    # at once, the first sample after the rise would undo it.
    controller = QualityController(ceiling="480p", stable_for=10.0, ramp=3.0)
    controller.observe(Sample(at=0, bitrate_kbps=300, rtt_ms=20, packet_loss=0.0))
    assert controller.current == "360p"
    decisions = {}
    for t in range(1, 20):
        decision = controller.observe(Sample(at=t, bitrate_kbps=790, rtt_ms=20, packet_loss=0.0))
        if decision is not None:
            decisions[t] = (decision.quality, decision.reason)
    # Up after the stable period; the bitrate under 480p's need is judged only 3 s later.
    assert decisions == {10: ("480p", "stable"), 13: ("360p", "bandwidth")}
    # Loss is judged at once, ramp or not.
    controller = QualityController(ceiling="480p", stable_for=10.0, ramp=3.0)
    controller.observe(Sample(at=0, bitrate_kbps=300, rtt_ms=20, packet_loss=0.0))
    for t in range(1, 12):
        controller.observe(Sample(at=t, bitrate_kbps=1000, rtt_ms=20, packet_loss=0.0))
    assert controller.current == "480p"
    decision = controller.observe(Sample(at=12, bitrate_kbps=1000, rtt_ms=20, packet_loss=0.2))
    assert decision is not None and (decision.quality, decision.reason) == ("360p", "loss")
