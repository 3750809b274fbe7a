"""The embedded store: SQLite (stdlib sqlite3, WAL) behind one small thread adapter.

sqlite3 blocks, so every call runs in a worker thread through :class:`_SqliteThread`, one at a
time (a capacity limiter of one) on one connection. Writes are grouped: :meth:`Store.write` queues
statements for the writer task, which commits everything queued so far in one transaction, then
runs each write's ``on_durable`` callback in queue order on the Trio thread and wakes the writers.
Callbacks therefore see commits in exactly the order they were queued, which is what lets the
sequencer publish events in ``seq`` order.

WAL with ``synchronous=NORMAL`` survives a killed process: a committed transaction is in the WAL
file before ``commit()`` returns. (Power loss may drop the last transactions; set
``synchronous=FULL`` for that, at a cost in commit latency.)
"""

from __future__ import annotations

import itertools
import logging
import operator
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import trio

from ._errors import StorageError

T = TypeVar("T")

log = logging.getLogger("crealia.storage")

Statement = tuple[str, Sequence[Any]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    project_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    payload BLOB NOT NULL,
    effects BLOB NOT NULL,
    PRIMARY KEY (project_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    project_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    seq INTEGER,
    status TEXT NOT NULL,
    conflicts BLOB NOT NULL,
    PRIMARY KEY (project_id, change_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    project_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    document BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS comments (
    project_id TEXT NOT NULL,
    comment_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    element_id TEXT,
    time REAL,
    text TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (project_id, comment_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS conflicts_project ON conflicts (project_id, status);
CREATE TABLE IF NOT EXISTS project_settings (
    project_id TEXT PRIMARY KEY,
    settings BLOB NOT NULL
);
-- The epoch of each project's history (PROTOCOL.md §3): written with its first event, replaced
-- whenever the history is rewritten (a GDPR erasure).
CREATE TABLE IF NOT EXISTS project_epochs (
    project_id TEXT PRIMARY KEY,
    epoch TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metric_samples (
    scope TEXT NOT NULL,
    at INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS metric_samples_scope ON metric_samples (scope, at);
CREATE INDEX IF NOT EXISTS metric_samples_at ON metric_samples (at);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    project_id TEXT,
    level TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    resolved_at INTEGER,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_started ON alerts (started_at);
CREATE TABLE IF NOT EXISTS audit_events (
    -- Appended in time order under the rowid: no random-key index to keep for the event ids.
    id TEXT NOT NULL,
    at INTEGER NOT NULL,
    project_id TEXT,
    user_id TEXT,
    action TEXT NOT NULL,
    severity TEXT NOT NULL,
    risk INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_project ON audit_events (project_id, at);
CREATE INDEX IF NOT EXISTS audit_user ON audit_events (user_id, at);
CREATE TABLE IF NOT EXISTS security_alerts (
    id TEXT PRIMARY KEY,
    project_id TEXT,
    type TEXT NOT NULL,
    resolved INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS security_alerts_project ON security_alerts (project_id, created_at);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
"""


class _SqliteThread:
    """Runs functions against one sqlite3 connection in a worker thread, one at a time."""

    def __init__(self, path: Path, *, checkpoints: bool = False) -> None:
        self._path = path
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._checkpoints = checkpoints

    async def open(self) -> None:
        automatic = 1000 if self._checkpoints else 0

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            # The writer never checkpoints (a checkpoint fsyncs, which would stall the commit
            # and every ack behind it); a second connection does, in its own thread.
            conn.execute(f"PRAGMA wal_autocheckpoint={automatic}")
            conn.executescript(_SCHEMA)
            return conn

        try:
            self._conn = await trio.to_thread.run_sync(connect, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open {self._path}: {exc}") from exc

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the worker thread.

        Cancellation waits for ``fn`` to finish: sqlite calls are short and must not be torn.

        Raises:
            StorageError: sqlite raised, or the store is closed.
        """
        conn = self._conn
        if conn is None:
            raise StorageError("store is closed")
        try:
            return await trio.to_thread.run_sync(fn, conn, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)


@attrs.define(eq=False)
class _Write:
    statements: list[Statement]
    on_durable: Callable[[], None] | None
    on_failed: Callable[[], None] | None
    done: trio.Event = attrs.Factory(trio.Event)
    error: StorageError | None = None


@attrs.define(eq=False)
class Store:
    """The embedded store. Open it with :func:`open_store`."""

    path: Path
    _thread: _SqliteThread
    #: A second connection for long reads (reports, exports): WAL lets it read while the
    #: writer commits, so a big query never holds back acks.
    _reader: _SqliteThread
    _send: trio.MemorySendChannel[_Write]
    _recv: trio.MemoryReceiveChannel[_Write]
    #: Transactions committed and writes grouped into them, for metrics and benchmarks.
    commits: int = 0
    writes: int = 0
    #: Set by tests to make the next commits fail (fault injection on the real store).
    fail_commits: bool = False
    _writer_done: trio.Event = attrs.Factory(trio.Event)

    async def write(
        self,
        statements: list[Statement],
        on_durable: Callable[[], None] | None = None,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        """Queue statements for the next grouped commit and wait until it is durable.

        ``on_durable`` runs on the Trio thread right after the commit, before any later write's.
        If the commit fails, ``on_failed`` runs instead, for this write and for every write
        queued behind it (they are failed too, so nothing queued after a lost write commits).

        Raises:
            StorageError: the commit failed (nothing of this write is stored) or the store is
                closed.
        """
        item = _Write(statements, on_durable, on_failed)
        try:
            self._send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StorageError("store is closed") from None
        except trio.WouldBlock:
            raise StorageError("store write queue is full") from None
        with trio.CancelScope(shield=True):
            # A queued write commits whether or not its writer is cancelled; waiting for it keeps
            # the caller's idea of what happened honest.
            await item.done.wait()
        if item.error is not None:
            raise item.error

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only function against the database in the worker thread.

        Raises:
            StorageError: sqlite raised.
        """
        return await self._thread.run(fn)

    async def read_aside(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only function on the store's second connection, beside the writer: for
        long queries. It sees every commit made before it starts.

        Raises:
            StorageError: sqlite raised.
        """
        return await self._reader.run(fn)

    async def check(self) -> None:
        """Prove the store answers and is writable.

        Raises:
            StorageError: it is not.
        """

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        await self._thread.run(probe)

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:
            self._writer_done.set()

    async def _write_loop(self) -> None:
        async with self._recv:
            async for first in self._recv:
                batch = [first]
                while len(batch) < 1024:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        statements = [s for item in batch for s in item.statements]
        failing = self.fail_commits

        def commit(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN")
            try:
                if failing:
                    raise sqlite3.OperationalError("injected failure")
                # Runs of the same statement go through executemany: one call, not one each.
                for sql, rows in itertools.groupby(statements, key=operator.itemgetter(0)):
                    conn.executemany(sql, [params for _sql, params in rows])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        try:
            await self._thread.run(commit)
        except StorageError as exc:
            while True:
                try:
                    batch.append(self._recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for item in batch:
                item.error = exc
                if item.on_failed is not None:
                    item.on_failed()
                item.done.set()
            return
        self.commits += 1
        self.writes += len(batch)
        for item in batch:
            if item.on_durable is not None:
                item.on_durable()
            item.done.set()


@asynccontextmanager
async def open_store(data_dir: Path, name: str = "crealia.sqlite3") -> AsyncIterator[Store]:
    """Open (creating if needed) the SQLite database ``name`` in ``data_dir`` with its writer
    task.

    A server keeps two: ``crealia.sqlite3`` (the projects: events, snapshots, comments,
    conflicts) and ``OPS_DB`` (audit events, security alerts, metric samples), so that a
    thousand audit rows a second never queue in front of the commits that acks wait for.
    On exit, queued writes are committed before the database is closed.

    Raises:
        StorageError: the directory or database cannot be created or opened.
    """
    try:
        await trio.to_thread.run_sync(lambda: Path(data_dir).mkdir(parents=True, exist_ok=True))
    except OSError as exc:
        raise StorageError(f"cannot create data dir {data_dir}: {exc}") from exc
    path = Path(data_dir) / name
    thread = _SqliteThread(path)
    await thread.open()
    checkpointer = _SqliteThread(path, checkpoints=True)
    await checkpointer.open()
    send, recv = trio.open_memory_channel[_Write](100_000)
    store = Store(path=path, thread=thread, reader=checkpointer, send=send, recv=recv)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._writer)
            nursery.start_soon(_checkpoints, checkpointer, nursery.cancel_scope)
            try:
                yield store
            finally:
                send.close()  # the writer drains what is queued, then ends
                await _wait_closed(store)
                nursery.cancel_scope.cancel()
    finally:
        await thread.close()
        with trio.CancelScope(shield=True), suppress(StorageError):
            await checkpointer.run(_checkpoint_truncate)
        await checkpointer.close()


#: The operations database: audit log, security alerts, metric samples and alerts.
OPS_DB = "ops.sqlite3"

#: Seconds between deletions of rows past their retention.
RETENTION_INTERVAL = 3600.0


async def keep_pruning(prune: Callable[[], Awaitable[int]], what: str) -> None:
    """Call ``prune`` now and every ``RETENTION_INTERVAL`` seconds, until cancelled; a failing
    store is logged and tried again next time."""
    while True:
        try:
            await prune()
        except StorageError as exc:
            log.warning("%s retention: %s", what, exc)
        await trio.sleep(RETENTION_INTERVAL)  # a period, not synchronization


#: Seconds between background WAL checkpoints.
CHECKPOINT_INTERVAL = 1.0


async def _checkpoints(checkpointer: _SqliteThread, _scope: trio.CancelScope) -> None:
    """Copy the WAL into the database now and then, off the writer's thread.

    A PASSIVE checkpoint never blocks the writer; it only copies what no reader still needs.
    """
    while True:
        await trio.sleep(CHECKPOINT_INTERVAL)  # a period, not synchronization
        try:
            await checkpointer.run(_checkpoint_passive)
        except StorageError as exc:
            log.warning("WAL checkpoint failed: %s", exc)


def _checkpoint_passive(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _checkpoint_truncate(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def _wait_closed(store: Store) -> None:
    with trio.CancelScope(shield=True):
        await store._writer_done.wait()


# -- statements and queries ----------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(value: bytes) -> Any:
    return orjson.loads(value)
