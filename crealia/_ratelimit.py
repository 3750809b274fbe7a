"""Rate limits per key (a user) and event class, by GCRA, optionally shared across processes.

GCRA, the generic cell rate algorithm, keeps one number per key and class: the *theoretical
arrival time* (TAT), the moment the key would be idle again had every admitted event been spread
out at the sustained rate. With an emission interval ``T = window / count`` and a burst tolerance
``τ = burst · T``, an event of cost ``c`` arriving at ``now`` is admitted when
``max(TAT, now) + c·T - now <= τ``, and then the TAT moves to ``max(TAT, now) + c·T``. So a key
idle for long may send ``burst`` events at once, then one every ``T``; a refused event records
nothing and learns how long to wait (docs/protocol.md §7, ``rate_limited`` with ``retry_after_ms``).

Every decision is local and immediate (:meth:`RateLimiter.check` is synchronous and O(1)). In a
cluster, :meth:`RateLimiter.run` sends each key's consumption to a shared store every
``sync_interval`` seconds and adopts the cluster's TAT when it is later than its own. The shared
store keeps its TATs on its own clock (Redis's ``TIME``) and answers with how far ahead of *its*
now a TAT lies, so the processes' clocks never need to agree.

A process may not run ahead of the cluster by more than a *slack*: per key and class it admits
at most ``slack`` cost (a share of the burst, at least 1) that the shared store has not yet
confirmed. Past that, :meth:`RateLimiter.admit` wakes the sync loop and waits for the round
trip (a client sees a little latency, not a refusal), while :meth:`RateLimiter.check` refuses
with a wait of a few milliseconds. So a key spread over N processes gets at most its burst plus
N slacks, instead of N bursts (a process that never saw the key would otherwise grant it all).
While the shared store is unreachable the slack does not apply and the limits hold locally.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Protocol

import attrs
import trio

from ._errors import ConfigurationError
from ._jobs import JobFailures
from ._protocol import PROTOCOL, RATE_CLASSES

log = logging.getLogger("crealia.ratelimit")

#: The rate-limit classes and the client message types in them, read from the protocol table
#: (docs/protocol.md §11; every type names its class there). ``rest`` counts every REST call
#: (the HTTP app charges it) and holds no message type.
CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        cls: tuple(name for name, entry in PROTOCOL.items() if entry.rate_class == cls)
        for cls in RATE_CLASSES
    }
)


def event_class(message_type: str) -> str:
    """The rate class of a client message type (its protocol table entry's); ``"other"`` for a
    name that is no message type (nothing can be sent under it: decoding refuses it)."""
    entry = PROTOCOL.get(message_type)
    return "other" if entry is None else entry.rate_class


def _at_least_one(instance: Limit, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Limit.{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Limit:
    """A rate: ``count`` events per window sustained, ``burst`` of them at once.

    A key idle for a while may send ``burst`` events at once (the GCRA burst tolerance is
    ``burst`` emission intervals); after that one every ``window / count``.

    Raises:
        ValueError: ``count`` or ``burst`` is not an integer >= 1 (the message names it).
    """

    count: int = attrs.field(validator=_at_least_one)
    burst: int = attrs.field(validator=_at_least_one)


#: The limits per window of the default ``rate_limit_window_ms`` (60 s) for an editor.
#: Cursors: 120/s sustained while clients send at most 60 Hz.
DEFAULT_LIMITS: dict[str, Limit] = {
    "cursor": Limit(count=7200, burst=240),
    "edit": Limit(count=3000, burst=500),
    "comment": Limit(count=300, burst=50),
    "signal": Limit(count=1200, burst=200),
    "rest": Limit(count=1200, burst=120),
    "other": Limit(count=1200, burst=120),
}

#: The cluster slack: how far (a share of the burst) a process may admit ahead of what the
#: shared store confirmed, per key and class.
DEFAULT_SLACK = 0.1

# Float slack when comparing times in milliseconds (one microsecond), so that a request retried
# exactly after ``retry_after_ms`` is admitted despite rounding.
_SLACK_MS = 1e-3


class SharedLimits(Protocol):
    """A store shared by the processes of a cluster; :class:`~crealia.abc.Backplane` is one."""

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float] | None:
        """Record consumption and answer the cluster's state; see
        :meth:`crealia.abc.Backplane.sync_rate_limits` for the contract."""


@attrs.define(eq=False)
class _Bucket:
    """One class's limit and the TAT (local clock, ms) of every key that used it lately."""

    interval: float
    tolerance: float
    tats: dict[str, float] = attrs.Factory(dict)
    #: Cost admitted per key since the last sync (filled only when shared).
    consumed: dict[str, int] = attrs.Factory(dict)
    #: Cost sent to the shared store by the sync in flight, not yet confirmed.
    in_flight: dict[str, int] = attrs.Factory(dict)
    #: Unconfirmed cost a key may have (the cluster slack).
    slack: int = 1


class RateLimiter:
    """GCRA limits per key and class, decided locally, optionally synced across processes.

    ``limits`` maps a class (see :data:`~crealia._protocol.RATE_CLASSES`) to its :class:`Limit`
    per ``window_ms``; a class without a limit is not limited. ``clock`` returns seconds
    (monotonic); inject one to test timing. With ``shared``, :meth:`run` syncs with it every
    ``sync_interval`` seconds, and each key may run ahead of the cluster by ``slack`` times its
    class's burst (at least one event; see the module docstring).

    Raises:
        ValueError: ``window_ms`` or ``sync_interval`` is not positive, ``slack`` is not in
            (0, 1], or a limit is not a :class:`Limit`.
    """

    #: Seconds between sweeps that forget idle keys.
    sweep_interval: float = 10.0
    #: Seconds :meth:`admit` waits at least for a sync round before refusing (a loaded shared
    #: store can take longer than two sync intervals; a short wait beats a spurious refusal).
    slack_wait: float = 1.0

    def __init__(
        self,
        limits: Mapping[str, Limit],
        window_ms: int,
        *,
        shared: SharedLimits | None = None,
        sync_interval: float = 0.1,
        slack: float = DEFAULT_SLACK,
        clock: Callable[[], float] = time.monotonic,
        jobs: JobFailures | None = None,
    ) -> None:
        if isinstance(window_ms, bool) or not isinstance(window_ms, int) or window_ms <= 0:
            raise ValueError(f"window_ms must be a positive integer, got {window_ms!r}")
        if not sync_interval > 0:
            raise ValueError(f"sync_interval must be positive, got {sync_interval!r}")
        if not 0 < slack <= 1:
            raise ValueError(f"slack must be a fraction of the burst in (0, 1], got {slack!r}")
        for cls, limit in limits.items():
            if not isinstance(limit, Limit):
                raise ValueError(f"limits[{cls!r}] must be a Limit, got {limit!r}")
        self.limits = dict(limits)
        self.window_ms = window_ms
        self.sync_interval = sync_interval
        self._shared = shared
        self._clock = clock
        #: Where failed syncs and sweeps are counted (the server's, when it made this one).
        self.jobs = jobs or JobFailures()
        self._buckets: dict[str, _Bucket] = {
            cls: _Bucket(
                interval=window_ms / limit.count,
                tolerance=limit.burst * window_ms / limit.count,
                slack=max(1, math.ceil(limit.burst * slack)),
            )
            for cls, limit in limits.items()
        }
        #: Keys (per class) forgotten by sweeps since the start.
        self.forgotten = 0
        #: Syncs with the shared store that failed since the start.
        self.sync_failures = 0
        self._sync_failing = False
        self._sync_error: Exception | None = None
        self._sync_lock = trio.Lock()
        #: Set to ask the sync loop for a round now; and set when that round is over.
        self._wake = trio.Event()
        self._round = trio.Event()
        #: Milliseconds the last sync took (what a key over its slack waits, about).
        self._sync_ms = 1.0
        #: Events refused or delayed because their process had run ahead of the cluster.
        self.slack_waits = 0

    @property
    def size(self) -> int:
        """How many (key, class) pairs are tracked now."""
        return sum(len(b.tats) for b in self._buckets.values())

    @property
    def shared(self) -> bool:
        """Whether the limits are synced with other processes."""
        return self._shared is not None

    def check(self, key: str, cls: str, cost: int = 1) -> int:
        """Admit an event of ``cost`` for ``key`` in class ``cls`` now, or say when.

        Returns 0 when admitted (and records it), otherwise the milliseconds (>= 1) after
        which the same request would be admitted; a refusal records nothing.

        In a cluster, an event that would take ``key`` more than its slack ahead of what the
        shared store confirmed is refused with the wait of about one sync round trip (and the
        sync loop is woken); :meth:`admit` waits for that round trip instead.

        Raises:
            ValueError: ``cost`` exceeds the class's burst, so it could never be admitted.
        """
        wait, ahead = self._check(key, cls, cost)
        if ahead:
            self.slack_waits += 1
            self._wake.set()
            return max(1, math.ceil(self._sync_ms))
        return wait

    async def admit(self, key: str, cls: str, cost: int = 1) -> int:
        """Like :meth:`check`, but when ``key`` has run a slack ahead of the cluster, wait for
        the next sync round (at most :attr:`slack_wait` or ``2 * sync_interval`` seconds,
        whichever is longer) and decide then.

        Cancellation leaves nothing recorded.

        Raises:
            ValueError: as :meth:`check`.
        """
        wait, ahead = self._check(key, cls, cost)
        if not ahead:
            return wait
        self.slack_waits += 1
        with trio.move_on_after(max(self.slack_wait, 2 * self.sync_interval)):
            while ahead:
                done = self._round
                self._wake.set()
                await done.wait()
                wait, ahead = self._check(key, cls, cost)
        if ahead:
            return max(1, math.ceil(self._sync_ms))
        return wait

    def _check(self, key: str, cls: str, cost: int) -> tuple[int, bool]:
        """``(wait, ahead)``: the wait as :meth:`check` says it, and whether admitting would
        take ``key`` more than its slack ahead of the cluster (then nothing was recorded)."""
        bucket = self._buckets.get(cls)
        if bucket is None:
            return 0, False
        now = self._clock() * 1000.0
        tats = bucket.tats
        tat = tats.get(key, now)
        if tat < now:
            tat = now
        tat += cost * bucket.interval
        excess = tat - now - bucket.tolerance
        if excess > _SLACK_MS:
            if cost * bucket.interval > bucket.tolerance + _SLACK_MS:
                raise ValueError(f"cost {cost} exceeds the burst of class {cls!r}")
            return math.ceil(excess - _SLACK_MS), False
        if self._shared is not None:
            consumed = bucket.consumed
            unconfirmed = consumed.get(key, 0) + bucket.in_flight.get(key, 0)
            # At least one event may always go (an event costlier than the slack too).
            if unconfirmed and unconfirmed + cost > bucket.slack and not self._sync_failing:
                return 0, True
            consumed[key] = consumed.get(key, 0) + cost
        tats[key] = tat
        return 0, False

    def sweep(self) -> int:
        """Forget every key whose TAT has passed (an idle key is the same as an unknown one);
        returns how many were forgotten."""
        now = self._clock() * 1000.0
        forgotten = 0
        for bucket in self._buckets.values():
            tats = bucket.tats
            idle = [key for key, tat in tats.items() if tat <= now]
            for key in idle:
                del tats[key]
            forgotten += len(idle)
        self.forgotten += forgotten
        return forgotten

    async def sync(self) -> None:
        """Send what every key consumed since the last sync to the shared store and adopt the
        cluster's TATs where they are later than the local ones.

        Without a shared store, or when the store says there is nothing to share (one process),
        this does nothing (and consumption is no longer tracked). A failing store is logged
        (once, until it works again) and counted in :attr:`sync_failures`; what it missed is
        dropped and the limits hold locally. Cancellation drops this round's consumption.
        """
        # One sync at a time: a caller of sync() returns only after what was consumed before
        # the call has reached the shared store, even if the background sync had taken it.
        async with self._sync_lock:
            done, self._round = self._round, trio.Event()
            try:
                await self._sync()
            finally:
                for bucket in self._buckets.values():
                    bucket.in_flight = {}
                done.set()  # whoever waits for a round: decide again

    async def _sync(self) -> None:
        shared = self._shared
        if shared is None:
            return
        sent: list[tuple[_Bucket, str]] = []
        updates: list[tuple[str, int, float]] = []
        for cls, bucket in self._buckets.items():
            consumed, bucket.consumed = bucket.consumed, {}
            bucket.in_flight = consumed
            for key, cost in consumed.items():
                sent.append((bucket, key))
                updates.append((f"{key}:{cls}", cost, bucket.interval))
        if not updates:
            return
        started = trio.current_time()
        try:
            ahead = await shared.sync_rate_limits(updates)
        except Exception as exc:
            self.sync_failures += 1
            if not self._sync_failing:
                self._sync_failing = True
                log.warning("shared rate limits unavailable, limiting locally")
            self._sync_error = exc  # the sync job counts it (and logs why)
            return
        if self._sync_failing:
            self._sync_failing = False
            log.info("shared rate limits are back")
        if ahead is None:
            self._shared = None
            for bucket in self._buckets.values():
                bucket.consumed.clear()
            return
        self._sync_ms = (trio.current_time() - started) * 1000.0
        now = self._clock() * 1000.0
        for (bucket, key), backlog in zip(sent, ahead, strict=True):
            # What this process admitted while the answer was on its way is not in it yet.
            cluster_tat = now + backlog + bucket.consumed.get(key, 0) * bucket.interval
            if bucket.tats.get(key, now) < cluster_tat:
                bucket.tats[key] = cluster_tat

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync with the shared store every ``sync_interval`` seconds (if there is one) and
        forget idle keys every :attr:`sweep_interval` seconds, until cancelled. Neither job
        ends by failing: a failed round is logged, counted in :attr:`jobs` and retried."""
        async with trio.open_nursery() as nursery:
            if self._shared is not None:
                nursery.start_soon(self.jobs.keep_running, "rate_limit_sync", self._sync_round)
            nursery.start_soon(partial(self.jobs.keep_running, "rate_limit_sweep", self._sweep,
                                       period=self.sweep_interval))  # fmt: skip
            task_status.started()

    async def _sync_round(self) -> None:
        if self._shared is None:
            await trio.sleep_forever()  # one process after all: nothing to share
        with trio.move_on_after(self.sync_interval):
            await self._wake.wait()  # a key ran a slack ahead: sync now
        self._wake = trio.Event()
        await self.sync()
        error, self._sync_error = self._sync_error, None
        if error is not None:
            raise error

    async def _sweep(self) -> None:
        self.sweep()
        await trio.lowlevel.checkpoint()


def rate_limits(overrides: Mapping[str, str]) -> dict[str, Limit]:
    """:data:`DEFAULT_LIMITS` with a server's overrides: per class ``"count/burst"``, ``"count"``
    (the burst is then a tenth of it) or ``"off"`` (that class is not limited).

    Raises:
        ConfigurationError: an unknown class or a malformed limit (the message names it).
    """
    limits = dict(DEFAULT_LIMITS)
    for cls, raw in overrides.items():
        if cls not in RATE_CLASSES:
            raise ConfigurationError(
                f"rate limit {cls!r}: unknown class; known: {', '.join(RATE_CLASSES)}"
            )
        text = str(raw).strip().lower()
        if text in ("off", "0", "none"):
            limits.pop(cls, None)
            continue
        count, _, burst = text.partition("/")
        try:
            limits[cls] = Limit(
                count=int(count), burst=int(burst) if burst else max(1, int(count) // 10)
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"rate limit {cls!r}={raw!r}: expected count/burst, count or off ({exc})"
            ) from None
    return limits
