"""Fault scenarios against real ``crealia serve`` processes (and a real redis-server).

Each scenario runs writers (tests/faults/_scenario.py) through faults and then checks that no
acknowledged edit was lost or duplicated, that every replica saw a gap-free order and equals
the server's snapshot, and that a resume yields exactly the missing events. Counts and
recovery times are printed (``-s``) and written to ``test-artifacts/faults/<name>.json``.

The fast versions run in the normal suite; the full ones are marked ``faults_full`` and run
with ``CREALIA_FAULTS_FULL=1`` (``make test-faults``).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from crealia import Config

from .._process import ServerProcess, on_tmpfs, run_server, seen_from_outside, tmpfs_refused
from .._redis import RedisServer, run_redis
from ._proxy import Direction, open_proxy
from ._scenario import (
    FULL,
    SECRET,
    Counts,
    Writer,
    close,
    connect,
    edit,
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
                async with run_server(data, SECRET, drain=True) as proc:
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
                    run_server(tmp_path / f"node{i}", SECRET, "--redis", redis.url, drain=True)
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
            run_server(tmp_path / "data", SECRET, drain=True) as proc,
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


# (d) A slow consumer is cut within its bound while the others keep their cursor latency.


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crealia.toml"
    path.write_text(text)
    return path


@attrs.define(eq=False)
class Observer:
    """Sends a cursor every 20 ms (its send time in ``position.time``) and measures, for the
    other observer's cursors, the time from send to receipt; notes when ``watch`` leaves."""

    name: str
    other: str
    watch: str
    latencies: list[tuple[float, float]] = attrs.Factory(list)  # (received at, seconds)
    left_at: float | None = None
    left: trio.Event = attrs.Factory(trio.Event)
    sampled: trio.Event = attrs.Factory(trio.Event)

    async def run(self, url: str) -> None:
        async with trio.open_nursery() as nursery:
            client = await connect(nursery, url)
            await join(client, self.name)
            nursery.start_soon(self._send, client)
            try:
                while True:
                    envelope = await client.next()
                    data = envelope.get("data") or {}
                    if envelope["type"] != "collaboration_event":
                        continue
                    now = trio.current_time()
                    if data["kind"] == "cursor_update" and data["user_id"] == self.other:
                        sent = data["payload"]["position"]["time"] / 1000
                        self.latencies.append((now, now - sent))
                        self.sampled.set()
                        self.sampled = trio.Event()
                    elif data["kind"] == "user_left" and data["user_id"] == self.watch:
                        self.left_at = now
                        self.left.set()
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await close(client)

    async def _send(self, client: Any) -> None:
        n = 0
        while True:
            n += 1
            position = {"x": n, "y": 0, "time": trio.current_time() * 1000}
            await client.send("cursor_update", {"position": position})
            await trio.sleep(0.02)  # the cursor's rate, not synchronization

    async def samples(self, count: int) -> None:
        target = len(self.latencies) + count
        while len(self.latencies) < target:
            await self.sampled.wait()


