"""Operations: Prometheus /metrics, samples and their API, reports, retention, health, the live
feed, alerts on a live server with a webhook, structured logs and the config file.

Policy: loopback only, port 0, a deadline on every I/O test, real servers and a real store;
no sleeps. Samples are taken by calling the monitor (the sampler's own period is long) except
where the sampler itself is under test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from crealia import Config, ConfigurationError, Server, open_server
from crealia._storage import dumps

from ._http_receiver import start_receiver
from ._process import run_server
from ._scrape import fetch_metrics, parse_metrics
from ._wsclient import RawClient, open_raw_client
from .conftest import JWT_SECRET, Clients, data_store, make_config, opened

SEED_FIELDS = {
    "activeUsers", "activeProjects", "activeSessions", "websocketConnections", "webrtcStreams",
    "averageLatency", "memoryUsage", "cpuUsage", "networkBandwidth", "errorRate",
    "conflictRate", "resolutionRate",
}  # fmt: skip

INSERT = {"op": "insert", "element_id": "clip", "element_type": "clip", "props": {"title": "a"}}


@pytest.fixture
async def quiet(tmp_path: Path) -> AsyncIterator[Server]:
    """A server whose sampler waits an hour: the test takes samples itself."""
    async with open_server(make_config(tmp_path / "data", metrics_interval=3600)) as srv:
        yield srv


@pytest.fixture
async def clients(quiet: Server, nursery: trio.Nursery) -> AsyncIterator[Clients]:
    async with opened(quiet, nursery) as clients:
        yield clients


async def join(clients: Clients, user: str, project: str = "p1", role: str = "owner") -> RawClient:
    return await clients.join(user, project, role)


def auth(
    server: Server, user: str = "olga", project: str = "p1", role: str = "owner"
) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.issue_token(user, project, role)}"}  # type: ignore[arg-type]


async def scrape(server: Server) -> dict[str, float]:
    """/metrics parsed by prometheus-client's own parser: ``{sample name{labels}: value}``."""
    response = await fetch_metrics(server.http_url)
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


# -- Prometheus -----------------------------------------------------------------------------------


