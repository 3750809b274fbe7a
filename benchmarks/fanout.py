#!/usr/bin/env python3
"""Room fan-out load generator and measurement tool for crealia.

Starts ``python -m crealia serve`` (or uses ``--url``), connects N WebSocket clients spread over
R rooms (projects ``bench-0`` .. ``bench-{R-1}``), makes every client send ``cursor_update`` at
H Hz and ``timeline_change`` at E Hz, and measures, after a warm-up:

* end-to-end cursor latency (the send time travels in ``position.time``; sender and receivers are
  in this one process, so they share one monotonic clock),
* delivered cursor events vs. what was sent to each receiver (the server may coalesce a user's
  updates within a tick, so both are reported),
* durable-edit ack latency (send -> ``ack`` with the same ``ref``), edit rate, and the fan-out
  latency of the resulting ``collaboration_event`` (the edit's value is its send time),
* frames / envelopes / bytes received, server errors, closes (with codes),
* server CPU (% of one core, psutil on the server pid and its children), server RSS per idle
  connection, and this load generator's own CPU.

The client side is one process, one Trio thread, raw sockets + wsproto, a lean reader per
connection and orjson; check the "loadgen CPU" line: near 100 % means the client, not the
server, was the bottleneck.

Examples::

    python benchmarks/fanout.py --clients 50 --rooms 1 --cursor-hz 5 --duration 10
    python benchmarks/fanout.py --clients 200 --rooms 4 --cursor-hz 20 --edit-hz 1 \\
        --duration 20 --compare-batching
    python benchmarks/fanout.py --clients 100 --rooms 1 --cursor-hz 10 --duration 10 \\
        --endpoint http --deflate --json
    python benchmarks/fanout.py --url ws://127.0.0.1:3001/ws --jwt-secret S --server-pid 1234 \\
        --clients 100 --rooms 2 --cursor-hz 10 --duration 10

``--duration`` is the measured window; ``--warmup`` seconds of traffic come before it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import random
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from array import array
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson
import psutil
import trio
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from crealia._loadgen import (  # noqa: E402
    _BASE_NS,
    NET_ERRORS,
    Connection,
    HandshakeRefused,
    envelopes,
    now_ms,
    percentiles,
)

LISTENING_RE = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")
SUBPROTOCOL = "crealia.v1"
ELEMENT_ID = "bench-el"
RECV_SIZE = 256 * 1024
_monotonic_ns = time.monotonic_ns
_loads = orjson.loads
_dumps = orjson.dumps


class BenchError(Exception):
    """A fatal problem (server did not start, nobody could connect...)."""


def log(cfg: argparse.Namespace, msg: str) -> None:
    if not cfg.quiet:
        print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def dist(samples: array) -> dict[str, Any]:
    """Nearest-rank p50/p95/p99 (the package's), with the count, max and mean."""
    n = len(samples)
    if not n:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {"n": n, **percentiles(samples), "max": max(samples), "mean": sum(samples) / n}


class ProcGroup:
    """Several server processes measured as one (``--cluster``)."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs
        self.pid = procs[0].pid


def cpu_seconds(proc: Any, include_children: bool = True) -> float:
    if isinstance(proc, ProcGroup):
        return sum(cpu_seconds(p, include_children) for p in proc.procs)
    t = proc.cpu_times()
    total = t.user + t.system
    if include_children:
        try:
            kids = proc.children(recursive=True)
        except psutil.Error:
            kids = []
        for kid in kids:
            try:
                kt = kid.cpu_times()
            except psutil.Error:
                continue
            total += kt.user + kt.system
    return total


def host_busy_seconds() -> float:
    """CPU seconds spent by the whole machine, all cores, not idle."""
    t = psutil.cpu_times()
    return (
        sum(t)
        - t.idle
        - getattr(t, "iowait", 0.0)
        - getattr(t, "guest", 0.0)
        - getattr(t, "guest_nice", 0.0)
    )


def rss_bytes(proc: Any) -> int:
    if isinstance(proc, ProcGroup):
        return sum(rss_bytes(p) for p in proc.procs)
    total = proc.memory_info().rss
    try:
        kids = proc.children(recursive=True)
    except psutil.Error:
        kids = []
    for kid in kids:
        try:
            total += kid.memory_info().rss
        except psutil.Error:
            continue
    return total


# --------------------------------------------------------------------------- server process


class ServerProc:
    """`python -m crealia serve` as a subprocess: start, wait for the listening line, stop."""

    def __init__(
        self, cfg: argparse.Namespace, secret: str, tick_ms: float | None, data_dir: Path
    ) -> None:
        self.cfg = cfg
        self.secret = secret
        self.tick_ms = tick_ms
        self.data_dir = data_dir
        self.stderr_path = data_dir.parent / "server-stderr.log"
        self.stdout_tail: deque[str] = deque(maxlen=50)
        self.proc: trio.Process | None = None
        self.ps: psutil.Process | None = None
        self.http_port = 0
        self.ws_port = 0
        self.startup_s: float | None = None
        self.shutdown_s: float | None = None
        self.returncode: int | None = None
        self.killed = False
        self.cmd: list[str] = []
        self._stderr_file: Any = None

    async def start(self, nursery: trio.Nursery) -> None:
        cmd = [
            sys.executable, "-m", "crealia", "serve",
            "--port", "0", "--ws-port", "0",
            "--data-dir", str(self.data_dir),
            "--jwt-secret", self.secret,
        ]  # fmt: skip
        if self.tick_ms is not None:
            cmd += ["--tick-ms", f"{self.tick_ms:g}"]
        cmd += list(self.cfg.server_arg or [])
        self.cmd = cmd
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # every client comes from 127.0.0.1: lift the per-address caps unless the caller set them
        env.setdefault("CREALIA_MAX_CONNECTIONS_PER_ADDRESS", "0")
        env.setdefault("CREALIA_PREAUTH_HANDSHAKE_LIMIT", "off")
        self._stderr_file = open(self.stderr_path, "wb")  # noqa: SIM115 - kept for the run
        t0 = time.monotonic()
        self.proc = await trio.lowlevel.open_process(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            stdin=subprocess.DEVNULL,
            cwd=self.cfg.server_cwd or str(REPO_ROOT),
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)
        assert self.proc.stdout is not None
        buf = b""
        found = None
        with trio.move_on_after(self.cfg.start_timeout):
            while found is None:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.stdout_tail.append(line.decode("utf-8", "replace"))
                    m = LISTENING_RE.search(line)
                    if m and found is None:
                        found = m
        if found is None:
            with trio.CancelScope(shield=True):
                await self.stop()
            why = (
                f"within {self.cfg.start_timeout:g} s (then stopped, exit code {self.returncode})"
                if self.killed or time.monotonic() - t0 >= self.cfg.start_timeout
                else f"before exiting with code {self.returncode}"
            )
            raise BenchError(
                f"server did not print 'crealia listening http=PORT ws=PORT' {why}\n"
                f"command: {' '.join(cmd)}\n{self.diagnostics()}"
            )
        self.startup_s = time.monotonic() - t0
        self.http_port, self.ws_port = int(found.group(1)), int(found.group(2))
        nursery.start_soon(self._drain_stdout, buf)

    async def _drain_stdout(self, buf: bytes) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            while True:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.stdout_tail.append(line.decode("utf-8", "replace"))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def stop(self) -> None:
        """SIGINT, wait up to 10 s, then SIGKILL (the server and what it spawned)."""
        proc = self.proc
        if proc is None or self.shutdown_s is not None:
            return
        kids: list[psutil.Process] = []
        if self.ps is not None:
            try:
                kids = self.ps.children(recursive=True)
            except psutil.Error:
                kids = []
        t0 = time.monotonic()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            with trio.move_on_after(self.cfg.stop_timeout):
                await proc.wait()
            if proc.returncode is None:
                self.killed = True
                proc.kill()
                await proc.wait()
        for kid in kids:  # only what our server spawned, by pid
            try:
                if kid.is_running():
                    kid.kill()
            except psutil.Error:
                pass
        self.shutdown_s = time.monotonic() - t0
        self.returncode = proc.returncode
        if self._stderr_file is not None:
            self._stderr_file.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def diagnostics(self, lines: int = 25) -> str:
        err = self.stderr_text().splitlines()[-lines:]
        out = list(self.stdout_tail)[-lines:]
        parts = []
        if out:
            parts.append("server stdout (tail):\n  " + "\n  ".join(out))
        if err:
            parts.append("server stderr (tail):\n  " + "\n  ".join(err))
        return "\n".join(parts)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    """Shared state of one run: configuration, phase events, counters, latency samples."""

    def __init__(self, cfg: argparse.Namespace, url: str, secret: str) -> None:
        self.cfg = cfg
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        #: With --cluster, client i connects to ports[i % len(ports)] (same host and path).
        self.ports = [self.port, *list(getattr(cfg, "_extra_ports", []))]
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.secret = secret
        self.run_id = secrets.token_hex(3)
        self.prop_prefix = f"r{self.run_id}c"
        # the window: cursor/edit timestamps (ms, this process's clock) in [m0_ms, m1_ms)
        self.m0_ms = math.inf
        self.m1_ms = math.inf
        self.in_window = False
        self.traffic_start_t = math.inf  # trio clock
        self.traffic_end_t = math.inf  # trio clock
        self.traffic_go = trio.Event()
        self.close_go = trio.Event()
        self.all_settled = trio.Event()
        self.connect_sem = trio.Semaphore(cfg.connect_concurrency)
        self.n_ok = 0
        self.n_failed = 0
        self.n_done = 0
        self.all_done = trio.Event()
        self.clients: list[Client] = []
        self.uids: set[str] = set()
        # samples (ms)
        self.cursor_lat = array("d")
        self.edit_ack_lat = array("d")
        self.edit_push_lat = array("d")
        self.welcome_lat = array("d")
        self.send_lag = array("d")
        # counters
        self.connect_errors: Counter[str] = Counter()
        self.server_errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.closes_during_run: Counter[str] = Counter()
        self.close_reasons: dict[str, str] = {}
        self.close_times: list[float | None] = []  # s since traffic start; None: before
        self.closes_at_end: Counter[str] = Counter()
        self.exceptions: Counter[str] = Counter()
        self.push_types: Counter[str] = Counter()
        self.ack_status: Counter[str] = Counter()
        self.conflicts_detected = 0
        self.foreign_events = 0
        self.cursor_bad = 0
        self.deflate_negotiated = 0
        self.subprotocol_selected = 0

    def token(self, uid: str, project: str) -> str:
        now = int(time.time())
        claims = {
            "sub": uid,
            "name": f"Bench {uid}",
            "project": project,
            "role": "editor",
            "iat": now,
            "exp": now + 3600 + int(self.cfg.warmup + self.cfg.duration) * 2,
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def client_settled(self, ok: bool) -> None:
        if ok:
            self.n_ok += 1
        else:
            self.n_failed += 1
        if self.n_ok + self.n_failed >= len(self.clients):
            self.all_settled.set()

    def client_done(self) -> None:
        self.n_done += 1
        if self.n_done >= len(self.clients):
            self.all_done.set()


class Client(Connection):
    """One WebSocket client: the package's lean connection (raw trio socket, wsproto for the
    handshake and sends, the inline reader) and one sender task."""

    def __init__(self, bench: Bench, idx: int, room: int) -> None:
        super().__init__(
            deflate=bench.cfg.deflate,
            subprotocol=None if bench.cfg.no_subprotocol else SUBPROTOCOL,
        )
        self.b = bench
        self.idx = idx
        self.room = room
        self.project = f"{bench.cfg.project_prefix}-{room}"
        self.uid = f"bench-{bench.run_id}-{idx}"
        self.prop = f"{bench.prop_prefix}{idx}"
        self.token = bench.token(self.uid, self.project)
        self.ok = False  # welcomed
        #: Counts what it receives without parsing it (--sample).
        self.sink = False
        self._settled = False
        self.next_ref = 2
        self.waiters: dict[int, list[Any]] = {}  # ref -> [event, envelope]
        self.pending_edits: dict[int, float] = {}  # ref -> send ms
        self.base: int | None = None
        self.last_seq = 0  # durable order check: welcome seq, then every pushed seq
        self.seq_gaps = 0
        self.seq_stale = 0
        self.has_element = False
        self.edit_n = 0
        self._partial: list[str] = []
        # counters
        self.cursor_sent_win = 0
        self.cursor_sent_total = 0
        self.cursor_recv_win = 0
        self.cursor_recv_total = 0
        self.edit_sent_win = 0
        self.edit_sent_total = 0
        self.edit_acked_win = 0
        self.edit_applied_win = 0
        self.edit_errors = 0
        self.edit_push_win = 0
        self.edit_push_total = 0
        self.frames_win = 0
        self.frames_total = 0
        self.envelopes_win = 0
        self.wire_bytes_win = 0
        self.wire_bytes_total = 0
        self.payload_bytes_win = 0
        self.skipped_sends = 0

    # ---------------------------------------------------------------- sending

    async def send_msg(self, msg: dict[str, Any]) -> None:
        await self.send_bytes(self.ws.send(TextMessage(data=_dumps(msg).decode())))

    async def request(self, typ: str, data: dict[str, Any], timeout: float) -> dict[str, Any]:
        ref = self.next_ref
        self.next_ref += 1
        waiter: list[Any] = [trio.Event(), None]
        self.waiters[ref] = waiter
        await self.send_msg({"type": typ, "ref": ref, "data": data})
        with trio.fail_after(timeout):
            await waiter[0].wait()
        return waiter[1]

    # ---------------------------------------------------------------- lifecycle

    async def main(self) -> None:
        b = self.b
        try:
            async with trio.open_nursery() as nursery:
                await self._run(nursery)
                nursery.cancel_scope.cancel()
        finally:
            if not self._settled:
                self._settled = True
                b.client_settled(False)
            await self.aclose()
            b.client_done()

    async def _run(self, nursery: trio.Nursery) -> None:
        """Connect, hello, wait for the traffic phase, send, close. Records its own errors."""
        b = self.b
        try:
            with trio.fail_after(b.cfg.connect_timeout):
                async with b.connect_sem:
                    t0 = now_ms()
                    await self._open()
                    nursery.start_soon(self._reader_wsproto if b.cfg.wsproto_reader else self.read)
                    await self._hello()
                    b.welcome_lat.append(now_ms() - t0)
        except trio.TooSlowError:
            b.connect_errors["timeout (connect/handshake/welcome)"] += 1
            return
        except _Abort:
            return
        except NET_ERRORS as exc:
            b.connect_errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            return
        except Exception as exc:
            b.connect_errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            return
        self.ok = True
        self._settled = True
        b.client_settled(True)
        try:
            await b.traffic_go.wait()
            if self.alive:
                await self._sender()
            await b.close_go.wait()
            await self._close()
        except Exception as exc:  # keep the other clients going; report it
            b.exceptions[exc_key(exc)] += 1

    async def _open(self) -> None:
        """TCP connect and the WebSocket handshake."""
        b = self.b
        port = b.ports[self.idx % len(b.ports)]
        try:
            await self.open(b.host, port, b.target)
        except HandshakeRefused as exc:
            b.connect_errors[str(exc)] += 1
            raise _Abort from None
        if self.deflated:
            b.deflate_negotiated += 1
        if self.selected_subprotocol:
            b.subprotocol_selected += 1

    async def _hello(self) -> None:
        b = self.b
        waiter: list[Any] = [trio.Event(), None]
        self.waiters[1] = waiter
        await self.send_msg(
            {"type": "hello", "ref": 1, "data": {"token": self.token, "project_id": self.project}}
        )
        await waiter[0].wait()
        env = waiter[1]
        if env is None:
            b.connect_errors["connection closed before welcome"] += 1
            raise _Abort
        if env.get("type") != "welcome":
            d = env.get("data") or {}
            b.connect_errors[f"hello refused: {env.get('type')} {d.get('code')}"] += 1
            raise _Abort
        d = env.get("data") or {}
        if isinstance(d.get("seq"), int):
            self.last_seq = d["seq"]
        snap = d.get("snapshot") or {}
        elements = snap.get("elements") or {}
        self.has_element = ELEMENT_ID in elements
        versions = (snap.get("versions") or {}).get(ELEMENT_ID) or {}
        seq = versions.get(self.prop)
        if isinstance(seq, int):
            self.base = seq

    async def insert_element(self) -> str:
        """Insert the room's shared element (called on one client per room)."""
        env = await self.request(
            "timeline_change",
            {
                "change_id": f"bench-{self.b.run_id}-insert-{self.room}",
                "changes": [
                    {
                        "op": "insert",
                        "element_id": ELEMENT_ID,
                        "element_type": "clip",
                        "props": {"name": "bench", "start": 0, "duration": 1},
                    }
                ],
            },
            timeout=self.b.cfg.connect_timeout,
        )
        if env is None:
            return "connection closed"
        d = env.get("data") or {}
        if env.get("type") == "ack":
            return str(d.get("status"))
        return f"{env.get('type')}: {d.get('code')} {d.get('message')}"

    async def _close(self) -> None:
        b = self.b
        self.closing = True
        if not self.alive or self.stream is None:
            return
        try:
            if self.ws.state is ConnectionState.OPEN:
                await self.send_bytes(self.ws.send(CloseConnection(code=1000)))
        except NET_ERRORS:
            return
        except Exception as exc:  # wsproto LocalProtocolError etc.
            b.exceptions["close: " + exc_key(exc)] += 1
            return
        with trio.move_on_after(b.cfg.close_timeout):
            await self.reader_done.wait()
        if not self.reader_done.is_set():
            b.closes_at_end["no close reply"] += 1

    # ---------------------------------------------------------------- sender

    async def _sender(self) -> None:
        b = self.b
        cfg = b.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.idx if cfg.seed is not None else None)
        start = b.traffic_start_t
        end = b.traffic_end_t
        pc = 1.0 / cfg.cursor_hz if cfg.cursor_hz > 0 else math.inf
        pe = 1.0 / cfg.edit_hz if cfg.edit_hz > 0 else math.inf
        # staggered phases so clients don't send in lockstep
        next_c = start + rng.random() * pc if pc != math.inf else math.inf
        next_e = start + rng.random() * pe if pe != math.inf else math.inf
        x = rng.uniform(0, 1920)
        y = rng.uniform(0, 1080)
        lag = b.send_lag
        current_time = trio.current_time
        sleep_until = trio.sleep_until
        ws_send = self.ws.send
        send_raw = self.send_bytes
        base_ns = _BASE_NS
        mono = _monotonic_ns
        try:
            while self.alive:
                nxt = next_c if next_c < next_e else next_e
                if nxt >= end:
                    return
                await sleep_until(nxt)
                now = current_time()
                if next_c <= now:
                    late = now - next_c
                    x = min(1920.0, max(0.0, x + rng.uniform(-20, 20)))
                    y = min(1080.0, max(0.0, y + rng.uniform(-20, 20)))
                    ts = (mono() - base_ns) / 1e6
                    data = _dumps(
                        {
                            "type": "cursor_update",
                            "data": {"position": {"x": round(x, 1), "y": round(y, 1), "time": ts}},
                        }
                    )
                    await send_raw(ws_send(TextMessage(data=data.decode())))
                    self.cursor_sent_total += 1
                    if b.m0_ms <= ts < b.m1_ms:
                        self.cursor_sent_win += 1
                        lag.append(late * 1000.0)
                    next_c += pc
                    if late > pc:  # fell behind by more than a period: skip, don't burst
                        missed = int(late / pc)
                        if b.in_window:
                            self.skipped_sends += missed
                        next_c += missed * pc
                if next_e <= now:
                    late = now - next_e
                    await self._send_edit()
                    next_e += pe
                    if late > pe:
                        missed = int(late / pe)
                        if b.in_window:
                            self.skipped_sends += missed
                        next_e += missed * pe
        except (*NET_ERRORS, LocalProtocolError) as exc:
            # the connection went away under us (the reader records the close itself)
            if not self.closing and not self.closed_by_server:
                self.b.exceptions["send: " + exc_key(exc)] += 1
            self.alive = False

    async def _send_edit(self) -> None:
        b = self.b
        ref = self.next_ref
        self.next_ref += 1
        self.edit_n += 1
        ts = (_monotonic_ns() - _BASE_NS) / 1e6
        op: dict[str, Any] = {"op": "set", "element_id": ELEMENT_ID, "prop": self.prop, "value": ts}
        if self.base is not None:
            op["base"] = self.base
        msg = {
            "type": "timeline_change",
            "ref": ref,
            "data": {"change_id": f"{self.uid}-{self.edit_n}", "changes": [op]},
        }
        self.pending_edits[ref] = ts
        self.edit_sent_total += 1
        if b.m0_ms <= ts < b.m1_ms:
            self.edit_sent_win += 1
        await self.send_bytes(self.ws.send(TextMessage(data=_dumps(msg).decode())))

    # ---------------------------------------------------------------- reader

    async def read(self) -> None:
        """The package's lean reader (wsproto's parser costs ~8 us a frame, which would make
        this process the bottleneck with batching off); waiters woken when it ends."""
        try:
            await super().read()
        finally:
            for w in self.waiters.values():
                w[0].set()
            self.waiters.clear()

    def on_bytes(self, count: int) -> None:
        self.wire_bytes_total += count
        if self.b.in_window:
            self.wire_bytes_win += count

    def on_lost(self, why: str) -> None:
        self.b.closes_during_run[why] += 1

    def on_reader_error(self, exc: Exception) -> None:
        self.b.exceptions["reader: " + exc_key(exc)] += 1

    def on_text(self, payload: bytes) -> None:
        if self.sink and b'"ref":' not in payload:
            # A sink counts what it gets without parsing it (by arrival time; replies, which
            # carry a ref, are parsed): the samplers measure latency and order.
            self.frames_total += 1
            if self.b.in_window:
                cfg = self.b.cfg
                self.frames_win += 1
                self.payload_bytes_win += len(payload)
                # one scan of the frame per kind of traffic (envelopes: the ones counted)
                if cfg.cursor_hz > 0:
                    cursors = payload.count(b'"kind":"cursor_update"')
                    self.cursor_recv_win += cursors
                    self.envelopes_win += cursors
                if cfg.edit_hz > 0:
                    edits = payload.count(b'"kind":"timeline_change"')
                    self.edit_push_win += edits
                    self.envelopes_win += edits
            return
        self._on_text(payload)

    def on_close(self, code: int, reason: str) -> None:
        self._on_close(CloseConnection(code=code, reason=reason))

    async def _reader_wsproto(self) -> None:
        """Reader that lets wsproto parse every frame (--wsproto-reader, for cross-checks)."""
        b = self.b
        stream = self.stream
        assert stream is not None
        ws = self.ws
        recv = stream.receive_some
        partial = self._partial
        if self._leftover:
            ws.receive_data(self._leftover)
            self._leftover = b""
        try:
            while True:
                data = await recv(RECV_SIZE)
                if not data:
                    if not self.closing:
                        b.closes_during_run["EOF without close frame"] += 1
                    return
                self.rx_ms = (_monotonic_ns() - _BASE_NS) / 1e6
                self.on_bytes(len(data))
                ws.receive_data(data)
                for ev in ws.events():
                    cls = type(ev)
                    if cls is TextMessage:
                        if not ev.message_finished:
                            partial.append(ev.data)
                            continue
                        if partial:
                            partial.append(ev.data)
                            text = "".join(partial)
                            partial.clear()
                        else:
                            text = ev.data
                        self._on_text(text)
                    elif cls is CloseConnection:
                        self.alive = False
                        self.closed_by_server = not self.closing
                        self._on_close(ev)
                        if ws.state is ConnectionState.REMOTE_CLOSING:
                            with contextlib.suppress(*NET_ERRORS):
                                await self.send_bytes(ws.send(ev.response()))
                        return
                    elif cls is Ping:
                        await self.send_bytes(ws.send(ev.response()))
                    elif cls is BytesMessage:
                        b.push_types["<binary frame>"] += 1
        except NET_ERRORS as exc:
            if not self.closing:
                b.closes_during_run[f"socket error: {type(exc).__name__}"] += 1
        except Exception as exc:  # protocol error, bad JSON...: record and drop the connection
            b.exceptions["reader: " + exc_key(exc)] += 1
        finally:
            self.alive = False
            self.reader_done.set()
            for w in self.waiters.values():
                w[0].set()
            self.waiters.clear()

    def _on_close(self, ev: CloseConnection) -> None:
        b = self.b
        code = str(ev.code)
        if self.closing:
            b.closes_at_end[code] += 1
        else:
            b.closes_during_run[code] += 1
            if ev.reason and code not in b.close_reasons:
                b.close_reasons[code] = ev.reason[:200]
            started = b.traffic_start_t != math.inf
            b.close_times.append(trio.current_time() - b.traffic_start_t if started else None)

    def _on_text(self, text: str | bytes) -> None:
        b = self.b
        batch = envelopes(_loads(text))
        self.frames_total += 1
        if b.in_window:
            self.frames_win += 1
            self.payload_bytes_win += len(text)
            self.envelopes_win += len(batch)
        for env in batch:
            self._on_env(env)

    def _on_env(self, env: dict[str, Any]) -> None:
        b = self.b
        typ = env.get("type")
        if typ == "collaboration_event":
            d = env["data"]
            kind = d.get("kind")
            if kind == "cursor_update":
                if d.get("user_id") not in b.uids:
                    b.foreign_events += 1
                    return
                try:
                    ts = d["payload"]["position"]["time"]
                    self.cursor_recv_total += 1
                    if b.m0_ms <= ts < b.m1_ms:
                        self.cursor_recv_win += 1
                        b.cursor_lat.append(self.rx_ms - ts)
                except (KeyError, TypeError):
                    b.cursor_bad += 1
                return
            if kind == "timeline_change":
                self._on_edit_push(d)
                return
            b.push_types[f"collaboration_event/{kind}"] += 1
            return
        ref = env.get("ref")
        if typ == "ack":
            ts = self.pending_edits.pop(ref, None)
            if ts is None:
                self._wake(ref, env)
                return
            d = env.get("data") or {}
            status = d.get("status")
            seq = d.get("seq")
            applied = status == "applied" or status == "partial"
            if applied and isinstance(seq, int) and (self.base is None or seq > self.base):
                self.base = seq
            if b.m0_ms <= ts < b.m1_ms:
                b.ack_status[str(status)] += 1
                self.edit_acked_win += 1
                b.edit_ack_lat.append(self.rx_ms - ts)
                if applied:
                    self.edit_applied_win += 1
            return
        if typ == "error":
            d = env.get("data") or {}
            code = str(d.get("code"))
            b.server_errors[code] += 1
            if code not in b.error_samples:
                b.error_samples[code] = str(d.get("message"))[:200]
            if ref is not None:
                if self.pending_edits.pop(ref, None) is not None:
                    self.edit_errors += 1
                else:
                    self._wake(ref, env)
            return
        if ref is not None and ref in self.waiters:
            self._wake(ref, env)
            return
        if typ == "conflict_resolved":
            seq = (env.get("data") or {}).get("seq")
            if isinstance(seq, int):
                self._check_seq(seq)
        elif typ == "conflict_detected":
            b.conflicts_detected += len((env.get("data") or {}).get("conflicts") or ())
        b.push_types[str(typ)] += 1

    def _wake(self, ref: Any, env: dict[str, Any]) -> None:
        w = self.waiters.pop(ref, None)
        if w is not None:
            w[1] = env
            w[0].set()
        else:
            self.b.push_types[f"unexpected reply {env.get('type')}"] += 1

    def _check_seq(self, seq: int) -> None:
        """Durable events must arrive in seq order, each once, none missing (none older than
        the welcome's seq either)."""
        last = self.last_seq
        if seq <= last:
            self.seq_stale += 1
        else:
            if seq > last + 1:
                self.seq_gaps += seq - last - 1
            self.last_seq = seq

    def _on_edit_push(self, d: dict[str, Any]) -> None:
        b = self.b
        payload = d.get("payload") or {}
        seq = d.get("seq")
        if isinstance(seq, int):
            self._check_seq(seq)
        changes = payload.get("changes") or ()
        mine = self.prop
        prefix = b.prop_prefix
        for op in changes:
            prop = op.get("prop")
            if prop is None:
                continue
            if prop == mine and isinstance(seq, int) and (self.base is None or seq > self.base):
                self.base = seq
            v = op.get("value")
            if type(v) is float and prop.startswith(prefix):
                self.edit_push_total += 1
                if b.m0_ms <= v < b.m1_ms:
                    self.edit_push_win += 1
                    b.edit_push_lat.append(self.rx_ms - v)


