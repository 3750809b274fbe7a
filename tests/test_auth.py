"""Authentication and the WebSocket Origin allow-list, over real servers and sockets.

JWTs: HS256 with the secret, RS256/ES256 with configured public keys, key ids and rotation,
leeway, and the refusals (algorithm confusion, ``alg: none``, unknown kid, expired). Origins:
cross-site handshakes get 403 on both endpoints, same-origin, allow-listed and Origin-less ones
are served. Policy: loopback only, port 0, a deadline on every wait, no sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, RejectConnection, RejectData, Request

from crealia import Acceptor, Config, Server, TokenAuthority, open_server
from crealia._auth import sign_token, token_claims
from crealia._errors import ConfigurationError, Unauthorized
from crealia._origin import ALLOW_HINT, HostPolicy, OriginPolicy, normalize_origin
from crealia.transports._asgi import Receive, Scope, Send, _refuse

from .conftest import JWT_SECRET, make_config, ws_url

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# --- keys and tokens ---------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def claims(project: str = "p1", **kw: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"user_id": "ana", "project_id": project, "role": "editor"}
    values.update(kw)
    return token_claims(**values)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token put together by hand: HMAC-SHA256 with ``hmac_key``, or unsigned."""
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if hmac_key is None:
        return head + "."
    digest = hmac.new(hmac_key, head.encode(), hashlib.sha256).digest()
    return head + "." + b64(digest)


# --- talking to a server -----------------------------------------------------------------------


@asynccontextmanager
async def keyed_server(data_dir: Path, **overrides: object) -> AsyncIterator[Server]:
    async with open_server(make_config(data_dir, **overrides)) as server:
        yield server


async def hello(url: str, token: str, project: str = "p1") -> dict[str, Any]:
    """The reply to ``hello`` (``welcome`` or ``error``)."""
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(url) as ws:
            try:
                data = {"token": token, "project_id": project}
                await ws.send_message(json.dumps({"type": "hello", "ref": 1, "data": data}))
                reply = json.loads(await ws.get_message())
            finally:
                await close(ws)
            envelope = reply[0] if isinstance(reply, list) else reply
            return dict(envelope)


async def close(ws: trio_websocket.WebSocketConnection) -> None:
    await ws.aclose()
    # trio-websocket leaves the TCP stream open when the peer closed first.
    await ws._close_stream()


async def rest(server: Server, token: str, project: str = "p1") -> httpx.Response:
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as http:
            return await http.get(
                f"{server.http_url}/api/projects/{project}/snapshot",
                headers={"Authorization": f"Bearer {token}"},
            )


async def accepted(server: Server, endpoint: str, token: str) -> None:
    reply = await hello(ws_url(server, endpoint), token)
    assert reply["type"] == "welcome", reply
    response = await rest(server, token)
    assert response.status_code == 200, response.text


async def refused(server: Server, endpoint: str, token: str) -> str:
    """Assert ``token`` is refused on hello and on REST; returns the hello error's message."""
    reply = await hello(ws_url(server, endpoint), token)
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == "unauthorized", reply
    response = await rest(server, token)
    assert response.status_code == 401, response.text
    message = str(reply["data"]["message"])
    assert "BEGIN" not in message
    assert "BEGIN" not in response.text
    return message


# --- JWT over the real endpoints ---------------------------------------------------------------


async def test_auth_rs256_and_es256_accepted(tmp_path: Path, endpoint: str) -> None:
    rsa_private, ec_private = rsa_key(), ec_key()
    keys = {
        "rsa-1": str(write(tmp_path / "keys" / "rsa.pem", public_pem(rsa_private))),
        "ec-1": public_pem(ec_private),  # PEM text works as well as a path
    }
    async with keyed_server(tmp_path / "data", jwt_public_keys=keys) as server:
        rs256 = sign_token(claims(), rsa_private, algorithm="RS256", kid="rsa-1")
        await accepted(server, endpoint, rs256)
        es256 = sign_token(claims(), ec_private, algorithm="ES256", kid="ec-1")
        await accepted(server, endpoint, es256)
        # The kid-less secret still verifies HS256 tokens (Server.issue_token).
        await accepted(server, endpoint, server.issue_token("bo", "p1", "viewer"))
        # A key's token under another key's id fails the signature.
        swapped = sign_token(claims(), rsa_private, algorithm="RS256", kid="ec-1")
        assert "not allowed" in await refused(server, endpoint, swapped)