async def slow_consumer(tmp_path: Path, mode: str, name: str, close_timeout: float) -> None:
    """A member behind the proxy stops reading (``stall``) or reads at 2 KiB/s (``slow``)
    while a writer sends ~400 KB/s of edits; two other members measure each other's cursors.

    The bound on the cut (the others hearing it leave) is the documented one (docs/protocol.md
    §7, docs/security.md): the outbox overflows (``outbox_bytes``, set small here so that the
    kernel's buffers are what the bound is about), or the client falls ``client_lag_timeout``
    behind (sampled every quarter of it), whichever comes first; the room lets it go then, not
    ``close_timeout`` later when the connection is dropped."""
    outbox_bytes, outbox_frames, rcvbuf = 256 * 1024, 64, 64 * 1024
    settings = {"outbox_bytes": outbox_bytes, "outbox_frames": outbox_frames,
                "close_timeout": close_timeout}  # fmt: skip
    config = config_file(tmp_path, "".join(f"{k} = {v}\n" for k, v in settings.items()))
    counts = Counts(name, extra={"mode": mode, **settings})
    with trio.fail_after(90):
        async with (
            run_server(tmp_path / "data", SECRET, "--config", str(config), drain=True) as proc,
            open_proxy("127.0.0.1", proc.ws_port, rcvbuf=rcvbuf) as proxy,
        ):
            slow_url = f"ws://127.0.0.1:{proxy.port}/ws"
            writer = Writer("w0", lambda: proc.ws_url, pad=16 * 1024, rate=25)
            slow = Writer("slow", lambda: slow_url, window=0)
            observers = [Observer("o1", "o2", "slow"), Observer("o2", "o1", "slow")]
            setup_seq = await setup_project(proc.ws_url)
            async with trio.open_nursery() as nursery:
                for task in (slow.run, writer.run):
                    nursery.start_soon(task)
                for observer in observers:
                    nursery.start_soon(observer.run, proc.ws_url)
                await wait_acks([writer], 10)
                baseline_from = trio.current_time()
                before = proxy.forwarded[Direction.DOWNSTREAM]
                for observer in observers:
                    await observer.samples(75)
                stall_at = trio.current_time()
                rate = (proxy.forwarded[Direction.DOWNSTREAM] - before) / (stall_at - baseline_from)
                if mode == "stall":
                    proxy.stall()
                else:
                    proxy.slow(2048)
                # What may sit between the server's outbox and the stalled reader: the server's
                # socket send buffer (at most tcp_wmem's max), the proxy's receive buffer (the
                # kernel doubles SO_RCVBUF) and one read the proxy holds. Past that the outbox
                # fills (outbox_bytes). The lag check may close it sooner: between 1 and 1.5
                # times client_lag_timeout (its default, 3 s) after the server's socket stops
                # draining, which takes filling the proxy's buffers first. A second more for a
                # loaded machine.
                buffered = _wmem_max() + 2 * rcvbuf + proxy.chunk + outbox_bytes
                lagging = 1.5 * LAG_TIMEOUT_S + (2 * rcvbuf + proxy.chunk) / rate
                bound = min(1.5 * buffered / rate, lagging) + 1
                await observers[0].left.wait()
                assert observers[0].left_at is not None
                cut_s = observers[0].left_at - stall_at
                for observer in observers:
                    await observer.samples(50)
                proxy.passthrough()
                await slow.wait_until(lambda: slow.connections >= 2)
                counts.recovery_s.append(trio.current_time() - observers[0].left_at)
                # Replays are capped at half the (small) outbox: the log comes from replicas.
                await verify(proc.ws_url, [writer, slow], counts, setup_seq=setup_seq,
                             replay=False, resume_back=4)  # fmt: skip
                nursery.cancel_scope.cancel()
    before_ms = [1000 * t for o in observers for at, t in o.latencies if at < stall_at]
    during_ms = [1000 * t for o in observers for at, t in o.latencies
                 if stall_at <= at <= stall_at + cut_s + 1]  # fmt: skip
    counts.extra.update(
        cut_s=round(cut_s, 3), cut_bound_s=round(bound, 3), fanout_bytes_per_s=round(rate),
        slow_close_codes=slow.close_codes, cursor_samples_during=len(during_ms),
        cursor_p99_before_ms=round(percentile(before_ms, 0.99), 1),
        cursor_p99_during_ms=round(percentile(during_ms, 0.99), 1),
        cursor_max_during_ms=round(max(during_ms), 1),
    )  # fmt: skip
    check(counts)
    assert cut_s <= bound, counts.extra
    # The room never waits for the slow member: the others' cursors stay quick.
    assert counts.extra["cursor_p99_during_ms"] <= CURSOR_P99_MS, counts.extra


#: The server's default ``client_lag_timeout`` (the scenario leaves it alone).
LAG_TIMEOUT_S = Config().client_lag_timeout
#: The others' cursor p99 while a member stalls, on a loaded 2-core machine (the issue measured
#: 62-77 ms with 100 clients; here a few clients, so a regression to seconds stands out).
CURSOR_P99_MS = 250.0


