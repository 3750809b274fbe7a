"""The quality ladder of live sessions and the controller that picks a viewer's rung.

docs/protocol.md §8: a viewer watches at one rung of :data:`LADDER` (360p to 1080p, each with a
frame box and a bitrate cap). From the viewer's ``stream_stats`` (about one :class:`Sample` a
second) the server moves the rung:

- **down at once** when the latest sample shows ``packet_loss`` > :data:`LOSS_DOWN`,
  ``rtt_ms`` > :data:`RTT_DOWN_MS`, or a bitrate under the rung's *need* (the cap of the rung
  below). At least one rung, and as far as the bitrate says: to the highest rung whose need the
  measured bitrate meets. Never below 360p.
- **up one rung** only after a stable period: every sample of the last ``stable_for`` seconds
  clean, nothing changed for that long, and never above the *ceiling*, the rung of the host's
  frame size (where a viewer starts).

:func:`calculate_optimal_quality` is that rule as a pure function of a window of samples.
:class:`QualityController` keeps one viewer's window and rung and adds hysteresis: an up-switch
undone by the network within the stable period doubles the period for the next try (up to a
cap), and a rung that holds, with clean samples, for twice the period brings it back to the
base. Everything here is pure: no I/O, no clock (times come in the samples), so the same samples
give the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import attrs

#: Down at once when the latest sample's packet loss (a fraction) is above this.
LOSS_DOWN = 0.05
#: Down at once when the latest sample's round-trip time is above this, in milliseconds.
RTT_DOWN_MS = 300.0
#: The most samples a :class:`QualityController` keeps, whatever their times (about four
#: minutes of once-a-second stats, more than the longest stable period).
MAX_SAMPLES = 256


@attrs.frozen(kw_only=True)
class Rung:
    """One step of the quality ladder: a frame box, a bitrate cap, and the bitrate it needs."""

    #: ``"360p"``, ``"480p"``, ``"720p"`` or ``"1080p"``.
    name: str
    #: The frame box (landscape; a portrait frame fits the box turned, see :func:`fit`).
    width: int
    height: int
    #: The highest bitrate sent at this rung (``max_bitrate_kbps`` of ``quality_change``).
    max_kbps: int
    #: The measured bitrate below which a viewer cannot stay here: the cap of the rung below.
    need_kbps: int


#: The rungs, lowest first.
LADDER: tuple[Rung, ...] = (
    Rung(name="360p", width=640, height=360, max_kbps=800, need_kbps=0),
    Rung(name="480p", width=854, height=480, max_kbps=1200, need_kbps=800),
    Rung(name="720p", width=1280, height=720, max_kbps=2500, need_kbps=1200),
    Rung(name="1080p", width=1920, height=1080, max_kbps=4500, need_kbps=2500),
)
#: The rungs by name (read-only).
RUNGS: Mapping[str, Rung] = MappingProxyType({rung.name: rung for rung in LADDER})
_INDEX: dict[str, int] = {rung.name: i for i, rung in enumerate(LADDER)}


def _index(name: str) -> int:
    try:
        return _INDEX[name]
    except KeyError:
        raise ValueError(f"unknown quality {name!r}; known: {', '.join(RUNGS)}") from None


def rung_for_size(width: int, height: int) -> Rung:
    """The rung of a frame size (where a viewer of that frame starts): the highest rung whose
    height the frame's shorter side reaches, so 1280x720 and 720x1280 are both 720p, 1920x800
    is 720p, and anything under 360 pixels is 360p.

    Raises:
        ValueError: a side is not positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a frame size is positive, got {width}x{height}")
    reached = [rung for rung in LADDER if rung.height <= min(width, height)]
    return reached[-1] if reached else LADDER[0]


def fit(rung: Rung, width: int, height: int) -> tuple[int, int]:
    """The frame size to send at ``rung`` for a host frame of ``width``x``height``: scaled down
    (never up) to fit the rung's box, keeping the aspect ratio, both sides even and at least 2.

    The box turns with the frame: a portrait frame fits ``rung.height``x``rung.width``, so a
    720x1280 phone frame stays 720x1280 at 720p, as :func:`rung_for_size` rates it.

    Raises:
        ValueError: a side is not positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a frame size is positive, got {width}x{height}")
    box_w, box_h = (rung.width, rung.height) if width >= height else (rung.height, rung.width)
    if width > box_w or height > box_h:
        # Integer arithmetic: the side that overflows its box most is set to the box.
        if width * box_h >= height * box_w:
            width, height = box_w, height * box_w // width
        else:
            width, height = width * box_h // height, box_h
    return max(2, width - width % 2), max(2, height - height % 2)


@attrs.frozen(kw_only=True)
class Sample:
    """One viewer's stream statistics at a moment (a ``stream_stats`` message, or the server's
    own statistics of the viewer's connection in relay mode)."""

    #: When, in seconds on any monotonic clock (only differences count).
    at: float
    bitrate_kbps: float
    rtt_ms: float
    #: A fraction, 0..1.
    packet_loss: float
    jitter_ms: float = 0.0