async def test_auth_only_public_key_is_the_default(tmp_path: Path, endpoint: str) -> None:
    private = rsa_key()
    path = write(tmp_path / "keys" / "signer.pem", public_pem(private))
    async with keyed_server(
        tmp_path / "data", jwt_secret=None, jwt_public_keys={"signer": str(path)}
    ) as server:
        await accepted(server, endpoint, sign_token(claims(), private, algorithm="RS256"))
        # With keys configured the generated data-dir secret verifies nothing.
        generated = (tmp_path / "data" / "jwt-secret").read_text().strip()
        hs = TokenAuthority(generated).issue(user_id="ana", project_id="p1", role="editor")
        assert "not allowed" in await refused(server, endpoint, hs)
        with pytest.raises(ConfigurationError, match="no HMAC secret"):
            server.issue_token("ana", "p1")


async def test_auth_key_rotation(tmp_path: Path, endpoint: str) -> None:
    old_key, new_key = rsa_key(), ec_key()
    old_secret, new_secret = "old-" + "o" * 40, "new-" + "n" * 40
    keys = {"2024": public_pem(old_key), "2025": public_pem(new_key)}
    secrets = {"hs-old": old_secret, "hs-new": new_secret}
    old_rs = sign_token(claims(), old_key, algorithm="RS256", kid="2024")
    new_es = sign_token(claims(), new_key, algorithm="ES256", kid="2025")
    signer = TokenAuthority(secrets=secrets)
    old_hs = signer.issue(user_id="ana", project_id="p1", role="editor", kid="hs-old")
    new_hs = signer.issue(user_id="ana", project_id="p1", role="editor", kid="hs-new")
    data = tmp_path / "data"
    async with keyed_server(data, jwt_public_keys=keys, jwt_secrets=secrets) as server:
        for token in (old_rs, new_es, old_hs, new_hs):
            await accepted(server, endpoint, token)
    # The old keys are removed: their tokens fail, the new ones go on.
    keys.pop("2024")
    secrets.pop("hs-old")
    async with keyed_server(data, jwt_public_keys=keys, jwt_secrets=secrets) as server:
        assert "unknown key id '2024'" in await refused(server, endpoint, old_rs)
        assert "unknown key id 'hs-old'" in await refused(server, endpoint, old_hs)
        await accepted(server, endpoint, new_es)
        await accepted(server, endpoint, new_hs)