def _wmem_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_slow_consumer_is_cut_and_others_keep_their_latency(tmp_path: Path) -> None:
    await slow_consumer(tmp_path, "stall", "slow_consumer", close_timeout=10.0)


@full
@pytest.mark.parametrize("mode", ["stall", "slow"])
async def test_slow_consumer_full(tmp_path: Path, mode: str) -> None:
    await slow_consumer(tmp_path, mode, f"slow_consumer_full_{mode}", close_timeout=5.0)


# (e) A 10x flood from one client is held within its rate limit + 5 %.


async def flood(tmp_path: Path, seconds: float, name: str) -> None:
    count, burst, window = 600, 30, 60.0  # the edit limit: 10 a second, 30 at once
    config = config_file(
        tmp_path, f'abuse_errors = 1000000\n[rate_limits]\nedit = "{count}/{burst}"\n'
    )
    per_s = count / window
    counts = Counts(name, extra={"limit": f"{count}/{burst} per {window:.0f} s",
                                 "flood_per_s": 10 * per_s, "seconds": seconds})  # fmt: skip
    replies: dict[int, dict[str, Any]] = {}
    with trio.fail_after(60 + 2 * seconds):
        async with run_server(
            tmp_path / "data", SECRET, "--config", str(config), drain=True
        ) as proc:
            setup_seq = await setup_project(proc.ws_url)
            calm = Writer("calm", lambda: proc.ws_url, rate=5)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(calm.run)
                client = await connect(nursery, proc.ws_url)
                await join(client, "flood")
                total = int(10 * per_s * seconds)
                done = trio.Event()

                async def read() -> None:
                    while len(replies) < total:
                        envelope = await client.next()
                        if envelope.get("ref") is not None:
                            replies[envelope["ref"]] = envelope | {"at": trio.current_time()}
                    done.set()

                nursery.start_soon(read)
                start = trio.current_time()
                for k in range(total):
                    await client.send("timeline_change", edit(f"f-{k}", f"f-{k}", k), ref=k + 2)
                    await trio.sleep_until(start + (k + 1) / (10 * per_s))  # the flood's pace
                await done.wait()
                await close(client)
                span = max(r["at"] for r in replies.values()) - start
                await verify(proc.ws_url, [calm], counts, setup_seq=setup_seq)
                auditor = await connect(nursery, proc.ws_url)
                snapshot = (await join(auditor, "auditor"))["snapshot"]
                await close(auditor)
    accepted = {f"f-{r - 2}": e["data"]["seq"] for r, e in replies.items() if e["type"] == "ack"}
    refused = [e for e in replies.values() if e["type"] == "error"]
    props, versions = snapshot["elements"]["clip"]["props"], snapshot["versions"]["clip"]
    flooded = {prop for prop in props if prop.startswith("f-")}
    allowed = burst + per_s * span
    counts.acked += len(accepted)
    counts.lost += len(set(accepted) - flooded) + sum(
        versions[c] != s for c, s in accepted.items() if c in versions
    )
    counts.extra.update(
        sent=total, accepted=len(accepted), refused=len(refused), span_s=round(span, 3),
        allowed=round(allowed, 1), accepted_over_allowed=round(len(accepted) / allowed, 3),
        refused_codes=sorted({e["data"]["code"] for e in refused}),
    )  # fmt: skip
    # Nothing refused was applied; nothing accepted is missing.
    counts.unexpected_errors += len(flooded - set(accepted))
    check(counts)
    assert len(accepted) <= 1.05 * allowed, counts.extra
    assert len(accepted) >= burst, counts.extra  # held, not shut out
    assert counts.extra["refused_codes"] == ["rate_limited"], counts.extra


async def test_flood_is_held_within_its_rate_limit(tmp_path: Path) -> None:
    await flood(tmp_path, 4.0, "flood")


@full
async def test_flood_full(tmp_path: Path) -> None:
    await flood(tmp_path, 30.0, "flood_full")


