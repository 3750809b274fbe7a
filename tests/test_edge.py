"""The server's edge under attack: descriptor exhaustion, connection caps, slow requests, Host
checks and the JWT secret's way in. Policy: loopback only (attackers on their own 127.0.0.x
addresses), port 0, a deadline on every I/O test, real servers (in-process or a subprocess)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from crealia import Config, TokenAuthority, open_server
from crealia._errors import ConfigurationError

from ._process import ServerProcess, run_server
from ._wsclient import open_raw_client
from .conftest import make_config, opened, ws_url

SECRET = "edge-test-secret-0123456789abcdef-xyz"


def token(user: str, project: str = "p1", role: str = "editor") -> str:
    return TokenAuthority(SECRET).issue(user_id=user, project_id=project, role=role)


def low_nofile(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


async def connect_from(address: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from the loopback ``address``."""
    sock = trio.socket.socket()
    try:
        await sock.bind((address, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def slow_request(path: str = "/api/collaboration/performance/report") -> bytes:
    """Complete headers announcing a body that never comes."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode()  # fmt: skip


async def read_all(stream: trio.SocketStream) -> bytes:
    """What the server sends until it closes (or resets) the connection."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


@asynccontextmanager
async def draining(proc: ServerProcess) -> AsyncIterator[list[str]]:
    """Collect the server's output while the block runs (so its pipe never fills)."""
    lines: list[str] = []
    assert proc.process.stdout is not None
    stdout = proc.process.stdout

    async def drain() -> None:
        buffer = b""
        while chunk := await stdout.receive_some(65536):
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines.extend(line.decode(errors="replace") for line in done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        yield lines
        nursery.cancel_scope.cancel()


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and " " in line):
            key, _, value = line.rpartition(" ")
            if key == name or key.startswith(name + "{"):
                return float(value)
    return 0.0


async def legit_edit(url: str, nursery: trio.Nursery, user_token: str, change_id: str) -> int:
    """Join p1 with ``user_token``, insert an element; returns the acknowledged seq."""
    client = await open_raw_client(nursery, url)
    insert = {"op": "insert", "element_id": change_id, "element_type": "clip", "props": {}}
    try:
        await client.hello(user_token, "p1")
        ack = await client.request("timeline_change", {"change_id": change_id,
                                                       "changes": [insert]})  # fmt: skip
        assert ack["type"] == "ack", ack
        return int(ack["data"]["seq"])
    finally:
        await client.aclose()


# -- descriptor exhaustion (a subprocess with a low RLIMIT_NOFILE) ----------------------------


async def test_edge_descriptor_exhaustion_does_not_end_the_server(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # Caps off and a long body deadline: the attack really takes every descriptor.
    env = {"CREALIA_MAX_CONNECTIONS": str(1 << 20), "CREALIA_MAX_CONNECTIONS_PER_ADDRESS": "0",
           "CREALIA_HTTP_BODY_TIMEOUT": "3600", "CREALIA_METRICS_INTERVAL": "0.2",
           "CREALIA_HEALTH_INTERVAL": "0.2"}  # fmt: skip
    async with run_server(tmp_path / "d", SECRET, env=env, preexec_fn=low_nofile(256)) as proc, \
            draining(proc) as output:  # fmt: skip
        attackers: list[trio.SocketStream] = []
        with trio.fail_after(60):
            first = await legit_edit(proc.ws_url, nursery, token("before"), "c0")
            for i in range(320):  # more than the 256 descriptors the server may have
                stream = await connect_from(f"127.0.0.{2 + i % 4}", proc.http_port)
                await stream.send_all(slow_request())
                attackers.append(stream)
            # The sampler and the health check run out of descriptors: logged, not fatal.
            while not any("sample failed" in line for line in output):
                assert proc.process.poll() is None, output
                await trio.sleep(0.05)  # polling the server's log, bounded above
            assert proc.process.poll() is None, output
            for stream in attackers:
                await stream.aclose()
            async with httpx.AsyncClient(base_url=proc.http_url, timeout=5) as http:
                while True:
                    try:
                        health = await http.get("/healthz")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.05)  # waiting for descriptors to be freed, bounded
                second = await legit_edit(proc.ws_url, nursery, token("after"), "c1")
                exposition = (await http.get("/metrics")).text
        assert proc.process.poll() is None, output
    assert health.status_code == 200
    assert second > first
    assert metric(exposition, 'crealia_background_failures_total{job="sample"}') >= 1
    accept_errors = metric(exposition, "crealia_accept_errors_total")
    assert accept_errors >= 1
    # Backing off (10 ms doubling to 1 s), not spinning: a spinning loop makes thousands.
    assert accept_errors < 200, accept_errors
    assert any("backing off" in line for line in output)


async def test_edge_caps_refuse_an_attack_while_another_address_is_served(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # The default global cap (3/4 of 256 = 192) and 40 per address: four attacking addresses
    # hold 160 with headers they never finish, the rest of their connections are answered 503;
    # 127.0.0.9 still gets in.
    env = {"CREALIA_MAX_CONNECTIONS_PER_ADDRESS": "40"}
    async with run_server(tmp_path / "d", SECRET, env=env, preexec_fn=low_nofile(256)) as proc, \
            draining(proc) as output:  # fmt: skip
        held: list[trio.SocketStream] = []
        refused: list[bytes] = []
        with trio.fail_after(60):
            for i in range(4 * 60):
                port = proc.http_port if i % 2 else proc.ws_port
                stream = await connect_from(f"127.0.0.{2 + i % 4}", port)
                await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end
                held.append(stream)

            async def answer(stream: trio.SocketStream) -> None:
                with trio.move_on_after(2):  # the held ones never answer: a bounded look
                    data = await read_all(stream)
                    refused.append(data)

            async with trio.open_nursery() as readers:
                for stream in held:
                    readers.start_soon(answer, stream)
                # During the attack, another address is served on both ports.
                async with httpx.AsyncClient(
                    base_url=proc.http_url, timeout=5,
                    transport=httpx.AsyncHTTPTransport(local_address="127.0.0.9"),
                ) as http:  # fmt: skip
                    health = await http.get("/healthz")
                    seq = await legit_edit(proc.ws_url, nursery, token("calm"), "c0")
                    exposition = (await http.get("/metrics")).text
            for stream in held:
                await stream.aclose()
        assert proc.process.poll() is None, output
    assert health.status_code == 200
    assert seq >= 1
    assert len(refused) == 4 * 60 - 4 * 40
    assert all(r.startswith(b"HTTP/1.1 503 ") for r in refused), refused[:3]
    assert all(b"too many connections from your address (at most 40)" in r for r in refused)
    assert metric(exposition, 'crealia_connections_refused_total{reason="address"}') == 80
    assert metric(exposition, "crealia_open_connections") >= 4 * 40


# -- caps, in process ---------------------------------------------------------------------------


async def test_edge_global_cap_answers_503_and_frees_slots(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", max_connections=6, max_connections_per_address=0)
    async with open_server(config) as server:
        with trio.fail_after(20):
            held = [await connect_from("127.0.0.1", port)
                    for port in (server.http_port, server.ws_port) * 3]  # fmt: skip
            while server.hub.gate.open < 6:
                await trio.sleep(0.01)  # the accept loop counts them in; bounded above
            extra = await connect_from("127.0.0.1", server.ws_port)
            await extra.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(extra)
            await extra.aclose()
            for stream in held:
                await stream.aclose()
            while server.hub.gate.open:
                await trio.sleep(0.01)  # the server notices the closes; bounded above
            later = server.issue_token("later", "p1")
            seq = await legit_edit(ws_url(server, "ws"), nursery, later, "c0")
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert answer.endswith(b"server busy: too many open connections, try again later\n")
    assert server.hub.gate.refused["global"] == 1
    assert seq >= 1


async def test_edge_one_address_gets_at_most_a_quarter_of_the_global_cap(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """With the default per-address cap (256) above a quarter of a global cap of 40, one
    attacking address holds 10 connections, not all 40: the others are still served."""
    config = make_config(tmp_path / "d", max_connections=40)
    async with open_server(config) as server:
        assert server.hub.gate.max_per_address == 10
        with trio.fail_after(20):
            held = [await connect_from("127.0.0.2", server.http_port) for _ in range(10)]
            for stream in held:
                await stream.send_all(b"POST /api/x HTTP/1.1\r\nHost: x\r\n")  # never ends
            while server.hub.gate.by_address.get("127.0.0.2") != 10:
                await trio.sleep(0.01)  # the accept loop counts them in; bounded above
            extra = await connect_from("127.0.0.2", server.http_port)
            await extra.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(extra)
            await extra.aclose()
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                healthy = await http.get("/healthz")
            seq = await legit_edit(ws_url(server, "ws"), nursery, server.issue_token("u", "p1"),
                                   "c0")  # fmt: skip
            for stream in held:
                await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert answer.endswith(b"too many connections from your address (at most 10)\n")
    assert healthy.status_code == 200
    assert seq >= 1


def test_edge_address_cap_is_a_quarter_of_the_global_cap_at_most() -> None:
    from crealia._edge import address_cap

    assert address_cap(256, 192) == 48
    assert address_cap(20, 192) == 20
    assert address_cap(0, 192) == 0  # the operator's "no cap" (behind a proxy) stands
    assert address_cap(256, 0) == 256
    assert address_cap(256, 2) == 1


async def test_edge_sessions_per_user_are_capped_with_1013(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    config = make_config(tmp_path / "d", max_sessions_per_user=2)
    async with open_server(config) as server, opened(server, nursery) as clients:
        clients.url = ws_url(server, endpoint)
        with trio.fail_after(20):
            first = await clients.join("ann")
            await clients.join("ann", project="p2")  # across projects: the same user
            third = await clients.raw()
            await third.send("hello", {"token": clients.token("ann"), "project_id": "p1"}, ref=7)
            reply = await third.next()
            code = await third.closed()
            other = await clients.join("bob")  # another user is not affected
            await first.aclose()
            while server.hub.gate.by_user.get("ann") != 1:
                await trio.sleep(0.01)  # the server notices the close; bounded above
            again = await clients.join("ann")
    assert (reply["type"], reply["ref"], reply["data"]["code"]) == ("error", 7, "overloaded")
    assert "too many sessions for this user (at most 2)" in reply["data"]["message"]
    assert code == 1013
    assert other.welcome and again.welcome
    assert server.hub.gate.refused["user"] == 1


# -- HTTP read deadlines ------------------------------------------------------------------------


async def test_edge_http_slow_headers_and_missing_bodies_are_cut(tmp_path: Path) -> None:
    config = make_config(tmp_path / "d", http_header_timeout=1.0, http_body_timeout=1.0)
    async with open_server(config) as server:
        port = server.http_port
        token = server.issue_token("o", "p1", "owner")
        with trio.fail_after(20):
            # Headers a byte at a time: cut within the header deadline.
            loris = await connect_from("127.0.0.1", port)
            start = trio.current_time()
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                    await loris.send_all(bytes([byte]))
                    await trio.sleep(0.1)  # the attack's pace
            except trio.BrokenResourceError:
                pass
            loris_cut = trio.current_time() - start
            await loris.aclose()
            # An authorized request whose body never comes: cut at the body deadline.
            waiting = await connect_from("127.0.0.1", port)
            await waiting.send_all(slow_request().replace(
                b"Host:", f"Authorization: Bearer {token}\r\nHost:".encode()))  # fmt: skip
            start = trio.current_time()
            waited = await read_all(waiting)
            body_cut = trio.current_time() - start
            await waiting.aclose()
            # Refused before its body was read (401): closed a second later, not held.
            early = await connect_from("127.0.0.1", port)
            await early.send_all(slow_request())
            start = trio.current_time()
            answer = await read_all(early)
            early_cut = trio.current_time() - start
            await early.aclose()
            # A request that is complete keeps its connection while its response streams.
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                posted = await http.post("/api/collaboration/performance/report",
                                         json={"startDate": 0, "endDate": 1},
                                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert loris_cut < 6  # hypercorn's keep-alive timer (min(5, header deadline)) or ours
    assert 0.9 <= body_cut < 3
    assert waited == b"" or waited.startswith(b"HTTP/1.1 408 ")  # Quart may answer first
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert early_cut < 3
    assert posted.status_code == 200
    assert server.hub.gate.read_timeouts >= 1


async def test_edge_websocket_outlives_the_http_deadlines(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", http_header_timeout=0.5, http_body_timeout=0.5)
    async with open_server(config) as server, opened(server, nursery) as clients:
        clients.url = ws_url(server, "http")
        with trio.fail_after(20):
            client = await clients.join("ann")
            await trio.sleep(1.5)  # three header deadlines pass; the socket must stay open
            pong = await client.request("ping", {})
    assert pong["type"] == "pong"


HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: rebound.example\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip


# -- allowed hosts ------------------------------------------------------------------------------


async def test_edge_allowed_hosts_refuse_other_hosts_with_421(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", allowed_hosts=".crealia.test, 127.0.0.1")
    async with open_server(config) as server:
        with trio.fail_after(20):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                good = await http.get("/healthz")  # Host: 127.0.0.1:<port>
                sub = await http.get("/healthz", headers={"Host": "app.crealia.test:8080"})
                evil = await http.get("/healthz", headers={"Host": "evil.example"})
                lookalike = await http.get("/healthz", headers={"Host": "evilcrealia.test"})
            refused: list[bytes] = []
            for port in (server.http_port, server.ws_port):
                stream = await connect_from("127.0.0.1", port)
                await stream.send_all(HANDSHAKE)
                refused.append(await read_all(stream))
                await stream.aclose()
            ann = server.issue_token("ann", "p1")
            seq = await legit_edit(ws_url(server, "ws"), nursery, ann, "c0")
    assert (good.status_code, sub.status_code) == (200, 200)
    assert (evil.status_code, lookalike.status_code) == (421, 421)
    assert evil.text == "host not allowed: evil.example\n"
    assert all(r.startswith(b"HTTP/1.1 421 ") for r in refused), refused
    assert all(r.endswith(b"host not allowed: rebound.example\n") for r in refused), refused
    assert seq >= 1
    assert server.hub.gate.refused["host"] == 4


def test_edge_allowed_hosts_setting_is_checked() -> None:
    assert Config.from_env({"CREALIA_ALLOWED_HOSTS": "A.example, .b.example"}).allowed_hosts == (
        "a.example", ".b.example")  # fmt: skip
    for bad in ("http://a.example", "a.example:80", "a/b", "a b"):
        with pytest.raises(ConfigurationError, match=r"allowed_hosts: .* is not a host name"):
            Config(allowed_hosts=bad)
    for field, value in (("max_connections", -1), ("max_sessions_per_user", 1 << 17),
                         ("http_body_timeout", 0), ("http_header_timeout", 1e9)):  # fmt: skip
        with pytest.raises(ConfigurationError, match=field):
            Config(**{field: value})  # type: ignore[arg-type]


# -- the JWT secret's way in --------------------------------------------------------------------


async def test_edge_jwt_secret_flag_warns_and_the_file_is_the_way(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    with trio.fail_after(60):
        async with run_server(tmp_path / "a", None, "--jwt-secret", SECRET) as proc:
            flagged = proc.output[0]
            await legit_edit(proc.ws_url, nursery, token("ann"), "c0")
        async with run_server(tmp_path / "b", None, "--jwt-secret-file", str(secret_file)) as proc:
            quiet = proc.output[0]
            await legit_edit(proc.ws_url, nursery, token("ann"), "c0")
        env = {"CREALIA_JWT_SECRET_FILE": str(secret_file)}
        async with run_server(tmp_path / "c", None, env=env) as proc:
            await legit_edit(proc.ws_url, nursery, token("ann"), "c0")
    assert "--jwt-secret puts the secret on the command line" in flagged
    assert SECRET not in flagged
    assert "warning" not in quiet.lower()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    failed = subprocess.run(
        [sys.executable, "-m", "crealia", "serve", "--jwt-secret-file", str(empty)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert failed.returncode == 2
    assert "is empty" in failed.stderr
    assert json.dumps(SECRET) not in failed.stderr


async def test_edge_early_response_says_connection_close(tmp_path: Path) -> None:
    # A response sent before its request's body was read ends the connection (the body is not
    # skipped): it must say so, or a keep-alive client sends its next request into a
    # connection that will not answer it (schemathesis found this: the request after a 401
    # got nothing and the connection was dropped a second later).
    async with open_server(make_config(tmp_path / "d")) as server:
        token = server.issue_token("o", "p1", "owner")
        with trio.fail_after(10):
            early = await connect_from("127.0.0.1", server.http_port)
            await early.send_all(slow_request())  # no token: 401 before the body is read
            answer = await read_all(early)
            await early.aclose()
            # A request whose body was read keeps its connection for the next one.
            kept = await connect_from("127.0.0.1", server.http_port)
            body = b'{"startDate": 0, "endDate": 1}'
            head_lines = [
                "POST /api/collaboration/performance/report HTTP/1.1",
                "Host: 127.0.0.1",
                "Content-Type: application/json",
                f"Authorization: Bearer {token}",
                f"Content-Length: {len(body)}",
            ]
            await kept.send_all("\r\n".join(head_lines).encode() + b"\r\n\r\n" + body)
            first = b""
            while b"\r\n\r\n" not in first:
                first += await kept.receive_some(65536)
            await kept.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            second = b""
            while b"HTTP/1.1 200" not in second:
                second += await kept.receive_some(65536)
            await kept.aclose()
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 401 ")
    assert b"\r\nconnection: close" in head
    assert b"connection: close" not in first.split(b"\r\n\r\n", 1)[0].lower()
