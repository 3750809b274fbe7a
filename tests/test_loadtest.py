"""``crealia loadtest``: its arguments, its exit codes, and a summary whose arithmetic matches
what the server stored, on one server, through a Redis cluster, and with relay streams."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from crealia import Server, open_server
from crealia._loadtest import (
    LoadtestOptions,
    Progress,
    Unreachable,
    format_summary,
    parse_duration,
    run_loadtest,
)

from ._redis import free_port, run_redis
from .conftest import JWT_SECRET, make_config

TIMEOUT = 60


def options(*urls: str, **overrides: Any) -> LoadtestOptions:
    values: dict[str, Any] = {"urls": urls, "secret": JWT_SECRET, "users": 6, "projects": 2,
                              "duration": 1.5, "cursor_hz": 10, "edit_every": 0.25,
                              "comment_every": 0.5, "seed": 7}  # fmt: skip
    values.update(overrides)
    return LoadtestOptions(**values)


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.ws_port}/ws"


async def stored(server: Server, project: str, run_id: str) -> Counter[str]:
    """The durable events the server keeps of ``project`` from that run, by kind (the clips'
    inserts as ``insert``)."""
    events = await server.backplane.events_since(project, 0)
    assert events is not None
    kinds: Counter[str] = Counter()
    for event in events:
        assert event.user_id.startswith(f"lt-{run_id}-"), event
        inserts = [op for op in event.effects if op["op"] == "insert"]
        kinds["insert" if inserts else event.kind] += 1
    return kinds


def check_arithmetic(summary: dict[str, Any], per_project: int) -> None:
    """The summary adds up: every message offered to the other members of its project."""
    sent, acked, delivered = summary["sent"], summary["acked"], summary["delivered"]
    others = per_project - 1
    total = sent["cursor"] + sent["edit"] + sent["comment"]
    assert summary["offered_per_s"] == round(total * others / summary["duration_s"], 1)
    assert summary["delivered_per_s"] == round(sum(delivered.values()) / summary["duration_s"],
                                               1)  # fmt: skip
    assert acked == {"edit": sent["edit"], "comment": sent["comment"]}
    # durable events reach every other member, exactly once; cursors may be coalesced
    assert delivered["edit"] == summary["applied"] * others
    assert delivered["comment"] == sent["comment"] * others
    assert 0 < delivered["cursor"] <= sent["cursor"] * others
    for kind in ("cursor", "edit_ack", "edit_fanout"):
        row = summary["latency_ms"][kind]
        assert 0 <= row["p50"] <= row["p95"] <= row["p99"], (kind, row)
    assert summary["errors"] == {} and summary["closes"] == {}
    assert summary["bytes_per_user_per_s"] > 0 and summary["bytes_sent_per_user_per_s"] > 0


async def test_summary_adds_up_against_what_the_server_stored(server: Server) -> None:
    with trio.fail_after(TIMEOUT):
        summary = await run_loadtest(options(url(server)))
        assert summary["users"] == 6 and summary["projects"] == 2
        check_arithmetic(summary, per_project=3)
        assert summary["applied"] == summary["sent"]["edit"]  # own clips: no conflict
        assert summary["conflicts"] == {"requested": 0, "detected": 0}
        totals: Counter[str] = Counter()
        for project in ("loadtest-0", "loadtest-1"):
            totals += await stored(server, project, summary["run_id"])
        # the clips' inserts, then every acknowledged edit and comment, nothing else
        assert totals == {"insert": 6, "timeline_change": summary["applied"],
                          "comment_add": summary["sent"]["comment"]}  # fmt: skip


async def test_conflict_rate_makes_conflicts_the_server_detects(server: Server) -> None:
    with trio.fail_after(TIMEOUT):
        summary = await run_loadtest(options(url(server), users=4, projects=1, cursor_hz=2,
                                             comment_every=0, conflict_rate=1.0))  # fmt: skip
    conflicts = summary["conflicts"]
    assert conflicts["requested"] == summary["sent"]["edit"] > 4
    # the first write to the shared clip by someone else than its creator starts them off
    assert 0 < conflicts["detected"] <= conflicts["requested"]
    assert summary["applied"] == summary["sent"]["edit"] - conflicts["detected"]
    check_arithmetic(summary, per_project=4)
    kinds = await stored(server, "loadtest-0", summary["run_id"])
    assert kinds["insert"] == 5  # the shared clip and the four users' own
    assert kinds["timeline_change"] == summary["applied"]
    # each conflict settled by the default chain, as a durable resolution
    assert kinds["conflict_resolved"] == conflicts["detected"]


async def test_users_spread_over_a_redis_cluster_see_each_other(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(run_redis(tmp_path / "redis"))
        configs = [make_config(tmp_path / f"node{i}", redis_url=redis.url) for i in range(2)]
        nodes = [await stack.enter_async_context(open_server(c)) for c in configs]
        with trio.fail_after(TIMEOUT):
            # one project, its users alternating between the two nodes
            summary = await run_loadtest(options(url(nodes[0]), url(nodes[1]), projects=1))
            check_arithmetic(summary, per_project=6)
            kinds = await stored(nodes[1], "loadtest-0", summary["run_id"])
        assert kinds == {"insert": 6, "timeline_change": summary["applied"],
                         "comment_add": summary["sent"]["comment"]}  # fmt: skip


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_elsewhere() -> None:
    figures = {"elapsed_s": 1.0, "duration_s": 10.0, "users": 5, "users_total": 6,
               "sent_per_s": 120.0, "delivered_per_s": 480.0, "cursor_p99_ms": 3.25,
               "errors": 0}  # fmt: skip
    plain = io.StringIO()
    progress = Progress(plain, every=5)
    for second in range(1, 12):
        progress({**figures, "elapsed_s": float(second)})
    lines = plain.getvalue().splitlines()
    assert len(lines) == 3, lines  # at 1, 6 and 11 s
    assert lines[0] == ("     1/10 s  users 5/6  sent 120/s  delivered 480/s  "
                        "cursor p99 3.2 ms  errors 0")  # fmt: skip

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    live = Progress(terminal)
    live(figures)
    live({**figures, "elapsed_s": 2.0})
    live.done()
    assert terminal.getvalue().count("\r\x1b[2K") == 2 and terminal.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("90", 90.0), ("30s", 30.0), ("10m", 600.0), ("1.5h", 5400.0), ("250ms", 0.25), ("0", 0.0)],
)
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["", "10q", "m", "-5s", "nan", "inf"])
def test_bad_durations(raw: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(raw)


def loadtest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crealia", "loadtest", *args], text=True,
                          capture_output=True, timeout=TIMEOUT, env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: --url"),
        (("--url", "http://127.0.0.1:1/ws", "--jwt-secret", "s"), "is not a WebSocket URL"),
        (("--url", "ws://127.0.0.1:99999/ws", "--jwt-secret", "s"), "is not a WebSocket URL"),
        (("--url", "ws://h/ws"), "give --jwt-secret (or CREALIA_JWT_SECRET) or --data-dir"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--data-dir", "d"), "give one of them"),
        (("--url", "ws://h/ws", "--data-dir", "/nonexistent"), "cannot read the server's secret"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--users", "0"), "0 is not from 1 to"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--users", "x"), "'x' is not a whole"),
        (
            ("--url", "ws://h/ws", "--jwt-secret", "s", "--users", "2", "--projects", "3"),
            "more projects than --users 2",
        ),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--duration", "0"), "must be from 0.1 s"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--duration", "ten"), "is not a duration"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--cursor-hz", "61"), "from 0 to 60"),
        (
            ("--url", "ws://h/ws", "--jwt-secret", "s", "--edit-every", "0.01s"),
            "must be 0 (off) or from 0.05 s",
        ),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--conflict-rate", "1.5"), "from 0 to 1"),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--streams", "101"), "not from 0 to 100"),
        (
            ("--url", "ws://h/ws", "--jwt-secret", "s", "--project-prefix", "a b"),
            "--project-prefix 'a b'",
        ),
        (
            ("--url", "ws://h/ws", "--jwt-secret", "s", "--project-prefix=" + "p" * 70),
            "must be 1 to 64",
        ),
        (
            ("--url", "ws://h/ws", "--jwt-secret", "s", "--media-ip", "nowhere"),
            "'nowhere' is not an IP address",
        ),
        (("--url", "ws://h/ws", "--jwt-secret", "s", "--users"), "expected one argument"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = loadtest(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crealia loadtest: "), result.stderr
    assert message in lines[0], lines[0]


async def test_an_unreachable_server_is_one_line_and_exit_1(server: Server) -> None:
    refused = f"ws://127.0.0.1:{free_port()}/ws"
    cases = [
        (refused, JWT_SECRET, f"{refused}: all attempts to connect"),
        (f"ws://127.0.0.1:{server.http_port}/elsewhere", JWT_SECRET,
         "the handshake was refused with HTTP 404"),
        (url(server), "another-secret-of-at-least-32-bytes!!",
         "the server refused the hello: unauthorized"),
    ]  # fmt: skip
    for target, secret, message in cases:
        result = await trio.to_thread.run_sync(
            lambda t=target, s=secret: loadtest("--url", t, "--jwt-secret", s, "--duration", "1")
        )
        assert result.returncode == 1, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("crealia loadtest: cannot reach the server: "), lines[0]
        assert message in lines[0], lines[0]
    with pytest.raises(Unreachable, match="all attempts to connect"):
        await run_loadtest(options(refused))


async def test_the_command_prints_a_table_and_ends_with_json(server: Server) -> None:
    args = ("--url", url(server), "--users", "4", "--projects", "2", "--duration", "1s",
            "--cursor-hz", "5", "--edit-every", "0.5s", "--comment-every", "0",
            "--json")  # fmt: skip
    env = {"CREALIA_JWT_SECRET": JWT_SECRET, "PATH": "/usr/bin:/bin"}
    result = await trio.to_thread.run_sync(lambda: loadtest(*args, env=env))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert set(summary) >= {"users", "projects", "duration_s", "sent", "offered_per_s",
                            "delivered_per_s", "latency_ms", "errors", "closes",
                            "bytes_per_user_per_s"}  # fmt: skip
    assert summary["sent"]["comment"] == 0 and summary["sent"]["edit"] > 0
    check_arithmetic(summary, per_project=2)
    assert "crealia loadtest: 4 users in 2 projects for 1 s" in result.stderr
    assert "edit fan-out" in result.stderr  # the table went to stderr
    plain = await trio.to_thread.run_sync(lambda: loadtest(*args[:-1], env=env))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("crealia loadtest: 4 users in 2 projects")
    assert "latency (ms)" in plain.stdout


@pytest.fixture
async def relay_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = make_config(tmp_path / "data", webrtc_listen_ips=("127.0.0.1",))
    async with open_server(config) as server:
        yield server


@pytest.mark.usefixtures("loopback_only")
async def test_two_relay_streams_report_real_frame_rates(relay_server: Server) -> None:
    with trio.fail_after(TIMEOUT):
        summary = await run_loadtest(options(url(relay_server), users=2, projects=2, duration=3,
                                             cursor_hz=2, edit_every=0, comment_every=0,
                                             streams=2))  # fmt: skip
    streams = summary["streams"]
    assert len(streams) == 2
    for stream in streams:
        assert "error" not in stream, stream
        # a 15 fps source through the relay's decode and re-encode
        assert 5 <= stream["viewer_fps"] <= 20, stream
        assert stream["frames"] >= 15, stream
        assert stream["bitrate_kbps"] > 20, stream


def test_an_empty_secret_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("\n")
    result = loadtest("--url", "ws://h/ws", "--data-dir", str(tmp_path))
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"crealia loadtest: --data-dir {tmp_path}: the server's secret {tmp_path}/jwt-secret "
        "is empty (see crealia loadtest --help)"
    ]


async def test_the_data_dir_named_on_the_command_line_wins_over_the_environment(
    server: Server, tmp_path: Path
) -> None:
    (tmp_path / "jwt-secret").write_text(JWT_SECRET + "\n")
    args = ("--url", url(server), "--data-dir", str(tmp_path), "--users", "2", "--projects",
            "1", "--duration", "0.5", "--edit-every", "0", "--comment-every", "0",
            "--json")  # fmt: skip
    env = {"CREALIA_JWT_SECRET": "another-servers-secret-of-32-bytes-or-more", "PATH": "/bin"}
    result = await trio.to_thread.run_sync(lambda: loadtest(*args, env=env))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["users"] == 2


async def _deaf_server(
    listeners: list[trio.SocketListener], *, task_status: trio.TaskStatus[int]
) -> None:
    """Welcomes one hello, then reads nothing more, ever."""

    async def handle(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some(65536))
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection(subprotocol="crealia.v1")))
                elif isinstance(event, TextMessage):
                    welcome = {"type": "welcome", "ref": 1, "data": {"seq": 0, "users": []}}
                    await stream.send_all(ws.send(TextMessage(data=json.dumps(welcome))))
                    await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def test_a_server_that_stops_answering_cannot_hold_the_run(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = await nursery.start(_deaf_server, listeners)
    with trio.fail_after(30):  # traffic 1 s, drain 2 s, close 1 s
        summary = await run_loadtest(options(f"ws://127.0.0.1:{port}/ws", users=1, projects=1,
                                             duration=1, cursor_hz=60, edit_every=0,
                                             comment_every=0, settle_timeout=2))  # fmt: skip
    assert summary["users"] == 1 and summary["sent"]["cursor"] > 0


def test_the_table_says_why_users_were_refused() -> None:
    summary = {"users": 3, "projects": 1, "duration_s": 1.0,
               "sent": {"cursor": 10, "edit": 0, "comment": 0}, "acked": {"edit": 0, "comment": 0},
               "applied": 0, "offered_per_s": 20.0, "delivered_per_s": 20.0,
               "latency_ms": {k: {"p50": 1.0, "p95": 2.0, "p99": 3.0}
                              for k in ("cursor", "edit_ack", "edit_fanout")},
               "errors": {"connect": 7}, "closes": {"4429": 7}, "bytes_per_user_per_s": 1.0,
               "bytes_sent_per_user_per_s": 1.0, "conflicts": {"requested": 0, "detected": 0},
               "loadgen_cpu_percent": 95.0}  # fmt: skip
    table = format_summary(summary, ["ws://127.0.0.1:1/ws"])
    assert "errors: connect x7" in table and "closes by the server: 4429 x7" in table
    assert "per-address limits count every user of this machine as one client" in table
    assert "near 100 %: the generator, not the server, was the limit" in table
    quiet = format_summary({**summary, "errors": {}, "closes": {}, "loadgen_cpu_percent": 10.0},
                           ["ws://127.0.0.1:1/ws"])  # fmt: skip
    assert "per-address" not in quiet and "was the limit" not in quiet
