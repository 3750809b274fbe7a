#!/usr/bin/env python3
"""crealia against python-socketio on uvicorn: the same presence workloads, in one run, with
the ratios.

Each workload starts a fresh server (``crealia serve`` on its embedded default, then
``benchmarks/_socketio_server.py``), connects N clients spread over R rooms, makes each send a
cursor move H times a second (each client its own phase) and measures, over ``--duration``
seconds after ``--warmup``:

* delivered: the cursor events clients received, against offered (each message sent times the
  other members of its room); both by arrival and send time within the window;
* latency: send to receipt, on this process's clock (the send time travels in the message),
  measured by ``--sample`` clients per room; the others count what they get without parsing it
  (crealia batches many events a frame, Socket.IO sends one frame per event), which keeps this
  process from being the bottleneck;
* the server's CPU (psutil, % of one core), and for the idle workload its RSS per connection
  (authenticated and joined: crealia's ``hello``, Socket.IO's namespace connect);
* for the edits workload (crealia only: Socket.IO has no durable ack): each client inserts its
  own clip, then moves it ``edit_hz`` times a second (conditional on the insert's ``seq``); the
  ack's latency, send to receipt, by ``ref``, for every client, and the acks' statuses.

The clients are ``crealia._loadgen.Connection`` for both servers (raw sockets, wsproto for the
handshake and sends, an inline frame reader). Socket.IO's keep-alive ping is set longer than a
run so that both servers only carry the workload. Needs the ``bench`` extra (python-socketio,
uvicorn, websockets). Loopback only.

    python benchmarks/compare.py [--workloads 50x5,200x5,200x20,500x5,idle1000,edits1000]
                                 [--duration 10] [--warmup 3] [--sample 10] [--json]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import psutil
import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from crealia._loadgen import (  # noqa: E402
    NET_ERRORS,
    Connection,
    cpu_seconds,
    envelopes,
    now_ms,
    percentiles,
)

SECRET = "compare-secret-of-at-least-32-bytes!!"
CREALIA_LISTENING = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")
SOCKETIO_LISTENING = re.compile(rb"socketio listening (\d+)")
_loads = orjson.loads
_dumps = orjson.dumps


@attrs.frozen
class Workload:
    clients: int
    rooms: int
    hz: float
    #: Edits a second per client (crealia only: Socket.IO has no durable ack to time).
    edit_hz: float = 0.0

    @property
    def label(self) -> str:
        if self.edit_hz:
            total = self.clients * self.edit_hz
            return f"{total:,.0f} edits/s, {self.rooms} rooms"
        if self.hz == 0:
            return f"{self.clients} idle, {self.clients // self.rooms} per room"
        return f"{self.clients} x {self.hz:g} Hz, {self.rooms} room" + ("s" * (self.rooms > 1))


WORKLOADS = {
    "50x5": Workload(50, 1, 5),
    "200x5": Workload(200, 1, 5),
    "200x20": Workload(200, 1, 20),
    "500x5": Workload(500, 1, 5),
    "idle1000": Workload(1000, 20, 0),
    "edits1000": Workload(200, 20, 0, edit_hz=5),
}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the servers ----------------------------------------------------------------------------------


class Server:
    """A server subprocess: start it, wait for its listening line, measure it, stop it."""

    def __init__(self, kind: str, data_dir: Path, tree: Path | None = None) -> None:
        self.kind = kind
        self.tree = tree
        self.data_dir = data_dir
        self.process: trio.Process | None = None
        self.ps: psutil.Process | None = None
        self.port = 0

    async def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", CREALIA_JWT_SECRET=SECRET)
        # one loopback address for every client: no per-address caps (connections, handshakes)
        env.update(CREALIA_MAX_CONNECTIONS_PER_ADDRESS="0", CREALIA_MAX_CONNECTIONS="60000",
                   CREALIA_PREAUTH_HANDSHAKE_LIMIT="off")  # fmt: skip
        cwd = REPO_ROOT
        if self.kind == "crealia":
            if self.tree is not None:  # another checkout's server (a "before" run)
                cwd, env["PYTHONPATH"] = self.tree, str(self.tree)
            command = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
                       "--data-dir", str(self.data_dir)]  # fmt: skip
            pattern, group = CREALIA_LISTENING, 2
        else:
            command = [sys.executable, str(REPO_ROOT / "benchmarks" / "_socketio_server.py")]
            pattern, group = SOCKETIO_LISTENING, 1
        self.process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            cwd=str(cwd), preexec_fn=_raise_nofile,
        )  # fmt: skip
        assert self.process.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while not (found := pattern.search(buffer)):
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"{self.kind} exited before listening")
                buffer += chunk
        self.port = int(found.group(group))
        self.ps = psutil.Process(self.process.pid)

    async def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        with trio.move_on_after(10):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


# -- the clients ----------------------------------------------------------------------------------


class _Counts:
    def __init__(self) -> None:
        self.measuring = False
        self.sent = 0
        self.received = 0
        self.latency = array("d")
        self.closes = 0
        #: Edits: acks of changes sent while measuring, by status.
        self.statuses: dict[str, int] = {}


class _Client(Connection):
    """One client of either server; ``sink`` clients count without parsing."""

    def __init__(self, counts: _Counts, index: int, room: int, sink: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.counts = counts
        self.index = index
        self.room = room
        self.sink = sink
        self.joined = trio.Event()
        #: Socket.IO: the Engine.IO open packet arrived.
        self.opened = trio.Event()
        #: crealia edits: send time (:func:`now_ms`) and whether it counts, by ref.
        self.pending: dict[int, tuple[float, bool]] = {}
        self.refs = 1
        self.element_seq: int | None = None
        self.inserted = trio.Event()

    def on_close(self, code: int, reason: str) -> None:
        self.counts.closes += 1
        self.joined.set()

    def on_lost(self, why: str) -> None:
        self.counts.closes += 1
        self.joined.set()

    def cursor(self, x: float, y: float, at: float) -> str:
        raise NotImplementedError

    def edit(self, rng: random.Random) -> str:
        raise NotImplementedError

    async def join(self, nursery: trio.Nursery, port: int) -> None:
        raise NotImplementedError


class CrealiaClient(_Client):
    async def join(self, nursery: trio.Nursery, port: int) -> None:
        await self.open("127.0.0.1", port, "/ws")
        nursery.start_soon(self.read)
        now = int(time.time())
        project = f"bench-{self.room}"
        token = jwt.encode({"sub": f"u{self.index}", "name": f"User {self.index}",
                            "project": project, "role": "editor", "iat": now,
                            "exp": now + 3600}, SECRET, algorithm="HS256")  # fmt: skip
        await self.send_json({"type": "hello", "ref": 1,
                              "data": {"token": token, "project_id": project}})  # fmt: skip
        await self.joined.wait()

    def cursor(self, x: float, y: float, at: float) -> str:
        return _dumps({"type": "cursor_update",
                       "data": {"position": {"x": x, "y": y, "time": at}}}).decode()  # fmt: skip

    async def insert_element(self) -> None:
        """Insert this client's own clip (its edits conflict with nobody's) and wait for the ack."""
        self.refs += 1
        self.pending[self.refs] = (now_ms(), False)
        op = {"op": "insert", "element_id": f"clip-{self.index}", "element_type": "clip",
              "props": {"name": f"Clip {self.index}", "start": 0, "duration": 1000}}  # fmt: skip
        data = {"change_id": f"insert-{self.index}", "changes": [op]}
        await self.send_json({"type": "timeline_change", "ref": self.refs, "data": data})
        await self.inserted.wait()

    def edit(self, rng: random.Random) -> str:
        """A move of this client's clip, conditional on the clip's insert (its own writes since
        do not conflict with it); the send time is kept by ref."""
        self.refs += 1
        self.pending[self.refs] = (now_ms(), self.counts.measuring)
        op = {"op": "set", "element_id": f"clip-{self.index}", "prop": "start",
              "value": rng.randrange(600_000), "base": self.element_seq}  # fmt: skip
        data = {"change_id": f"e-{self.index}-{self.refs}", "changes": [op]}
        return _dumps({"type": "timeline_change", "ref": self.refs, "data": data}).decode()

    def on_text(self, payload: bytes) -> None:
        counts = self.counts
        if self.sink and self.joined.is_set() and b'"type":"ack"' not in payload:
            if counts.measuring:
                counts.received += payload.count(b'"kind":"cursor_update"')
            return
        for envelope in envelopes(_loads(payload)):
            kind = envelope.get("type")
            if kind == "ack" and (sent := self.pending.pop(envelope.get("ref"), None)):
                at, counted = sent
                data = envelope["data"]
                if not self.inserted.is_set():
                    self.element_seq = data.get("seq")
                    self.inserted.set()
                elif counted:
                    counts.latency.append(self.rx_ms - at)
                    status = data.get("status", "?")
                    counts.statuses[status] = counts.statuses.get(status, 0) + 1
            elif kind == "error" and envelope.get("ref") in self.pending:
                self.pending.pop(envelope["ref"])
                counts.statuses["error"] = counts.statuses.get("error", 0) + 1
                self.inserted.set()
            elif kind == "collaboration_event":
                data = envelope["data"]
                if data.get("kind") == "cursor_update" and counts.measuring:
                    counts.received += 1
                    counts.latency.append(self.rx_ms - data["payload"]["position"]["time"])
            elif kind in ("welcome", "error") and envelope.get("ref") == 1:
                self.joined.set()


class SocketioClient(_Client):
    async def join(self, nursery: trio.Nursery, port: int) -> None:
        await self.open(
            "127.0.0.1", port, f"/socket.io/?EIO=4&transport=websocket&room=r{self.room}"
        )
        nursery.start_soon(self.read)
        await self.opened.wait()
        await self.send("40")  # connect to the default namespace
        await self.joined.wait()

    def cursor(self, x: float, y: float, at: float) -> str:
        return "42" + _dumps(["cursor", {"x": x, "y": y, "t": at}]).decode()

    def on_text(self, payload: bytes) -> None:
        counts = self.counts
        if payload[:2] == b"42":
            if counts.measuring:
                counts.received += 1
                if not self.sink:
                    counts.latency.append(self.rx_ms - _loads(payload[2:])[1]["t"])
        elif payload[:1] == b"0":
            self.opened.set()
        elif payload[:2] == b"40":
            self.joined.set()


def _cursor_moves(client: _Client, rng: random.Random) -> Callable[[], str]:
    x, y = rng.uniform(0, 1920), rng.uniform(0, 1080)

    def move() -> str:
        nonlocal x, y
        x = min(1920.0, max(0.0, x + rng.uniform(-20, 20)))
        y = min(1080.0, max(0.0, y + rng.uniform(-20, 20)))
        return client.cursor(round(x, 1), round(y, 1), now_ms())

    return move


async def _traffic(client: _Client, hz: float, start: float, end: float, seed: int,
                   edits: bool = False) -> None:  # fmt: skip
    """Send ``hz`` messages a second (cursor moves, or edits) from ``start`` to ``end``, each
    client its own phase; a late sender skips what it missed instead of bursting."""
    rng = random.Random(seed)
    period = 1 / hz
    due = start + rng.random() * period
    message = (lambda: client.edit(rng)) if edits else _cursor_moves(client, rng)
    counts = client.counts
    try:
        while client.alive and due < end:
            await trio.sleep_until(due)
            late = trio.current_time() - due
            due += period * (1 + int(late / period) if late > period else 1)
            counted = counts.measuring  # as the edit's ack will be
            await client.send(message())
            if counted:
                counts.sent += 1
    except NET_ERRORS:
        return


# -- one measurement ------------------------------------------------------------------------------


async def measure(kind: str, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """One workload against one server: delivered, latency, CPU, RSS per connection (for
    edits: acked and ack latency)."""
    if workload.edit_hz and kind != "crealia":
        return {"skipped": "no durable ack to time"}
    with tempfile.TemporaryDirectory(prefix="crealia-compare-") as tmp:
        server = Server(kind, Path(tmp) / "data", args.crealia_tree)
        await server.start()
        assert server.ps is not None
        counts = _Counts()
        client_class: Callable[..., _Client]
        if kind == "crealia":
            client_class = CrealiaClient
        else:
            client_class = lambda *a, **kw: SocketioClient(*a, subprotocol=None, **kw)  # noqa: E731
        per_room = workload.clients // workload.rooms
        clients = [client_class(counts, i, i % workload.rooms, i // workload.rooms >= args.sample)
                   for i in range(workload.clients)]  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                await trio.sleep(0.5)
                rss_before = server.ps.memory_info().rss
                limit = trio.CapacityLimiter(64)

                async def join(client: _Client) -> None:
                    async with limit:
                        with trio.fail_after(30):
                            await client.join(nursery, server.port)

                async with trio.open_nursery() as joining:
                    for client in clients:
                        joining.start_soon(join, client)
                await trio.sleep(2.0)  # idle: let allocations settle before reading RSS
                rss = server.ps.memory_info().rss
                connected = sum(c.joined.is_set() and c.alive for c in clients)
                per_connection = (rss - rss_before) / max(connected, 1) / 1024
                result: dict[str, Any] = {
                    "connected": connected,
                    "rss_per_connection_kib": round(per_connection, 1),
                }
                if workload.edit_hz:
                    async with trio.open_nursery() as inserting:
                        for client in clients:
                            if client.joined.is_set() and client.alive:
                                inserting.start_soon(client.insert_element)  # type: ignore[attr-defined]
                hz = workload.edit_hz or workload.hz
                if hz > 0:
                    start = trio.current_time() + 0.1
                    end = start + args.warmup + args.duration + 0.5
                    for client in clients:
                        nursery.start_soon(_traffic, client, hz, start, end, client.index,
                                           bool(workload.edit_hz))  # fmt: skip
                    await trio.sleep_until(start + args.warmup)
                    me = psutil.Process()
                    me0 = cpu_seconds(me, children=False)  # the server is a child: not it
                    cpu0, t0 = cpu_seconds(server.ps), time.monotonic()
                    counts.measuring = True
                    await trio.sleep(args.duration)
                    counts.measuring = False
                    elapsed = time.monotonic() - t0
                    cpu = (cpu_seconds(server.ps) - cpu0) / elapsed * 100
                    loadgen = (cpu_seconds(me, children=False) - me0) / elapsed * 100
                    if workload.edit_hz:  # delivered: acked, of the edits sent
                        offered, received = counts.sent, len(counts.latency)
                    else:
                        offered, received = counts.sent * (per_room - 1), counts.received
                    result.update({
                        "offered_per_s": round(offered / elapsed),
                        "delivered_per_s": round(received / elapsed),
                        "delivered_percent": round(100 * received / offered, 1)
                        if offered else None,
                        "latency_ms": {k: None if v is None else round(v, 2)
                                       for k, v in percentiles(counts.latency).items()},
                        "server_cpu_percent": round(cpu, 1),
                        "loadgen_cpu_percent": round(loadgen, 1),
                    })  # fmt: skip
                    if workload.edit_hz:
                        await trio.sleep_until(end)
                        with trio.move_on_after(10):  # the last acks
                            while any(c.pending for c in clients if c.alive):
                                await trio.sleep(0.05)
                        result["ack_statuses"] = counts.statuses
                    await trio.sleep_until(end)
                result["closes"] = counts.closes
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for client in clients:
                    await client.aclose()
                await server.stop()
        return result


# -- the report -----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(rows: list[dict[str, Any]]) -> str:
    """The rows as a table; for an edits workload, delivered is acked and latency the ack's."""
    lines = [
        f"{'workload':<28}{'server':<10}{'delivered':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU %':>8}{'KiB/conn':>10}",
    ]
    for row in rows:
        for kind in ("crealia", "socketio"):
            r = row[kind]
            if "skipped" in r:
                lines.append(f"{'':<28}{kind:<10}  skipped: {r['skipped']}")
                continue
            lat = r.get("latency_ms", {})
            delivered = r.get("delivered_percent")
            lines.append(
                f"{row['workload'] if kind == 'crealia' else '':<28}{kind:<10}"
                f"{'-' if delivered is None else f'{delivered:.1f} %':>11}"
                f"{lat.get('p50') if lat.get('p50') is not None else '-':>9}"
                f"{lat.get('p99') if lat.get('p99') is not None else '-':>9}"
                f"{r.get('server_cpu_percent', '-'):>8}{r['rss_per_connection_kib']:>10}"
            )
        c, s = row["crealia"], row["socketio"]
        if "skipped" in s:
            continue
        cl, sl = c.get("latency_ms", {}), s.get("latency_ms", {})
        lines.append(
            f"{'':<28}{'ratio':<10}{'':>11}{_ratio(cl.get('p50'), sl.get('p50')):>9}"
            f"{_ratio(cl.get('p99'), sl.get('p99')):>9}"
            f"{_ratio(c.get('server_cpu_percent'), s.get('server_cpu_percent')):>8}"
            f"{_ratio(c['rss_per_connection_kib'], s['rss_per_connection_kib']):>10}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    _raise_nofile()
    rows = []
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        row: dict[str, Any] = {"workload": workload.label, "name": name}
        for kind in ("crealia", "socketio"):
            row[kind] = await measure(kind, workload, args)
            if not args.json:
                print(f"[compare] {name} {kind}: {row[kind]}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--sample", type=int, default=10,
        help="clients per room that parse and time what they get (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--crealia-tree", type=Path, default=None,
        help="run crealia from this checkout (e.g. a git worktree of an earlier commit)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    unknown = set(arguments.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    measured = trio.run(main, arguments)
    if arguments.json:
        print(orjson.dumps(measured).decode())
    else:
        print(report(measured))
