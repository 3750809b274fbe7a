"""/readyz in a cluster says whether a write can commit: Redis out of memory (a real
redis-server under ``noeviction`` with a tiny ``maxmemory``) or restored from an older copy
(a real restart from an earlier AOF) is 503 naming the ``redis`` check, and 200 once fixed.

(The embedded store's side, a database file that cannot grow, is in test_wal.py.)
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from crealia import open_server

from ._redis import RedisServer, run_redis
from .conftest import make_config, opened
from .test_protocol import insert, set_op


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


async def _ready(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/readyz")
    return response.status_code, response.json()


async def _until_ready(http: httpx.AsyncClient) -> None:
    while (await _ready(http))[0] != 200:
        await trio.sleep(0.1)  # polling a recovering server, bounded by the test's fail_after


def _config_set(url: str, **values: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for name, value in values.items():
            client.config_set(name.replace("_", "-"), value)
    finally:
        client.close()


async def test_readyz_fails_while_redis_is_out_of_memory(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "node", redis_url=redis_server.url)
    with trio.fail_after(30):
        async with (
            open_server(config) as server,
            opened(server, nursery) as clients,
            httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
        ):
            alice = await clients.join("alice")
            first = await alice.request("timeline_change", insert("i", "clip"))
            assert (await _ready(http))[0] == 200
            await trio.to_thread.run_sync(
                lambda: _config_set(redis_server.url, maxmemory_policy="noeviction", maxmemory="1")
            )
            try:
                status, body = await _ready(http)
                assert status == 503, body
                assert "redis cannot take writes" in body["checks"]["redis"], body
                assert "maxmemory" in body["checks"]["redis"], body
                refused = await alice.request("timeline_change", set_op("c", "clip", "t", 1, None))
                assert refused["data"]["code"] == "overloaded", refused
            finally:
                await trio.to_thread.run_sync(lambda: _config_set(redis_server.url, maxmemory="0"))
            await _until_ready(http)
            again = await alice.request("timeline_change", set_op("c", "clip", "t", 1, None))
            assert again["data"]["seq"] == first["data"]["seq"] + 1, again


async def test_readyz_fails_while_redis_is_behind_after_a_restore(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "node", redis_url=redis_server.url)
    aof = redis_server.directory / "appendonlydir"
    backup = tmp_path / "aof-backup"
    with trio.fail_after(40):
        async with (
            open_server(config) as server,
            httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
        ):
            async with opened(server, nursery) as clients:
                alice = await clients.join("alice")
                await alice.request("timeline_change", insert("i", "clip"))
                for i in range(3):
                    await alice.request("timeline_change", set_op(f"a{i}", "clip", "t", i, None))
                # Acked writes are fsynced (appendfsync always): this copy holds seq 1..4.
                await trio.to_thread.run_sync(lambda: shutil.copytree(aof, backup))
                for i in range(3):
                    await alice.request("timeline_change", set_op(f"b{i}", "clip", "t", i, None))
                await redis_server.kill()
                await trio.to_thread.run_sync(lambda: shutil.rmtree(aof))
                await trio.to_thread.run_sync(lambda: shutil.copytree(backup, aof))
                await redis_server.start()  # the same port: the node reconnects by itself
                status, body = await _ready(http)
                while "lost acknowledged writes" not in body["checks"].get("redis", ""):
                    await trio.sleep(0.1)  # the node reconnecting, bounded by fail_after
                    status, body = await _ready(http)
                assert status == 503, body
                assert (
                    "alice" not in body["checks"]["redis"] and "p1" not in body["checks"]["redis"]
                )
                refused = await alice.request("timeline_change", set_op("c", "clip", "t", 9, None))
                assert refused["data"]["code"] == "overloaded", refused
                assert "behind" in refused["data"]["message"]
            # Once the project's room closed, its copy here is dropped: ready again, and a
            # new member sees what Redis holds.
            await _until_ready(http)
            async with opened(server, nursery) as clients:
                bob = await clients.join("bob")
                assert bob.welcome["seq"] == 4
                reply = await bob.request("timeline_change", set_op("d", "clip", "t", 5, None))
                assert reply["data"]["seq"] == 5, reply
