"""Audit-log growth under a refused-token flood from one client (issue 10, item 5).

Starts a server in this process (loopback, port 0, a temporary data dir), then for
``--duration`` seconds one client sends, as fast as it can with ``--rest`` and ``--ws`` workers:
REST ``GET /api/projects/<15 KB id>/snapshot`` with a forged bearer token, and WebSocket
``hello`` with a bad token naming a random project. Reports what reached the audit table
(rows, bytes of row data, per second) and how ``ops.sqlite3`` grew.

    .venv/bin/python benchmarks/audit_flood.py --duration 10
    .venv/bin/python benchmarks/audit_flood.py --duration 10 --json
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import trio
import trio_websocket

from crealia import Config, open_server


def stored(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as conn:
        rows, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) "
                                  "FROM audit_events").fetchone()  # fmt: skip
    return int(rows), int(size)


def disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def main(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(port=0, ws_port=0, data_dir=Path(tmp), jwt_secret="s" * 40)
        async with open_server(config) as server:
            ops = Path(server.ops.path)
            sent = {"rest": 0, "ws": 0, "rest_429": 0, "ws_4429": 0}
            long_id = "x" * 15_000

            async def rest() -> None:
                async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                    while True:
                        response = await http.get(
                            f"/api/projects/{long_id}/snapshot",
                            headers={"Authorization": "Bearer x.y.z"},
                        )
                        sent["rest"] += 1
                        sent["rest_429"] += response.status_code == 429

            async def ws() -> None:
                url = f"ws://127.0.0.1:{server.ws_port}/ws"
                while True:
                    try:
                        async with trio_websocket.open_websocket_url(url) as conn:
                            hello = {
                                "type": "hello",
                                "ref": 1,
                                "data": {"token": "bad", "project_id": uuid.uuid4().hex},
                            }
                            await conn.send_message(json.dumps(hello))
                            reply = json.loads(await conn.get_message())
                            sent["ws"] += 1
                            sent["ws_4429"] += reply.get("data", {}).get("code") == "rate_limited"
                            await conn.get_message()
                    except trio_websocket.ConnectionClosed:
                        pass
                    except (trio_websocket.HandshakeError, OSError):
                        await trio.sleep(0.01)

            await server.hub.audit.flush()
            rows0, bytes0 = stored(ops)
            disk0 = disk(ops)
            async with trio.open_nursery() as nursery:
                for _ in range(args.rest):
                    nursery.start_soon(rest)
                for _ in range(args.ws):
                    nursery.start_soon(ws)
                await trio.sleep(args.duration)
                nursery.cancel_scope.cancel()
            await server.hub.audit.flush()
            rows1, bytes1 = stored(ops)
            disk1 = disk(ops)
    d = args.duration
    return {
        "duration_s": d,
        "rest_requests": sent["rest"], "rest_429": sent["rest_429"],
        "ws_hellos": sent["ws"], "ws_rate_limited": sent["ws_4429"],
        "audit_rows_per_s": round((rows1 - rows0) / d, 1),
        "audit_data_bytes_per_s": round((bytes1 - bytes0) / d),
        "ops_db_growth_bytes_per_s": round((disk1 - disk0) / d),
    }  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rest", type=int, default=4, help="concurrent REST workers")
    parser.add_argument("--ws", type=int, default=4, help="concurrent WebSocket workers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = trio.run(main, args)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