async def test_auth_algorithm_confusion_refused(tmp_path: Path, endpoint: str) -> None:
    """HS256 signed with a public key's PEM as the secret: the classic confusion attack."""
    private = rsa_key()
    pem = public_pem(private)
    async with keyed_server(
        tmp_path / "data", jwt_secret=None, jwt_public_keys={"rsa-1": pem}
    ) as server:
        payload = claims()
        for header in ({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, {"alg": "HS256"}):
            forged = forge(header, payload, pem.encode())
            message = await refused(server, endpoint, forged)
            assert "algorithm 'HS256' is not allowed" in message, message
        # The same key signing properly is fine.
        signed = sign_token(payload, private, algorithm="RS256", kid="rsa-1")
        await accepted(server, endpoint, signed)


async def test_auth_alg_none_refused(tmp_path: Path, endpoint: str) -> None:
    async with keyed_server(tmp_path / "data") as server:
        for header in ({"alg": "none"}, {"alg": "none", "kid": "x"}, {"alg": "None"}):
            unsigned = forge(header, claims(), None)
            await refused(server, endpoint, unsigned)
        # An HS256 token made with the right secret by hand is accepted: the forge is sound.
        await accepted(server, endpoint, forge({"alg": "HS256"}, claims(), JWT_SECRET.encode()))


async def test_auth_leeway(tmp_path: Path, endpoint: str) -> None:
    async with keyed_server(tmp_path / "data", jwt_leeway=5.0) as server:
        # Expired two seconds ago: within the 5 s leeway.
        issue = partial(server.hub.auth.issue, user_id="ana", project_id="p1", role="editor")
        await accepted(server, endpoint, issue(ttl=10, now=time.time() - 12))
        stale = issue(ttl=10, now=time.time() - 40)
        assert await refused(server, endpoint, stale) == "token expired"
        # Issued (iat) a minute from now: not yet valid, beyond the leeway.
        future = issue(now=time.time() + 60)
        assert "not yet valid" in await refused(server, endpoint, future)


async def test_auth_refusals_say_why(tmp_path: Path, endpoint: str) -> None:
    private, stranger = rsa_key(), rsa_key()
    async with keyed_server(tmp_path / "data", jwt_public_keys={"k": public_pem(private)}) as s:
        unknown = sign_token(claims(), private, algorithm="RS256", kid="nope")
        assert "unknown key id 'nope'" in await refused(s, endpoint, unknown)
        forged = sign_token(claims(), stranger, algorithm="RS256", kid="k")
        assert "bad signature" in await refused(s, endpoint, forged)
        ps = sign_token(claims(), private, algorithm="PS256", kid="k")
        assert "algorithm 'PS256' is not allowed" in await refused(s, endpoint, ps)
        no_role = claims()
        del no_role["role"]
        missing = sign_token(no_role, private, algorithm="RS256", kid="k")
        assert "role" in await refused(s, endpoint, missing)
        other = sign_token(claims("p2"), private, algorithm="RS256", kid="k")
        reply = await hello(ws_url(s, endpoint), other)
        assert reply["data"] == {"code": "unauthorized", "message": "token is for another project"}
        garbage = await hello(ws_url(s, endpoint), "not.a.token")
        assert garbage["data"]["code"] == "unauthorized"


async def test_auth_cli_token_with_private_key(tmp_path: Path) -> None:
    rsa_private, ec_private = rsa_key(), ec_key()
    authority = TokenAuthority(
        public_keys={"r": public_pem(rsa_private), "e": public_pem(ec_private)}
    )
    for kid, key, alg in (("r", rsa_private, "RS256"), ("e", ec_private, None)):
        path = write(tmp_path / f"{kid}.key", private_pem(key))
        command = [sys.executable, "-m", "crealia", "token", "--user", "cli", "--role", "owner"]
        command += ["--project", "p4", "--private-key", str(path), "--kid", kid]
        if alg:
            command += ["--alg", alg]
        with trio.fail_after(30):
            result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
        token = result.stdout.decode().strip()
        user = authority.verify(token, "p4")
        assert (user.id, user.role, user.project_id) == ("cli", "owner", "p4")
    # A private key given where a public key belongs is refused without echoing it.
    with pytest.raises(ConfigurationError) as info:
        TokenAuthority(public_keys={"oops": private_pem(rsa_private).decode()})
    assert "PRIVATE" not in str(info.value)
    assert "public half" in str(info.value)


# --- JWT configuration -------------------------------------------------------------------------


def test_auth_config_from_env(tmp_path: Path) -> None:
    key = ec_key()
    pem = write(tmp_path / "k" / "ec.pem", public_pem(key))
    keys_file = write(tmp_path / "k" / "keys.json", json.dumps({"file-kid": "ec.pem"}))
    env = {
        "CREALIA_JWT_SECRETS": json.dumps({"a": "s" * 40}),
        "CREALIA_JWT_PUBLIC_KEYS": json.dumps({"ec": str(pem)}),
        "CREALIA_JWT_KEYS_FILE": str(keys_file),
        "CREALIA_JWT_ALGORITHMS": "HS256, ES256",
        "CREALIA_JWT_LEEWAY": "2.5",
        "CREALIA_ALLOWED_ORIGINS": "https://App.example.com:443, http://localhost:5173",
    }
    config = Config.from_env(env)
    assert config.jwt_secrets == {"a": "s" * 40}
    assert config.jwt_algorithms == ("HS256", "ES256")
    assert config.jwt_leeway == 2.5
    assert config.allowed_origins == ("https://app.example.com", "http://localhost:5173")
    authority = TokenAuthority.from_config(config)
    assert sorted(str(k) for k in authority.key_ids) == ["a", "ec", "file-kid"]
    token = sign_token(claims(), key, algorithm="ES256", kid="file-kid")
    assert authority.verify(token, "p1").id == "ana"
    # One PEM path: the key of tokens without kid.
    single = Config.from_env({"CREALIA_JWT_PUBLIC_KEYS": str(pem)})
    assert (
        TokenAuthority.from_config(single)
        .verify(sign_token(claims(), key, algorithm="ES256"), "p1")
        .id
        == "ana"
    )
    # A malformed secrets variable is named, its value never shown.
    with pytest.raises(ConfigurationError, match="CREALIA_JWT_SECRETS") as info:
        Config.from_env({"CREALIA_JWT_SECRETS": "{hunter2"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"jwt_algorithms": ("none",)}, "never accepted"),
        ({"jwt_algorithms": ("HS1",)}, "not supported"),
        ({"jwt_public_keys": {"k": "/no/such/key.pem"}}, "cannot read"),
        ({"jwt_public_keys": {"k": "-----BEGIN PUBLIC KEY-----\nxx\n"}}, "not a PEM public"),
        ({"jwt_public_keys": {"": "EC384"}}, "configured twice"),
        ({"jwt_public_keys": {"k": "EC384"}}, "fits none of the allowed algorithms"),
        ({"jwt_secrets": {"k": "s" * 40}, "jwt_algorithms": ("RS256",)}, "fits none"),
        ({"jwt_keys_file": "/no/such/keys.json"}, "jwt_keys_file"),
        ({"allowed_origins": ("ftp://files.example.com",)}, "not an origin"),
        ({"allowed_origins": "https://a.example.com/path"}, "not an origin"),
    ],
)
def test_auth_config_refused(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    keys = overrides.get("jwt_public_keys")
    if keys is not None:
        p384 = public_pem(ec_key(ec.SECP384R1()))
        swapped = {k: p384 if v == "EC384" else v for k, v in keys.items()}
        overrides = {**overrides, "jwt_public_keys": swapped}
    with pytest.raises(ConfigurationError, match=message):
        make_config(tmp_path, **overrides)


def test_auth_p384_key_with_es384_allowed(tmp_path: Path) -> None:
    key = ec_key(ec.SECP384R1())
    config = make_config(
        tmp_path, jwt_public_keys={"k": public_pem(key)}, jwt_algorithms=("ES384", "HS256")
    )
    authority = TokenAuthority.from_config(config)
    assert authority.verify(sign_token(claims(), key, algorithm="ES384", kid="k"), "p1")
    with pytest.raises(Unauthorized, match="not allowed"):
        authority.verify(forge({"alg": "HS256", "kid": "k"}, claims(), b"x" * 40), "p1")


# --- Origin allow-list -------------------------------------------------------------------------


async def handshake(url: str, origin: str | None) -> tuple[int, bytes]:
    """(101, b"") when the server accepts the WebSocket and a session answers on it, else the
    refusal's status and body. A small wsproto client: trio-websocket's leaves the socket of a
    rejected handshake open."""
    hostport = url.split("/")[2]
    host, port = hostport.rsplit(":", 1)
    headers = [(b"Origin", origin.encode())] if origin is not None else []
    conn = WSConnection(ConnectionType.CLIENT)
    status, body, text = 0, b"", ""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            request = Request(host=hostport, target="/ws", extra_headers=headers)
            await stream.send_all(conn.send(request))
            while True:
                data = await stream.receive_some()
                assert data, "the server closed the connection"
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, AcceptConnection):
                        # Before hello a ping gets bad_request: proof that a session serves it.
                        ping = json.dumps({"type": "ping", "ref": 1, "data": {}})
                        await stream.send_all(conn.send(Message(data=ping)))
                    elif isinstance(event, Message):
                        text += str(event.data)
                        if event.message_finished:
                            reply = json.loads(text)
                            envelope = reply[0] if isinstance(reply, list) else reply
                            assert envelope["type"] == "error", envelope
                            return 101, b""
                    elif isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            return status, b""
                    elif isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            return status, body


