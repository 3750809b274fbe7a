"""The client's address behind a reverse proxy: ``trusted_proxies`` and ``X-Forwarded-For``.

Real servers on 127.0.0.1, whose clients send the header themselves (playing the proxy, as the
TCP peer 127.0.0.1 is trusted or not), on both WebSocket endpoints and over REST; then the
shipped ``deploy/haproxy.cfg`` run by a real HAProxy in front of a server (skipped where HAProxy
is not installed; ``scripts/bootstrap.sh --test`` installs it). Every other loopback address is
a different host to the kernel, so the client connects from 127.0.0.2 and HAProxy from
127.0.0.3. Policy: loopback only, port 0, a deadline on every I/O test, no sleeps.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from crealia import ConfigurationError, Server, open_server
from crealia._config import Config
from crealia._proxies import MAX_HOPS, TrustedProxies

from ._postgres import free_port
from ._wsclient import RawClient
from .conftest import make_config, ws_url

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
INSERT = {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {"title": "a"}}
LOOPBACK = ("127.0.0.1/32",)
#: A REST request that is refused (401) and audited in p1.
AUDITED = "/api/collaboration/audit?projectId=p1"


# -- helpers ------------------------------------------------------------------------------------


def forwarded_headers(lines: Sequence[str]) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", line.encode()) for line in lines]


class Opener:
    """Opens raw clients in the test's nursery, each sending X-Forwarded-For lines of its own;
    closes them all at the end (:func:`opener`)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.opened: list[RawClient] = []

    async def open(
        self, url: str, forwarded: Sequence[str] = (), *, source: str | None = None
    ) -> RawClient:
        """A raw client of ``url`` sending ``forwarded`` as X-Forwarded-For lines, from the
        local address ``source`` when given."""
        headers = forwarded_headers(forwarded)
        if source is None:
            ws = await trio_websocket.connect_websocket_url(
                self.nursery, url, extra_headers=headers
            )
        else:
            host, port, resource = _split(url)
            sock = trio.socket.socket()
            await sock.bind((source, 0))
            await sock.connect((host, port))
            ws = await trio_websocket.wrap_client_stream(
                self.nursery, trio.SocketStream(sock), host, resource, extra_headers=headers
            )
        client = RawClient(ws)
        self.opened.append(client)
        return client

    async def join(
        self, server: Server, url: str, user: str, forwarded: Sequence[str] = ()
    ) -> RawClient:
        client = await self.open(url, forwarded)
        client.welcome = await client.hello(server.issue_token(user, "p1"), "p1")
        return client

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            for client in self.opened:
                await client.aclose()


@pytest.fixture
async def clients(nursery: trio.Nursery) -> AsyncIterator[Opener]:
    opener = Opener(nursery)
    try:
        yield opener
    finally:
        await opener.aclose()


def _split(url: str) -> tuple[str, int, str]:
    match = re.fullmatch(r"ws://([\d.]+):(\d+)(/.*)", url)
    assert match, url
    return match.group(1), int(match.group(2)), match.group(3)


def owner(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.issue_token('olga', 'p1', 'owner')}"}


