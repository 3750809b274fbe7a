"""PostgreSQL as the store of record: the private test server, then the backplane.

Policy: loopback only, port 0, a deadline on every I/O test, a real PostgreSQL per test
(tests/_postgres.py), no mocks and no sleeps.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from crealia import (
    Comment,
    Config,
    ConfigurationError,
    Conflict,
    DurableEvent,
    Ephemeral,
    Overloaded,
    TimelineChange,
    TransportError,
    User,
    open_server,
)
from crealia._document import Quotas
from crealia._wire import InsertOp
from crealia.backplanes import _pg
from crealia.backplanes.postgresql import (
    BUSY_TRIES,
    PostgreSQLBackplane,
    open_postgresql_backplane,
)
from crealia.testing import check_backplane

from ._postgres import PostgresServer, free_port, run_postgres
from ._wsclient import open_raw_client
from .conftest import make_config, opened
from .test_protocol import insert


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresServer]:
    async with run_postgres() as server:
        yield server


async def test_postgres_fixture_starts_stops_and_survives_an_immediate_stop(
    postgres: PostgresServer,
) -> None:
    with trio.fail_after(60):
        await postgres.psql("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        await postgres.stop("immediate")
        await postgres.start()
        assert (await postgres.psql("SELECT n FROM t")).strip() == "1"
        await postgres.kill()
        await postgres.start()
        assert (await postgres.psql("SELECT count(*) FROM t")).strip() == "1"
        assert postgres.starts == 3


# -- the contract ------------------------------------------------------------------------------


async def test_check_backplane_passes_on_postgresql(postgres: PostgresServer) -> None:
    url = await postgres.create_database("conformance")
    with trio.fail_after(300):
        await check_backplane(lambda: open_postgresql_backplane(url, history_limit=1000))


async def test_check_backplane_passes_on_postgresql_at_the_least_history_memory(
    postgres: PostgresServer,
) -> None:
    """At ``history_memory_bytes``' least bound most resumes read their events back from the
    database (``History.since``)."""
    url = await postgres.create_database("conformance_small")
    quotas = Quotas(history_memory=64 * 1024)
    with trio.fail_after(300):
        await check_backplane(
            lambda: open_postgresql_backplane(url, history_limit=1000, quotas=quotas)
        )


# -- two processes on one database --------------------------------------------------------------


class _Heard:
    """A listener keeping the seqs it hears, and when (trio's clock)."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.at: dict[int, float] = {}
        self.changed = trio.Event()
        self.rewritten = trio.Event()

    def on_durable(self, event: DurableEvent) -> None:
        self.seqs.append(event.seq)
        self.at[event.seq] = trio.current_time()
        self.changed.set()
        self.changed = trio.Event()

    def on_conflicts(self, conflicts: list[Conflict]) -> None:
        pass

    def on_rewritten(self) -> None:
        self.rewritten.set()

    def on_ephemeral(self, message: Ephemeral) -> None:
        pass

    async def until(self, seq: int) -> None:
        while seq not in self.at:
            await self.changed.wait()


def _user(project_id: str, name: str) -> User:
    return User(id=name, name=name, role="editor", project_id=project_id)


def _change(change_id: str, element_id: str, **props: Any) -> TimelineChange:
    op = InsertOp(op="insert", element_id=element_id, element_type="clip", props=props)
    return TimelineChange(change_id=change_id, changes=[op])


async def test_two_backplanes_on_one_database_see_one_gap_free_order(
    postgres: PostgresServer,
) -> None:
    url = await postgres.create_database("two")
    project = "p-two"
    with trio.fail_after(120):
        async with (
            open_postgresql_backplane(url) as one,
            open_postgresql_backplane(url) as two,
        ):
            heard_one, heard_two = _Heard(), _Heard()
            async with one.subscribe(project, heard_one), two.subscribe(project, heard_two):
                acked: list[int] = []

                async def writer(backplane: PostgreSQLBackplane, name: str) -> None:
                    for i in range(100):
                        if i % 4 == 3:
                            seq, dup = await backplane.commit_comment(
                                _user(project, name), Comment(id=f"{name}-k{i}", text="x")
                            )
                            assert not dup
                        else:
                            outcome = await backplane.commit_change(
                                _user(project, name), _change(f"{name}-c{i}", f"{name}-e{i}", v=i)
                            )
                            assert outcome.status == "applied" and outcome.seq is not None
                            seq = outcome.seq
                        acked.append(seq)

                async with trio.open_nursery() as nursery:
                    for backplane, name in ((one, "a"), (two, "b"), (one, "c"), (two, "d")):
                        nursery.start_soon(writer, backplane, name)
                assert sorted(acked) == list(range(1, 401))
                await heard_one.until(400)
                await heard_two.until(400)
                assert heard_one.seqs == heard_two.seqs == list(range(1, 401))
            for backplane in (one, two):
                events = await backplane.events_since(project, 0)
                assert events is not None and [e.seq for e in events] == list(range(1, 401))
            snap_one, snap_two = await one.snapshot(project), await two.snapshot(project)
            assert snap_one == snap_two and snap_one["seq"] == 400
            assert len(snap_one["elements"]) == 300
            # Both processes wrote, so both waited for the other's row lock at times.
            assert one.writes >= 200 and two.writes >= 200
            assert await one.epoch(project) == await two.epoch(project)


async def test_a_process_that_must_catch_up_still_writes_while_another_keeps_writing(
    postgres: PostgresServer,
) -> None:
    """A write prepared on a mirror the project moved past is prepared again while its
    transaction holds the project's row, so it commits. Before, it gave the row up and tried
    again: the process that kept writing learnt of its success before the other learnt of its
    failure and took the row first every time, and the other's writes failed with
    ``overloaded`` after 64 attempts (on CI; here 3 busy writers on one process did it)."""
    url = await postgres.create_database("starve")
    project = "p-starve"
    with trio.fail_after(120):
        async with (
            open_postgresql_backplane(url) as busy,
            open_postgresql_backplane(url) as other,
        ):
            done = trio.Event()

            async def keep_writing(name: str) -> None:
                i = 0
                while not done.is_set():
                    await busy.commit_change(
                        _user(project, name), _change(f"{name}-{i}", f"{name}-{i}", v=i)
                    )
                    i += 1

            async with trio.open_nursery() as nursery:
                for name in ("a", "b", "c"):
                    nursery.start_soon(keep_writing, name)
                for i in range(30):
                    if i % 3 == 2:
                        _seq, dup = await other.commit_comment(
                            _user(project, "z"), Comment(id=f"z-k{i}", text="x")
                        )
                        assert not dup
                    else:
                        outcome = await other.commit_change(
                            _user(project, "z"), _change(f"z-{i}", f"z-{i}", v=i)
                        )
                        assert outcome.status == "applied"
                done.set()
            # The other process prepared its writes again under the lock, not in a new try.
            assert other.redone > 0
            events = await other.events_since(project, 0)
            assert events is not None
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert sum(1 for e in events if e.user_id == "z") == 30


async def test_an_erasure_s_notice_leaves_a_mirror_loaded_from_the_rewritten_history(
    postgres: PostgresServer,
) -> None:
    """The erasing process opens the project again (its room reopens as soon as the erasure
    is done) before its own notice comes: that notice must not close the new room, whose
    members would resume a second time; a notice of another epoch does close it."""
    url = await postgres.create_database("renotice")
    project = "p-renotice"
    with trio.fail_after(60):
        async with open_postgresql_backplane(url) as one:
            await one.commit_change(_user(project, "alice"), _change("c1", "e1", v=1))
            await one.erase_user(project, "alice", "erased-1")
            epoch = await one.epoch(project)
            heard = _Heard()
            async with one.subscribe(project, heard):
                notice = {"p": project, "s": 1, "e": epoch}
                one._heard([orjson.dumps(notice).decode()])  # its own, whenever it comes
                assert not heard.rewritten.is_set()
                one._heard([orjson.dumps(notice | {"e": "another"}).decode()])
                assert heard.rewritten.is_set()


async def test_a_database_restored_under_a_running_process_renews_the_epochs_it_holds(
    postgres: PostgresServer,
) -> None:
    """An online backup (pg_dump) restored in place of the database while a process has the
    project open: its identity changed (another database oid), so every project gets a new
    epoch and the process drops its copy and tells the room (``on_rewritten``), although it
    held two events the restored database does not have. Before, it kept its copy, refused
    every write ("behind") and gave resuming clients the old epoch."""
    url = await postgres.create_database("live")
    project = "p-restore"
    dump = postgres.directory / "live.dump"
    pg_url = ["-h", str(postgres.directory), "-p", str(postgres.port), "-U", "postgres"]
    with trio.fail_after(120):
        async with open_postgresql_backplane(url, poll_interval=0.2) as backplane:
            heard = _Heard()
            async with backplane.subscribe(project, heard):
                for i in range(3):
                    await backplane.commit_change(
                        _user(project, "a"), _change(f"c{i}", f"e{i}", v=i)
                    )
                before = await backplane.epoch(project)
                await postgres._run("pg_dump", "-Fc", *pg_url, "-f", str(dump), "live")
                for i in range(3, 5):
                    await backplane.commit_change(
                        _user(project, "a"), _change(f"c{i}", f"e{i}", v=i)
                    )
                await postgres.psql("CREATE DATABASE staged")
                await postgres._run("pg_restore", *pg_url, "-d", "staged", str(dump))
                await postgres.psql("DROP DATABASE live WITH (FORCE)")
                await postgres.psql("ALTER DATABASE staged RENAME TO live")
                await heard.rewritten.wait()
            after = await backplane.epoch(project)
            assert after != before
            events = await backplane.events_since(project, 0)
            assert events is not None and [e.seq for e in events] == [1, 2, 3]
            outcome = await backplane.commit_change(_user(project, "a"), _change("c9", "e9"))
            assert outcome.seq == 4
        # A process started on the restored database later finds its identity stored.
        async with open_postgresql_backplane(url) as again:
            assert await again.epoch(project) == after


async def test_a_write_whose_row_another_transaction_holds_is_put_off_then_waits(
    postgres: PostgresServer,
) -> None:
    """Another transaction holds the project's row: the write is answered busy (so the batch
    does not wait holding its other rows) twice, then waits for the row, and commits once
    the other transaction ends."""
    url = await postgres.create_database("busy")
    project = "p-busy"
    holder = _pg.PgConnection(url, name="test-holder")
    with trio.fail_after(60):
        async with open_postgresql_backplane(url) as backplane:
            await backplane.commit_change(_user(project, "a"), _change("c0", "e0"))

            def hold(conn: Any) -> None:
                conn.execute("BEGIN")
                conn.execute("SELECT seq FROM projects WHERE project_id = %s FOR UPDATE",
                             (project,))  # fmt: skip

            def waiting(conn: Any) -> int:
                row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
                return int(row[0])

            watcher = _pg.PgConnection(url, name="test-watcher")
            try:
                await holder.run(hold)
                async with trio.open_nursery() as nursery:
                    acked = trio.Event()

                    async def write() -> None:
                        outcome = await backplane.commit_change(
                            _user(project, "a"), _change("c1", "e1")
                        )
                        assert outcome.seq == 2
                        acked.set()

                    nursery.start_soon(write)
                    while not await watcher.run(waiting):
                        await trio.sleep(0.02)  # polling the database for the waiting lock
                    assert backplane.busy == BUSY_TRIES and not acked.is_set()
                    await holder.run(lambda conn: conn.execute("COMMIT"))
                    await acked.wait()
            finally:
                await holder.close()
                await watcher.close()


async def test_a_write_prepared_on_a_copy_of_a_rewritten_history_is_refused(
    postgres: PostgresServer,
) -> None:
    """The project's epoch changed under this process's copy (an erasure elsewhere whose
    notice has not come yet; here the poller is too slow to notice): the write is refused,
    nothing applied, the room hears ``on_rewritten``, and the resend commits on the reloaded
    copy. Before, the seq matched, so a write built on the erased values (a conflict's
    ``current.user_id``) committed on top of the rewrite."""
    url = await postgres.create_database("stale-epoch")
    project = "p-stale-epoch"
    with trio.fail_after(60):
        async with open_postgresql_backplane(url, poll_interval=600) as backplane:
            heard = _Heard()
            async with backplane.subscribe(project, heard):
                await backplane.commit_change(_user(project, "a"), _change("c1", "e1"))
                await postgres.psql(
                    f"UPDATE projects SET epoch = 'rewritten' WHERE project_id = '{project}'",
                    database="stale-epoch",
                )
                with pytest.raises(Overloaded, match="rewritten meanwhile"):
                    await backplane.commit_change(_user(project, "a"), _change("c2", "e2"))
                assert heard.rewritten.is_set()
            outcome = await backplane.commit_change(_user(project, "a"), _change("c2", "e2"))
            assert outcome.status == "applied" and outcome.seq == 2


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_notify_delivers_another_process_s_events_within_a_bounded_delay(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The delay from a write's ack on one process to its delivery on another (LISTEN/NOTIFY,
    events read by seq), and the ack latency itself, over 300 sequential edits."""
    url = await postgres.create_database("delay")
    project = "p-delay"
    with trio.fail_after(120):
        async with (
            open_postgresql_backplane(url) as one,
            open_postgresql_backplane(url) as two,
        ):
            heard = _Heard()
            async with two.subscribe(project, heard):
                acks: list[float] = []
                delays: list[float] = []
                for i in range(300):
                    started = trio.current_time()
                    outcome = await one.commit_change(
                        _user(project, "a"), _change(f"c{i}", f"e{i}", v=i)
                    )
                    acked = trio.current_time()
                    assert outcome.seq == i + 1
                    await heard.until(i + 1)
                    acks.append(acked - started)
                    delays.append(max(0.0, heard.at[i + 1] - acked))
            assert heard.seqs == list(range(1, 301))
            assert two.notices >= 300
    line = (
        f"postgresql: edit ack p50 {_percentile(acks, 0.5) * 1000:.2f} ms, "
        f"p99 {_percentile(acks, 0.99) * 1000:.2f} ms; NOTIFY delivery to another process after "
        f"the ack p50 {_percentile(delays, 0.5) * 1000:.2f} ms, "
        f"p99 {_percentile(delays, 0.99) * 1000:.2f} ms"
    )
    with capsys.disabled():
        print(f"\n{line}")
    # Far below the poller's period: the notices did the delivering.
    assert _percentile(delays, 0.99) < 0.5, line


# -- a real session ------------------------------------------------------------------------------


async def test_a_session_served_on_postgresql_acks_fans_out_and_resumes(
    postgres: PostgresServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    url = await postgres.create_database("served")
    config = make_config(tmp_path / "data")
    with trio.fail_after(60):
        async with open_postgresql_backplane(url) as backplane:
            async with open_server(config, backplane=backplane) as server:
                assert server.backplane is backplane
                async with opened(server, nursery) as clients:
                    alice = await clients.join("alice")
                    bob = await clients.join("bob")
                    assert alice.welcome["epoch"] == await backplane.epoch("p1")
                    ack = await alice.request("timeline_change", insert("c1", "clip", v=1))
                    assert ack["type"] == "ack" and ack["data"]["status"] == "applied", ack
                    event = await bob.event("timeline_change", seq=1)
                    assert event["data"]["payload"]["changes"][0]["element_id"] == "clip"
                    comment = await bob.request(
                        "comment_add", {"comment": {"id": "k", "text": "hi"}}
                    )
                    assert comment["type"] == "ack" and comment["data"]["seq"] == 2, comment
                    await alice.event("comment_add", seq=2)
                    await alice.send("cursor_update", {"position": {"x": 1, "y": 2}})
                    cursor = await bob.event("cursor_update")
                    assert cursor["data"]["user_id"] == "alice"
                    carol = await clients.raw()
                    welcome = await carol.hello(clients.token("carol"), "p1", resume=1,
                                                epoch=alice.welcome["epoch"])  # fmt: skip
                    assert "snapshot" not in welcome and welcome["replayed"] >= 1, welcome
                    replayed = await carol.event("comment_add", seq=2)
                    assert replayed["data"]["payload"]["comment"]["text"] == "hi"
                    # Another history's epoch: a snapshot, never a replay.
                    dave = await clients.raw()
                    other = await dave.hello(clients.token("dave"), "p1", resume=1,
                                             epoch="another-history")  # fmt: skip
                    assert other["snapshot"]["seq"] == 2, other
                async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                    ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["checks"]["postgresql"] == "ok", ready.json()
            snapshot = await backplane.snapshot("p1")
            assert snapshot["seq"] == 2 and snapshot["elements"]["clip"]["props"] == {"v": 1}


# -- migrations ----------------------------------------------------------------------------------


async def test_migrations_bring_an_empty_database_to_the_current_schema(
    postgres: PostgresServer,
) -> None:
    url = await postgres.create_database("migrated")
    with trio.fail_after(60):
        assert await _pg.migrate(url) == (0, _pg.SCHEMA_VERSION)
        assert await _pg.migrate(url) == (_pg.SCHEMA_VERSION, _pg.SCHEMA_VERSION)
        tables = await postgres.psql(
            "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
            "WHERE schemaname = 'public'", database="migrated",
        )  # fmt: skip
        assert tables.strip().split(",") == [
            "alerts", "audit_events", "changes", "comments", "conflicts", "crealia_identity",
            "crealia_schema", "events", "health", "metric_samples", "project_roles",
            "project_settings",
            "projects", "security_alerts", "snapshots",
        ]  # fmt: skip
        # Opening a backplane on an empty database migrates it too.
        fresh = await postgres.create_database("fresh")
        async with open_postgresql_backplane(fresh) as backplane:
            await backplane.commit_comment(_user("p", "a"), Comment(id="k", text="x"))
        versions = await postgres.psql("SELECT version FROM crealia_schema", database="fresh")
        assert versions.split() == [str(v) for v in range(1, _pg.SCHEMA_VERSION + 1)]


async def test_a_database_with_a_newer_schema_is_refused_in_one_line(
    postgres: PostgresServer,
) -> None:
    url = await postgres.create_database("newer")
    with trio.fail_after(60):
        await _pg.migrate(url)
        await postgres.psql("INSERT INTO crealia_schema (version) VALUES (99)", database="newer")
        message = (
            f"database '{url}' has schema version 99, newer than this crealia's "
            f"{_pg.SCHEMA_VERSION}: upgrade crealia (or use another database)"
        )
        with pytest.raises(ConfigurationError) as refused:
            async with open_postgresql_backplane(url):
                pytest.fail("a newer schema must be refused")  # pragma: no cover
        assert str(refused.value) == message
        with pytest.raises(ConfigurationError, match="newer than this crealia's"):
            await _pg.migrate(url)


# -- the database restarts -----------------------------------------------------------------------


async def test_after_an_immediate_stop_and_restart_acked_edits_are_there_and_writes_go_on(
    postgres: PostgresServer,
) -> None:
    url = await postgres.create_database("restart")
    project = "p-restart"
    with trio.fail_after(120):
        async with open_postgresql_backplane(url) as backplane:
            heard = _Heard()
            async with backplane.subscribe(project, heard):
                for i in range(50):
                    outcome = await backplane.commit_change(
                        _user(project, "a"), _change(f"c{i}", f"e{i}", v=i)
                    )
                    assert outcome.seq == i + 1
                await postgres.stop("immediate")  # a crash: recovery replays the WAL
                with pytest.raises(Overloaded):
                    await backplane.commit_change(_user(project, "a"), _change("down", "x"))
                with pytest.raises(TransportError):
                    await backplane.check()
                await postgres.start()
                # The writer's connection died while PostgreSQL was away: the next write
                # reconnects and commits, first time.
                outcome = await backplane.commit_change(_user(project, "a"), _change("c50", "e50"))
                assert (outcome.status, outcome.seq) == ("applied", 51)
                await heard.until(51)
                assert heard.seqs == list(range(1, 52))
                await backplane.wait_listening()
                await backplane.check()
                assert backplane.writer_conn.opened == 2
                # The listener's lost connection was counted, and it listens again.
                assert backplane.jobs.counts["pg_listener"] >= 1
                assert "pg_listener" not in backplane.jobs.failing
        async with open_postgresql_backplane(url) as again:
            events = await again.events_since(project, 0)
            assert events is not None and [e.seq for e in events] == list(range(1, 52))
            snapshot = await again.snapshot(project)
            assert {eid: el["props"].get("v") for eid, el in snapshot["elements"].items()} == {
                **{f"e{i}": i for i in range(50)}, "e50": None,
            }  # fmt: skip


async def test_an_unreachable_database_is_one_line_at_start(postgres: PostgresServer) -> None:
    await postgres.stop("fast")
    url = postgres.database_url("postgres")
    with trio.fail_after(30), pytest.raises(TransportError) as refused:
        async with open_postgresql_backplane(url):
            pytest.fail("must not open")  # pragma: no cover
    message = str(refused.value)
    assert message.startswith(f"database '{url}': cannot connect: "), message
    assert "\n" not in message
    with pytest.raises(ConfigurationError, match=r"expected postgresql://"):
        async with open_postgresql_backplane("mysql://h/db"):
            pytest.fail("must not open")  # pragma: no cover


# -- the command line: crealia migrate, crealia serve --database ----------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``python -m crealia`` of this checkout, its ``postgresql`` entry
    point registered (by a throwaway distribution until the package is installed again)."""
    paths = [str(ROOT)]
    groups = importlib.metadata.entry_points(group="crealia.backplanes")
    if "postgresql" not in groups.names:
        site = tmp_path / "site"
        info = site / "crealia_postgresql_entry-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: crealia-postgresql-entry\nVersion: 0\n"
        )
        (info / "entry_points.txt").write_text(
            "[crealia.backplanes]\npostgresql = crealia.backplanes.postgresql:open_backplane\n"
        )
        paths.append(str(site))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREALIA_", "DATABASE_"))}
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "crealia", *args], env=env,
                                      capture_stdout=True, capture_stderr=True,
                                      check=False)  # fmt: skip
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def test_setup_cfg_registers_the_postgresql_backplane_and_pins_psycopg() -> None:
    text = (ROOT / "setup.cfg").read_text()
    assert "    postgresql = crealia.backplanes.postgresql:open_backplane\n" in text
    assert "    psycopg[binary]>=3.2\n" in text