def own_origin(server: Server, endpoint: str) -> str:
    return f"http://127.0.0.1:{server.ws_port if endpoint == 'ws' else server.http_port}"


async def test_origin_cross_site_refused(tmp_path: Path, endpoint: str) -> None:
    async with keyed_server(tmp_path / "data") as server:
        url = ws_url(server, endpoint)
        status, body = await handshake(url, "https://evil.example")
        assert status == 403
        assert body.decode().strip() == f"origin not allowed: https://evil.example ({ALLOW_HINT})"
        # Same port, another host name: another origin.
        port = server.ws_port if endpoint == "ws" else server.http_port
        assert (await handshake(url, f"http://localhost:{port}"))[0] == 403
        assert (await handshake(url, "null"))[0] == 403
        # The server goes on serving.
        assert (await handshake(url, None))[0] == 101


async def test_origin_same_origin_and_no_origin_accepted(tmp_path: Path, endpoint: str) -> None:
    async with keyed_server(tmp_path / "data") as server:
        url = ws_url(server, endpoint)
        assert await handshake(url, own_origin(server, endpoint)) == (101, b"")
        assert (await handshake(url, own_origin(server, endpoint).upper()))[0] == 101
        assert (await handshake(url, None))[0] == 101
        reply = await hello(url, server.issue_token("ana", "p1"))
        assert reply["type"] == "welcome"


async def test_origin_allow_list(tmp_path: Path, endpoint: str) -> None:
    allowed = ("https://app.example.com", "http://localhost:5173")
    async with keyed_server(tmp_path / "data", allowed_origins=allowed) as server:
        url = ws_url(server, endpoint)
        assert (await handshake(url, "https://APP.example.com:443"))[0] == 101
        assert (await handshake(url, "http://localhost:5173"))[0] == 101
        assert (await handshake(url, "https://app.example.com:8443"))[0] == 403
        assert (await handshake(url, "http://app.example.com"))[0] == 403
        # The server's own origin stays allowed beside the list.
        assert (await handshake(url, own_origin(server, endpoint)))[0] == 101