@attrs.frozen(kw_only=True)
class Decision:
    """A new rung for a viewer: what ``quality_change`` carries."""

    quality: str
    max_bitrate_kbps: int
    #: Why: ``"loss"``, ``"rtt"``, ``"bandwidth"`` (down), ``"stable"`` (up), or ``"ceiling"``
    #: (the host's frame shrank under the viewer's rung, :meth:`QualityController.set_ceiling`).
    reason: str


def _decision(index: int, reason: str) -> Decision:
    rung = LADDER[index]
    return Decision(quality=rung.name, max_bitrate_kbps=rung.max_kbps, reason=reason)


def _trouble(sample: Sample, rung: Rung, *, bandwidth: bool = True) -> str | None:
    """The reason ``sample`` calls for going down from ``rung``, by precedence; None if clean.
    ``bandwidth`` False: the bitrate is not judged (the sender is still ramping up)."""
    if sample.packet_loss > LOSS_DOWN:
        return "loss"
    if sample.rtt_ms > RTT_DOWN_MS:
        return "rtt"
    if bandwidth and sample.bitrate_kbps < rung.need_kbps:
        return "bandwidth"
    return None


def calculate_optimal_quality(
    window: Sequence[Sample],
    current: str,
    *,
    ceiling: str,
    since_change: float,
    stable_for: float,
    ramp: float = 0.0,
) -> Decision | None:
    """The rung a viewer at ``current`` should move to, or None to stay.

    ``window`` holds the viewer's recent samples, oldest first (times increasing, values
    finite); ``since_change`` is how long ago (in the samples' clock) the rung last changed.

    Down, judged on the latest sample alone: by packet loss, then round-trip time, then
    bandwidth. When several hold, the reason is the first of ``"loss"``, ``"rtt"``,
    ``"bandwidth"``: loss and delay are what a viewer sees, and they also depress the measured
    bitrate, so they are the cause more often than the effect. The target is the highest rung
    whose need the latest bitrate meets, and for loss or rtt (which may hold at any bitrate) at
    least one rung below ``current``. At 360p nothing is lower: None.

    Up one rung (``"stable"``), never above ``ceiling``, when the rung has held for
    ``stable_for`` seconds (``since_change >= stable_for``), the window reaches back that far
    (its oldest sample is at least ``stable_for`` seconds before the latest: too short a history
    is not taken for calm; a gap inside it is judged by the samples around it), and every sample
    of the last ``stable_for`` seconds (``at > latest - stable_for``) is clean at ``current``.
    The ceiling only bounds going up: a viewer above it is left for
    :meth:`QualityController.set_ceiling` to bring down.

    ``ramp``: for that many seconds after a change the bitrate is not judged (loss and delay
    still are). A sender moved up a rung takes a moment to reach the new rung's bitrate, and
    until it does, what it sends is at most the old rung's cap, which is the new rung's need:
    judged at once, every rise would be undone by the next sample.

    Raises:
        ValueError: ``current`` or ``ceiling`` is no rung's name.
    """
    here, top = _index(current), _index(ceiling)
    if not window:
        return None
    latest = window[-1]
    changed = latest.at - since_change
    reason = _trouble(latest, LADDER[here], bandwidth=since_change >= ramp)
    if reason is not None:
        if here == 0:
            return None
        met = [i for i, rung in enumerate(LADDER) if rung.need_kbps <= latest.bitrate_kbps]
        afford = met[-1] if met else 0  # a negative bitrate meets nothing
        return _decision(min(here - 1, afford), reason)
    if here >= top or since_change < stable_for:
        return None
    start = latest.at - stable_for
    if window[0].at > start:
        return None
    if any(_trouble(s, LADDER[here], bandwidth=s.at - changed >= ramp)
           for s in window if s.at > start):  # fmt: skip
        return None
    return _decision(here + 1, "stable")