async def audit_events(server: Server, **params: str) -> list[dict[str, Any]]:
    """The audit log of p1, asked directly (no X-Forwarded-For)."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        response = await http.get("/api/collaboration/audit", params=params, headers=owner(server))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def addresses(events: list[dict[str, Any]], action: str) -> set[str]:
    return {e["ipAddress"] for e in events if e["action"] == action}


async def rest(
    server: Server,
    method: str,
    path: str,
    forwarded: Sequence[str],
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    base_url: str | None = None,
    source: str | None = None,
) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
    lines = [("X-Forwarded-For", line) for line in forwarded]
    async with httpx.AsyncClient(base_url=base_url or server.http_url, timeout=10,
                                 transport=transport) as http:  # fmt: skip
        return await http.request(method, path, json=body,
                                  headers=[*lines, *(headers or {}).items()])  # fmt: skip


# -- the setting --------------------------------------------------------------------------------


def test_trusted_proxies_takes_networks_and_single_addresses() -> None:
    assert Config().trusted_proxies == ()
    config = Config(trusted_proxies="10.0.0.0/8, 192.0.2.7,fd00::/8")  # type: ignore[arg-type]
    assert config.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32", "fd00::/8")
    from_env = Config.from_env({"TRUSTED_PROXIES": "172.31.250.250/32"})
    assert from_env.trusted_proxies == ("172.31.250.250/32",)
    flags = {"trusted_proxies": ("--trusted-proxies", "10.1.0.0/16,::1")}
    assert Config.from_env({}, flags=flags).trusted_proxies == ("10.1.0.0/16", "::1/128")


BAD = [
    ("10.0.0/8", "is not an IP network"),
    ("proxy.example.com", "is not an IP network"),
    ("10.0.0.1/8", "has host bits set (the network is 10.0.0.0/8)"),
    ("0.0.0.0/0", "trusts every address"),
    ("::/0", "trusts every address"),
]


@pytest.mark.parametrize(("entry", "why"), BAD)
def test_trusted_proxies_refuses_a_bad_entry_naming_it(entry: str, why: str) -> None:
    wanted = f"trusted_proxies: {entry!r} {why}"
    for build in (
        lambda: Config(trusted_proxies=("10.0.0.0/8", entry)),
        lambda: Config.from_env({"TRUSTED_PROXIES": f"10.0.0.0/8,{entry}"}),
        lambda: Config.from_env(
            {}, flags={"trusted_proxies": ("--trusted-proxies", f"10.0.0.0/8,{entry}")}
        ),
    ):
        with pytest.raises(ConfigurationError) as caught:
            build()
        message = str(caught.value)
        assert wanted in message and "\n" not in message, message


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_refuses_a_bad_trusted_proxy_in_one_line(tmp_path: Path, how: str) -> None:
    argv = [sys.executable, "-m", "crealia", "serve", "--port", "0", "--ws-port", "0",
            "--data-dir", str(tmp_path / "d")]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if how == "flag":
        argv += ["--trusted-proxies", "10.0.0.0/8,10.0.0/8"]
    else:
        env["TRUSTED_PROXIES"] = "10.0.0.0/8,10.0.0/8"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'10.0.0/8' is not an IP network" in lines[0]
    assert ("--trusted-proxies" if how == "flag" else "TRUSTED_PROXIES=") in lines[0]
    assert not (tmp_path / "d").exists(), "a refused setting changes nothing"


# -- the rules ----------------------------------------------------------------------------------


RULES = [
    # (trusted, peer, header lines, the client's address)
    ((), "127.0.0.1", ["203.0.113.7"], "127.0.0.1"),  # trust no one: the header is ignored
    (LOOPBACK, "192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # an untrusted peer
    (LOOPBACK, "127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    (LOOPBACK, "127.0.0.1", [], "127.0.0.1"),  # the proxy's own request
    (LOOPBACK, "127.0.0.1", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # spoofed, real
    (LOOPBACK, "127.0.0.1", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # two lines
    (LOOPBACK, "127.0.0.1", ["junk, 203.0.113.7"], "203.0.113.7"),  # left of it is not read
    (("127.0.0.1/32", "10.0.0.0/8"), "127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),
    (("127.0.0.1/32", "10.0.0.0/8"), "127.0.0.1", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),
    (LOOPBACK, "127.0.0.1", ["not-an-address"], "127.0.0.1"),  # malformed: the peer
    (LOOPBACK, "127.0.0.1", ["203.0.113.7, unknown"], "127.0.0.1"),
    (LOOPBACK, "127.0.0.1", ["203.0.113.7,"], "127.0.0.1"),  # an empty entry
    (LOOPBACK, "127.0.0.1", ["203.0.113.7:41234"], "203.0.113.7"),
    (LOOPBACK, "127.0.0.1", ["[2001:db8::7]:41234"], "2001:db8::7"),
    (LOOPBACK, "127.0.0.1", ["2001:DB8:0::7"], "2001:db8::7"),
    (LOOPBACK, "127.0.0.1", ["[2001:db8::7"], "127.0.0.1"),
    (LOOPBACK, "::ffff:127.0.0.1", ["::ffff:203.0.113.7"], "203.0.113.7"),  # IPv4-mapped
    (("::1/128",), "::1", ["203.0.113.7"], "203.0.113.7"),
    (LOOPBACK, "127.0.0.1", [", ".join(["127.0.0.1"] * (MAX_HOPS + 1))], "127.0.0.1"),
]


@pytest.mark.parametrize(("trusted", "peer", "lines", "client"), RULES)
def test_client_address_is_the_rightmost_address_not_a_trusted_proxy(
    trusted: tuple[str, ...], peer: str, lines: list[str], client: str
) -> None:
    assert TrustedProxies.from_config(trusted).client_address(peer, lines) == client


def test_a_malformed_header_is_logged_once_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    proxies = TrustedProxies.from_config(LOOPBACK)
    with caplog.at_level(logging.DEBUG, logger="crealia.proxies"):
        for garbage in ("garbage", "also, garbage"):
            assert proxies.client_address("127.0.0.1", [garbage]) == "127.0.0.1"
    records = [r for r in caplog.records if r.name == "crealia.proxies"]
    assert [r.levelno for r in records] == [logging.DEBUG]
    assert "'garbage'" in records[0].getMessage()
    assert proxies.malformed == 2


# -- a real server: both endpoints and REST ------------------------------------------------------


@asynccontextmanager
async def serving(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    async with open_server(make_config(tmp_path / "data", **settings)) as server:
        yield server


async def test_the_forwarded_address_is_audited_on_both_endpoints_and_rest(
    tmp_path: Path, clients: Opener, endpoint: str
) -> None:
    async with serving(tmp_path, trusted_proxies=LOOPBACK) as server:
        with trio.fail_after(30):
            url = ws_url(server, endpoint)
            ana = await clients.join(server, url, "ana", ["203.0.113.7"])
            await ana.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
            intruder = await clients.open(url, ["203.0.113.66"])
            await intruder.send("hello", {"token": "forged", "project_id": "p1"}, ref=1)
            assert await intruder.closed() == 4401
            chain = {"strategies": ["merge", "priority"]}
            changed = await rest(server, "PUT", "/api/projects/p1/strategies", ["198.51.100.20"],
                                 headers=owner(server), body=chain)  # fmt: skip
            assert changed.status_code == 200, changed.text
            refused = await rest(server, "GET", AUDITED, ["198.51.100.21"],
                                 headers={"Authorization": "Bearer forged"})  # fmt: skip
            assert refused.status_code == 401
            await ana.aclose()
            events = await audit_events(server)
    assert addresses(events, "join") == {"203.0.113.7"}
    assert addresses(events, "edit") == {"203.0.113.7"}
    assert addresses(events, "strategy_change") == {"198.51.100.20"}
    assert addresses(events, "token_refused") == {"203.0.113.66", "198.51.100.21"}


async def test_the_header_is_ignored_from_a_peer_not_trusted(
    tmp_path: Path, clients: Opener, endpoint: str
) -> None:
    # 127.0.0.2/32 is trusted, the clients connect from 127.0.0.1: the header is theirs.
    async with serving(tmp_path, trusted_proxies=("127.0.0.2/32",)) as server:
        with trio.fail_after(30):
            ana = await clients.join(server, ws_url(server, endpoint), "ana", ["203.0.113.7"])
            await ana.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
            refused = await rest(server, "GET", AUDITED, ["198.51.100.21"],
                                 headers={"Authorization": "Bearer forged"})  # fmt: skip
            assert refused.status_code == 401
            events = await audit_events(server)
    assert addresses(events, "join") == addresses(events, "edit") == {"127.0.0.1"}
    assert addresses(events, "token_refused") == {"127.0.0.1"}


async def test_a_spoofed_entry_left_of_the_real_one_is_never_taken(
    tmp_path: Path, clients: Opener, endpoint: str
) -> None:
    async with serving(tmp_path, trusted_proxies=LOOPBACK) as server:
        with trio.fail_after(30):
            url = ws_url(server, endpoint)
            await clients.join(server, url, "ana", ["198.51.100.1, 203.0.113.7"])
            await clients.join(server, url, "bob", ["198.51.100.1", "203.0.113.8"])
            await clients.join(server, url, "cy", ["garbage"])  # malformed: the peer's
            refused = await rest(server, "GET", AUDITED,
                                 ["198.51.100.1", "203.0.113.9"],
                                 headers={"Authorization": "Bearer forged"})  # fmt: skip
            assert refused.status_code == 401
            events = await audit_events(server)
    joins = {e["userId"]: e["ipAddress"] for e in events if e["action"] == "join"}
    assert joins == {"ana": "203.0.113.7", "bob": "203.0.113.8", "cy": "127.0.0.1"}
    assert addresses(events, "token_refused") == {"203.0.113.9"}


async def handshake(port: int, forwarded: str) -> tuple[bytes, trio.SocketStream]:
    """A WebSocket handshake to ``/ws`` on ``port`` carrying ``forwarded``: the answer's head
    and the open stream (kept open after a 101, so that the connection stays counted)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nX-Forwarded-For: {forwarded}\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await stream.receive_some(4096)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    return answer, stream


