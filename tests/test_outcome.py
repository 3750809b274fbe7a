"""Issue 10, item 10: in a cluster, ``overloaded`` says whether the write may have landed.

A real redis-server is paused (SIGSTOP) while a write is in flight: the command sits in its
socket and runs once Redis goes on, so the client must be told "outcome unknown: resend with the
same change_id", and the resend must be acked ``duplicate`` (or ``applied``), never lost. A write
refused before anything reached Redis says ``not_applied``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio

from crealia import open_server

from ._redis import run_redis
from .conftest import make_config, opened
from .test_protocol import insert, set_op


async def test_redis_paused_mid_write_says_outcome_unknown_and_resend_is_not_lost(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with (
        run_redis(tmp_path / "redis") as redis_server,
        open_server(make_config(tmp_path / "n0", redis_url=redis_server.url)) as node,
        open_server(make_config(tmp_path / "n1", redis_url=redis_server.url)) as other,
        opened(node, nursery) as clients,
    ):
        assert redis_server.process is not None
        pid = redis_server.process.pid
        with trio.fail_after(60):
            a = await clients.join("alice")
            first = await a.request("timeline_change", insert("c1", "clip", start=0))
            assert first["data"]["seq"] == 1
            os.kill(pid, signal.SIGSTOP)
            try:
                reply = await a.request("timeline_change", set_op("c2", "clip", "start", 5, None))
                assert reply["type"] == "error", reply
                assert reply["data"]["code"] == "overloaded"
                assert reply["data"]["outcome"] == "unknown", reply
                # Another node has never loaded the project: its write fails on the load, before
                # anything is sent, and says so.
                token = other.issue_token("owner", "p1", "owner")
                async with httpx.AsyncClient(timeout=30) as http:
                    refused = await http.post(
                        f"{other.http_url}/api/collaboration/conflicts/nope/resolve",
                        headers={"Authorization": f"Bearer {token}"},
                        json={"choice": "current", "projectId": "p1"},
                    )
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["outcome"] == "not_applied"
            finally:
                os.kill(pid, signal.SIGCONT)
            # The resend with the same change_id: applied exactly once, whichever way it went.
            resend = await a.request("timeline_change", set_op("c2", "clip", "start", 5, None))
            assert resend["type"] == "ack", resend
            assert resend["data"]["status"] in ("duplicate", "applied")
            assert resend["data"]["seq"] == 2
            again = await a.request("timeline_change", set_op("c3", "clip", "start", 6, None))
            assert again["data"]["seq"] == 3
            b = await clients.raw()
            welcome = await b.hello(node.issue_token("bob", "p1", "viewer"), "p1", resume=0)
            seqs = [(await b.event("timeline_change"))["data"]["seq"] for _ in range(3)]
            assert welcome["replayed"] == 3 and seqs == [1, 2, 3]


async def test_python_client_resends_a_change_of_unknown_outcome(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from crealia import open_session

    async with (
        run_redis(tmp_path / "redis") as redis_server,
        open_server(make_config(tmp_path / "n0", redis_url=redis_server.url)) as node,
    ):
        assert redis_server.process is not None
        pid = redis_server.process.pid
        url = f"ws://127.0.0.1:{node.ws_port}/ws"
        with trio.fail_after(60):
            async with open_session(url, node.issue_token("alice", "p1"), "p1") as session:
                await session.change(insert("c1", "clip", start=0)["changes"])  # type: ignore[arg-type]
                acks: list[dict[str, object]] = []

                async def write() -> None:
                    acks.append(
                        await session.change(
                            set_op("c2", "clip", "start", 5, None)["changes"],  # type: ignore[arg-type]
                            change_id="c2",
                        )
                    )

                os.kill(pid, signal.SIGSTOP)
                try:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(write)
                        # Long enough for the first attempt to time out (socket timeout 2 s).
                        await trio.sleep(3)  # a fault window, not synchronization
                        os.kill(pid, signal.SIGCONT)
                finally:
                    os.kill(pid, signal.SIGCONT)
                (ack,) = acks
                assert ack["status"] in ("duplicate", "applied") and ack["seq"] == 2
