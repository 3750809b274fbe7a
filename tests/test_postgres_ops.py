"""Operations data on PostgreSQL: two servers on one database answer every operator query alike.

Policy: loopback only, port 0, a deadline on every test, a real PostgreSQL per test
(tests/_postgres.py), no mocks and no sleeps: a server's queued audit events are stored by its
``flush``, and alerts are awaited on the live feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from crealia import Server, open_server
from crealia._plugins import AlertRuleRegistry
from crealia._security import AuditRule, SecurityMonitor
from crealia.backplanes.postgresql import open_postgresql_backplane

from ._postgres import PostgresServer, run_postgres
from .conftest import make_config, opened
from .test_protocol import insert


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresServer]:
    async with run_postgres() as server:
        yield server


@asynccontextmanager
async def two_servers(
    postgres: PostgresServer, tmp_path: Path, name: str, **overrides: Any
) -> AsyncIterator[tuple[Server, Server]]:
    """Two servers, each on its own backplane (as two processes would be), on one database."""
    url = await postgres.create_database(name)
    async with (
        open_postgresql_backplane(url) as one,
        open_postgresql_backplane(url) as two,
        open_server(make_config(tmp_path / "a", **overrides), backplane=one) as a,
        open_server(make_config(tmp_path / "b", **overrides), backplane=two) as b,
    ):
        yield a, b


def bearer(server: Server, user: str, role: str = "owner", project: str = "p1") -> dict[str, str]:
    token = server.issue_token(user, project, role)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}", "User-Agent": "crealia-tests/1"}


async def call(
    server: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        return await http.request(method, path, json=body, headers=headers or {})


async def test_ops_sqlite_is_not_opened_on_postgresql(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "noops") as (a, b):
            assert a.ops is None and b.ops is None
            assert a.ops_store.shared and a.ops_store is a.backplane.ops_store()
            ready = await call(b, "GET", "/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["storage"] == "ok"
    assert not (tmp_path / "a" / "ops.sqlite3").exists()


async def test_audit_written_on_one_process_is_listed_and_exported_by_the_other(
    postgres: PostgresServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "audit") as (a, b):
            async with opened(a, nursery) as clients:
                alice = await clients.join("alice")
                ack = await alice.request("timeline_change", insert("c1", "clip", v=1))
                assert ack["type"] == "ack", ack
            await a.hub.audit.flush()
            owner = bearer(b, "olga")
            listed = await call(b, "GET", "/api/collaboration/audit?userId=alice", None, owner)
            assert listed.status_code == 200, listed.text
            actions = [e["action"] for e in listed.json()["events"]]
            assert {"join", "edit"} <= set(actions), actions
            from_a = await call(a, "GET", "/api/collaboration/audit?userId=alice", None,
                                bearer(a, "olga"))  # fmt: skip
            assert from_a.json()["events"] == listed.json()["events"]
            # Filters and paging mean the same: newest first, at most ``limit``.
            one = await call(b, "GET", "/api/collaboration/audit?userId=alice&limit=1", None,
                             owner)  # fmt: skip
            assert one.json()["events"] == listed.json()["events"][:1]
            edits = await call(b, "GET", "/api/collaboration/audit?action=edit", None, owner)
            assert [e["resource"] for e in edits.json()["events"]] == ["timeline:c1"]
            future = await call(b, "GET", "/api/collaboration/audit?startDate=2999-01-01T00:00:00Z",
                                None, owner)  # fmt: skip
            assert future.json()["events"] == []
            csv = await call(b, "POST", "/api/collaboration/audit/export",
                             {"format": "csv", "userId": "alice"}, owner)  # fmt: skip
            assert csv.status_code == 200 and "timeline:c1" in csv.text
            # Bad parameters are answered as on SQLite.
            for query in ("limit=many", "startDate=yesterday"):
                bad = await call(b, "GET", f"/api/collaboration/audit?{query}", None, owner)
                assert bad.status_code == 400, (query, bad.text)
            bad_status = await call(b, "GET", "/api/collaboration/security/alerts?status=x",
                                    None, owner)  # fmt: skip
            assert bad_status.status_code == 400


async def _refuse_tokens(server: Server, times: int) -> None:
    for _ in range(times):
        refused = await call(server, "GET", "/api/collaboration/conflicts?projectId=p1", None,
                             {"Authorization": "Bearer x.y.z"})  # fmt: skip
        assert refused.status_code == 401


async def _open_alerts(server: Server) -> list[dict[str, Any]]:
    response = await call(server, "GET", "/api/collaboration/security/alerts?status=open", None,
                          bearer(server, "olga"))  # fmt: skip
    assert response.status_code == 200, response.text
    return list(response.json()["alerts"])


async def test_refused_tokens_on_two_processes_raise_the_alert_one_process_would(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Threshold 8: 4 refused tokens on each of two processes are the 8 of one. Both
    processes' rules see all 8 (their own at once, the other's through the shared table), one
    alert is stored, and both list it and resolve it alike."""
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "alerts", security_alert_threshold=8,
                               audit_refusal_window=0.5) as (a, b):  # fmt: skip
            async with a.monitor.subscribe("p1") as feed_a, b.monitor.subscribe("p1") as feed_b:
                await _refuse_tokens(a, 4)
                await _refuse_tokens(b, 4)
                for feed in (feed_a, feed_b):  # each process finds it
                    while True:
                        kind, alert = await feed.receive()
                        if kind == "security_alert":
                            break
                    assert alert["type"] == "unauthorized_access", alert
                    assert "8 refused tokens from ip:127.0.0.1" in alert["message"], alert
            await a.security.flush()
            await b.security.flush()
            seen_a, seen_b = await _open_alerts(a), await _open_alerts(b)
            assert len(seen_a) == 1, seen_a
            assert [x["id"] for x in seen_a] == [x["id"] for x in seen_b]
            path = f"/api/collaboration/security/alerts/{seen_a[0]['id']}/resolve"
            resolved = await call(b, "POST", path, {"note": "checked"}, bearer(b, "olga"))
            assert resolved.status_code == 200, resolved.text
            assert await _open_alerts(a) == []


