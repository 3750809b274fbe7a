"""The server as a real process: SIGKILL loses no acknowledged change; SIGTERM stops cleanly."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio

from crealia import TokenAuthority

from ._process import run_server
from ._wsclient import open_raw_client

SECRET = "process-test-secret-0123456789abcdef"


def token(user: str, project: str = "p1", role: str = "editor") -> str:
    return TokenAuthority(SECRET).issue(user_id=user, project_id=project, role=role)


async def test_sigkill_loses_no_acknowledged_change(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "data"
    acked: dict[str, int] = {}
    total = 400
    async with run_server(data, SECRET) as proc:
        client = await open_raw_client(nursery, proc.ws_url)
        with trio.fail_after(20):
            await client.hello(token("alice"), "p1")
            first = await client.request(
                "timeline_change",
                {
                    "change_id": "seed",
                    "changes": [
                        {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {}}
                    ],
                },
            )
            acked["seed"] = first["data"]["seq"]
            for i in range(total):
                await client.send(
                    "timeline_change",
                    {
                        "change_id": f"c{i}",
                        "changes": [
                            {"op": "set", "element_id": "clip", "prop": f"p{i}", "value": i}
                        ],
                    },
                    ref=i + 10,
                )
            # Kill it while writes are still in flight.
            while len(acked) < total // 3:
                env = await client.next()
                if env["type"] == "ack":
                    acked[env["data"]["change_id"]] = env["data"]["seq"]
            proc.kill()
            try:
                while True:
                    env = await client.next()
                    if env["type"] == "ack":
                        acked[env["data"]["change_id"]] = env["data"]["seq"]
            except Exception:
                pass
            await client.aclose()
    assert len(acked) >= total // 3
    async with run_server(data, SECRET) as proc:
        with trio.fail_after(20):
            client = await open_raw_client(nursery, proc.ws_url)
            welcome = await client.hello(token("bob"), "p1")
            snapshot = welcome["snapshot"]
            versions = snapshot["versions"]["clip"]
            props = snapshot["elements"]["clip"]["props"]
            for change_id, seq in acked.items():
                if change_id == "seed":
                    continue
                i = int(change_id[1:])
                assert props[f"p{i}"] == i, change_id
                assert versions[f"p{i}"] == seq, change_id
            assert snapshot["seq"] >= max(acked.values())
            # The log has no gaps: a resume from 0 replays 1..seq in order.
            again = await open_raw_client(nursery, proc.ws_url)
            w2 = await again.hello(token("carol"), "p1", resume=0)
            assert w2["replayed"] == snapshot["seq"]
            seqs = [(await again.next())["data"]["seq"] for _ in range(w2["replayed"])]
            assert seqs == list(range(1, snapshot["seq"] + 1))
            # Acked change ids stay acked: alice's resend is a duplicate with the first seq.
            some = next(cid for cid in acked if cid != "seed")
            i = int(some[1:])
            resend = await open_raw_client(nursery, proc.ws_url)
            await resend.hello(token("alice"), "p1")
            dup = await resend.request(
                "timeline_change",
                {
                    "change_id": some,
                    "changes": [{"op": "set", "element_id": "clip", "prop": f"p{i}", "value": i}],
                },
            )
            assert dup["data"]["status"] == "duplicate"
            assert dup["data"]["seq"] == acked[some]
            await resend.aclose()
            await client.aclose()
            await again.aclose()


async def test_sigterm_closes_clients_with_1001_and_exits_zero(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with run_server(tmp_path / "data", SECRET) as proc:
        with trio.fail_after(15):
            ws_client = await open_raw_client(nursery, proc.ws_url)
            await ws_client.hello(token("alice"), "p1")
            http_client = await open_raw_client(nursery, f"ws://127.0.0.1:{proc.http_port}/ws")
            await http_client.hello(token("bob"), "p1")
            await ws_client.request("comment_add", {"comment": {"id": "k", "text": "hi"}})
            proc.signal(signal.SIGTERM)
            assert await ws_client.closed() == 1001
            assert await http_client.closed() == 1001
            assert await proc.process.wait() == 0
    async with run_server(tmp_path / "data", SECRET) as proc:
        with trio.fail_after(15):
            client = await open_raw_client(nursery, proc.ws_url)
            welcome = await client.hello(token("carol"), "p1")
            assert welcome["seq"] == 1
            await client.aclose()


async def test_token_command_is_accepted_by_serve(tmp_path: Path, nursery: trio.Nursery) -> None:
    import sys

    data = tmp_path / "data"
    with trio.fail_after(20):
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "crealia",
                "token",
                "--user",
                "u1",
                "--project",
                "p9",
                "--role",
                "viewer",
                "--name",
                "Una",
                "--data-dir",
                str(data),
            ],
            capture_stdout=True,
        )
        minted = result.stdout.decode().strip()
        secret_file = data / "jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        user = TokenAuthority(secret).verify(minted, "p9")
        assert (user.id, user.name, user.role) == ("u1", "Una", "viewer")
    # serve without --jwt-secret uses the same generated secret.
    async with run_server(data, None) as proc:
        with trio.fail_after(15):
            client = await open_raw_client(nursery, proc.ws_url)
            welcome = await client.hello(minted, "p9")
            assert welcome["user"] == {"id": "u1", "name": "Una", "role": "viewer"}
            await client.aclose()


async def test_http_snapshot_health_and_ready(tmp_path: Path, nursery: trio.Nursery) -> None:
    async with run_server(tmp_path / "data", SECRET) as proc:
        with trio.fail_after(15):
            client = await open_raw_client(nursery, proc.ws_url)
            await client.hello(token("alice"), "p1")
            await client.request(
                "timeline_change",
                {
                    "change_id": "c",
                    "changes": [
                        {
                            "op": "insert",
                            "element_id": "e",
                            "element_type": "marker",
                            "props": {"t": 1},
                        }
                    ],
                },
            )
            await client.aclose()
    async with run_server(tmp_path / "data", SECRET) as proc:
        with trio.fail_after(15):
            await trio.to_thread.run_sync(_http_checks, proc.http_url)


def _http_checks(base: str) -> None:
    with httpx.Client(base_url=base, timeout=5) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"
        auth = {"Authorization": f"Bearer {token('vic', role='viewer')}"}
        snap = http.get("/api/projects/p1/snapshot", headers=auth)
        assert snap.status_code == 200
        body = snap.json()
        assert body["seq"] == 1
        assert body["elements"] == {"e": {"type": "marker", "props": {"t": 1}}}
        assert body["versions"] == {"e": {"t": 1}}
        missing = http.get("/api/projects/p1/snapshot")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthorized"
        forged = http.get(
            "/api/projects/p1/snapshot",
            headers={"Authorization": "Bearer " + token("x")[:-4] + "AAAA"},
        )
        assert forged.status_code == 401
        other = http.get("/api/projects/p2/snapshot", headers=auth)
        assert other.status_code == 403
        assert other.json()["error"]["code"] == "forbidden"
        nowhere = http.get("/api/nothing", headers=auth)
        assert nowhere.status_code == 404
        assert nowhere.json()["error"]["code"] == "not_found"


async def test_serve_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    import os
    import sys

    cases = {
        "CREALIA_GC_THRESHOLD": ("lots", "CREALIA_GC_THRESHOLD"),
        "PORT": ("eighty", "PORT='eighty'"),
        "CREALIA_HISTORY_LIMIT": ("10", "history_limit must be at least 1000"),
    }
    for name, (value, expected) in cases.items():
        with trio.fail_after(20):
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "crealia",
                    "serve",
                    "--port",
                    "0",
                    "--ws-port",
                    "0",
                    "--data-dir",
                    str(tmp_path / "d"),
                    "--jwt-secret",
                    SECRET,
                ],
                env={**os.environ, name: value},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr.decode(), (name, result.stderr)