def exc_key(exc: BaseException) -> str:
    """A short, aggregatable description of an exception (no message payloads)."""
    if isinstance(exc, LocalProtocolError):
        return "LocalProtocolError (send on a closed connection)"
    return f"{type(exc).__name__}: {str(exc)[:100]}"


class _Abort(Exception):
    """A client gives up (already recorded)."""


# --------------------------------------------------------------------------- one run


async def run_once(cfg: argparse.Namespace, tick_ms: float | None, label: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="crealia-fanout-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        server: ServerProc | None = None
        secret = cfg.jwt_secret or secrets.token_hex(32)
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            try:
                if cfg.url:
                    url = cfg.url
                    ps = psutil.Process(cfg.server_pid) if cfg.server_pid else None
                else:
                    extra_servers: list[ServerProc] = []
                    if cfg.cluster > 1 or cfg.redis:
                        redis_url = (
                            cfg.redis
                            if cfg.redis not in (None, "auto")
                            else await start_redis(nursery, Path(tmp))
                        )
                        cfg.server_arg = [*(cfg.server_arg or []), "--redis", redis_url]
                        for k in range(1, cfg.cluster):
                            other_dir = Path(tmp) / f"data{k}"
                            other_dir.mkdir()
                            extra = ServerProc(cfg, secret, tick_ms, other_dir)
                            extra.stderr_path = Path(tmp) / f"server-stderr-{k}.log"
                            await extra.start(nursery)
                            extra_servers.append(extra)
                    server = ServerProc(cfg, secret, tick_ms, data_dir)
                    log(cfg, f"[{label}] starting: {' '.join(server_cmd_preview(cfg, tick_ms))}")
                    await server.start(nursery)
                    port = server.ws_port if cfg.endpoint == "ws" else server.http_port
                    url = f"ws://127.0.0.1:{port}/ws"
                    ps = server.ps
                    if extra_servers:
                        cfg._extra_ports = [s.ws_port if cfg.endpoint == "ws" else s.http_port
                                            for s in extra_servers]  # fmt: skip
                        ps = ProcGroup([p for p in [server.ps] + [s.ps for s in extra_servers]
                                        if p is not None])  # fmt: skip
                    log(
                        cfg,
                        f"[{label}] server up in {server.startup_s:.2f} s: "
                        f"http={server.http_port} ws={server.ws_port}; using {url}",
                    )
                result = await drive(cfg, url, secret, ps, label)
            finally:
                with trio.CancelScope(shield=True):
                    if server is not None:
                        log(cfg, f"[{label}] stopping server (SIGINT)")
                        await server.stop()
                    for extra in locals().get("extra_servers", []):
                        await extra.stop()
                nursery.cancel_scope.cancel()
        if server is not None:
            stderr = server.stderr_text()
            if cfg.server_log:
                suffix = "" if label == "run" else "." + label.replace(" ", "-")
                Path(cfg.server_log + suffix).write_text(stderr)
            result["server"].update(
                {
                    "cmd": server.cmd,
                    "http_port": server.http_port,
                    "ws_port": server.ws_port,
                    "startup_s": server.startup_s,
                    "shutdown_s": server.shutdown_s,
                    "exit_code": server.returncode,
                    "killed_after_timeout": server.killed,
                    "stderr_tracebacks": stderr.count("Traceback (most recent call last)"),
                    "stderr_lines": len(stderr.splitlines()),
                }
            )
            if server.returncode not in (0, None) or server.killed or "Traceback" in stderr:
                result["server"]["diagnostics"] = server.diagnostics()
        result["label"] = label
        result["tick_ms"] = tick_ms
        return result


async def start_redis(nursery: trio.Nursery, tmp: Path) -> str:
    """A redis-server of our own on a free loopback port (AOF on), stopped with the run."""
    import socket as _socket

    with _socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await trio.lowlevel.open_process(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip

    async def reap() -> None:
        try:
            await trio.sleep_forever()
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()

    nursery.start_soon(reap)
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)  # waiting for the port to open, bounded above
                continue
            await stream.aclose()
            return f"redis://127.0.0.1:{port}/0"


def server_cmd_preview(cfg: argparse.Namespace, tick_ms: float | None) -> list[str]:
    cmd = ["python", "-m", "crealia", "serve", "--port", "0", "--ws-port", "0"]
    if tick_ms is not None:
        cmd += ["--tick-ms", f"{tick_ms:g}"]
    return cmd + list(cfg.server_arg or [])


async def drive(
    cfg: argparse.Namespace,
    url: str,
    secret: str,
    ps: psutil.Process | None,
    label: str,
) -> dict[str, Any]:
    b = Bench(cfg, url, secret)
    me = psutil.Process()
    rooms: list[list[Client]] = [[] for _ in range(cfg.rooms)]
    for i in range(cfg.clients):
        c = Client(b, i, i % cfg.rooms)
        c.sink = cfg.sample > 0 and i // cfg.rooms >= cfg.sample
        b.clients.append(c)
        b.uids.add(c.uid)
        rooms[c.room].append(c)

    await trio.sleep(cfg.rss_settle / 2)
    rss_before = rss_bytes(ps) if ps else None

    async with trio.open_nursery() as cn:
        t_conn = trio.current_time()
        for c in b.clients:
            cn.start_soon(c.main)
        with trio.move_on_after(cfg.connect_timeout + 5 + cfg.clients / 200):
            await b.all_settled.wait()
        connect_s = trio.current_time() - t_conn
        log(
            cfg,
            f"[{label}] connected {b.n_ok}/{cfg.clients} in {connect_s:.2f} s"
            + (f" ({b.n_failed} failed)" if b.n_failed else ""),
        )
        if b.n_ok == 0:
            b.close_go.set()
            b.traffic_go.set()
            detail = "; ".join(f"{k} x{v}" for k, v in b.connect_errors.most_common(5))
            raise BenchError(f"no client could connect to {url}: {detail or 'unknown'}")

        # idle RSS with every client connected, before any traffic
        await trio.sleep(cfg.rss_settle)
        rss_idle = rss_bytes(ps) if ps else None

        # one element per room, inserted by the first connected member if missing
        insert_status: dict[str, str] = {}
        if cfg.edit_hz > 0:
            for members in rooms:
                live = [c for c in members if c.ok and c.alive]
                if not live:
                    continue
                first = live[0]
                if first.has_element:
                    insert_status[first.project] = "present"
                    continue
                try:
                    insert_status[first.project] = await first.insert_element()
                except trio.TooSlowError:
                    insert_status[first.project] = "timeout"
            bad = {k: v for k, v in insert_status.items() if v not in ("applied", "present")}
            if bad:
                log(cfg, f"[{label}] element insert not applied: {bad}")

        live_rooms = [[c for c in members if c.ok and c.alive] for members in rooms]
        t_start = trio.current_time() + 0.05
        ms_at = now_ms() + (t_start - trio.current_time()) * 1000.0
        b.traffic_start_t = t_start
        b.traffic_end_t = t_start + cfg.warmup + cfg.duration
        b.m0_ms = ms_at + cfg.warmup * 1000.0
        b.m1_ms = b.m0_ms + cfg.duration * 1000.0
        b.traffic_go.set()
        log(
            cfg,
            f"[{label}] traffic: warmup {cfg.warmup:g} s, then measuring {cfg.duration:g} s",
        )

        await trio.sleep_until(t_start + cfg.warmup)
        b.in_window = True
        w0 = time.monotonic()
        srv_cpu0 = cpu_seconds(ps) if ps else None
        me_cpu0 = cpu_seconds(me, include_children=False)
        host0 = host_busy_seconds()
        await trio.sleep_until(b.traffic_end_t)
        b.in_window = False
        wall = time.monotonic() - w0
        srv_cpu1 = cpu_seconds(ps) if ps else None
        me_cpu1 = cpu_seconds(me, include_children=False)
        host1 = host_busy_seconds()
        log(cfg, f"[{label}] measured {wall:.2f} s; draining {cfg.drain:g} s")
        await trio.sleep(cfg.drain)
        rss_loaded = rss_bytes(ps) if ps else None
        alive_at_end = sum(1 for c in b.clients if c.alive)

        b.close_go.set()
        with trio.move_on_after(cfg.close_timeout + 3):
            await b.all_done.wait()
        cn.cancel_scope.cancel()

    # ---- aggregate
    dur = cfg.duration
    clients = [c for c in b.clients if c.ok]
    expected = 0
    nominal_per_s = 0.0
    push_expected = 0
    for members in live_rooms:
        n = len(members)
        sent = sum(c.cursor_sent_win for c in members)
        expected += (n - 1) * sent if n else 0
        nominal_per_s += n * (n - 1) * cfg.cursor_hz
        applied = sum(c.edit_applied_win for c in members)
        push_expected += n * applied
    delivered = sum(c.cursor_recv_win for c in clients)
    sent_total = sum(c.cursor_sent_win for c in clients)
    n_recv = sum(len(m) for m in live_rooms)
    per_client_rates = sorted(c.cursor_recv_win / dur for c in clients) or [0.0]
    edits_sent = sum(c.edit_sent_win for c in clients)
    edits_acked = sum(c.edit_acked_win for c in clients)
    edit_push = sum(c.edit_push_win for c in clients)
    frames = sum(c.frames_win for c in clients)
    envelopes = sum(c.envelopes_win for c in clients)
    wire = sum(c.wire_bytes_win for c in clients)
    payload = sum(c.payload_bytes_win for c in clients)
    me_cpu = (me_cpu1 - me_cpu0) / wall * 100.0 if wall > 0 else None
    srv_cpu = (
        (srv_cpu1 - srv_cpu0) / wall * 100.0
        if wall > 0 and srv_cpu0 is not None and srv_cpu1 is not None
        else None
    )
    room_sizes = [len(m) for m in live_rooms]
    host_cpu = (host1 - host0) / wall * 100.0 if wall > 0 else None
    others_cpu = (
        host_cpu - (srv_cpu or 0.0) - (me_cpu or 0.0)
        if host_cpu is not None and me_cpu is not None and ps is not None
        else None
    )
    close_phases: Counter[str] = Counter()
    for t in b.close_times:
        if t is None:
            close_phases["before traffic"] += 1
        elif t < cfg.warmup:
            close_phases["warmup"] += 1
        elif t < cfg.warmup + dur:
            close_phases["measured"] += 1
        else:
            close_phases["drain"] += 1
    first_close = min((t for t in b.close_times if t is not None), default=None)

    out: dict[str, Any] = {
        "config": {
            "clients": cfg.clients,
            "rooms": cfg.rooms,
            "clients_per_room": [min(room_sizes), max(room_sizes)],
            "cursor_hz": cfg.cursor_hz,
            "edit_hz": cfg.edit_hz,
            "warmup_s": cfg.warmup,
            "duration_s": cfg.duration,
            "endpoint": cfg.endpoint if not cfg.url else "external",
            "url": url,
            "deflate": cfg.deflate,
            "run_id": b.run_id,
        },
        "connect": {
            "ok": b.n_ok,
            "failed": b.n_failed,
            "seconds": connect_s,
            "welcome_ms": dist(b.welcome_lat),
            "errors": dict(b.connect_errors),
            "deflate_negotiated": b.deflate_negotiated,
            "subprotocol_selected": b.subprotocol_selected,
            "alive_at_end": alive_at_end,
        },
        "cursor": {
            "latency_ms": dist(b.cursor_lat),
            "sent": sent_total,
            "sent_per_s": sent_total / dur,
            "delivered": delivered,
            "delivered_per_s": delivered / dur,
            "expected_sent_to_receivers": expected,
            "expected_per_s": expected / dur,
            "delivered_ratio": delivered / expected if expected else None,
            "nominal_per_s": nominal_per_s,
            "delivered_per_client_per_s": delivered / dur / n_recv if n_recv else None,
            "nominal_per_client_per_s": nominal_per_s / n_recv if n_recv else None,
            "per_client_min_per_s": per_client_rates[0],
            "per_client_max_per_s": per_client_rates[-1],
            "malformed": b.cursor_bad,
            "foreign": b.foreign_events,
        },
        "edits": {
            "element_insert": insert_status,
            "sent": edits_sent,
            "acked": edits_acked,
            "ack_rate_per_s": edits_acked / dur,
            "ack_latency_ms": dist(b.edit_ack_lat),
            "ack_status": dict(b.ack_status),
            "errors": sum(c.edit_errors for c in clients),
            "unacked_at_end": sum(len(c.pending_edits) for c in clients),
            "push_delivered": edit_push,
            "push_expected": push_expected,
            "push_latency_ms": dist(b.edit_push_lat),
            "conflicts_detected": b.conflicts_detected,
            "seq_gaps": sum(c.seq_gaps for c in clients),
            "seq_stale_or_duplicate": sum(c.seq_stale for c in clients),
        },
        "traffic": {
            "frames": frames,
            "frames_per_s": frames / dur,
            "envelopes": envelopes,
            "envelopes_per_frame": envelopes / frames if frames else None,
            "wire_bytes": wire,
            "wire_bytes_per_s": wire / dur,
            "payload_bytes": payload,
            "frames_total_run": sum(c.frames_total for c in clients),
            "wire_bytes_total_run": sum(c.wire_bytes_total for c in clients),
            "other_pushes": dict(b.push_types),
        },
        "errors": {
            "server_errors": dict(b.server_errors),
            "server_error_samples": b.error_samples,
            "closes_during_run": dict(b.closes_during_run),
            "close_reasons": b.close_reasons,
            "closes_during_run_by_phase": dict(close_phases),
            "first_close_after_traffic_start_s": first_close,
            "closes_at_end": dict(b.closes_at_end),
            "client_exceptions": dict(b.exceptions),
        },
        "server": {
            "pid": ps.pid if ps else None,
            "cpu_percent": srv_cpu,
            "rss_before_mb": rss_before / 2**20 if rss_before else None,
            "rss_idle_mb": rss_idle / 2**20 if rss_idle else None,
            "rss_after_load_mb": rss_loaded / 2**20 if rss_loaded else None,
            "rss_per_conn_kb": (
                (rss_idle - rss_before) / b.n_ok / 1024
                if rss_before and rss_idle and b.n_ok
                else None
            ),
        },
        "loadgen": {
            "cpu_percent": me_cpu,
            "send_lag_ms": dist(b.send_lag),
            "skipped_sends": sum(c.skipped_sends for c in clients),
            "measured_wall_s": wall,
        },
        "host": {
            "cores": psutil.cpu_count(),
            "busy_percent_of_one_core": host_cpu,
            "other_processes_percent_of_one_core": others_cpu,
        },
    }
    out["warnings"] = warnings_for(out)
    return out


def warnings_for(r: dict[str, Any]) -> list[str]:
    w = []
    lg = r["loadgen"]
    if lg["cpu_percent"] is not None and lg["cpu_percent"] > 85:
        w.append(f"load generator CPU {lg['cpu_percent']:.0f} %: the client may be the bottleneck")
    lag = lg["send_lag_ms"]
    if lag["p99"] is not None and lag["p99"] > 20:
        w.append(f"send lag p99 {lag['p99']:.1f} ms: sends were late (client or socket backlog)")
    if lg["skipped_sends"]:
        w.append(f"{lg['skipped_sends']} scheduled sends skipped (sender fell behind)")
    c = r["connect"]
    if c["failed"]:
        w.append(f"{c['failed']} clients failed to connect")
    if c["alive_at_end"] < c["ok"]:
        w.append(f"{c['ok'] - c['alive_at_end']} connections lost during the run")
    e = r["errors"]
    if e["closes_during_run"]:
        w.append(
            f"closes during run: {e['closes_during_run']} "
            f"{e['close_reasons'] if e['close_reasons'] else ''}".rstrip()
        )
    oth = r["host"]["other_processes_percent_of_one_core"]
    if oth is not None and oth > 25:
        w.append(f"other processes used {oth:.0f} % of a core during the window: noisy figures")
    if e["server_errors"]:
        w.append(f"server errors: {e['server_errors']}")
    if e["client_exceptions"]:
        w.append(f"client exceptions: {e['client_exceptions']}")
    ed = r["edits"]
    if ed["unacked_at_end"]:
        w.append(f"{ed['unacked_at_end']} edits never acked")
    if ed["push_expected"] and ed["push_delivered"] < ed["push_expected"]:
        w.append(
            f"durable edit pushes delivered {ed['push_delivered']} < expected "
            f"{ed['push_expected']} (durable events must not be dropped)"
        )
    if ed["seq_gaps"] or ed["seq_stale_or_duplicate"]:
        w.append(
            f"durable seq order broken: {ed['seq_gaps']} seqs never pushed, "
            f"{ed['seq_stale_or_duplicate']} pushed twice or older than the welcome's seq"
        )
    cu = r["cursor"]
    if cu["malformed"]:
        w.append(f"{cu['malformed']} cursor events without a numeric position.time")
    return w


# --------------------------------------------------------------------------- output


def _f(v: Any, spec: str = ".2f", unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:{spec}}{unit}"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} MB"


def _lat(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "no samples"
    return (
        f"p50 {d['p50']:.2f}  p95 {d['p95']:.2f}  p99 {d['p99']:.2f}  max {d['max']:.1f} ms"
        f"  (n={d['n']:,})"
    )


def format_summary(r: dict[str, Any]) -> str:
    cfg, co, cu, ed, tr, er, sv, lg = (
        r["config"], r["connect"], r["cursor"], r["edits"],
        r["traffic"], r["errors"], r["server"], r["loadgen"],
    )  # fmt: skip
    tick = r.get("tick_ms")
    tick_s = (
        "server default" if tick is None else ("0 (batching off)" if tick == 0 else f"{tick:g}")
    )
    lines = [
        f"== crealia fan-out: {r.get('label', '')}  endpoint {cfg['endpoint']} ({cfg['url']})",
        f"   {cfg['clients']} clients in {cfg['rooms']} rooms "
        f"({cfg['clients_per_room'][0]}-{cfg['clients_per_room'][1]}/room), cursor "
        f"{cfg['cursor_hz']:g} Hz, edit {cfg['edit_hz']:g} Hz, tick-ms {tick_s}, "
        f"deflate {'on' if cfg['deflate'] else 'off'}"
        f"{' (negotiated ' + str(co['deflate_negotiated']) + ')' if cfg['deflate'] else ''}, "
        f"warmup {cfg['warmup_s']:g} s, measured {cfg['duration_s']:g} s",
    ]
    rows: list[tuple[str, str]] = [
        (
            "connect",
            f"{co['ok']}/{co['ok'] + co['failed']} in {co['seconds']:.2f} s; "
            f"connect->welcome p50 {_f(co['welcome_ms']['p50'])} "
            f"p99 {_f(co['welcome_ms']['p99'])} ms",
        ),
        ("cursor latency", _lat(cu["latency_ms"])),
        (
            "cursor delivered",
            f"{cu['delivered_per_s']:,.0f}/s total, "
            f"{_f(cu['delivered_per_client_per_s'], ',.1f')}/s per client "
            f"(min {cu['per_client_min_per_s']:,.1f}, max {cu['per_client_max_per_s']:,.1f})",
        ),
        (
            "cursor expected",
            f"sent-to-receivers {cu['expected_per_s']:,.0f}/s "
            f"-> delivered {_f(cu['delivered_ratio'] and cu['delivered_ratio'] * 100, '.1f')} %;"
            f" nominal (n-1)*H {_f(cu['nominal_per_client_per_s'], ',.1f')}/s per client "
            f"({cu['nominal_per_s']:,.0f}/s total); sent {cu['sent_per_s']:,.0f}/s",
        ),
    ]
    if cfg["edit_hz"] > 0:
        st = ", ".join(f"{k} {v}" for k, v in sorted(ed["ack_status"].items())) or "none"
        rows += [
            ("edit ack latency", _lat(ed["ack_latency_ms"])),
            (
                "edit rate",
                f"{ed['ack_rate_per_s']:,.1f} acks/s ({ed['sent']} sent, {ed['acked']} acked); "
                f"{st}; errors {ed['errors']}, unacked {ed['unacked_at_end']}, "
                f"conflicts {ed['conflicts_detected']}",
            ),
            ("edit fan-out", _lat(ed["push_latency_ms"])),
            (
                "edit pushes",
                f"{ed['push_delivered']:,} delivered / {ed['push_expected']:,} expected; "
                f"seq order: {ed['seq_gaps']} missing, "
                f"{ed['seq_stale_or_duplicate']} duplicate/stale",
            ),
        ]
    rows += [
        (
            "frames received",
            f"{tr['frames']:,} ({tr['frames_per_s']:,.0f}/s), envelopes/frame "
            f"{_f(tr['envelopes_per_frame'])}",
        ),
        (
            "bytes received",
            f"{tr['wire_bytes'] / 2**20:,.2f} MiB on the wire "
            f"({tr['wire_bytes_per_s'] / 1024:,.0f} KiB/s), payload "
            f"{tr['payload_bytes'] / 2**20:,.2f} MiB",
        ),
        (
            "server CPU",
            f"{_f(sv['cpu_percent'], '.1f', ' %')} of one core",
        ),
        (
            "server RSS",
            f"before {_mb(sv['rss_before_mb'])}, idle with clients {_mb(sv['rss_idle_mb'])} "
            f"-> {_f(sv['rss_per_conn_kb'], '.1f', ' KiB')}/conn; "
            f"after load {_mb(sv['rss_after_load_mb'])}",
        ),
        (
            "loadgen",
            f"CPU {_f(lg['cpu_percent'], '.1f', ' %')}; send lag p50 "
            f"{_f(lg['send_lag_ms']['p50'])} p99 {_f(lg['send_lag_ms']['p99'])} ms; "
            f"skipped {lg['skipped_sends']}",
        ),
        (
            "host CPU",
            f"{_f(r['host']['busy_percent_of_one_core'], '.0f', ' %')} busy "
            f"({r['host']['cores']} cores = {100 * (r['host']['cores'] or 0)} %); "
            f"other processes {_f(r['host']['other_processes_percent_of_one_core'], '.0f', ' %')}",
        ),
        (
            "errors",
            ", ".join(f"{k} x{v}" for k, v in er["server_errors"].items()) or "none",
        ),
        (
            "closes",
            "during run: "
            + (", ".join(f"{k} x{v}" for k, v in er["closes_during_run"].items()) or "none")
            + (
                f" (by phase {er['closes_during_run_by_phase']}, first "
                f"{_f(er['first_close_after_traffic_start_s'], '.2f')} s after traffic start)"
                if er["closes_during_run"]
                else ""
            )
            + "; at end: "
            + (", ".join(f"{k} x{v}" for k, v in er["closes_at_end"].items()) or "none"),
        ),
    ]
    if "exit_code" in sv:
        rows.append(
            (
                "server shutdown",
                f"SIGINT -> exit {sv['exit_code']} in {_f(sv['shutdown_s'])} s"
                + (" (KILLED after timeout)" if sv.get("killed_after_timeout") else "")
                + (
                    f"; {sv['stderr_tracebacks']} traceback(s) on stderr"
                    if sv.get("stderr_tracebacks")
                    else ""
                ),
            )
        )
    if tr["other_pushes"]:
        rows.append(
            (
                "other pushes (run)",
                ", ".join(f"{k} {v}" for k, v in sorted(tr["other_pushes"].items())),
            )
        )
    width = max(len(k) for k, _ in rows)
    lines += [f"   {k:<{width}}  {v}" for k, v in rows]
    for w in r["warnings"]:
        lines.append(f"   WARNING: {w}")
    if sv.get("diagnostics"):
        lines.append("   " + sv["diagnostics"].replace("\n", "\n   "))
    return "\n".join(lines)


def format_comparison(a: dict[str, Any], b: dict[str, Any]) -> str:
    def g(r: dict[str, Any], *path: str) -> Any:
        for p in path:
            r = r[p] if r is not None else None
        return r

    metrics = [
        ("cursor p50 ms", ("cursor", "latency_ms", "p50"), ".2f"),
        ("cursor p95 ms", ("cursor", "latency_ms", "p95"), ".2f"),
        ("cursor p99 ms", ("cursor", "latency_ms", "p99"), ".2f"),
        ("cursor delivered/s", ("cursor", "delivered_per_s"), ",.0f"),
        ("delivered/sent-to-receivers", ("cursor", "delivered_ratio"), ".3f"),
        ("edit ack p50 ms", ("edits", "ack_latency_ms", "p50"), ".2f"),
        ("edit ack p99 ms", ("edits", "ack_latency_ms", "p99"), ".2f"),
        ("edit fan-out p50 ms", ("edits", "push_latency_ms", "p50"), ".2f"),
        ("edit fan-out p99 ms", ("edits", "push_latency_ms", "p99"), ".2f"),
        ("frames recv/s", ("traffic", "frames_per_s"), ",.0f"),
        ("envelopes/frame", ("traffic", "envelopes_per_frame"), ".2f"),
        ("wire KiB/s", ("traffic", "wire_bytes_per_s"), ",.0f"),
        ("server CPU %", ("server", "cpu_percent"), ".1f"),
        ("loadgen CPU %", ("loadgen", "cpu_percent"), ".1f"),
        ("other processes CPU %", ("host", "other_processes_percent_of_one_core"), ".0f"),
    ]
    ta = "default" if a.get("tick_ms") is None else f"{a['tick_ms']:g} ms"
    lines = [
        "== batching comparison",
        f"   {'metric':<28} {'tick ' + ta:>16} {'tick 0 (off)':>16} {'off/on':>8}",
    ]
    for name, path, spec in metrics:
        va, vb = g(a, *path), g(b, *path)
        if name == "wire KiB/s":
            va = va / 1024 if va is not None else None
            vb = vb / 1024 if vb is not None else None
        ratio = f"{vb / va:.2f}x" if va and vb is not None else "n/a"
        lines.append(f"   {name:<28} {_f(va, spec):>16} {_f(vb, spec):>16} {ratio:>8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="crealia room fan-out load generator (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=50, help="number of WebSocket clients (N)")
    p.add_argument("--rooms", type=int, default=1, help="rooms (projects bench-0..bench-R-1)")
    p.add_argument("--cursor-hz", type=float, default=5.0, help="cursor_update rate per client")
    p.add_argument("--edit-hz", type=float, default=0.0, help="timeline_change rate per client")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="traffic seconds before measuring")
    p.add_argument(
        "--endpoint",
        choices=("ws", "http"),
        default="ws",
        help="ws: fast path on --ws-port; http: the HTTP app's /ws (hypercorn)",
    )
    p.add_argument(
        "--tick-ms",
        type=float,
        default=None,
        help="pass --tick-ms to the server (0: batching off); default: server's",
    )
    p.add_argument(
        "--compare-batching",
        action="store_true",
        help="run twice: default tick (or --tick-ms) and --tick-ms 0; compare",
    )
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument(
        "--wsproto-reader",
        action="store_true",
        help="parse received frames with wsproto instead of the lean inline parser (slower)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="K",
        help="only K clients per room parse what they receive and measure latency; the others "
        "count deliveries by substring, by arrival time (default 0: every client parses). "
        "Keeps this process from being the bottleneck at hundreds of thousands of deliveries/s",
    )
    p.add_argument("--no-subprotocol", action="store_true", help=f"don't offer {SUBPROTOCOL}")
    p.add_argument("--url", help="use a running server at this ws:// URL (loopback only)")
    p.add_argument("--cluster", type=int, default=1,
                   help="start this many server processes on one Redis and spread the clients "
                        "over them (default 1: the embedded server)")  # fmt: skip
    p.add_argument(
        "--redis",
        default=None,
        help="with --cluster: this Redis URL (default: start a redis-server)",
    )
    p.add_argument("--jwt-secret", help="the server's JWT secret (required with --url)")
    p.add_argument("--server-pid", type=int, help="with --url: pid for server CPU/RSS figures")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `crealia serve` (repeatable, use --server-arg=--x)",
    )
    p.add_argument("--server-log", help="write the server's stderr to this file")
    p.add_argument("--server-cwd", help="working directory for the server (default: repo root)")
    p.add_argument("--project-prefix", default="bench", help="room project id prefix")
    p.add_argument(
        "--connect-concurrency", type=int, default=64, help="connections being opened at once"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="per-client TCP+handshake+welcome timeout",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the server's listening line",
    )
    p.add_argument(
        "--stop-timeout", type=float, default=10.0, help="seconds after SIGINT before SIGKILL"
    )
    p.add_argument(
        "--drain", type=float, default=1.5, help="seconds to keep reading after the last send"
    )
    p.add_argument(
        "--close-timeout",
        type=float,
        default=3.0,
        help="seconds to wait for the server's close reply",
    )
    p.add_argument(
        "--rss-settle", type=float, default=1.0, help="idle seconds before each RSS reading"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for send phases")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    cfg = p.parse_args(argv)  # fmt: skip
    if cfg.clients < 1 or cfg.rooms < 1 or cfg.rooms > cfg.clients:
        p.error("need --clients >= --rooms >= 1")
    if cfg.duration <= 0 or cfg.warmup < 0 or cfg.cursor_hz < 0 or cfg.edit_hz < 0:
        p.error("--duration must be > 0; --warmup, --cursor-hz, --edit-hz >= 0")
    if cfg.url:
        parts = urlsplit(cfg.url)
        if parts.scheme != "ws":
            p.error("--url must be ws://HOST:PORT/PATH")
        if not _is_loopback(parts.hostname or ""):
            p.error("--url must point at a loopback address (127.0.0.0/8, ::1, localhost)")
        if not cfg.jwt_secret:
            p.error("--url needs --jwt-secret (the server's secret, to mint tokens)")
        if cfg.compare_batching:
            p.error("--compare-batching starts its own servers; it cannot be used with --url")
        if cfg.tick_ms is not None:
            p.error("--tick-ms is a server option; it cannot be used with --url")
    if cfg.tick_ms is not None and cfg.tick_ms < 0:
        p.error("--tick-ms must be >= 0")
    if cfg.compare_batching and cfg.tick_ms == 0:
        p.error("--compare-batching already runs --tick-ms 0; give a tick > 0 or none")
    return cfg


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out += _leaves(e)
        return out
    return [exc]


def _raise_nofile(need: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: the run was cancelled, its server stopped."""


async def amain(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    got: list[int] = []

    async def watch_signals(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                got.append(signum)
                scope.cancel()  # finally blocks (shielded) close clients, stop the server
                return

    async def work(scope: trio.CancelScope) -> None:
        try:
            if cfg.compare_batching:
                results.append(await run_once(cfg, cfg.tick_ms, "batching on"))
                await trio.sleep(0.5)
                results.append(await run_once(cfg, 0, "batching off"))
            else:
                label = "external server" if cfg.url else "run"
                results.append(await run_once(cfg, cfg.tick_ms, label))
        finally:
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        nursery.start_soon(work, nursery.cancel_scope)
    if got:
        raise Interrupted(signal.Signals(got[0]).name)
    return results


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # a short --jwt-secret would be warned about for every token minted
    warnings.filterwarnings("ignore", message=".*HMAC key.*")
    # both our sockets and (inherited) the server's
    _raise_nofile(2 * cfg.clients + 1024)
    try:
        results = trio.run(amain, cfg)
    except BaseException as exc:  # Trio wraps errors in (nested) exception groups
        leaves = list(_leaves(exc))
        stops = [e for e in leaves if isinstance(e, KeyboardInterrupt | Interrupted)]
        if stops:
            print(f"fanout: interrupted ({stops[0] or 'SIGINT'})", file=sys.stderr)
            return 130
        bench_errors = [e for e in leaves if isinstance(e, BenchError)]
        if bench_errors:
            for e in bench_errors:
                print(f"fanout: {e}", file=sys.stderr)
            return 1
        raise
    if cfg.json:
        if len(results) == 1:
            obj: dict[str, Any] = results[0]
        else:
            obj = {"batching_on": results[0], "batching_off": results[1]}
        sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        for r in results:
            print(format_summary(r))
            print()
        if len(results) == 2:
            print(format_comparison(results[0], results[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
