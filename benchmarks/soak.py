#!/usr/bin/env python3
"""Soak: minutes of mixed load against a real ``crealia serve``, sampling what must stay bounded.

Starts ``python -m crealia serve`` on free ports in a temporary data dir and drives ``--clients``
simulated users over ``--projects`` projects for ``--minutes``: each moves its cursor, edits its
own clip and comments on it (the users of ``crealia loadtest``, ``crealia._loadtest._User``), and
comes and goes: a session lasts an exponentially distributed time (mean ``--session-minutes``),
then the user closes, stays away 1 to 5 s and joins again, resuming from the last ``seq`` it saw
(an exact replay, or a snapshot). Every ``--sample-every`` seconds it samples the server: RSS,
open file descriptors, threads (psutil), ``crealia_history_bytes`` / ``_events`` and the open
connections (``/metrics``), the sizes of ``crealia.sqlite3`` and ``ops.sqlite3`` and their WALs,
and the edit-ack latencies of the interval (p50/p99/max) with the joins, leaves, snapshots and
replays it saw. Then every client leaves, the rooms close (``room_grace``), and it samples again.

It prints the curves as a table, then a JSON summary (``--json``: only the JSON), and exits 1
when a figure grows without bound or does not come back once the clients have left:

- growth is the least-squares slope over the second half of the load samples (the first half
  fills what is bounded: histories, id caches, page caches). RSS is judged beyond what the
  histories report holding (``crealia_history_bytes``, bounded per project by
  ``history_memory_bytes``) and what SQLite's allocator holds (``crealia_sqlite_memory_bytes``:
  its page caches, 2 MB a connection), per durable event written: a leak is a cost per event,
  and what is left costs less than ``--max-bytes-per-event`` (default 200 bytes, a sixth of what
  an edit costs in a history: docs/performance.md, "The soak"). Open fds
  are judged beyond the open connections (those come and go with the users), threads as they
  are: either may not grow by more than 3 over the second half.
- the WAL stays under ``wal_max_bytes`` (64 MiB) and the histories under ``history_memory_bytes``
  per project (the soak sets 1 MiB, ``--history-memory-bytes``, so that they are full by the
  second half of a 10-minute run): their largest sample, not a slope (a WAL saw-tooths
  between checkpoints).
- after the clients left: the histories hold nothing (0 bytes, 0 projects), fds are back to
  where they were before the load (+2), threads too (+2). The RSS is reported (the share of its
  growth given back) but not judged unless ``--min-rss-returned`` asks: CPython keeps what a
  closed project freed for the next one rather than giving it back (docs/performance.md,
  "Memory after a soak"). With ``--rounds 2`` or more, each round on new projects, that reuse
  is judged: no later round may peak more than ``--reuse-slack`` (10 %) of the first round's
  growth (at least 8 MiB) above the first round's peak.

The database itself grows with every event by design (it is the store of record): its growth is
reported in bytes per event, not judged.

Examples::

    python benchmarks/soak.py                                   # 10 minutes, 100 clients
    python benchmarks/soak.py --minutes 3 --clients 60 --projects 6 --sample-every 15
    python benchmarks/soak.py --minutes 3 --rounds 2 --sample-every 20   # memory reused?
    python benchmarks/soak.py --minutes 2 --history-memory-bytes 262144 --json
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from crealia._loadgen import NET_ERRORS, HandshakeRefused, percentiles  # noqa: E402
from crealia._loadtest import LoadtestOptions, Unreachable, _Run, _User  # noqa: E402

LISTENING_RE = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")
MIB = 1024 * 1024


class SoakError(Exception):
    """The soak could not run (the server did not start, nobody could connect)."""


def log(cfg: argparse.Namespace, message: str) -> None:
    if not cfg.json:
        print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the server


class ServerProc:
    """``python -m crealia serve`` as a subprocess: started, its ports read, stopped by pid."""

    def __init__(self, cfg: argparse.Namespace, data_dir: Path, secret: str) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.secret = secret
        self.proc: trio.Process | None = None
        self.ps: psutil.Process | None = None
        self.http_port = 0
        self.ws_port = 0
        self.stderr_path = data_dir.parent / "server-stderr.log"
        self._stderr: Any = None

    async def start(self, nursery: trio.Nursery) -> None:
        cmd = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
               "--data-dir", str(self.data_dir), "--jwt-secret", self.secret,
               *self.cfg.server_arg]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Every client comes from 127.0.0.1: lift the per-address caps unless the caller set them.
        env.setdefault("CREALIA_MAX_CONNECTIONS_PER_ADDRESS", "0")
        env.setdefault("CREALIA_PREAUTH_HANDSHAKE_LIMIT", "off")
        if self.cfg.history_memory_bytes:
            env["CREALIA_HISTORY_MEMORY_BYTES"] = str(self.cfg.history_memory_bytes)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))  # fmt: skip
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - kept for the run
        self.proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT), env=env,
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)
        assert self.proc.stdout is not None
        buf = b""
        with trio.move_on_after(60):
            while not (found := LISTENING_RE.search(buf)):
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
        if not found:
            await self.stop()
            tail = self.stderr_path.read_text("utf-8", "replace")[-2000:]
            raise SoakError(f"the server did not say it listens: {' '.join(cmd)}\n{tail}")
        self.http_port, self.ws_port = int(found.group(1)), int(found.group(2))
        nursery.start_soon(self._drain_stdout)

    async def _drain_stdout(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            while await self.proc.stdout.receive_some(65536):
                pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def stop(self) -> None:
        """SIGINT, then SIGKILL after 15 s: only the process this soak started."""
        proc = self.proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if self._stderr is not None:
            self._stderr.close()


# --------------------------------------------------------------------------- the users


class SoakUser(_User):
    """A ``crealia loadtest`` user that resumes from the last ``seq`` it saw when it joins
    again, and counts what its welcome was (a replay or a snapshot)."""

    def __init__(self, run: _Run, index: int, resume: tuple[int, str] | None,
                 previous: SoakUser | None = None) -> None:  # fmt: skip
        super().__init__(run, index)
        self.resume = resume
        self.last_seq = 0
        if previous is not None:  # a new session of the same person: new ids, never reused
            self.edits, self.comments = previous.edits, previous.comments

    async def start(self, nursery: trio.Nursery) -> None:
        # _Peer.start, with a resume in the hello.
        parts = self.url.split("/", 3)
        host, port = parts[2].rsplit(":", 1)
        await self.open(host, int(port), "/" + (parts[3] if len(parts) > 3 else ""))
        nursery.start_soon(self.read)
        data: dict[str, Any] = {"token": self.run.token(self.user_id, self.project, self.role),
                                "project_id": self.project}  # fmt: skip
        if self.resume is not None:
            data["resume"] = {"seq": self.resume[0], "epoch": self.resume[1]}
        reply = await self.request("hello", data)
        if reply.get("type") != "welcome":
            error = reply.get("data") or {}
            raise Unreachable(f"hello refused: {error.get('code')}: {error.get('message')}")
        self.welcome = reply["data"]
        self.last_seq = int(self.welcome.get("seq") or 0)

    def on_envelope(self, envelope: dict[str, Any]) -> None:
        if envelope.get("type") in ("collaboration_event", "conflict_resolved"):
            seq = (envelope.get("data") or {}).get("seq")
            if isinstance(seq, int) and seq > self.last_seq:
                self.last_seq = seq
        super().on_envelope(envelope)


class Counts:
    """What the users did, cumulative (the samples take differences)."""

    def __init__(self) -> None:
        self.joins = 0
        self.leaves = 0
        self.failed_joins = 0
        self.snapshots = 0
        self.replays = 0
        self.connected = 0
        self.join_ms = array("d")
        self.failures: dict[str, int] = {}


async def user_life(cfg: argparse.Namespace, run: _Run, index: int, counts: Counts,
                    end: float, leave: trio.Event) -> None:  # fmt: skip
    """One user slot: join, work for a while, leave, come back, until ``end`` (trio clock) or
    ``leave``."""
    rng = random.Random(cfg.seed * 7919 + index)
    resume: tuple[int, str] | None = None
    mean = cfg.session_minutes * 60
    first = True
    user: SoakUser | None = None
    while trio.current_time() < end and not leave.is_set():
        user = SoakUser(run, index, resume, user)
        joined = False
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            try:
                with trio.fail_after(30):
                    await user.start(nursery)
                    await user.prepare(creator=False)
                joined = True
            except (trio.TooSlowError, Unreachable, HandshakeRefused, *NET_ERRORS) as exc:
                key = type(exc).__name__
                counts.failures[key] = counts.failures.get(key, 0) + 1
                counts.failed_joins += 1
            if joined:
                counts.join_ms.append((trio.current_time() - began) * 1000)
                counts.joins += 1
                counts.connected += 1
                if not first:
                    counts.snapshots += "snapshot" in user.welcome
                    counts.replays += "snapshot" not in user.welcome
                first = False
                stay = rng.expovariate(1 / mean) if mean > 0 else math.inf
                until = min(end, trio.current_time() + stay)
                user.join_traffic()
                with trio.move_on_after(max(0.0, until - trio.current_time())):
                    async with trio.open_nursery() as working:
                        working.start_soon(user.traffic, trio.current_time(), until)
                        await leave.wait()
                        working.cancel_scope.cancel()
                user.leave_traffic()
                resume = (user.last_seq, str(user.welcome.get("epoch", "")))
                with trio.move_on_after(10):
                    await user.close(5)
            await user.aclose()
            nursery.cancel_scope.cancel()
        if joined:
            counts.connected -= 1
            counts.leaves += 1
        if not leave.is_set():
            await trio.sleep(rng.uniform(1, 5))


# --------------------------------------------------------------------------- sampling


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def scrape(http_port: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.get(f"http://127.0.0.1:{http_port}/metrics")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


class Sampler:
    def __init__(self, cfg: argparse.Namespace, server: ServerProc, run: _Run,
                 counts: Counts) -> None:  # fmt: skip
        self.cfg = cfg
        self.server = server
        self.run = run
        self.counts = counts
        self.samples: list[dict[str, Any]] = []
        self.started = trio.current_time()
        self._acks = 0
        self._marks = (0, 0, 0, 0, 0)
        self.round = 0

    def begin(self, run: _Run, round_: int) -> None:
        """Sample ``run``'s acks from now on (a new round)."""
        self.run = run
        self.round = round_
        self._acks = 0

    async def sample(self, phase: str) -> dict[str, Any]:
        ps = self.server.ps
        assert ps is not None
        data = self.server.data_dir
        metrics = await scrape(self.server.http_port)
        with ps.oneshot():
            rss, fds, threads = ps.memory_info().rss, ps.num_fds(), ps.num_threads()
            cpu = ps.cpu_times()
        acks = self.run.ack_latency[self._acks :]
        self._acks = len(self.run.ack_latency)
        c = self.counts
        marks = (c.joins, c.leaves, c.snapshots, c.replays, c.failed_joins)
        delta = [a - b for a, b in zip(marks, self._marks, strict=True)]
        joins, leaves, snapshots, replays, failed = delta
        self._marks = marks
        stats = percentiles(acks, (50, 99))
        history = int(metrics.get("crealia_history_bytes", 0))
        sqlite = int(metrics.get("crealia_sqlite_memory_bytes", 0))
        sample = {
            "t_s": round(trio.current_time() - self.started, 1),
            "round": self.round,
            "phase": phase,
            "clients": c.connected,
            "rss": rss,
            "history_bytes": history,
            "rss_beyond_history": rss - history,
            "sqlite_bytes": sqlite,
            "rss_beyond": rss - history - sqlite,
            "history_events": int(metrics.get("crealia_history_events", 0)),
            "history_projects": int(metrics.get("crealia_history_projects", 0)),
            "fds": fds,
            "connections": int(metrics.get("crealia_open_connections", 0)),
            "fds_beyond_connections": fds - int(metrics.get("crealia_open_connections", 0)),
            "threads": threads,
            "db_bytes": file_size(data / "crealia.sqlite3"),
            "wal_bytes": file_size(data / "crealia.sqlite3-wal"),
            "ops_bytes": file_size(data / "ops.sqlite3"),
            "ops_wal_bytes": file_size(data / "ops.sqlite3-wal"),
            "acked": sum(self.run.acked.values()),
            "changes": int(metrics.get("crealia_changes_total", 0)),
            "cpu_s": round(cpu.user + cpu.system, 1),
            "loop_lag_ms": _round(1000 * metrics.get("crealia_event_loop_lag_seconds", 0.0)),
            "acks": len(acks),
            "ack_p50_ms": _round(stats["p50"]),
            "ack_p99_ms": _round(stats["p99"]),
            "ack_max_ms": _round(max(acks) if acks else None),
            "joins": joins,
            "leaves": leaves,
            "snapshots": snapshots,
            "replays": replays,
            "failed_joins": failed,
        }
        self.samples.append(sample)
        log(self.cfg, format_row(sample))
        return sample


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------- the verdict


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``(x, y)`` points (0 with fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def verdict(cfg: argparse.Namespace, samples: list[dict[str, Any]]) -> dict[str, Any]:
    baseline = next(s for s in samples if s["phase"] == "baseline")
    rounds = sorted({s["round"] for s in samples if s["phase"] != "baseline"})
    last = rounds[-1]
    load = [s for s in samples if s["phase"] == "load" and s["round"] == last]
    half = load[len(load) // 2 :]
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool, **figures: Any) -> None:
        checks[name] = {"ok": ok, **figures}

    if len(half) >= 3:
        span = half[-1]["t_s"] - half[0]["t_s"]
        events = half[-1]["acked"] - half[0]["acked"]
        rss_slope = slope([(s["t_s"], s["rss_beyond"]) for s in half])
        per_event = rss_slope * span / events if events > 0 else 0.0
        check("rss_beyond_history_and_sqlite_growth", per_event <= cfg.max_bytes_per_event,
              bytes_per_s=round(rss_slope), bytes_per_event=round(per_event, 1),
              threshold=cfg.max_bytes_per_event, events=events)  # fmt: skip
        for name in ("fds_beyond_connections", "threads"):
            grown = slope([(s["t_s"], s[name]) for s in half]) * span
            check(f"{name}_growth", grown <= 3, over_second_half=round(grown, 2), threshold=3)
        db = slope([(s["t_s"], s["db_bytes"]) for s in half]) * span
        checks["db_growth"] = {"ok": True, "bytes_per_event": round(db / events, 1)
                               if events > 0 else None, "judged": False}  # fmt: skip
    else:
        check("enough_samples", False, why="fewer than 3 samples in the second half of the load: "
              "run longer or sample more often")  # fmt: skip
    wal = max(s["wal_bytes"] for s in samples)
    check("wal_bounded", wal <= cfg.wal_max_bytes, max=wal, bound=cfg.wal_max_bytes)
    bound = cfg.history_memory_bytes or 4 * MIB
    held = max(s["history_bytes"] for s in samples)
    check("history_bounded", held <= bound * cfg.projects, max=held, bound=bound * cfg.projects)
    peaks = {}
    for round_ in rounds:
        after = [s for s in samples if s["phase"] == "after" and s["round"] == round_]
        loaded = [s for s in samples if s["phase"] == "load" and s["round"] == round_]
        peaks[round_] = max(s["rss"] for s in loaded)
        if not after:
            continue
        end = after[-1]
        suffix = f"_round{round_}" if len(rounds) > 1 else ""
        check(f"history_released{suffix}", end["history_bytes"] == 0
              and end["history_projects"] == 0, bytes=end["history_bytes"],
              projects=end["history_projects"])  # fmt: skip
        check(f"fds_back{suffix}", end["fds"] <= baseline["fds"] + 2, now=end["fds"],
              baseline=baseline["fds"])  # fmt: skip
        check(f"threads_back{suffix}", end["threads"] <= baseline["threads"] + 2,
              now=end["threads"], baseline=baseline["threads"])  # fmt: skip
        grown = peaks[round_] - baseline["rss"]
        returned = (peaks[round_] - end["rss"]) / grown if grown > 0 else 1.0
        # CPython keeps what a closed project freed for the next one (docs/performance.md):
        # judged only when asked for (--min-rss-returned), and by reuse over rounds.
        judged = cfg.min_rss_returned > 0
        check(f"rss_returned{suffix}", not judged or returned >= cfg.min_rss_returned,
              peak=peaks[round_], now=end["rss"], baseline=baseline["rss"],
              returned=round(returned, 3), threshold=cfg.min_rss_returned,
              judged=judged)  # fmt: skip
    if len(rounds) > 1:
        # The next projects reuse what the last ones freed: no round peaks much above the first.
        allowed = peaks[rounds[0]] + max(cfg.reuse_slack * (peaks[rounds[0]] - baseline["rss"]),
                                         8 * MIB)  # fmt: skip
        worst = max(peaks[r] for r in rounds[1:])
        check("rss_reused", worst <= allowed, first_peak=peaks[rounds[0]], later_peak=worst,
              allowed=round(allowed))  # fmt: skip
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


# --------------------------------------------------------------------------- output

COLUMNS = (
    ("t_s", "t s", "{:>6.0f}"), ("round", "r", "{:>1}"), ("phase", "phase", "{:>8}"),
    ("clients", "users", "{:>5}"),
    ("rss", "rss MB", "{:>7.1f}"), ("history_bytes", "hist MB", "{:>7.2f}"),
    ("sqlite_bytes", "sqlt MB", "{:>7.1f}"), ("rss_beyond", "rest MB", "{:>7.1f}"),
    ("history_events", "h.evts", "{:>6}"),
    ("fds", "fds", "{:>4}"), ("connections", "conns", "{:>5}"), ("threads", "thr", "{:>3}"),
    ("db_bytes", "db MB", "{:>6.1f}"), ("wal_bytes", "wal MB", "{:>6.2f}"),
    ("ops_bytes", "ops MB", "{:>6.1f}"), ("ops_wal_bytes", "opsw MB", "{:>7.2f}"),
    ("changes", "changes", "{:>7}"), ("acks", "acks", "{:>5}"),
    ("ack_p50_ms", "p50 ms", "{:>6}"), ("ack_p99_ms", "p99 ms", "{:>6}"),
    ("ack_max_ms", "max ms", "{:>6}"), ("joins", "join", "{:>4}"), ("leaves", "left", "{:>4}"),
    ("snapshots", "snap", "{:>4}"), ("replays", "repl", "{:>4}"),
    ("loop_lag_ms", "lag ms", "{:>6}"), ("cpu_s", "cpu s", "{:>6}"),
)  # fmt: skip
_MB = {"rss", "history_bytes", "rss_beyond_history", "sqlite_bytes", "rss_beyond", "db_bytes",
       "wal_bytes", "ops_bytes",
       "ops_wal_bytes"}  # fmt: skip


def _width(spec: str) -> int:
    return int(re.search(r">(\d+)", spec).group(1))  # type: ignore[union-attr]


def format_row(sample: dict[str, Any]) -> str:
    cells = []
    for key, _title, spec in COLUMNS:
        value = sample.get(key)
        if value is None:
            cells.append("-".rjust(_width(spec)))
        else:
            cells.append(spec.format(value / MIB if key in _MB else value))
    return " ".join(cells)


def format_table(samples: list[dict[str, Any]]) -> str:
    header = " ".join(title.rjust(_width(spec)) for _key, title, spec in COLUMNS)
    return "\n".join([header, *(format_row(s) for s in samples)])


# --------------------------------------------------------------------------- the run


async def soak(cfg: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="crealia-soak-") as tmp:
        data_dir = Path(tmp) / "data"
        server = ServerProc(cfg, data_dir, secret)
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            try:
                return await _drive(cfg, server, secret)
            finally:
                await server.stop()
                nursery.cancel_scope.cancel()


async def _drive(cfg: argparse.Namespace, server: ServerProc, secret: str) -> dict[str, Any]:
    duration = cfg.minutes * 60
    counts = Counts()
    runs: list[_Run] = []
    sampler: Sampler | None = None
    log(cfg, f"server pid {server.proc.pid if server.proc else '?'} ws={server.ws_port} "
        f"http={server.http_port}; {cfg.clients} clients over {cfg.projects} projects for "
        f"{cfg.minutes:g} min, {cfg.rounds} round(s)")  # fmt: skip
    log(cfg, format_table([]))
    for round_ in range(1, cfg.rounds + 1):
        # Each round its own projects and users: what the last round freed is for them.
        options = LoadtestOptions(
            urls=(f"ws://127.0.0.1:{server.ws_port}/ws",), secret=secret, users=cfg.clients,
            projects=cfg.projects, duration=duration, cursor_hz=cfg.cursor_hz,
            edit_every=cfg.edit_every, comment_every=cfg.comment_every,
            project_prefix=f"soak{round_}", seed=cfg.seed + round_,
        )  # fmt: skip
        run = _Run(options)
        runs.append(run)
        if sampler is None:
            sampler = Sampler(cfg, server, run, counts)
            await sampler.sample("baseline")
        sampler.begin(run, round_)
        await _one_round(cfg, sampler, run, counts, duration)
    assert sampler is not None
    result = verdict(cfg, sampler.samples)
    joins = sorted(counts.join_ms)
    acks = array("d", (x for run in runs for x in run.ack_latency))
    sent: dict[str, int] = {}
    acked: dict[str, int] = {}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    messages: dict[str, str] = {}
    for run in runs:
        for into, counter in ((sent, run.sent), (acked, run.acked), (errors, run.errors),
                              (closes, run.closes)):  # fmt: skip
            for key, value in counter.items():
                into[key] = into.get(key, 0) + value
        messages.update(run.error_messages)
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "options": {k: v for k, v in vars(cfg).items() if k != "json"},
        "ok": result["ok"],
        "checks": result["checks"],
        "totals": {
            "joins": counts.joins, "leaves": counts.leaves, "failed_joins": counts.failed_joins,
            "join_failures": counts.failures, "snapshots": counts.snapshots,
            "replays": counts.replays, "sent": sent, "acked": acked, "errors": errors,
            "error_messages": messages, "closes": closes,
            "ack_ms": {**percentiles(acks, (50, 99)), "max": max(acks) if acks else None},
            "join_ms": percentiles(joins, (50, 99)),
        },
        "samples": sampler.samples,
    }  # fmt: skip


