"""What a relay live session costs the server, per viewer, by frame size.

Starts ``crealia serve`` (media on 127.0.0.1), then for each frame size and viewer count: one
host sending synthetic video at ``--fps`` to the server in relay mode, N viewers receiving it,
and the server process's CPU (psutil, user + system, percent of one core) measured over
``--seconds`` once frames flow. Host and viewers run in this process, so the server's CPU is
the relay's (plus the sessions' signalling, negligible). Prints one line per run, and the cost
of one viewer: the run with one viewer (decode once, encode once) and the increase per extra
viewer (one more scale and encode).

    python benchmarks/relay.py [--sizes 640x360,1280x720] [--viewers 1,2,4] [--fps 15]
                               [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import psutil
import trio
import trio_websocket

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from crealia._webrtc import Source, open_peer  # noqa: E402

SECRET = "benchmark-secret-of-at-least-32-bytes!!"
LISTENING = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")
LOOPBACK = ("127.0.0.1",)


class Client:
    """One raw protocol connection: requests with refs, pushes kept in order."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.inbox: list[dict[str, Any]] = []

    async def request(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        ref = next(self.refs)
        await self.ws.send_message(orjson.dumps({"type": kind, "ref": ref, "data": data}).decode())
        return await self.expect(lambda env: env.get("ref") == ref)

    async def expect(self, predicate: Any) -> dict[str, Any]:
        index = 0
        while True:
            while index >= len(self.inbox):
                value = orjson.loads(await self.ws.get_message())
                self.inbox.extend(value if isinstance(value, list) else [value])
            if predicate(self.inbox[index]):
                return self.inbox.pop(index)
            index += 1


async def connect(nursery: trio.Nursery, port: int, token: str, project: str) -> Client:
    ws = await trio_websocket.connect_websocket_url(nursery, f"ws://127.0.0.1:{port}/ws")
    client = Client(ws)
    reply = await client.request("hello", {"token": token, "project_id": project})
    assert reply["type"] == "welcome", reply
    return client


def token(user: str, project: str, role: str) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": user, "name": user, "project": project, "role": role, "iat": now,
              "exp": now + 3600}  # fmt: skip
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def to_server(peer: Any, client: Client, sid: str, **offer: Any) -> None:
    description = await peer.offer(**offer)
    reply = await client.request("webrtc_signal", {"session_id": sid, "to": "server",
                                                   "description": description})  # fmt: skip
    assert reply["type"] == "ack", reply
    answer = await client.expect(lambda e: e.get("type") == "webrtc_signal"
                                 and e["data"].get("from") == "server")  # fmt: skip
    await peer.accept(answer["data"]["description"])


async def run_once(
    nursery: trio.Nursery, port: int, server: psutil.Process, size: tuple[int, int],
    viewers: int, args: argparse.Namespace, run: int,
) -> dict[str, Any]:  # fmt: skip
    project = f"relay-{run}"
    async with AsyncExitStack() as stack:
        host_client = await connect(nursery, port, token("host", project, "editor"), project)
        reply = await host_client.request("live_start", {"kind": "camera", "mode": "relay"})
        assert reply["type"] == "ack", reply
        sid = reply["data"]["session_id"]
        host = await stack.enter_async_context(open_peer(listen_ips=LOOPBACK))
        await to_server(host, host_client, sid,
                        send=Source(width=size[0], height=size[1], fps=args.fps))  # fmt: skip
        peers = []
        for index in range(viewers):
            client = await connect(nursery, port, token(f"v{index}", project, "viewer"), project)
            reply = await client.request("live_join", {"session_id": sid})
            assert reply["type"] == "ack", reply
            peer = await stack.enter_async_context(open_peer(listen_ips=LOOPBACK))
            await to_server(peer, client, sid, receive=True)
            peers.append(peer)
        for peer in peers:
            await peer.frames(args.fps)  # a second of frames: flowing, encoders warm
        counts = [0] * viewers

        async def count(index: int, peer: Any) -> None:
            while True:
                counts[index] += len(await peer.frames(1))

        before, started = server.cpu_times(), time.monotonic()
        async with trio.open_nursery() as counting:
            for index, peer in enumerate(peers):
                counting.start_soon(count, index, peer)
            await trio.sleep(args.seconds)
            counting.cancel_scope.cancel()
        after, elapsed = server.cpu_times(), time.monotonic() - started
        cpu = 100 * ((after.user - before.user) + (after.system - before.system)) / elapsed
        await host_client.request("live_stop", {"session_id": sid})
    return {"size": f"{size[0]}x{size[1]}", "viewers": viewers, "server_cpu_percent":
            round(cpu, 1), "viewer_fps": [round(c / elapsed, 1) for c in counts]}  # fmt: skip


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    counts = [int(v) for v in args.viewers.split(",")]
    with tempfile.TemporaryDirectory() as data:
        # No viewer limit: the budget is what this measures.
        env = dict(os.environ, WEBRTC_LISTEN_IPS="127.0.0.1", PYTHONPATH=str(REPO_ROOT),
                   CREALIA_LIVE_RELAY_CPU_BUDGET="6400")  # fmt: skip
        cmd = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
               "--data-dir", data, "--jwt-secret", SECRET, "--metrics-interval", "0"]  # fmt: skip
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=env,
                                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            assert proc.stdout is not None
            buffer = b""
            with trio.fail_after(30):
                while not (found := LISTENING.search(buffer)):
                    buffer += await proc.stdout.receive_some(4096)
            port = int(found.group(2))
            server = psutil.Process(proc.pid)
            results = []
            async with trio.open_nursery() as nursery:
                for run, (size, viewers) in enumerate(itertools.product(sizes, counts)):
                    result = await run_once(nursery, port, server, size, viewers, args, run)
                    results.append(result)
                    if not args.json:
                        print(f"{result['size']:>9} {viewers} viewer(s): server CPU "
                              f"{result['server_cpu_percent']:5.1f} % of a core, viewers at "
                              f"{result['viewer_fps']} fps", flush=True)  # fmt: skip
                nursery.cancel_scope.cancel()
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    return results


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per size: the one-viewer cost and the increase per extra viewer (least squares)."""
    out: dict[str, dict[str, float]] = {}
    for size in dict.fromkeys(r["size"] for r in results):
        runs = [(r["viewers"], r["server_cpu_percent"]) for r in results if r["size"] == size]
        one = next((cpu for n, cpu in runs if n == 1), runs[0][1])
        if len(runs) > 1:
            mean_n = sum(n for n, _ in runs) / len(runs)
            mean_c = sum(c for _, c in runs) / len(runs)
            slope = sum((n - mean_n) * (c - mean_c) for n, c in runs) / sum(
                (n - mean_n) ** 2 for n, _ in runs
            )
        else:
            slope = one
        out[size] = {"one_viewer_cpu": round(one, 1), "per_extra_viewer_cpu": round(slope, 1)}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="640x360,1280x720")
    parser.add_argument("--viewers", default="1,2,4")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    measured = trio.run(main, arguments)
    costs = summary(measured)
    if arguments.json:
        print(json.dumps({"runs": measured, "cost": costs}))
    else:
        for size, cost in costs.items():
            print(f"{size}: one viewer {cost['one_viewer_cpu']} %, each more viewer "
                  f"{cost['per_extra_viewer_cpu']} % of a core")  # fmt: skip