async def test_origin_star_allows_any(tmp_path: Path, endpoint: str) -> None:
    async with keyed_server(tmp_path / "data", allowed_origins=("*",)) as server:
        url = ws_url(server, endpoint)
        for origin in ("https://evil.example", "null", "chrome-extension://abc"):
            assert (await handshake(url, origin))[0] == 101


async def test_origin_fast_path_accepts_the_http_apps_pages(tmp_path: Path) -> None:
    """A page of the HTTP app (its port) may connect to the fast path on the ws port."""
    async with keyed_server(tmp_path / "data") as server:
        port = server.ws_port
        url = f"ws://127.0.0.1:{port}/ws"
        assert (await handshake(url, f"http://127.0.0.1:{server.http_port}"))[0] == 101
        assert (await handshake(url, f"http://127.0.0.1:{port}"))[0] == 101
        assert (await handshake(url, f"https://127.0.0.1:{server.http_port}"))[0] == 101
        other = next(p for p in range(server.http_port + 1, 65536) if p != port)
        assert (await handshake(url, f"http://127.0.0.1:{other}"))[0] == 403


async def test_origin_close_before_accept_is_403_in_hypercorn(nursery: trio.Nursery) -> None:
    """Without the denial-response extension the route closes before accept: hypercorn then
    answers 403 (with no body)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await _refuse({**scope, "extensions": {}}, send, b"unused")

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    served: Any = app
    binds = await nursery.start(partial(hypercorn.trio.serve, served, config))
    port = int(binds[0].rsplit(":", 1)[1])
    assert await handshake(f"ws://127.0.0.1:{port}/ws", "https://evil.example") == (403, b"")
    nursery.cancel_scope.cancel()


def test_origin_policy_rules() -> None:
    assert normalize_origin("HTTPS://Example.COM:443") == "https://example.com"
    assert normalize_origin("http://[::1]:80") == "http://[::1]"
    assert normalize_origin("http://[::1]:3000/") == "http://[::1]:3000"
    for bad in ("null", "", "file://", "ws://a.b", "http://a.b/x", "http://a.b:99999"):
        assert normalize_origin(bad) is None, bad
    policy = OriginPolicy.from_origins(["https://app.example.com"])
    assert policy.allows(None, None)
    assert policy.allows("https://app.example.com:443", "other:1")
    assert policy.allows("http://h.example:8000", "H.example:8000")
    assert policy.allows("https://h.example", "h.example")
    assert not policy.allows("http://h.example", "h.example:8000")
    assert not policy.allows("http://h.example:8000", None)
    assert policy.allows("http://h.example:3000", "h.example:3001", ports=(3000,))
    assert policy.allows("http://[::1]:3000", "[::1]:3001", ports=(3000,))
    assert not policy.allows("http://h.example:3002", "h.example:3001", ports=(3000,))


async def _no_session(conn: object) -> None:
    raise AssertionError("no connection is served here")


def test_origin_acceptor_check_handshake_reports_refusals() -> None:
    heard: list[tuple[str, str, str]] = []
    acceptor = Acceptor(
        run_session=_no_session,
        on_origin_refused=lambda *refused: heard.append(refused),
        origins=OriginPolicy.from_origins(["https://app.example.com"]),
        hosts=HostPolicy.from_hosts(["h.example"]),
        page_ports=(3000,),
    )
    check = partial(acceptor.check_handshake, remote="10.0.0.1", user_agent="UA")
    assert check(host="h.example:3001", origin=None) is None
    assert check(host="h.example:3001", origin="https://app.example.com") is None
    assert check(host="h.example:3001", origin="http://h.example:3000") is None  # a page port
    refused = check(host="h.example:3001", origin="https://evil.example")
    assert refused is not None
    assert (refused.status, refused.reason) == (403, "origin")
    assert refused.body == f"origin not allowed: https://evil.example ({ALLOW_HINT})\n".encode()
    assert heard == [("https://evil.example", "10.0.0.1", "UA")]
    misdirected = check(host="evil.example", origin="https://evil.example")
    assert misdirected is not None
    assert (misdirected.status, misdirected.reason) == (421, "host")
    assert misdirected.body == b"host not allowed: evil.example\n"
    assert acceptor.gate.refused["host"] == 1
    assert len(heard) == 1  # a refused host is not also an origin refusal