async def test_prometheus_output_parses_and_moves_with_clients_and_edits(
    quiet: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        before = await scrape(quiet)
        assert before["crealia_connections"] == 0
        assert before["crealia_sessions"] == 0
        assert "process_resident_memory_bytes" in before
        alice = await join(clients, "alice", role="editor")
        bob = await join(clients, "bob", role="editor")
        ack = await alice.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
        assert ack["data"]["status"] == "applied"
        await bob.event("timeline_change")
        await alice.send("cursor_update", {"position": {"x": 1, "y": 2}})
        await bob.event("cursor_update")
        refused = await bob.request("conflict_dismiss", {"conflict_id": "nope"})
        assert refused["data"]["code"] == "not_found"
        after = await scrape(quiet)
    assert after["crealia_connections"] == 2
    assert after["crealia_sessions"] == 2
    assert after["crealia_active_users"] == 2
    assert after["crealia_active_projects"] == 1
    assert after["crealia_changes_total"] == before["crealia_changes_total"] + 1
    assert after["crealia_messages_received_total{type=timeline_change}"] == 1
    assert after["crealia_messages_received_total{type=cursor_update}"] == 1
    assert after["crealia_errors_total{code=not_found}"] == 1
    assert after["crealia_frames_sent_total"] > before["crealia_frames_sent_total"]
    assert after["crealia_sent_bytes_total"] > before["crealia_sent_bytes_total"]
    assert after["crealia_received_bytes_total"] > 0
    # Every frame sent was timed: the histogram counted them all, in cumulative buckets.
    assert after["crealia_fanout_latency_seconds_count"] == after["crealia_frames_sent_total"]
    assert (
        after["crealia_fanout_latency_seconds_bucket{le=+Inf}"]
        == after["crealia_fanout_latency_seconds_count"]
    )
    assert after["crealia_health_check_up{check=storage}"] == 1


async def test_prometheus_labels_stay_bounded_under_garbage(
    quiet: Server, clients: Clients
) -> None:
    client = await join(clients, "mallory", role="viewer")
    with trio.fail_after(20):
        for i in range(30):
            await client.send_raw(json.dumps({"type": f"made-up-{i}", "ref": i + 1, "data": {}}))
        for _ in range(30):
            await client.expect_type("error")
        values = await scrape(quiet)
    types = {k for k in values if k.startswith("crealia_messages_received_total{")}
    assert types == {"crealia_messages_received_total{type=invalid}"}
    assert values["crealia_messages_received_total{type=invalid}"] == 30
    assert values["crealia_errors_total{code=bad_request}"] == 30


# -- samples and the metrics API ------------------------------------------------------------------


async def test_samples_cover_the_seed_fields_globally_and_per_project(
    quiet: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        await quiet.monitor.take_sample()  # the baseline of the rates
        a1 = await join(clients, "a1", "p1", "editor")
        await join(clients, "a2", "p1", "viewer")
        await join(clients, "b1", "p2", "editor")
        await a1.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
        stale = {"op": "set", "element_id": "clip", "prop": "title", "value": "x", "base": 0}
        await a1.request("timeline_change", {"change_id": "c2", "changes": [stale]})
        samples = await quiet.monitor.take_sample()
    server, *projects = samples
    by_project = {s["projectId"]: s for s in projects}
    assert server["projectId"] is None
    assert set(server) >= SEED_FIELDS
    assert server["activeUsers"] == 3
    assert server["activeProjects"] == 2
    assert server["activeSessions"] == 3
    assert server["websocketConnections"] == 3
    assert 0 < server["memoryUsage"] < 100
    assert server["cpuUsage"] >= 0
    assert server["averageLatency"] is not None and server["averageLatency"] >= 0
    assert set(by_project) == {"p1", "p2"}
    assert by_project["p1"]["activeUsers"] == 2
    assert by_project["p2"]["activeUsers"] == 1
    assert "memoryUsage" not in by_project["p1"]
    # Own stale write: not a conflict, so the conflict rate stays 0; one error in p1 is none.
    assert by_project["p1"]["conflictRate"] == 0.0
    assert by_project["p1"]["messagesIn"] > 0
    assert by_project["p2"]["messagesIn"] == 0


async def test_conflict_and_error_rates_are_measured(quiet: Server, clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await join(clients, "alice", role="editor")
        bob = await join(clients, "bob", role="editor")
        await alice.request("timeline_change", {"change_id": "c1", "changes": [INSERT]})
        await quiet.monitor.take_sample()
        moved = {"op": "set", "element_id": "clip", "prop": "title", "value": "b", "base": 1}
        await alice.request("timeline_change", {"change_id": "c2", "changes": [moved]})
        stale = {"op": "set", "element_id": "clip", "prop": "title", "value": "c", "base": 1}
        ack = await bob.request("timeline_change", {"change_id": "c3", "changes": [stale]})
        assert ack["data"]["status"] == "conflict"
        await bob.expect_type("conflict_resolved")
        bad = await bob.request("cursor_update", {"position": {"x": "left"}})
        assert bad["type"] == "error"
        server, project = await quiet.monitor.take_sample()
    for sample in (server, project):
        assert sample["conflictRate"] == 50.0  # one of the two changes conflicted
        assert sample["resolutionRate"] == 100.0  # and the chain settled it
        assert sample["errorRate"] == pytest.approx(100 / 3, abs=0.01)  # 1 of 3 messages


async def test_ping_round_trips_are_measured(quiet: Server, clients: Clients) -> None:
    with trio.fail_after(20):
        await clients.join("alice")
        await clients.join("bob")
        with trio.move_on_after(5):
            await quiet.monitor.probe_pings()
        server, _project = await quiet.monitor.take_sample()
        values = await scrape(quiet)
    assert server["pingRtt"] is not None and 0 < server["pingRtt"] < 1000
    assert values["crealia_ping_rtt_seconds_count"] == 2


async def test_metrics_api_gives_current_values_and_series_to_owners_only(
    quiet: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        await join(clients, "alice")
        for _ in range(3):
            await quiet.monitor.take_sample()
        async with httpx.AsyncClient(base_url=quiet.http_url, timeout=5) as http:
            path = "/api/collaboration/performance/metrics"
            response = await http.get(path, headers=auth(quiet))
            assert response.status_code == 200
            body = response.json()
            assert body["projectId"] == "p1"
            assert len(body["series"]) == 3
            assert body["current"] == body["series"][-1]
            assert body["current"]["activeUsers"] == 1
            assert len(body["global"]["series"]) == 3
            assert set(body["global"]["current"]) >= SEED_FIELDS
            assert body["health"]["storage"]["ok"] is True
            for role in ("editor", "commenter", "viewer"):
                refused = await http.get(path, headers=auth(quiet, role=role))
                assert refused.status_code == 403
                assert "owner" in refused.json()["error"]["message"]
            assert (await http.get(path)).status_code == 401
            other = await http.get(path, params={"projectId": "p2"}, headers=auth(quiet))
            assert other.status_code == 403


async def test_the_sampler_feeds_websocket_subscribers_and_refuses_non_owners(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "d", metrics_interval=0.05)
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(20):
            owner = await join(clients, "olga")
            viewer = await join(clients, "vic", role="viewer")
            refused = await viewer.request("metrics_subscribe", {})
            assert refused["data"]["code"] == "forbidden"
            assert (await owner.request("metrics_subscribe", {}))["type"] == "ack"
            seen = {None: 0, "p1": 0}
            while min(seen.values()) < 2:
                push = await owner.expect_type("metrics_sample")
                seen[push["data"]["projectId"]] += 1
            other = await join(clients, "pat", "p2")
            assert (await other.request("metrics_subscribe", {}))["type"] == "ack"
            for _ in range(6):  # p2's owner never sees p1's samples
                push = await other.expect_type("metrics_sample")
                assert push["data"]["projectId"] in (None, "p2")
            assert (await owner.request("metrics_unsubscribe", {}))["type"] == "ack"
            assert not server.hub.metric_subscribers.keys() - {
                s.id for s in server.hub.rooms.rooms["p2"].sessions.values()
            }


async def test_server_sent_events_feed_with_access_token(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with open_server(make_config(tmp_path / "d", metrics_interval=0.05)) as server:
        token = server.issue_token("olga", "p1", "owner")
        async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
            with trio.fail_after(20):
                path = "/api/collaboration/performance/stream"
                refused = await http.get(path, params={"access_token": "garbage"})
                assert refused.status_code == 401
                viewer = server.issue_token("vic", "p1", "viewer")
                assert (await http.get(path, params={"access_token": viewer})).status_code == 403
                events = await read_events(server, f"{path}?access_token={token}", 3)
    assert all(kind == "metrics" for kind, _data in events)
    assert all(set(data) >= SEED_FIELDS for _kind, data in events if data["projectId"] is None)


async def read_events(server: Server, target: str, count: int) -> list[tuple[str, Any]]:
    """The first ``count`` server-sent events of ``target``, read over a plain socket with h11
    (httpx's line iterator cannot be left early without leaking its generators)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("Host", "127.0.0.1")])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        buffer, events = b"", []
        while len(events) < count:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
                assert dict(event.headers)[b"content-type"].startswith(b"text/event-stream")
            elif isinstance(event, h11.Data):
                buffer += event.data
                *whole, buffer = buffer.split(b"\n\n")
                for block in whole:
                    fields = dict(line.split(b": ", 1) for line in block.split(b"\n")
                                  if b": " in line and not line.startswith(b":"))  # fmt: skip
                    if b"data" in fields:
                        events.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
            else:
                raise AssertionError(f"unexpected {event!r}")
    return events[:count]


# -- reports and retention ------------------------------------------------------------------------


def _synthetic(at: int, latency: float, users: int) -> dict[str, Any]:
    return {"at": at, "projectId": None, "averageLatency": latency, "activeUsers": users,
            "errorRate": 0.0}  # fmt: skip


async def _store_samples(server: Server, samples: list[dict[str, Any]]) -> None:
    rows = [("INSERT INTO metric_samples (scope, at, data) VALUES (?, ?, ?)",
             (s["projectId"] or "", s["at"], dumps(s))) for s in samples]  # fmt: skip
    await server.ops.write(rows)  # type: ignore[arg-type]


def _stored(path: Path, start: int, end: int) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT data FROM metric_samples WHERE scope = '' AND at >= ? AND at < ? ORDER BY at",
            (start, end),
        ).fetchall()
    return [json.loads(row[0]) for row in rows]


def _expected(samples: list[dict[str, Any]], field: str) -> dict[str, float]:
    values = sorted(float(s[field]) for s in samples if s.get(field) is not None)
    return {
        "min": values[0],
        "avg": round(sum(values) / len(values), 3),
        "p95": values[math.ceil(0.95 * len(values)) - 1],
        "max": values[-1],
        "samples": len(values),
    }


async def test_report_json_and_csv_cover_the_range_and_match_stored_samples(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path / "d", metrics_interval=3600, alert_hold=0,
                         alert_options={"active_users": {"warning": 1, "critical": 5}})  # fmt: skip
    async with open_server(config) as server, trio.open_nursery() as nursery, \
            opened(server, nursery) as clients:  # fmt: skip
        base = 1_700_000_000_000
        latencies = [5.0, 12.5, 7.0, 30.0, 2.0, 100.0, 40.0]
        await _store_samples(
            server, [_synthetic(base + i * 1000, lat, i) for i, lat in enumerate(latencies)]
        )
        start, end = base + 1000, base + 6000  # samples 1..5: the first and last stay out
        with trio.fail_after(20):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                path = "/api/collaboration/performance/report"
                body = {"startDate": start, "endDate": end, "format": "json"}
                report = (await http.post(path, json=body, headers=auth(server))).json()
                stored = _stored(server.ops.path, start, end)
                assert [s["averageLatency"] for s in stored] == latencies[1:6]
                assert report["samples"] == 5
                assert report["metrics"]["averageLatency"] == _expected(stored, "averageLatency")
                assert report["metrics"]["activeUsers"] == _expected(stored, "activeUsers")
                assert report["startDate"] == "2023-11-14T22:13:21.000Z"

                iso = {"startDate": "2023-11-14T22:13:21Z", "endDate": "2023-11-14T22:13:26Z"}
                assert (await http.post(path, json=iso, headers=auth(server))).json() == report

                as_csv = await http.post(path, json={**body, "format": "csv"},
                                         headers=auth(server))  # fmt: skip
                assert as_csv.headers["content-type"].startswith("text/csv")
                assert "attachment" in as_csv.headers["content-disposition"]
                metrics_part, alerts_part = as_csv.text.split("\n\n")
                rows = list(csv.DictReader(io.StringIO(metrics_part)))
                assert {row["metric"] for row in rows} == set(report["metrics"])
                for row in rows:
                    expected = report["metrics"][row["metric"]]
                    assert {k: float(v) for k, v in row.items() if k != "metric"} == expected
                assert list(csv.DictReader(io.StringIO(alerts_part))) == []

                # An alert raised now is in a report of now, in both formats.
                await join(clients, "alice")
                await server.monitor.take_sample()
                now = int(time.time() * 1000)
                live = {"startDate": now - 60_000, "endDate": now + 1000}
                fresh = (await http.post(path, json=live, headers=auth(server))).json()
                # (with no hold, a busy test machine may fire the CPU rule too)
                mine = [a for a in fresh["alerts"] if a["rule"] == "active_users"]
                assert [a["level"] for a in mine] == ["warning"]
                assert fresh["samples"] >= 1
                as_csv = await http.post(path, json={**live, "format": "csv"},
                                         headers=auth(server))  # fmt: skip
                alerts = list(csv.DictReader(io.StringIO(as_csv.text.split("\n\n")[1])))
                assert [a["id"] for a in alerts] == [a["id"] for a in fresh["alerts"]]
                assert mine[0]["id"] in {a["id"] for a in alerts}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"endDate": 5}, 400, "startDate"),
        ({"startDate": "yesterday", "endDate": 5}, 400, "startDate"),
        ({"startDate": 10, "endDate": 5}, 400, "endDate"),
        ({"startDate": 1, "endDate": 5, "format": "xml"}, 400, "format"),
        ({"startDate": True, "endDate": 5}, 400, "startDate"),
        ({"startDate": 1e300, "endDate": 5}, 400, "startDate"),
        ({"startDate": 1, "endDate": 5, "projectId": "p2"}, 403, "p2"),
    ],
)
async def test_report_refuses_bad_requests_naming_the_field(
    quiet: Server, body: dict[str, Any], status: int, names: str
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=quiet.http_url, timeout=5) as http:
            path = "/api/collaboration/performance/report"
            response = await http.post(path, json=body, headers=auth(quiet))
            assert response.status_code == status
            assert names in response.json()["error"]["message"]
            editor = await http.post(path, json={"startDate": 1, "endDate": 5},
                                     headers=auth(quiet, role="editor"))  # fmt: skip
            assert editor.status_code == 403


async def test_retention_deletes_old_samples_and_resolved_alerts(quiet: Server) -> None:
    day = 86_400_000
    now = int(time.time() * 1000)
    old, recent = now - 31 * day, now - 29 * day
    await _store_samples(quiet, [_synthetic(old, 1.0, 1), _synthetic(recent, 2.0, 1)])
    await quiet.ops.write([
        ("INSERT INTO alerts (id, rule, project_id, level, state, started_at, updated_at, "
         "resolved_at, data) VALUES (?, 'latency', NULL, 'warning', ?, ?, ?, ?, x'7b7d')",
         (alert_id, state, old, old, old if state == "resolved" else None))
        for alert_id, state in (("gone", "resolved"), ("still-firing", "firing"))
    ])  # fmt: skip
    with trio.fail_after(10):
        removed = await quiet.monitor.prune()
    assert removed == 1
    with sqlite3.connect(quiet.ops.path) as conn:
        ats = [row[0] for row in conn.execute("SELECT at FROM metric_samples ORDER BY at")]
        alerts = [row[0] for row in conn.execute("SELECT id FROM alerts")]
    assert ats == [recent]
    assert alerts == ["still-firing"]


# -- health ---------------------------------------------------------------------------------------


async def test_readyz_turns_503_when_storage_fails_and_back(quiet: Server) -> None:
    async with httpx.AsyncClient(base_url=quiet.http_url, timeout=10) as http:
        with trio.fail_after(20):
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["checks"] == {"storage": "ok", "event_loop": "ok"}
            data_store(quiet).fail_commits = True
            try:
                failing = await http.get("/readyz")
                metrics = await scrape(quiet)
            finally:
                data_store(quiet).fail_commits = False
            assert failing.status_code == 503
            assert failing.json()["checks"]["storage"].startswith("failing: ")
            assert metrics["crealia_health_check_up{check=storage}"] == 0
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200


# -- alerts on a live server ----------------------------------------------------------------------


async def test_alerts_fire_escalate_and_resolve_on_a_live_server_with_webhook_and_feeds(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    config = make_config(
        tmp_path / "d",
        metrics_interval=3600,
        alert_hold=0,
        alert_options={"active_users": {"warning": 2, "critical": 3}},
        alert_webhooks=(receiver.url,),
    )
    async with open_server(config) as server, opened(server, nursery) as clients:
        with trio.fail_after(30):
            olga = await join(clients, "olga")
            assert (await olga.request("metrics_subscribe", {}))["type"] == "ack"
            await server.monitor.take_sample()
            assert [a for a in server.monitor.engine.firing() if a.rule == "active_users"] == []
            bob = await join(clients, "bob", role="viewer")
            await server.monitor.take_sample()
            warning = await server_alert(olga)
            carl = await join(clients, "carl", role="viewer")
            await server.monitor.take_sample()
            critical = await server_alert(olga)
            for client in (bob, carl):
                await client.aclose()
                await olga.event("user_left", user_id=client.welcome["user"]["id"])
            await server.monitor.take_sample()
            resolved = await server_alert(olga)
            await receiver.wait_received(6)  # at least global and p1, three changes each
            posted = receiver.received
    assert (warning["rule"], warning["level"], warning["state"]) == ("active_users", "warning",
                                                                     "firing")  # fmt: skip
    assert warning["value"] == 2 and warning["threshold"] == 2
    assert (critical["id"], critical["level"]) == (warning["id"], "critical")
    assert (resolved["id"], resolved["state"]) == (warning["id"], "resolved")
    assert resolved["resolvedAt"] is not None
    mine = {"projectId": None, "rule": "active_users"}
    webhook = [p["alert"] for p in posted if mine.items() <= p["alert"].items()]
    assert webhook == [warning, critical, resolved]
    assert {p["alert"]["projectId"] for p in posted} == {None, "p1"}
    assert server.monitor.notifier.failed == 0


async def server_alert(client: RawClient) -> dict[str, Any]:
    """The next server-wide ``active_users`` alert push (a busy machine may fire others)."""
    push = await client.expect_type("alert", projectId=None, rule="active_users")
    return dict(push["data"])


# -- logs and configuration -----------------------------------------------------------------------


async def test_serve_logs_json_lines_with_project_and_user(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with run_server(tmp_path / "d", JWT_SECRET, "--log-level", "info") as proc:
        with trio.fail_after(20):
            from crealia import TokenAuthority

            client = await open_raw_client(nursery, proc.ws_url)
            token = TokenAuthority(JWT_SECRET).issue(user_id="alice", project_id="p7",
                                                     role="editor")  # fmt: skip
            await client.hello(token, "p7")
            assert proc.process.stdout is not None
            buffer = proc.output[0]
            while '"session opened"' not in buffer:
                chunk = await proc.process.stdout.receive_some(65536)
                assert chunk, buffer
                buffer += chunk.decode()
            await client.aclose()
    lines = [line for line in buffer.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]  # every log line is one JSON object
    opened = next(e for e in entries if e["message"] == "session opened")
    assert opened["project_id"] == "p7"
    assert opened["user_id"] == "alice"
    assert opened["level"] == "info"
    assert opened["logger"] == "crealia.session"
    assert opened["time"].endswith("Z")


def test_thresholds_come_from_a_config_file_then_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "crealia.toml"
    path.write_text(
        "metrics_interval = 2.5\nalert_hold = 4\n"
        "[alerts.latency]\nwarning = 150\ncritical = 400\n"
        "[alerts.cpu]\nwarning = 60\n"
    )
    config = Config.from_env({"CREALIA_ALERT_LATENCY_CRITICAL": "450"}, config_file=path)
    assert config.metrics_interval == 2.5
    assert config.alert_hold == 4
    assert config.alert_options == {"latency": {"warning": 150, "critical": 450.0},
                                    "cpu": {"warning": 60}}  # fmt: skip
    env = {"CREALIA_CONFIG": str(path), "CREALIA_METRICS_INTERVAL": "1"}
    assert Config.from_env(env).metrics_interval == 1.0  # the environment wins over the file
    assert Config.from_env(env, metrics_interval=7).metrics_interval == 7  # flags win


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("no_such_setting = 1\n", {}, "no_such_setting"),
        ("metrics_interval = [\n", {}, "crealia.toml"),
        ("metrics_interval = -1\n", {}, "metrics_interval"),
        ("", {"CREALIA_ALERT_LATENCY_WARNING": "fast"}, "CREALIA_ALERT_LATENCY_WARNING"),
        ("", {"CREALIA_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_bad_configuration_is_refused_by_name(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "crealia.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        Config.from_env(env, config_file=path)


async def test_bad_thresholds_stop_the_server_before_it_starts(tmp_path: Path) -> None:
    config = make_config(tmp_path / "d", alert_options={"latency": {"warning": "high"}})
    with pytest.raises(ConfigurationError, match="latency"):
        async with open_server(config):
            pass  # pragma: no cover


async def test_configured_thresholds_reach_the_rules(tmp_path: Path) -> None:
    config = make_config(tmp_path / "d", alert_options={"latency": {"warning": 1, "critical": 2}},
                         alert_hold=0, metrics_interval=3600)  # fmt: skip
    async with open_server(config) as server:
        engine = server.monitor.engine
        changes = engine.evaluate({"at": 0, "projectId": None, "averageLatency": 1.5}, 0.0)
    assert [(c.rule, c.level, c.threshold) for c in changes] == [("latency", "warning", 1)]
