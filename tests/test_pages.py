"""The HTTP app's faces (crealia/_pages.py): static files and pages, ``/api/info``, the
``--dev`` token endpoint, CORS, and ``--dev``'s local origins on the WebSocket."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from crealia import Server, TokenAuthority, _pages
from crealia._origin import ALLOW_HINT, OriginPolicy

from .conftest import JWT_SECRET, ws_url
from .test_auth import handshake


async def get(server: Server, path: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        with trio.fail_after(10):
            return await http.request(kwargs.pop("method", "GET"), path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "text/html"), ("/demo", "text/html"), ("/dashboard", "text/html"),
    ("/security", "text/html"), ("/crealia.js", "text/javascript"),
    ("/crealia-react.js", "text/javascript"), ("/crealia.d.ts", "text/plain"),
    ("/favicon.ico", "image/svg+xml"), ("/static/pages.css", "text/css"),
])  # fmt: skip
async def test_pages_serve_each_file_with_its_type_and_policy(
    server: Server, path: str, kind: str
) -> None:
    response = await get(server, path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(kind)
    assert response.headers["content-security-policy"] == _pages.CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    # Revalidated by its ETag: the same file again is a 304 with no body.
    again = await get(server, path, headers={"If-None-Match": response.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")


async def test_pages_policy_admits_nothing_from_another_origin() -> None:
    directives = dict(d.strip().split(" ", 1) for d in _pages.CONTENT_SECURITY_POLICY.split(";"))
    for name, sources in directives.items():
        assert "http" not in sources and "*" not in sources, name
        assert "unsafe-inline" not in sources and "unsafe-eval" not in sources, name
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", [
    "/static/..%2Fsetup.cfg", "/static/.hidden", "/static/index.html", "/static/nope.js",
    "/static/../_pages.py", "/crealia.py", "/static/" + "a" * 300 + ".js",
])  # fmt: skip
async def test_pages_refuse_what_is_not_a_static_file(server: Server, path: str) -> None:
    response = await get(server, path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_pages_info_says_what_runs_without_a_token(server: Server) -> None:
    response = await get(server, "/api/info")
    assert response.status_code == 200
    info = response.json()
    assert info["name"] == "crealia" and info["protocol"] == 1 and info["dev"] is False
    assert info["websocket"] == "/ws" and info["uptime_s"] >= 0


async def test_pages_dev_token_is_not_found_without_dev(server: Server) -> None:
    body = {"user": "ann", "project": "p1", "role": "owner"}
    response = await get(server, "/api/dev/token", method="POST", json=body)
    assert response.status_code == 404
    assert "--dev" in response.json()["error"]["message"]


@pytest.mark.settings(dev=True)
async def test_pages_dev_token_mints_a_token_the_server_takes(server: Server) -> None:
    body = {"user": "ann", "name": "Ann Lee", "project": "p1", "role": "editor", "ttl": 600}
    response = await get(server, "/api/dev/token", method="POST", json=body)
    assert response.status_code == 200, response.text
    minted = response.json()
    user = TokenAuthority(JWT_SECRET).verify(minted["token"])
    assert (user.id, user.name, user.project_id, user.role) == ("ann", "Ann Lee", "p1", "editor")
    assert minted["claims"]["role"] == "editor" and minted["claims"]["sub"] == "ann"
    with trio.fail_after(10):
        minted_events = await server.hub.audit.query(action="dev_token")
    assert [(e.user_id, e.project_id) for e in minted_events] == [("ann", "p1")]


@pytest.mark.settings(dev=True)
@pytest.mark.parametrize(("body", "field"), [
    ({"project": "p1", "role": "owner"}, "body.user"),
    ({"user": "../x", "project": "p1", "role": "owner"}, "body.user"),
    ({"user": "ann", "project": "", "role": "owner"}, "body.project"),
    ({"user": "ann", "project": "p1", "role": "root"}, "body.role"),
    ({"user": "ann", "project": "p1", "role": "owner", "name": ""}, "body.name"),
    ({"user": "ann", "project": "p1", "role": "owner", "name": "n" * 65}, "body.name"),
    ({"user": "ann", "project": "p1", "role": "owner", "ttl": 10**9}, "body.ttl"),
    ({"user": "ann", "project": "p1", "role": "owner", "ttl": True}, "body.ttl"),
    ([1, 2], "body"),
])  # fmt: skip
async def test_pages_dev_token_refuses_bad_bodies_naming_the_field(
    server: Server, body: object, field: str
) -> None:
    response = await get(server, "/api/dev/token", method="POST", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["message"].startswith(field)
    with trio.fail_after(10):
        assert await server.hub.audit.query(action="dev_token") == []


@pytest.mark.settings(allowed_origins=("https://app.example.com",))
async def test_pages_cors_preflight_answers_allowed_origins_only(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    ask = {"Access-Control-Request-Method": "GET",
           "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    allowed = await get(server, "/api/collaboration/audit", method="OPTIONS",
                        headers={"Origin": "https://app.example.com", **ask})  # fmt: skip
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Authorization" in allowed.headers["access-control-allow-headers"]
    assert "GET" in allowed.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in allowed.headers
    with caplog.at_level(logging.WARNING, "crealia.http"):
        refused = await get(server, "/api/collaboration/audit", method="OPTIONS",
                            headers={"Origin": "https://evil.example", **ask})  # fmt: skip
    assert refused.status_code == 403
    message = refused.json()["error"]["message"]
    assert "https://evil.example" in message and ALLOW_HINT in message
    assert "access-control-allow-origin" not in refused.headers
    assert any("https://evil.example" in r.getMessage() and ALLOW_HINT in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.settings(allowed_origins=("https://app.example.com",))
async def test_pages_cors_headers_go_to_allowed_origins_on_every_answer(server: Server) -> None:
    ok = await get(server, "/api/info", headers={"Origin": "https://app.example.com"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Retry-After" in ok.headers["access-control-expose-headers"]
    assert "Origin" in ok.headers["vary"]
    # An error answer too, or the page could not read why it was refused.
    refused = await get(
        server, "/api/collaboration/audit", headers={"Origin": "https://app.example.com"}
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example.com"
    other = await get(server, "/api/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_pages_dev_policy_allows_local_origins_only() -> None:
    dev = OriginPolicy.from_origins([], dev=True)
    strict = OriginPolicy.from_origins([])
    for origin in ("http://localhost:5173", "http://127.0.0.1:8080", "http://[::1]:3000",
                   "http://localhost"):  # fmt: skip
        assert dev.listed(origin) and dev.allows(origin, "h.example:3001")
        assert not strict.listed(origin) and not strict.allows(origin, "h.example:3001")
    for origin in ("https://localhost:5173", "http://localhost.evil.example",
                   "http://127.0.0.2:80", "http://evil.example"):  # fmt: skip
        assert not dev.listed(origin) and not dev.allows(origin, "h.example:3001")


@pytest.mark.settings(dev=True)
async def test_pages_dev_accepts_local_origins_and_refusals_raise_no_alert(
    server: Server, endpoint: str
) -> None:
    url = ws_url(server, endpoint)
    with trio.fail_after(10):
        status, _body = await handshake(url, "http://localhost:5173")
        assert status == 101
        status, body = await handshake(url, "https://evil.example")
        assert status == 403 and ALLOW_HINT.encode() in body
        refused = await server.hub.audit.query(action="dev_origin_refused")
        alerts = await server.security.open_alerts()
    assert [e.details["origin"] for e in refused] == ["https://evil.example"]
    assert refused[0].severity == "low"
    assert alerts == []