async def test_the_connection_cap_counts_the_forwarded_address(
    tmp_path: Path, endpoint: str
) -> None:
    settings = {"trusted_proxies": LOOPBACK, "max_connections": 64,
                "max_connections_per_address": 2}  # fmt: skip
    held: list[trio.SocketStream] = []
    async with serving(tmp_path, **settings) as server:
        port = server.ws_port if endpoint == "ws" else server.http_port
        try:
            with trio.fail_after(30):
                # Two per client address, however many come through the proxy (five here).
                answers = []
                for address in ["203.0.113.1"] * 3 + ["203.0.113.2"] * 2:
                    answer, stream = await handshake(port, address)
                    answers.append(answer.split(b"\r\n", 1)[0])
                    held.append(stream)
                    if b" 503 " in answer:
                        assert b"too many connections from your address (at most 2)" in (
                            answer + await stream.receive_some(4096)
                        )
                assert [a.split(b" ")[1] for a in answers] == [b"101", b"101", b"503", b"101",
                                                                b"101"]  # fmt: skip
                gate = server.hub.gate
                assert (gate.by_address["203.0.113.1"], gate.by_address["203.0.113.2"]) == (2, 2)
        finally:
            for stream in held:
                await stream.aclose()


async def test_the_limits_before_authentication_count_the_forwarded_address(
    tmp_path: Path, clients: Opener, endpoint: str
) -> None:
    settings = {"trusted_proxies": LOOPBACK, "preauth_handshake_limit": "60/3",
                "preauth_rest_limit": "60/2"}  # fmt: skip
    async with serving(tmp_path, **settings) as server:
        with trio.fail_after(30):
            url = ws_url(server, endpoint)
            # Handshakes: a burst of 3 per client address.
            for attempt in range(4):
                client = await clients.open(url, ["198.51.100.1"])
                await client.send("hello", {"token": "forged", "project_id": "p1"}, ref=1)
                assert await client.closed() == (4401 if attempt < 3 else 4429)
            other = await clients.open(url, ["198.51.100.2"])
            await other.send("hello", {"token": "forged", "project_id": "p1"}, ref=1)
            assert await other.closed() == 4401
            # REST requests: a burst of 2 per client address.
            statuses = [
                (await rest(server, "GET", AUDITED, [address],
                            headers={"Authorization": "Bearer forged"})).status_code
                for address in ["198.51.100.9"] * 3 + ["198.51.100.10"]
            ]  # fmt: skip
            assert statuses == [401, 401, 429, 401]


