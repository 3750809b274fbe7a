"""Fault scenarios against real ``crealia serve`` processes (and a real redis-server).

Each scenario runs writers (tests/faults/_scenario.py) through faults and then checks that no
acknowledged edit was lost or duplicated, that every replica saw a gap-free order and equals
the server's snapshot, and that a resume yields exactly the missing events. Counts and
recovery times are printed (``-s``) and written to ``test-artifacts/faults/<name>.json``.

The fast versions run in the normal suite; the full ones are marked ``faults_full`` and run
with ``CREALIA_FAULTS_FULL=1`` (``make test-faults``).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from .._process import ServerProcess, run_server
from .._redis import RedisServer, run_redis
from ._proxy import open_proxy
from ._scenario import (
    FULL,
    SECRET,
    Counts,
    Writer,
    close,
    connect,
    join,
    percentile,
    recovery_time,
    report,
    setup_project,
    verify,
    wait_acks,
)


def full(test: Callable[..., Any]) -> Callable[..., Any]:
    """A full version: marked ``faults_full``, skipped unless CREALIA_FAULTS_FULL=1."""
    reason = "a full fault run: set CREALIA_FAULTS_FULL=1 (make test-faults)"
    skip = pytest.mark.skipif(not FULL, reason=reason)
    return pytest.mark.faults_full(skip(test))


def writers_on(urls: list[Callable[[], str]], **options: Any) -> list[Writer]:
    return [Writer(f"w{i}", urls[i % len(urls)], **options) for i in range(3)]


def check(counts: Counts) -> None:
    report(counts)
    assert counts.failures() == {}, counts
    assert counts.acked > 0


# (a) SIGKILL rounds of one server process, 3 writers.


async def sigkill_rounds(tmp_path: Path, rounds: int, name: str) -> None:
    data = tmp_path / "data"
    current: list[ServerProcess] = []
    writers = writers_on([lambda: current[0].ws_url])
    counts = Counts(name, extra={"rounds": rounds, "recovery_from": "the kill"})
    killed_at = 0.0
    setup_seq = 0
    with trio.fail_after(30 + 15 * rounds):
        async with trio.open_nursery() as nursery:
            for round_ in range(rounds + 1):
                async with run_server(data, SECRET) as proc:
                    current[:] = [proc]
                    if round_ == 0:
                        setup_seq = await setup_project(proc.ws_url)
                        for writer in writers:
                            nursery.start_soon(writer.run)
                    else:
                        counts.recovery_s.append(await recovery_time(writers, killed_at))
                    await wait_acks(writers, 10)
                    if round_ < rounds:
                        proc.kill()  # SIGKILL, with every writer's window in flight
                        killed_at = trio.current_time()
                    else:
                        await verify(proc.ws_url, writers, counts, setup_seq=setup_seq)
    check(counts)


async def test_sigkill_rounds_lose_no_acknowledged_edit(tmp_path: Path) -> None:
    await sigkill_rounds(tmp_path, 3, "sigkill")


@full
async def test_sigkill_rounds_full(tmp_path: Path) -> None:
    await sigkill_rounds(tmp_path, 20, "sigkill_full")


# (b) Redis restarts (SIGTERM and SIGKILL) under a 2-process cluster.


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the Redis restart scenario needs it")


async def stop_redis(redis: RedisServer, signum: int) -> None:
    assert redis.process is not None
    redis.process.send_signal(signum)
    with trio.CancelScope(shield=True):
        await redis.process.wait()
    redis.process = None


async def redis_restarts(tmp_path: Path, each: int, name: str) -> None:
    need_redis()
    schedule = [signal.SIGTERM, signal.SIGKILL] * each
    counts = Counts(name, extra={"restarts": [s.name for s in schedule],
                                 "recovery_from": "redis accepting again"})  # fmt: skip
    with trio.fail_after(60 + 10 * len(schedule)):
        async with run_redis(tmp_path / "redis") as redis, AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(
                    run_server(tmp_path / f"node{i}", SECRET, "--redis", redis.url)
                )
                for i in range(2)
            ]
            writers = writers_on([lambda: procs[0].ws_url, lambda: procs[1].ws_url])
            setup_seq = await setup_project(procs[0].ws_url)
            async with trio.open_nursery() as nursery:
                for writer in writers:
                    nursery.start_soon(writer.run)
                await wait_acks(writers, 10)
                for signum in schedule:
                    await stop_redis(redis, signum)
                    await redis.start()
                    counts.recovery_s.append(await recovery_time(writers, trio.current_time()))
                    await wait_acks(writers, 10)
                await verify(procs[0].ws_url, writers, counts, setup_seq=setup_seq)
            # The other process serves the same document.
            async with trio.open_nursery() as nursery:
                other = await connect(nursery, procs[1].ws_url)
                snapshot = (await join(other, "auditor"))["snapshot"]
                await close(other)
            counts.replicas_diverged += snapshot["elements"] != writers[0].replica.elements
    check(counts)


async def test_redis_restarts_lose_no_acknowledged_edit(tmp_path: Path) -> None:
    await redis_restarts(tmp_path, 1, "redis_restarts")


@full
async def test_redis_restarts_full(tmp_path: Path) -> None:
    await redis_restarts(tmp_path, 10, "redis_restarts_full")


# (c) Network drops between clients and the server, through the proxy.


async def network_drops(tmp_path: Path, drops: list[float], name: str) -> None:
    """Each drop cuts every connection and refuses new ones for its length (the clients
    reconnect and resume); a blackhole of the same length stalls the link instead, the
    connections kept (TCP carries on)."""
    counts = Counts(name, extra={"drops_s": drops, "recovery_from": "the end of the drop"})
    with trio.fail_after(60 + 3 * sum(drops)):
        async with (
            run_server(tmp_path / "data", SECRET) as proc,
            open_proxy("127.0.0.1", proc.ws_port) as proxy,
        ):
            url = f"ws://127.0.0.1:{proxy.port}/ws"
            writers = writers_on([lambda: url])
            setup_seq = await setup_project(proc.ws_url)
            async with trio.open_nursery() as nursery:
                for writer in writers:
                    nursery.start_soon(writer.run)
                await wait_acks(writers, 10)
                blackholes: list[float] = []
                for seconds in drops:
                    proxy.drop(seconds)
                    await trio.sleep(seconds)  # the fault's length
                    counts.recovery_s.append(await recovery_time(writers, trio.current_time()))
                    await wait_acks(writers, 10)
                    proxy.stall()
                    await trio.sleep(seconds)  # the fault's length
                    proxy.passthrough()
                    blackholes.append(await recovery_time(writers, trio.current_time()))
                    await wait_acks(writers, 10)
                counts.extra["blackhole_recovery_s"] = [round(t, 3) for t in blackholes]
                await verify(url, writers, counts, setup_seq=setup_seq)
    check(counts)


async def test_network_drops_lose_no_acknowledged_edit(tmp_path: Path) -> None:
    await network_drops(tmp_path, [1.0], "network_drops")


@full
async def test_network_drops_full(tmp_path: Path) -> None:
    await network_drops(tmp_path, [1.0, 5.0, 30.0], "network_drops_full")