# (f) A disk that fills and frees: the server's data dir is a tmpfs of its own, filled up by a
# file the test writes into it until ENOSPC, then freed.

#: The size of the server's disk: its databases and WAL stay far below it until it is filled.
DISK_BYTES = 48 * 1024 * 1024
#: Bound on the time from a full disk to the server refusing writes (its files have room left
#: in them: the WAL is reused from its start once checkpointed, so it takes the database file
#: or the WAL growing to run into the full disk).
BITE_S = 30.0


async def fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; returns how many bytes it took. Only on
    the server's own small disk, and never more than twice its size (should ``path`` be on
    another disk after all, this fails instead of filling it)."""
    disk = os.statvfs(path.parent)
    assert disk.f_blocks * disk.f_frsize <= DISK_BYTES, f"{path.parent} is not the small disk"
    written = 0
    chunk = bytes(1 << 20)
    async with await trio.open_file(path, "wb", buffering=0) as file:
        while written < 2 * DISK_BYTES:
            try:
                written += await file.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
    raise AssertionError(f"{path} took {written} bytes and the disk is not full")


async def disk_fills_and_frees(tmp_path: Path, rounds: int, full_s: float, name: str) -> None:
    reason = await tmpfs_refused(tmp_path / "probe")
    if reason is not None:
        pytest.skip(reason)
    data = tmp_path / "disk"
    data.mkdir()
    counts = Counts(name, extra={"rounds": rounds, "full_s": full_s, "disk_bytes": DISK_BYTES,
                                 "recovery_from": "the disk freed", "filler_bytes": [],
                                 "refused_after_s": [], "refused_while_full": [],
                                 "acked_while_full": []})  # fmt: skip
    with trio.fail_after(60 + rounds * (BITE_S + full_s + 30)):
        async with run_server(data, SECRET, drain=True, wrap=on_tmpfs(data, DISK_BYTES)) as proc:
            # Padded changes, so that the database grows into the full disk within seconds.
            writers = [Writer(f"w{i}", lambda: proc.ws_url, pad=1024) for i in range(3)]
            disk = seen_from_outside(proc, data)
            setup_seq = await setup_project(proc.ws_url)
            async with trio.open_nursery() as nursery:
                for writer in writers:
                    nursery.start_soon(writer.run)
                await wait_acks(writers, 10)
                for round_ in range(rounds):
                    filler = disk / f"filler-{round_}"
                    refused = [writer.retried for writer in writers]
                    acked = sum(len(writer.acked) for writer in writers)
                    counts.extra["filler_bytes"].append(await fill(filler))
                    filled = trio.current_time()
                    with trio.fail_after(BITE_S):
                        for writer, before in zip(writers, refused, strict=True):
                            await writer.wait_until(lambda w=writer, n=before: w.retried > n)  # type: ignore[misc]
                    counts.extra["refused_after_s"].append(round(trio.current_time() - filled, 3))
                    await trio.sleep(full_s)  # the fault's duration, not synchronization
                    await trio.Path(filler).unlink()
                    freed = trio.current_time()
                    counts.extra["refused_while_full"].append(
                        sum(w.retried for w in writers) - sum(refused)
                    )
                    counts.extra["acked_while_full"].append(
                        sum(len(w.acked) for w in writers) - acked
                    )
                    counts.recovery_s.append(await recovery_time(writers, freed))
                    await wait_acks(writers, 10)
                await verify(proc.ws_url, writers, counts, setup_seq=setup_seq)
            assert proc.process.returncode is None, "the server ended while its disk was full"
    check(counts)


async def test_a_disk_that_fills_and_frees_loses_no_acknowledged_edit(tmp_path: Path) -> None:
    await disk_fills_and_frees(tmp_path, 1, 1.0, "disk_full")


@full
async def test_a_disk_that_fills_and_frees_full(tmp_path: Path) -> None:
    await disk_fills_and_frees(tmp_path, 5, 5.0, "disk_full_full")
