"""Background jobs: each runs until cancelled, and none ends the server by failing.

The server's nursery holds long-running jobs beside the transports: the metric sampler, the
health checks, retention pruning, the audit writer and the operations database's size cap, the
security-alert writer, the rate limiter's cluster sync, webhook deliveries, each store's WAL
checkpointer, and each room's ticker and presence heartbeat. An exception escaping any of them
would cancel that nursery and end the whole server, so each job's loop runs through
:meth:`JobFailures.keep_running` (or a one-shot step through :meth:`JobFailures.guard`): a step
that fails in any way (a storage error, an ``OSError`` such as ``EMFILE``, a bug) is logged
(with its traceback the first time in a row, then one short line each time), counted by job
(``crealia_background_failures_total{job}``; ``crealia_background_job_failing{job}`` is 1 while
its last attempt failed) and tried again after a backoff that doubles from
:data:`FIRST_BACKOFF` up to :data:`MAX_BACKOFF` seconds.

Only ``Exception`` is caught: ``trio.Cancelled`` (a ``BaseException``) and any exception group
holding it go through, so cancelling a job still ends it at once.

This module imports nothing of crealia's: every layer (the store included) can use it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import attrs
import trio

log = logging.getLogger("crealia.jobs")

#: Every background job by name (the ``job`` label), so each counter exists from the start.
JOBS = (
    "sample",  # the metric sampler (crealia._monitor)
    "health",  # the health checks
    "prune",  # metric samples and resolved alerts past their retention
    "audit_writer",  # queued audit events into ops.sqlite3 (crealia._audit)
    "audit_prune",  # audit events past their retention
    "ops_size_cap",  # ops.sqlite3 kept under ops_max_bytes
    "security_alerts",  # security alerts into ops.sqlite3 (crealia._security)
    "rate_limit_sync",  # the rate limiter's sync with the shared store (crealia._ratelimit)
    "rate_limit_sweep",  # the rate limiter's forgetting of idle keys
    "alert_webhook",  # webhook deliveries of alerts (crealia._alerts)
    "wal_checkpoint",  # each store's WAL checkpointer (crealia._storage)
    "store_writer",  # a callback run after a commit (a bug: the writer goes on)
    "room_ticker",  # a room's batched fan-out (crealia._room)
    "presence",  # a room's cluster presence heartbeat and membership notices
    "room",  # a room that failed in another way: it closes, the server goes on
)

#: Seconds before the first retry of a failed step; each further failure in a row doubles it.
FIRST_BACKOFF = 0.05
#: The longest wait between two attempts of a failing step, in seconds.
MAX_BACKOFF = 5.0


@attrs.define(eq=False)
class JobFailures:
    """The failures of a server's background jobs, and the loop that survives them.

    One instance per server, shared by every job (a job made outside a server gets its own).
    A job that runs more than once at a time (a checkpointer per store, a heartbeat per room,
    a delivery loop per webhook) names each run with an ``instance``: failures are counted per
    job, whether it is failing is known per instance.
    """

    #: Failed attempts since the start, by job.
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(JOBS, 0))
    #: The instances of each job whose last attempt failed.
    _failing: dict[str, set[str | None]] = attrs.Factory(dict)

    @property
    def failing(self) -> set[str]:
        """The jobs with an instance whose last attempt failed."""
        return {job for job, instances in self._failing.items() if instances}

    def failed(self, job: str, exc: BaseException, instance: str | None = None) -> None:
        """Count a failed attempt of ``job``; logged with its traceback the first time in a
        row (of this instance), then with one short line."""
        self.counts[job] = self.counts.get(job, 0) + 1
        name = job if instance is None else f"{job} ({instance})"
        instances = self._failing.setdefault(job, set())
        if instance in instances:
            log.warning("%s failed again: %s: %s", name, type(exc).__name__, exc)
            return
        instances.add(instance)
        log.error("%s failed (retried): %s: %s", name, type(exc).__name__, exc, exc_info=exc)

    def succeeded(self, job: str, instance: str | None = None) -> None:
        """Note that an attempt of ``job`` worked (logged once after failures)."""
        instances = self._failing.get(job)
        if instances and instance in instances:
            instances.discard(instance)
            log.warning("%s works again", job if instance is None else f"{job} ({instance})")

    def forget(self, instance: str) -> None:
        """``instance`` ended (a room closed): it is failing no more."""
        for instances in self._failing.values():
            instances.discard(instance)

    @contextmanager
    def guard(self, job: str, instance: str | None = None) -> Iterator[None]:
        """Run a one-shot step of ``job``: an ``Exception`` escaping the block is counted and
        logged (not raised); cancellation goes through."""
        try:
            yield
        except Exception as exc:
            self.failed(job, exc, instance)
        else:
            self.succeeded(job, instance)

    async def keep_running(
        self,
        job: str,
        step: Callable[[], Awaitable[object]],
        *,
        period: float = 0.0,
        instance: str | None = None,
    ) -> NoReturn:
        """Run ``step`` again and again until cancelled, ``period`` seconds apart (0: at once;
        a step that waits for its own work gives 0). A failed step is counted and logged, and
        tried again after the backoff (never longer than ``period`` when there is one)."""
        backoff = 0.0
        ceiling = min(MAX_BACKOFF, period) if period > 0 else MAX_BACKOFF
        while True:
            try:
                await step()
            except Exception as exc:
                self.failed(job, exc, instance)
                backoff = min(ceiling, max(FIRST_BACKOFF, 2 * backoff))
                await trio.sleep(backoff)  # a backoff, not synchronization
                continue
            self.succeeded(job, instance)
            backoff = 0.0
            if period > 0:
                await trio.sleep(period)  # a period, not synchronization
            else:
                await trio.lowlevel.checkpoint()  # a step with nothing to wait for yields