async def test_four_refused_tokens_on_one_process_raise_nothing_at_threshold_eight(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "quiet", security_alert_threshold=8,
                               audit_refusal_window=0) as (a, b):  # fmt: skip
            await _refuse_tokens(a, 4)
            await a.hub.audit.flush()
            # B's tail reads what A stored: every row A committed, then nothing found.
            await b.security._tail()
            await b.security.flush()
            assert await _open_alerts(a) == await _open_alerts(b) == []


async def test_a_process_reading_refusals_after_their_alert_was_resolved_does_not_raise_it_again(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Threshold 6: 3 refused tokens on each of two processes raise one alert, which a person
    resolves at once. A process that reads those refusals only after the resolution (its tail
    lagging: here one whose step the test runs) finds the same 6, and must not raise the alert
    again: they are what was resolved. A refusal after the resolution raises a new one."""
    with trio.fail_after(60):
        async with (
            two_servers(postgres, tmp_path, "late", security_alert_threshold=6,
                        audit_refusal_window=0) as (a, b),
            open_postgresql_backplane(postgres.database_url("late")) as third,
        ):  # fmt: skip
            store = third.ops_store()
            assert store is not None
            rules = AlertRuleRegistry.discover().create_all()
            audit_rules = [rule for rule in rules if isinstance(rule, AuditRule)]
            late = SecurityMonitor(store=store, context=a.security.context, rules=audit_rules)
            late._cursor = (await store.audit_after(None))[1]  # as its run() starts

            async def first_alert(feed: Any, race: trio.CancelScope) -> None:
                while (await feed.receive())[0] != "security_alert":
                    pass
                race.cancel()

            async with (
                a.monitor.subscribe("p1") as feed_a,
                b.monitor.subscribe("p1") as feed_b,
                trio.open_nursery() as race,
            ):
                await _refuse_tokens(a, 3)
                await _refuse_tokens(b, 3)
                for feed in (feed_a, feed_b):  # whichever process finds the sixth first
                    race.start_soon(first_alert, feed, race.cancel_scope)
            for server in (a, b):
                await server.hub.audit.flush()
                await server.security.flush()
            (raised,) = await _open_alerts(a)
            path = f"/api/collaboration/security/alerts/{raised['id']}/resolve"
            resolved = await call(b, "POST", path, {"note": "seen"}, bearer(b, "olga"))
            assert resolved.status_code == 200, resolved.text
            await late._tail()  # the 6 refusals, read after the resolution
            await late.flush()
            assert await _open_alerts(a) == await _open_alerts(b) == []
            await _refuse_tokens(b, 1)
            await b.hub.audit.flush()
            await late._tail()
            await late.flush()
            (again,) = await _open_alerts(a)
            assert again["id"] != raised["id"], again


async def test_retention_prunes_the_shared_tables(
    postgres: PostgresServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "prune", metrics_interval=3600) as (a, b):
            async with opened(a, nursery) as clients:
                await clients.join("alice")
            await a.hub.audit.flush()
            await a.monitor.take_sample()
            await b.monitor.take_sample()
            report = await b.monitor.report(None, 0, 2**62)
            assert report["samples"] == 2  # both processes' samples
            assert await b.hub.audit.query(limit=10)
            far = 4102444800000  # 2100-01-01: past every retention
            assert await b.hub.audit.prune(now_ms=far) >= 1
            assert await a.hub.audit.query(limit=10) == []
            assert await a.monitor.prune(now_ms=far) >= 2  # and any open project's
            assert (await b.monitor.report(None, 0, 2**62))["samples"] == 0


async def test_gdpr_export_and_erasure_are_answered_alike_by_both_processes(
    postgres: PostgresServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(60):
        async with two_servers(postgres, tmp_path, "gdpr") as (a, b):
            async with opened(a, nursery) as clients:
                alice = await clients.join("alice")
                ack = await alice.request("timeline_change", insert("c1", "clip", v=1))
                assert ack["type"] == "ack", ack
                comment = await alice.request(
                    "comment_add", {"comment": {"id": "k1", "text": "alice here"}}
                )
                assert comment["type"] == "ack", comment
                old_epoch = alice.welcome["epoch"]
            await a.hub.audit.flush()
            path = "/api/collaboration/gdpr/export"
            body = {"userId": "alice", "format": "json"}
            export_a = (await call(a, "POST", path, body, bearer(a, "olga"))).json()
            export_b = (await call(b, "POST", path, body, bearer(b, "olga"))).json()
            for export in (export_a, export_b):
                export.pop("exportedAt")
            assert export_a["comments"][0]["text"] == "alice here"
            assert [e["seq"] for e in export_a["edits"]] == [1]
            assert {e["action"] for e in export_a["audit"]} >= {"join", "edit", "comment"}
            assert export_a == export_b
            erased = await call(b, "POST", "/api/collaboration/gdpr/erase", {"userId": "alice"},
                                bearer(b, "olga"))  # fmt: skip
            assert erased.status_code == 200, erased.text
            pseudonym = erased.json()["pseudonym"]
            assert erased.json()["erased"]["comments"] == 1
            assert erased.json()["erased"]["audit"] >= 3
            after_a = (await call(a, "POST", path, body, bearer(a, "olga"))).json()
            assert after_a["comments"] == after_a["edits"] == after_a["audit"] == []
            as_pseudonym = (await call(a, "POST", path, {"userId": pseudonym},
                                       bearer(a, "olga"))).json()  # fmt: skip
            assert [e["seq"] for e in as_pseudonym["edits"]] == [1]
            assert await a.backplane.epoch("p1") == await b.backplane.epoch("p1") != old_epoch
            # A client resuming with the old epoch gets a snapshot, on either process.
            for server in (a, b):
                async with opened(server, nursery) as clients:
                    raw = await clients.raw()
                    welcome = await raw.hello(clients.token("bob"), "p1", resume=1,
                                              epoch=old_epoch)  # fmt: skip
                    assert welcome["snapshot"]["seq"] == 2, welcome
                    assert welcome["epoch"] != old_epoch
                    writers = welcome["snapshot"]["elements"]["clip"]
                    assert "alice" not in str(writers), writers


async def test_an_erasure_on_one_process_closes_the_project_s_room_on_the_other(
    postgres: PostgresServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The erasure's notice tells every process its history was rewritten: a room open on
    another process closes (1011) and its members resume with a snapshot without the erased
    comment. Before, that room kept serving what was erased until it closed by itself."""
    with trio.fail_after(60):
        async with (
            two_servers(postgres, tmp_path, "erase-open") as (a, b),
            opened(a, nursery) as clients,
        ):
            alice = await clients.join("alice")
            bob = await clients.join("bob", role="editor")
            comment = await alice.request(
                "comment_add", {"comment": {"id": "k1", "text": "alice here"}}
            )
            assert comment["type"] == "ack", comment
            await alice.aclose()
            await a.hub.audit.flush()
            erased = await call(b, "POST", "/api/collaboration/gdpr/erase",
                                {"userId": "alice"}, bearer(b, "olga"))  # fmt: skip
            assert erased.status_code == 200, erased.text
            assert await bob.closed() == 1011
            raw = await clients.raw()
            welcome = await raw.hello(clients.token("bob"), "p1", resume=2,
                                      epoch=bob.welcome["epoch"])  # fmt: skip
            assert welcome["epoch"] != bob.welcome["epoch"]
            assert "alice here" not in str(welcome["snapshot"]), welcome
            # Nor does the history this process replays now name her or hold her text.
            replay = await clients.raw()
            replayed = await replay.hello(clients.token("carol"), "p1", resume=0,
                                          epoch=welcome["epoch"])  # fmt: skip
            count = replayed["replayed"]
            assert count == welcome["snapshot"]["seq"] > 0, replayed
            log = [await replay.expect(lambda env: "seq" in env.get("data", {}))
                   for _ in range(count)]  # fmt: skip
            assert "alice" not in {e["data"]["user_id"] for e in log}, log
            assert "alice here" not in str(log), log
