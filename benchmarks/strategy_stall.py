#!/usr/bin/env python3
"""Does one project's worst-case merge stall another project? (issue 10, item 8)

Starts ``python -m crealia serve`` (loopback, port 0, a temporary data directory), then:

* project ``victim``: one client sends ``ping`` every ``--ping-ms`` and records each round trip;
* project ``attacker``: its owner sets the chain to ``merge`` with the largest options the server
  accepts (``--steps``/``--chars``; the old code accepted 10**12, the new one refuses anything
  over its documented maximum and the script then retries with that maximum), and two editors
  raise ``--conflicts`` text conflicts on ~``--kb`` KB texts whose tokens share nothing (the
  worst case of the Myers diff: D = N + M).

It reports the victim's ping round trips (p50/p99/max, ms) before the conflicts (idle) and while
the merges run, and how long each conflict took to be settled. Example::

    python benchmarks/strategy_stall.py --kb 15 --conflicts 3
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import trio
import trio_websocket

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING_RE = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")


def token(secret: str, uid: str, project: str, role: str) -> str:
    now = int(time.time())
    claims = {"sub": uid, "name": uid, "project": project, "role": role, "iat": now,
              "exp": now + 3600}  # fmt: skip
    return jwt.encode(claims, secret, algorithm="HS256")


class Client:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.ref = 0

    async def send(self, kind: str, data: Any) -> int:
        self.ref += 1
        await self.ws.send_message(
            orjson.dumps({"type": kind, "ref": self.ref, "data": data}).decode()
        )
        return self.ref

    async def until(self, pred: Any) -> dict[str, Any]:
        while True:
            message = await self.ws.get_message()
            envelopes = orjson.loads(message)
            for env in envelopes if isinstance(envelopes, list) else [envelopes]:
                if pred(env):
                    return dict(env)

    async def request(self, kind: str, data: Any) -> dict[str, Any]:
        ref = await self.send(kind, data)
        return await self.until(lambda env: env.get("ref") == ref)


async def join(nursery: trio.Nursery, ws_url: str, tok: str, project: str) -> Client:
    ws = await trio_websocket.connect_websocket_url(
        nursery, ws_url, subprotocols=["crealia.v1"], max_message_size=64 * 1024 * 1024
    )
    client = Client(ws)
    reply = await client.request("hello", {"token": tok, "project_id": project})
    assert reply["type"] == "welcome", reply
    return client


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"n={len(values)} p50={percentile(values, 50):.1f} p99={percentile(values, 99):.1f} "
            f"max={max(values):.1f} ms")  # fmt: skip


def texts(kb: int) -> tuple[str, str, str]:
    words = kb * 1024 // 6
    return tuple(" ".join(f"{tag}{i:04d}" for i in range(words)) for tag in "abc")  # type: ignore[return-value]


async def main(cfg: argparse.Namespace) -> None:
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
               "--data-dir", str(Path(tmp) / "data"), "--jwt-secret", secret]  # fmt: skip
        # The victim pings faster than the default "other" rate limit allows.
        env = dict(os.environ, PYTHONUNBUFFERED="1", CREALIA_RATE_LIMIT_OTHER="off")
        proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT, env=env
        )
        try:
            await run(cfg, proc, secret)
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            proc.kill()


async def set_merge(
    http: httpx.AsyncClient, http_url: str, owner: str, options: dict[str, int]
) -> httpx.Response:
    chain = {"strategies": ["merge", "priority"], "options": {"merge": options}}
    return await http.put(f"{http_url}/api/projects/attacker/strategies",
                          headers={"Authorization": f"Bearer {owner}"}, json=chain)  # fmt: skip


def set_title(change_id: str, eid: str, value: str, base: int | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "set", "element_id": eid, "prop": "title", "value": value}
    if base is not None:
        op["base"] = base
    return {"change_id": change_id, "changes": [op]}


async def run(cfg: argparse.Namespace, proc: trio.Process, secret: str) -> None:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while (found := LISTENING_RE.search(buf)) is None:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                raise SystemExit("the server exited before listening")
            buf += chunk
    http_url = f"http://127.0.0.1:{int(found.group(1))}"
    ws_url = f"ws://127.0.0.1:{int(found.group(2))}/ws"

    owner = token(secret, "olga", "attacker", "owner")
    async with httpx.AsyncClient(timeout=30) as http:
        options = {"max_diff_steps": cfg.steps, "max_text_chars": cfg.chars}
        if cfg.ms:  # the old code has no max_diff_ms and refuses it
            options["max_diff_ms"] = cfg.ms
        put = await set_merge(http, http_url, owner, options)
        if put.status_code != 200:
            print(f"options {options} refused: {put.json()['error']['message']}")
            options = {"max_diff_steps": cfg.max_steps, "max_text_chars": cfg.max_chars,
                       "max_diff_ms": cfg.max_ms}  # fmt: skip
            put = await set_merge(http, http_url, owner, options)
            put.raise_for_status()
        print(f"attacker's merge options: {options}")

    rtts: dict[str, list[float]] = {"idle": [], "merging": []}
    phase = "idle"
    settle_ms: list[float] = []
    with trio.fail_after(cfg.idle + 60 * cfg.conflicts):
        async with trio.open_nursery() as nursery:
            victim = await join(nursery, ws_url, token(secret, "vic", "victim", "editor"), "victim")
            alice = await join(nursery, ws_url, token(secret, "alice", "attacker", "editor"),
                               "attacker")  # fmt: skip
            bob = await join(
                nursery, ws_url, token(secret, "bob", "attacker", "editor"), "attacker"
            )

            async def pinger() -> None:
                while True:
                    t0 = time.perf_counter()
                    await victim.request("ping", {})
                    rtts[phase].append((time.perf_counter() - t0) * 1000)
                    await trio.sleep(cfg.ping_ms / 1000)

            nursery.start_soon(pinger)
            await trio.sleep(cfg.idle)
            base, current, incoming = texts(cfg.kb)
            phase = "merging"
            for n in range(cfg.conflicts):
                eid = f"el{n}"
                await alice.request("timeline_change", {"change_id": f"i{n}", "changes": [
                    {"op": "insert", "element_id": eid, "element_type": "clip",
                     "props": {"title": base}}]})  # fmt: skip
                ack = await alice.request("timeline_change", set_title(f"a{n}", eid, current))
                seq = ack["data"]["seq"]
                t0 = time.perf_counter()
                change = set_title(f"b{n}", eid, incoming, base=seq - 1)
                ack = await bob.request("timeline_change", change)
                assert ack["data"]["status"] == "conflict", ack
                (cid,) = ack["data"]["conflicts"]
                await bob.until(lambda env, cid=cid: env.get("type") == "conflict_resolved"
                                and env["data"]["conflict_id"] == cid)  # fmt: skip
                settle_ms.append((time.perf_counter() - t0) * 1000)
            await trio.sleep(cfg.ping_ms / 1000 * 5)
            nursery.cancel_scope.cancel()
    print(f"victim ping, idle:    {summary(rtts['idle'])}")
    print(f"victim ping, merging: {summary(rtts['merging'])}")
    print(f"conflict settled in:  {', '.join(f'{ms:.0f}' for ms in settle_ms)} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kb", type=int, default=15, help="size of each text, KB")
    p.add_argument("--conflicts", type=int, default=3)
    p.add_argument("--steps", type=int, default=10**12, help="max_diff_steps asked for")
    p.add_argument("--chars", type=int, default=10**12, help="max_text_chars asked for")
    p.add_argument("--max-steps", type=int, default=1_000_000, help="used when --steps is refused")
    p.add_argument("--max-chars", type=int, default=200_000, help="used when --chars is refused")
    p.add_argument("--ms", type=int, default=0, help="max_diff_ms asked for (0: not sent)")
    p.add_argument("--max-ms", type=int, default=1000, help="used when --ms is refused")
    p.add_argument("--ping-ms", type=float, default=10.0)
    p.add_argument("--idle", type=float, default=2.0, help="seconds of pings before the merges")
    trio.run(main, p.parse_args())