class QualityController:
    """One viewer's rung, moved by its samples (:func:`calculate_optimal_quality`) with
    hysteresis. Pure: time comes in the samples; not thread-safe, call it from one task.

    The viewer starts at ``ceiling`` (the rung of the host's frame size). :meth:`observe` keeps
    the samples of the last ``window`` seconds (longer while the stable period is longer, and at
    most :data:`MAX_SAMPLES`) and returns at most one decision per sample, already applied.

    Hysteresis: when a down-switch comes within the stable period of the up-switch before it
    (the up was premature), the stable period doubles, up to ``max_stable_for``. Once the rung
    has held for twice the current period, unchanged and with every sample clean, the period is
    back to ``stable_for``. Clean, not merely unchanged: at 360p nothing is lower, so a rung
    that only "holds" through loss would reset the period in the middle of a flapping network.

    Raises:
        ValueError: ``ceiling`` is no rung's name, or the durations are not finite and positive
            with ``stable_for <= max_stable_for``.
    """

    def __init__(
        self,
        *,
        ceiling: str,
        stable_for: float = 10.0,
        window: float = 30.0,
        max_stable_for: float = 80.0,
        ramp: float = 3.0,
    ) -> None:
        _index(ceiling)
        durations = (stable_for, window, max_stable_for)
        if not all(math.isfinite(d) and d > 0 for d in durations) or stable_for > max_stable_for:
            raise ValueError(
                "stable_for, window and max_stable_for are finite seconds > 0 with stable_for <="
                f" max_stable_for, got {stable_for!r}, {window!r}, {max_stable_for!r}"
            )
        self._ceiling = ceiling
        self._current = ceiling
        self._base = stable_for
        self._period = stable_for
        self._window = window
        self._max_period = max_stable_for
        self._ramp = ramp
        #: Whether the last change was a rise (the sender ramps up: see ``ramp``).
        self._rose = False
        self._samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)
        #: When the rung last changed; None until the next sample (which then starts the clock).
        self._changed_at: float | None = None
        #: When the last up-switch happened, while a down-switch could still prove it premature.
        self._up_at: float | None = None
        #: The time of the latest sample that called for going down (at the rung then held).
        self._troubled_at = -math.inf

    @property
    def current(self) -> str:
        """The viewer's rung, by name."""
        return self._current

    @property
    def ceiling(self) -> str:
        """The highest rung the viewer may reach: the rung of the host's frame size."""
        return self._ceiling

    @property
    def stable_period(self) -> float:
        """How long (seconds) the samples must stay clean before the next up-switch."""
        return self._period

    def set_ceiling(self, name: str) -> Decision | None:
        """The host's frame size is known or changed: its rung is the new ceiling.

        A viewer above the new ceiling drops to it at once: the returned decision (reason
        ``"ceiling"``) is to be sent as ``quality_change`` like any other, and the stable period
        restarts from the next sample. A viewer at or below it stays (None) and climbs to a
        raised ceiling the usual way, one rung per stable period. A ceiling drop is not the
        network's verdict, so it never doubles the stable period.

        Raises:
            ValueError: ``name`` is no rung's name.
        """
        top = _index(name)
        self._ceiling = name
        if _index(self._current) <= top:
            return None
        self._current = name
        self._changed_at = None
        self._up_at = None
        self._rose = False
        return _decision(top, "ceiling")

    def observe(self, sample: Sample) -> Decision | None:
        """Take one sample; return the rung change it causes (already applied), or None.

        A sample that is not later than the previous one (a duplicate, a clock gone back) or
        has a non-finite value is ignored: the wire already refuses non-finite numbers, but a
        NaN here would fail every threshold comparison and so pass for a clean sample.
        """
        if not all(math.isfinite(value) for value in attrs.astuple(sample)):
            return None
        if self._samples and sample.at <= self._samples[-1].at:
            return None
        self._samples.append(sample)
        keep = max(self._window, self._period)
        while self._samples[0].at < sample.at - keep:
            self._samples.popleft()
        if self._changed_at is None:
            self._changed_at = sample.at
        if _trouble(sample, RUNGS[self._current]) is not None:
            self._troubled_at = sample.at
        if sample.at - max(self._changed_at, self._troubled_at) >= 2 * self._period:
            self._period = self._base
        if self._up_at is not None and sample.at - self._up_at >= self._period:
            self._up_at = None
        decision = calculate_optimal_quality(
            self._samples,
            self._current,
            ceiling=self._ceiling,
            since_change=sample.at - self._changed_at,
            stable_for=self._period,
            ramp=self._ramp if self._rose else 0.0,
        )
        if decision is None:
            return None
        self._rose = decision.reason == "stable"
        if decision.reason == "stable":
            self._up_at = sample.at
        elif self._up_at is not None:
            self._period = min(2 * self._period, self._max_period)
            self._up_at = None
        self._current = decision.quality
        self._changed_at = sample.at
        return decision