async def test_a_security_alert_names_the_forwarded_address(
    tmp_path: Path, clients: Opener
) -> None:
    async with serving(tmp_path, trusted_proxies=LOOPBACK, security_alert_threshold=3) as server:
        with trio.fail_after(30):
            for _ in range(3):
                intruder = await clients.open(ws_url(server, "ws"), ["203.0.113.50"])
                await intruder.send("hello", {"token": "forged", "project_id": "p1"}, ref=1)
                assert await intruder.closed() == 4401
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                response = await http.get("/api/collaboration/security/alerts?status=open",
                                          headers=owner(server))  # fmt: skip
    assert response.status_code == 200, response.text
    alerts = {a["type"]: a for a in response.json()["alerts"]}
    assert alerts["unauthorized_access"]["ipAddress"] == "203.0.113.50"


# -- the shipped HAProxy configuration, run --------------------------------------------------------


def local_haproxy_cfg(http_port: int, ws_port: int, app_http: int, app_ws: int) -> str:
    """deploy/haproxy.cfg with only its Docker parts replaced: it listens on 127.0.0.1 and
    sends to one server on 127.0.0.1, from 127.0.0.3 (so the server can tell it from the
    client, on 127.0.0.2). Each replacement must match once, or the test is of another file."""
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    replacements = [
        (r"^(\s*)bind :3000$", rf"\g<1>bind 127.0.0.1:{http_port}"),
        (r"^(\s*)bind :3001$", rf"\g<1>bind 127.0.0.1:{ws_port}"),
        (r"^(\s*)server-template app 32 app:3000$",
         rf"\g<1>server app1 127.0.0.1:{app_http} source 127.0.0.3"),
        (r"^(\s*)server-template app 32 app:3001 port 3000$",
         rf"\g<1>server app1 127.0.0.1:{app_ws} port {app_http} source 127.0.0.3"),
        (r" init-addr none resolvers docker", ""),
        (r"^resolvers docker\n(?:[ \t]+\S.*\n)+", ""),
    ]  # fmt: skip
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == 1, f"deploy/haproxy.cfg changed: {pattern!r} matched {count} times"
    return text