async def test_cli_migrate_brings_a_database_up_and_refuses_a_newer_one_in_one_line(
    postgres: PostgresServer, cli_env: dict[str, str]
) -> None:
    url = await postgres.create_database("cli")
    status, out, err = await _cli(cli_env, "migrate", "--database", url)
    assert (status, err) == (0, ""), err
    version = _pg.SCHEMA_VERSION
    assert out == f"crealia: database {url}: schema migrated from version 0 to {version}\n"
    status, out, err = await _cli({**cli_env, "DATABASE_URL": url}, "migrate")
    assert (status, out) == (
        0, f"crealia: database {url}: schema version {version}, up to date\n"
    ), err  # fmt: skip
    await postgres.psql(f"INSERT INTO crealia_schema (version) VALUES ({version + 1})",
                        database="cli")  # fmt: skip
    status, out, err = await _cli(cli_env, "migrate", "--database", url)
    assert status == 2
    assert err.splitlines() == [
        f"crealia: database '{url}' has schema version {version + 1}, newer than this "
        f"crealia's {version}: upgrade crealia (or use another database)"
    ]
    status, _out, err = await _cli(cli_env, "migrate", "--database", "sqlite:")
    assert status == 2
    assert err.strip() == (
        "crealia: backplane 'sqlite' has no migrations to run (it brings its store up to date "
        "when it opens)"
    )