async def _one_round(cfg: argparse.Namespace, sampler: Sampler, run: _Run, counts: Counts,
                 duration: float) -> None:  # fmt: skip
    """One round: the users come and go for ``duration`` s, then all leave; samples."""
    leave = trio.Event()
    started = trio.current_time()
    end = started + duration
    async with trio.open_nursery() as users:
        for index in range(cfg.clients):
            users.start_soon(user_life, cfg, run, index, counts, end, leave)
            await trio.sleep(cfg.ramp_s / max(cfg.clients, 1))
        next_sample = started + cfg.sample_every
        while next_sample < end - 1:
            await trio.sleep_until(next_sample)
            await sampler.sample("load")
            next_sample += cfg.sample_every
        # No sample at the end: the users are leaving then (their sessions end with it).
        await trio.sleep_until(end)
        leave.set()
    # Every client has left: the rooms close after their grace, then their histories go.
    await trio.sleep(cfg.settle_s)
    after_end = trio.current_time() + cfg.after_s
    while True:
        await sampler.sample("after")
        if trio.current_time() + cfg.sample_every > after_end:
            break
        await trio.sleep(cfg.sample_every)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    add("--clients", type=int, default=100, help="simulated users (default 100)")
    add("--projects", type=int, default=10, help="projects they are spread over (default 10)")
    add("--sample-every", type=float, default=30.0, help="seconds between samples (default 30)")
    add("--cursor-hz", type=float, default=5.0, help="cursor moves per user per second (5)")
    add("--edit-every", type=float, default=2.0, help="seconds between a user's edits (2)")
    add("--comment-every", type=float, default=20.0, help="seconds between comments (20)")
    add(
        "--session-minutes",
        type=float,
        default=2.0,
        help="mean minutes a user stays before leaving and joining again (2; 0: stays)",
    )
    add("--ramp-s", type=float, default=10.0, help="seconds over which the users first join")
    add(
        "--settle-s",
        type=float,
        default=10.0,
        help="seconds after the clients left before the first sample (room_grace is 5)",
    )
    add("--after-s", type=float, default=30.0, help="seconds of samples after the clients left")
    add(
        "--history-memory-bytes",
        type=int,
        default=1 << 20,
        help="the server's history_memory_bytes (1 MiB: full within the first half, so that what "
        "else grows shows; 0: the server's default, 4 MiB)",
    )
    add("--wal-max-bytes", type=int, default=64 * MIB, help="the WAL bound judged (64 MiB)")
    add(
        "--max-bytes-per-event",
        type=float,
        default=200.0,
        help="RSS growth beyond the histories allowed per event, second half (200)",
    )
    add(
        "--min-rss-returned",
        type=float,
        default=0.0,
        help="share of the RSS growth that must come back after the clients left (0: not judged)",
    )
    add(
        "--rounds",
        type=int,
        default=1,
        help="rounds of load, each on new projects (2 or more: the RSS must be reused)",
    )
    add(
        "--reuse-slack",
        type=float,
        default=0.1,
        help="how far above the first round's RSS growth a later round may peak (0.1)",
    )
    add("--seed", type=int, default=1)
    add("--server-arg", action="append", default=[], help="extra argument for crealia serve")
    add("--json", action="store_true", help="print only the JSON summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = trio.run(soak, cfg)
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    if not cfg.json:
        print(format_table(summary["samples"]))
        for name, check in summary["checks"].items():
            print(f"{'ok  ' if check['ok'] else 'FAIL'} {name}: "
                  f"{ {k: v for k, v in check.items() if k != 'ok'} }")  # fmt: skip
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
