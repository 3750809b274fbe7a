"""The in-process backplane directly: a write that cannot be recorded leaves nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from crealia import BadRequest, InternalError, Overloaded, User
from crealia._document import Quotas
from crealia._errors import StorageError
from crealia._storage import open_store
from crealia._wire import Comment, InsertOp, SetOp, TimelineChange
from crealia.backplanes.sqlite import SQLiteBackplane

USER = User(id="u", name="u", role="editor", project_id="p")


def _insert(change_id: str, element_id: str) -> TimelineChange:
    op = InsertOp(op="insert", element_id=element_id, element_type="clip", props={})
    return TimelineChange(change_id=change_id, changes=[op])


def _set(change_id: str, value: object) -> TimelineChange:
    return TimelineChange(
        change_id=change_id, changes=[SetOp(op="set", element_id="e", prop="v", value=value)]
    )


async def test_unencodable_value_is_refused_before_the_document_is_touched(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store)
            assert (await backplane.commit_change(USER, _insert("c1", "e"))).seq == 1
            # A value no JSON encoder takes, as a plugin bug might produce (past the message
            # validators): the document's value check refuses it before anything is touched.
            bad = _set("c2", 1)
            object.__setattr__(bad.changes[0], "value", {1, 2})
            with pytest.raises(BadRequest):
                await backplane.commit_change(USER, bad)
            project = backplane._projects["p"]
            assert not project.broken
            outcome = await backplane.commit_change(USER, _set("c2", 3))
            assert (outcome.status, outcome.seq) == ("applied", 2)
            assert backplane._projects["p"] is project  # not reloaded: nothing was touched


async def test_unencodable_write_marks_project_broken_and_reloads(tmp_path: Path) -> None:
    """A comment whose text no encoder takes (a lone surrogate: valid in a Python str, never in
    JSON off the wire) passes the message validators; the project's seq has moved on in memory
    when encoding the event fails. The project is marked broken and reloaded from the store."""
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store)
            assert (await backplane.commit_change(USER, _insert("c1", "e"))).seq == 1
            broken = backplane._projects["p"]
            with pytest.raises(InternalError, match="could not record the write"):
                await backplane.commit_comment(USER, Comment(id="k", text="a\ud800b"))
            assert broken.broken
            assert broken.doc.seq == 2  # memory ran ahead of the store: hence the reload
            # The next write reloads the project from what is durable: no gap, no seq reused.
            outcome = await backplane.commit_change(USER, _set("c2", 3))
            assert (outcome.status, outcome.seq) == ("applied", 2)
            assert backplane._projects["p"] is not broken
            assert await backplane.commit_comment(USER, Comment(id="k", text="ok")) == (3, False)
            snapshot = await backplane.snapshot("p")
            assert snapshot["seq"] == 3 and snapshot["elements"]["e"]["props"] == {"v": 3}
            assert [e.seq for e in await backplane.events_since("p", 0) or []] == [1, 2, 3]


async def test_failed_commit_marks_project_broken_and_reloads(tmp_path: Path) -> None:
    """The store's commit fails (the real SQLite transaction is rolled back): the change that
    was already applied in memory is dropped by reloading the project from the store."""
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store)
            assert (await backplane.commit_change(USER, _insert("c1", "e"))).seq == 1
            broken = backplane._projects["p"]
            store.fail_commits = True
            with pytest.raises(Overloaded) as caught:
                await backplane.commit_change(USER, _set("c2", "lost"))
            assert caught.value.outcome == "not_applied"
            assert broken.broken
            # While broken, nothing more is taken from the stale copy.
            store.fail_commits = False
            outcome = await backplane.commit_change(USER, _set("c3", "kept"))
            assert (outcome.status, outcome.seq) == ("applied", 2)
            assert backplane._projects["p"] is not broken
            snapshot = await backplane.snapshot("p")
            assert snapshot["elements"]["e"]["props"] == {"v": "kept"}
            # The failed change's id was not recorded: sending it again applies it.
            again = await backplane.commit_change(USER, _set("c2", "lost"))
            assert (again.status, again.seq) == ("applied", 3)
            assert [e.seq for e in await backplane.events_since("p", 0) or []] == [1, 2, 3]


async def test_concurrent_lookups_share_thread_calls_and_keep_their_own_results(
    tmp_path: Path,
) -> None:
    with trio.fail_after(10):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store)
            for n in range(20):
                await backplane.commit_change(USER, _insert(f"c{n}", f"e{n}"))
            found: dict[int, object] = {}

            async def look(n: int) -> None:
                found[n] = await store.lookup(
                    lambda conn: conn.execute(
                        "SELECT seq FROM changes WHERE project_id = 'p' AND change_id = ?",
                        (f"c{n}",),
                    ).fetchone()
                )

            async def broken() -> None:
                with pytest.raises(StorageError, match="sqlite: no such table: nowhere"):
                    await store.lookup(lambda conn: conn.execute("SELECT * FROM nowhere"))

            async def buggy() -> None:  # a bug in one lookup is that caller's alone
                with pytest.raises(ZeroDivisionError):
                    await store.lookup(lambda conn: 1 / 0)

            before = store.lookup_batches
            async with trio.open_nursery() as nursery:
                for n in range(25):  # five of them for ids never stored
                    nursery.start_soon(look, n)
                nursery.start_soon(broken)
                nursery.start_soon(buggy)
            assert found == {n: (n + 1,) if n < 20 else None for n in range(25)}
            assert await store.lookup(lambda conn: 7) == 7  # the store goes on
            # queued together: one thread call (two if the first began before the rest came)
            assert store.lookup_batches - before <= 3, store.lookup_batches - before
        with pytest.raises(StorageError, match="store is closed"):
            await store.lookup(lambda conn: None)


async def test_a_project_loads_and_resumes_beside_a_busy_writer(tmp_path: Path) -> None:
    """A room opening loads its project, and a resume reads the events no longer held in memory
    back from the store: both on the store's second connection, beside the writer, so that a
    long load never holds every project's commits behind it (what stalled the soak's acks).
    Here the writer's connection is held busy; the load and the read-back still complete."""
    with trio.fail_after(20):
        async with open_store(tmp_path) as store:
            backplane = SQLiteBackplane(store, quotas=Quotas(history_memory=4096))
            await backplane.commit_change(USER, _insert("c0", "e"))
            for i in range(1, 30):
                await backplane.commit_change(USER, _set(f"c{i}", "x" * 200))
            backplane.release("p")  # forgotten: its next use loads it from the store
            assert "p" not in backplane._projects
            gate, holding = threading.Event(), trio.Event()
            token = trio.lowlevel.current_trio_token()

            def hold_the_writer(conn: object) -> None:
                trio.from_thread.run_sync(holding.set, trio_token=token)
                gate.wait(15)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.read, hold_the_writer)
                await holding.wait()
                try:
                    with trio.fail_after(5):
                        events = await backplane.events_since("p", 0)
                finally:
                    gate.set()
            history = backplane._projects["p"].history
            assert history.first_held > 1  # the oldest events came from the store
            assert [e.seq for e in events or []] == list(range(1, 31))