async def test_cli_serve_with_an_unreachable_database_is_one_line(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    port = free_port()
    url = f"postgresql://crealia:hunter2@127.0.0.1:{port}/crealia"
    secret = tmp_path / "secret"
    secret.write_text("a-test-secret-of-at-least-32-bytes-long!!")
    status, _out, err = await _cli(cli_env, "serve", "--database", url, "--port", "0",
                                   "--ws-port", "0", "--data-dir", str(tmp_path / "d"),
                                   "--jwt-secret-file", str(secret))  # fmt: skip
    assert status == 2, err
    (line,) = err.splitlines()
    assert line.startswith(
        f"crealia: database 'postgresql://crealia:***@127.0.0.1:{port}/crealia': cannot connect: "
    ), line
    assert "hunter2" not in err


async def test_a_crealia_serve_process_and_this_one_share_a_project_on_one_database(
    postgres: PostgresServer, cli_env: dict[str, str], tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A real second process: ``crealia serve --database``; a client of each process, edits on
    both, one gap-free order on both."""
    url = await postgres.create_database("cluster")
    config = make_config(tmp_path / "here")
    secret = tmp_path / "secret"
    secret.write_text(config.jwt_secret or "")
    with trio.fail_after(90):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "crealia", "serve", "--database", url, "--port", "0",
             "--ws-port", "0", "--data-dir", str(tmp_path / "there"),
             "--jwt-secret-file", str(secret)],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            seen = b""
            while b"\n" not in seen:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "crealia serve exited before listening"
                seen += chunk
            first = seen.decode().splitlines()[0]
            assert first.startswith("crealia listening"), first
            ws_port = int(first.split("ws=")[1])
            async with (
                open_postgresql_backplane(url) as backplane,
                open_server(config, backplane=backplane) as server,
                opened(server, nursery) as clients,
            ):
                alice = await clients.join("alice")
                bob = await open_raw_client(nursery, f"ws://127.0.0.1:{ws_port}/ws")
                await bob.hello(clients.token("bob"), "p1")
                for i in range(10):
                    ack = await alice.request("timeline_change", insert(f"a{i}", f"ea{i}", v=i))
                    assert ack["data"]["status"] == "applied", ack
                    ack = await bob.request("timeline_change", insert(f"b{i}", f"eb{i}", v=i))
                    assert ack["data"]["status"] == "applied", ack
                for client in (alice, bob):
                    for seq in range(1, 21):
                        await client.event("timeline_change", seq=seq)
                await bob.aclose()
                snapshot = await backplane.snapshot("p1")
                assert snapshot["seq"] == 20 and len(snapshot["elements"]) == 20
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0


def test_config_database_url_selects_the_postgresql_backplane() -> None:
    url = "postgresql://crealia:secret@db:5432/crealia"
    assert Config(database_url=url).backplane_url == url
    assert Config.from_env({"DATABASE_URL": url}).backplane_url == url
    assert Config.from_env({}, database_url=url).database_url == url
    assert Config(database_url=url, backplane_url=url).backplane_url == url
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({"DATABASE_URL": "mysql://root:pw@db/x"})
    assert str(refused.value) == (
        "DATABASE_URL='mysql://root:***@db/x': database_url must be a "
        "postgresql://[user[:password]@]host[:port]/database URL"
    )
    with pytest.raises(ConfigurationError, match=r"both choose the backplane: set one of them"):
        Config(database_url=url, backplane_url="sqlite:")
    # A Redis URL beside the database is the Redis beside it, however it is given.
    beside = Config(database_url=url, redis_url="redis://r:6379/0")
    assert (beside.backplane_url, beside.redis_url) == (url, "redis://r:6379/0")
    for env in ({"DATABASE_URL": url, "REDIS_URL": "redis://r:6379/0"},
                {"CREALIA_BACKPLANE": url, "REDIS_URL": "redis://r:6379/0"}):  # fmt: skip
        beside = Config.from_env(env)
        assert (beside.backplane_url, beside.redis_url) == (url, "redis://r:6379/0"), env
    beside = Config(database_url=url, backplane_url="redis://r:6379/0")
    assert (beside.backplane_url, beside.redis_url) == (url, "redis://r:6379/0")
    with pytest.raises(ConfigurationError, match=r"two Redis servers beside the database"):
        Config(database_url=url, backplane_url="redis://r:6379/0", redis_url="redis://s:6379/0")
    assert "secret" not in repr(Config(database_url=url))