async def _wait_for_port(port: int, process: trio.Process) -> None:
    while True:
        assert process.returncode is None, "haproxy exited"
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.02)  # polling for the port to open, bounded by the caller
            continue
        await stream.aclose()
        return


#: Debian's haproxy is in /usr/sbin, which a user's PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
NO_HAPROXY = "haproxy is not installed (scripts/bootstrap.sh --test installs it)"


@pytest.mark.skipif(HAPROXY is None, reason=NO_HAPROXY)
async def test_the_shipped_haproxy_passes_the_client_address(
    tmp_path: Path, clients: Opener
) -> None:
    async with serving(tmp_path, trusted_proxies=("127.0.0.3/32",)) as server:
        lb_http, lb_ws = free_port(), free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(local_haproxy_cfg(lb_http, lb_ws, server.http_port, server.ws_port))
        log = (tmp_path / "haproxy.log").open("wb")
        haproxy = await trio.lowlevel.open_process(
            [str(HAPROXY), "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            with trio.fail_after(30):
                await _wait_for_port(lb_http, haproxy)
                await _wait_for_port(lb_ws, haproxy)
                for url, user in ((f"ws://127.0.0.1:{lb_ws}/ws", "ana"),
                                  (f"ws://127.0.0.1:{lb_http}/ws", "bob")):  # fmt: skip
                    # The client's own header too: HAProxy appends, the server takes its entry.
                    client = await clients.open(url, ["198.51.100.1"], source="127.0.0.2")
                    await client.hello(server.issue_token(user, "p1"), "p1")
                    change = {"change_id": f"c-{user}", "changes": [INSERT]}
                    await client.request("timeline_change", change)
                    await client.aclose()
                refused = await rest(server, "GET", AUDITED, ["198.51.100.1"],
                                     headers={"Authorization": "Bearer forged"},
                                     base_url=f"http://127.0.0.1:{lb_http}",
                                     source="127.0.0.2")  # fmt: skip
                assert refused.status_code == 401, refused.text
                ready = await rest(server, "GET", "/readyz", [],
                                   base_url=f"http://127.0.0.1:{lb_http}")  # fmt: skip
                assert ready.status_code == 200
                events = await audit_events(server)
        finally:
            haproxy.kill()
            with trio.CancelScope(shield=True):
                await haproxy.wait()
            log.close()
    joins = {e["userId"]: e["ipAddress"] for e in events if e["action"] == "join"}
    assert joins == {"ana": "127.0.0.2", "bob": "127.0.0.2"}, (tmp_path / "haproxy.log").read_text()
    assert addresses(events, "edit") == {"127.0.0.2"}
    assert addresses(events, "token_refused") == {"127.0.0.2"}
