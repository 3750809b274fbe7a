"""The embedded store: SQLite (stdlib sqlite3, WAL) behind one small thread adapter.

sqlite3 blocks, so every call runs in a worker thread through :class:`_SqliteThread`, one at a
time (a capacity limiter of one) on one connection. Writes are grouped: :meth:`Store.write` queues
statements for the writer task, which commits everything queued so far in one transaction, then
runs each write's ``on_durable`` callback in queue order on the Trio thread and wakes the writers.
Callbacks therefore see commits in exactly the order they were queued, which is what lets the
sequencer publish events in ``seq`` order.

WAL with ``synchronous=NORMAL`` (``durable=False``, the default) survives a killed process: a
committed transaction is in the WAL file before ``commit()`` returns. Power loss or an OS crash
may drop the last transactions; ``durable=True`` (``--durability fsync``) sets
``synchronous=FULL``, which fsyncs the WAL at every commit, so a grouped commit is on disk
before its acks, at the cost of an fsync a commit.

The WAL is kept bounded (:class:`WalPolicy`). The writer never checkpoints on its own (a
checkpoint fsyncs, which would stall the commit and every ack behind it); a checkpointer task
runs a PASSIVE checkpoint on the second connection every ``interval`` seconds, and early once the
WAL reaches ``checkpoint_bytes``. Under sustained writes a passive checkpoint never catches the
writer up, so the WAL would never restart; once it reaches half of ``max_bytes`` the checkpointer
takes the readers' turn (so no read of this store holds an old snapshot, and none can starve it:
the turn is first come, first served) and then the writer's, and runs a TRUNCATE checkpoint
between two commits. Acks wait for that one checkpoint; the WAL stays under ``max_bytes``.

Three connections: the writer (grouped commits, and short reads in line with them), the reader
(long reads beside the writer, and the checkpoints), and the lookups (indexed point reads such as
"was this change id used?", which never wait behind a long report).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import operator
import os
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs
import orjson
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._errors import StorageError
from ._jobs import JobFailures
from ._wire import tight

T = TypeVar("T")

#: Seconds the storage health check (:meth:`Store.probe`) waits for a WAL checkpoint of its own.
CHECKPOINT_PROBE = 2.0

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
    digest TEXT,
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
-- The epoch of each project's history (docs/protocol.md §3): written with its first event, replaced
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


#: Columns added to tables after their first release: (table, column, declaration).
_MIGRATIONS = (("changes", "digest", "TEXT"),)


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _MIGRATIONS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


#: The version of what is stored (``PRAGMA user_version``); :func:`_upgrade` brings an older
#: database up to it once, when a store opens it (a new database too: there is nothing to do).
#: 1: no secret in stored strategy options nor in ``strategy_change`` audit rows.
SCHEMA_VERSION = 1

#: Option keys that held an AI endpoint or a secret before AI endpoints became the operator's
#: (issue 10, item 2); version 1 removes them from every stored strategy option.
SECRET_OPTION_KEYS = frozenset({"api_key", "api_key_env", "url"})


def scrub_chain(chain: Any) -> bool:
    """Remove :data:`SECRET_OPTION_KEYS` from the strategy options of a stored chain
    (``{"strategies": [...], "options": {name: {...}}}``, a project's settings or a
    ``strategy_change`` audit event's details), in place, at any depth of the options; True if
    something was removed."""
    if not isinstance(chain, dict):
        return False
    return _scrub_keys(chain.get("options"))


def _scrub_keys(value: Any) -> bool:
    changed = False
    if isinstance(value, dict):
        for key in [k for k in value if k in SECRET_OPTION_KEYS]:
            del value[key]
            changed = True
        for inner in value.values():
            changed = _scrub_keys(inner) or changed
    elif isinstance(value, list):
        for inner in value:
            changed = _scrub_keys(inner) or changed
    return changed


def _upgrade(conn: sqlite3.Connection) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION` (once: the version is stored); returns
    how many rows were rewritten.

    Version 1 removes endpoints and keys from stored strategy options and from the details of
    stored ``strategy_change`` audit events. With ``secure_delete`` the old bytes are zeroed,
    and when a row was rewritten a VACUUM drops free pages that may hold older copies; a
    TRUNCATE checkpoint then leaves no old frame in the WAL file.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return 0
    secure = conn.execute("PRAGMA secure_delete").fetchone()[0]
    conn.execute("PRAGMA secure_delete=ON")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rewritten = _scrub_secrets(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        try:
            if rewritten:
                conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # the scrub is committed; only old copies may remain
            log.error("%s: secrets were removed, but old copies may remain in free pages or "
                      "the WAL until VACUUM runs: %s", _db_name(conn), exc)  # fmt: skip
    finally:
        conn.execute(f"PRAGMA secure_delete={int(secure)}")
    return rewritten


def _scrub_secrets(conn: sqlite3.Connection) -> int:
    rewritten = 0
    rows = conn.execute("SELECT project_id, settings FROM project_settings").fetchall()
    for project_id, raw in rows:
        settings = _loads_or_none(raw)
        if scrub_chain(settings):
            conn.execute("UPDATE project_settings SET settings = ? WHERE project_id = ?",
                         (dumps(settings), project_id))  # fmt: skip
            rewritten += 1
    rows = conn.execute(
        "SELECT rowid, data FROM audit_events WHERE action = 'strategy_change'"
    ).fetchall()
    for rowid, raw in rows:
        event = _loads_or_none(raw)
        if isinstance(event, dict) and scrub_chain(event.get("details")):
            conn.execute("UPDATE audit_events SET data = ? WHERE rowid = ?", (dumps(event), rowid))
            rewritten += 1
    if rewritten:
        log.warning("%s: removed AI endpoints and keys from %d stored strategy settings and "
                    "audit events (they are the operator's now)", _db_name(conn),
                    rewritten)  # fmt: skip
    return rewritten


def _loads_or_none(raw: Any) -> Any:
    try:
        return loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None


def _db_name(conn: sqlite3.Connection) -> str:
    row = conn.execute("PRAGMA database_list").fetchone()
    return Path(row[2]).name if row and row[2] else "database"


@attrs.frozen(kw_only=True)
class WalPolicy:
    """When a store checkpoints its write-ahead log (see the module docstring)."""

    #: Seconds between passive checkpoints.
    interval: float = 1.0
    #: A passive checkpoint starts early once the WAL file is this big; a WAL that restarts is
    #: also cut back to this size.
    checkpoint_bytes: int = 4 * 1024 * 1024
    #: The bound on the WAL file: a TRUNCATE checkpoint starts once it is half this big.
    max_bytes: int = 64 * 1024 * 1024


class _SqliteThread:
    """Runs functions against one sqlite3 connection in a worker thread, one at a time."""

    def __init__(self, path: Path, *, size_limit: int = -1, durable: bool = False) -> None:
        self._path = path
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._size_limit = size_limit
        self._synchronous = "FULL" if durable else "NORMAL"

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            # Checkpoints are the checkpointer's (see the module docstring), never a commit's.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={self._size_limit}")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            return conn

        try:
            self._conn = await trio.to_thread.run_sync(connect, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open {self._path}: {exc}") from exc

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the worker thread.

        Cancellation waits for ``fn`` to finish: sqlite calls are short and must not be torn.

        Raises:
            StorageError: sqlite (or the file system around it) raised, or the store is closed.
        """
        conn = self._conn
        if conn is None:
            raise StorageError("store is closed")
        try:
            return await trio.to_thread.run_sync(fn, conn, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc
        except OSError as exc:  # around sqlite: the WAL file's size, out of descriptors...
            raise StorageError(f"{self._path.name}: {exc}") from exc

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """Held by every call: holding it keeps the connection idle."""
        return self._limiter

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)


@attrs.define(eq=False)
class _Lookup:
    fn: Callable[[sqlite3.Connection], Any]
    done: trio.Event = attrs.Factory(trio.Event)
    value: Any = None
    error: Exception | None = None

    def settle(self, value: Any, error: Exception | None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()


def _each(fns: list[Callable[[sqlite3.Connection], Any]], conn: sqlite3.Connection) -> list[Any]:
    """Run every lookup of a batch in the lookup thread; each its own result or error (what
    sqlite or the file system raised as :class:`StorageError`, anything else as it was: a bug
    in one lookup reaches its own caller, not the batch or the store)."""
    out: list[Any] = []
    for fn in fns:
        try:
            out.append((fn(conn), None))
        except sqlite3.Error as exc:
            out.append((None, StorageError(f"sqlite: {exc}")))
        except OSError as exc:
            out.append((None, StorageError(f"lookup: {exc}")))
        except Exception as exc:
            out.append((None, exc))
    return out


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
    #: A third connection for indexed point reads, beside the writer and the long reads.
    _lookups: _SqliteThread
    _send: trio.MemorySendChannel[_Write]
    _recv: trio.MemoryReceiveChannel[_Write]
    wal: WalPolicy = attrs.Factory(WalPolicy)
    #: Transactions committed and writes grouped into them, for metrics and benchmarks.
    commits: int = 0
    writes: int = 0
    #: Thread calls that ran point reads (several reads a call under load).
    lookup_batches: int = 0
    #: Set by tests to make the next commits fail (fault injection on the real store).
    fail_commits: bool = False
    #: Where the checkpointer's failures are counted (the server's, when it opened the store).
    jobs: JobFailures = attrs.Factory(JobFailures)
    #: The WAL file's size in bytes, as last seen (after a commit or a checkpoint).
    wal_bytes: int = 0
    #: Largest WAL size seen since the store opened.
    wal_bytes_max: int = 0
    #: Checkpoints completed, by mode (``passive``, ``truncate``), and attempts that failed.
    checkpoints: dict[str, int] = attrs.Factory(lambda: {"passive": 0, "truncate": 0})
    checkpoint_failures: int = 0
    #: Why the last checkpoint failed; ``None`` once one succeeds.
    checkpoint_error: str | None = None
    _writer_done: trio.Event = attrs.Factory(trio.Event)
    _checkpoint_wanted: trio.Event = attrs.Factory(trio.Event)
    #: The WAL's size after the last checkpoint: the next starts early once it grew by
    #: ``checkpoint_bytes`` (a restarted WAL is reused from its start, not shrunk).
    _wal_at_checkpoint: int = 0
    _checkpointing: trio.Lock = attrs.Factory(trio.Lock)
    _lookup_queue: list[_Lookup] = attrs.Factory(list)
    _lookup_wanted: trio.Event = attrs.Factory(trio.Event)
    _lookups_closed: bool = False

    @property
    def name(self) -> str:
        """The database's file name without its suffix (``crealia``, ``ops``), for metrics."""
        return self.path.stem

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

    async def lookup(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short indexed read on the store's lookup connection: it never waits behind a
        commit or a long read, and sees every commit made before it is queued.

        Lookups queued while one batch runs go together in the next, one thread call for all
        of them: a thread hop per lookup made every edit wait for the GIL behind the event
        loop (up to its 5 ms switch interval), which capped a busy server's edits. A cancelled
        caller's lookup still runs (it only reads) and its result is dropped.

        Raises:
            StorageError: sqlite raised, or the store is closed.
            Exception: what ``fn`` raised otherwise.
        """
        if self._lookups_closed:
            raise StorageError("store is closed")
        item = _Lookup(fn)
        self._lookup_queue.append(item)
        self._lookup_wanted.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.value  # type: ignore[no-any-return]

    async def _lookup_batches(self) -> None:
        """Run the queued lookups, a batch per thread call, until cancelled; then fail what is
        left."""
        batch: list[_Lookup] = []
        try:
            while True:
                await self._lookup_wanted.wait()
                self._lookup_wanted = trio.Event()
                batch, self._lookup_queue = self._lookup_queue, []
                try:
                    results = await self._lookups.run(partial(_each, [i.fn for i in batch]))
                except StorageError as exc:
                    results = [(None, exc)] * len(batch)
                self.lookup_batches += 1
                for item, (value, error) in zip(batch, results, strict=True):
                    item.settle(value, error)
        finally:
            self._lookups_closed = True
            closed = StorageError("store is closed")
            for item in [*batch, *self._lookup_queue]:
                item.settle(None, closed)
            self._lookup_queue.clear()

    async def checkpoint(self, *, urgent: bool = False) -> None:
        """Checkpoint the WAL now: PASSIVE, or TRUNCATE once the WAL is past half its bound.
        One at a time; the checkpointer task calls it every interval. ``urgent`` (the writer,
        near the bound): only if no other checkpoint cut the WAL back meanwhile.

        Raises:
            StorageError: the checkpoint failed (the database file cannot be written, the disk
                is full, ...) or a reader outside this store kept the WAL from being cut back.
        """
        async with self._checkpointing:
            if urgent and self.wal_bytes < self._hard_mark:
                return
            try:
                size = self.wal_bytes
                if size < self.wal.max_bytes // 2:
                    size = await self._reader.run(partial(_checkpoint, "PASSIVE", self.path))
                    self.checkpoints["passive"] += 1
                if size >= self.wal.max_bytes // 2:
                    size = await self._truncate()
                    self.checkpoints["truncate"] += 1
            except StorageError as exc:
                self.checkpoint_failures += 1
                self.checkpoint_error = str(exc)
                log.warning("WAL checkpoint failed on %s: %s", self.path.name, exc)
                raise
            self.checkpoint_error = None
            self._saw_wal(size)
            self._wal_at_checkpoint = self.wal_bytes

    async def _truncate(self) -> int:
        # The readers' turns first, then the writer's: no snapshot of ours pins the WAL while
        # the checkpoint waits, and commits go on until it is the writer's turn.
        async with self._reader.limiter, self._lookups.limiter:
            return await self._thread.run(partial(_checkpoint, "TRUNCATE", self.path))

    @property
    def _hard_mark(self) -> int:
        # Past it the writer waits for a TRUNCATE before committing more: the last quarter of
        # the bound is room for the batch that crossed it.
        return self.wal.max_bytes * 3 // 4

    def _saw_wal(self, size: int) -> None:
        if size < 0:
            return  # not seen this time: the last size stands
        self.wal_bytes = size
        self.wal_bytes_max = max(self.wal_bytes_max, size)

    async def check(self) -> None:
        """Prove the store answers and is writable.

        Raises:
            StorageError: it is not.
        """

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        await self._thread.run(probe)

    async def probe(self) -> None:
        """The ``storage`` health check of this store: a real commit through the grouped
        writer, then a real checkpoint of what it wrote, so that the store is known to take
        writes and to copy them into the database file (a WAL that cannot be checkpointed grows
        until the disk is full), not just to open.

        Raises:
            StorageError: a write cannot commit, the WAL cannot be checkpointed, or it is over
                its bound (the message names the database file).
        """
        at = int(time.time() * 1000)
        try:
            await self.write([("INSERT OR REPLACE INTO health (id, at) VALUES (1, ?)", (at,))])
        except StorageError as exc:
            raise StorageError(f"{self.path.name}: a write cannot commit: {exc}") from exc
        # A checkpoint waits for the reader's turn: behind a long report, the background
        # checkpointer's last result stands in for this one.
        with trio.move_on_after(CHECKPOINT_PROBE):
            try:
                await self.checkpoint()
            except StorageError as exc:
                raise StorageError(f"{self.path.name}: WAL checkpoint failed: {exc}") from exc
        if self.checkpoint_error is not None:
            raise StorageError(f"{self.path.name}: WAL checkpoint failed: {self.checkpoint_error}")
        if self.wal_bytes > self.wal.max_bytes:
            raise StorageError(f"{self.path.name}: the WAL ({self.wal_bytes} bytes) is "
                               f"over its bound of {self.wal.max_bytes}")  # fmt: skip

    async def _writer(self) -> None:
        batch: list[_Write] = []
        try:
            async for first in self._recv:
                batch = [first]
                # Nothing of a write may outlive its commit: its callbacks hold the project's
                # state, which a closed room's release must free (not the next write).
                del first
                while len(batch) < 1024:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)
                batch = []
        finally:
            # Cancelled (or broken) before the queue was drained: whatever was not committed
            # fails now, so that no caller waits for a writer that is gone (write() waits
            # shielded) and nothing is taken for durable that was not.
            closed = StorageError("store is closed")
            for item in batch:
                if not item.done.is_set():
                    self._fail(item, closed)
            while True:
                try:
                    self._fail(self._recv.receive_nowait(), closed)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self._recv.close()
            self._writer_done.set()

    def _fail(self, item: _Write, error: StorageError) -> None:
        item.error = error
        if item.on_failed is not None:
            with self.jobs.guard("store_writer", self.name):  # a bug there must not stop commits
                item.on_failed()
        item.done.set()

    async def _commit(self, batch: list[_Write]) -> None:
        statements = [s for item in batch for s in item.statements]
        failing = self.fail_commits

        def commit(conn: sqlite3.Connection) -> int:
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
            return _wal_size(path)

        path = self.path
        if self.wal_bytes >= self._hard_mark:
            # Backpressure: the checkpoint waits for at most one reader, then this commit runs.
            # A failed one is logged and counted; the commit is tried all the same.
            with suppress(StorageError):
                await self.checkpoint(urgent=True)
        try:
            size = await self._thread.run(commit)
        except StorageError as exc:
            while True:
                try:
                    batch.append(self._recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for item in batch:
                self._fail(item, exc)
            return
        self.commits += 1
        self.writes += len(batch)
        self._saw_wal(size)
        if self.wal_bytes - self._wal_at_checkpoint >= self.wal.checkpoint_bytes:
            self._checkpoint_wanted.set()
        for item in batch:
            if item.on_durable is not None:
                with self.jobs.guard(
                    "store_writer", self.name
                ):  # a bug there must not stop commits
                    item.on_durable()
            item.done.set()


@asynccontextmanager
async def open_store(
    data_dir: Path,
    name: str = "crealia.sqlite3",
    *,
    wal: WalPolicy | None = None,
    jobs: JobFailures | None = None,
    durable: bool = False,
) -> AsyncIterator[Store]:
    """Open (creating if needed) the SQLite database ``name`` in ``data_dir`` with its writer
    and checkpointer tasks (whose failures count in ``jobs``); ``durable`` fsyncs every commit
    (see the module documentation).

    A server keeps two: ``crealia.sqlite3`` (the projects: events, snapshots, comments,
    conflicts) and ``OPS_DB`` (audit events, security alerts, metric samples), so that a
    thousand audit rows a second never queue in front of the commits that acks wait for.
    On exit, queued writes are committed before the database is closed.

    Raises:
        StorageError: the directory or database cannot be created or opened.
    """
    wal = wal or WalPolicy()
    try:
        await trio.to_thread.run_sync(lambda: Path(data_dir).mkdir(parents=True, exist_ok=True))
    except OSError as exc:
        raise StorageError(f"cannot create data dir {data_dir}: {exc}") from exc
    path = Path(data_dir) / name
    # Only the writer commits: its connection is the one whose commits must reach the disk.
    thread = _SqliteThread(path, size_limit=wal.checkpoint_bytes, durable=durable)
    await thread.open()
    try:
        await thread.run(_upgrade)  # before any other connection reads
    except BaseException:
        await thread.close()
        raise
    reader = _SqliteThread(path)
    lookups = _SqliteThread(path)
    try:
        await reader.open()
        await lookups.open()
    except BaseException:
        await reader.close()
        await thread.close()
        raise
    send, recv = trio.open_memory_channel[_Write](100_000)
    store = Store(path=path, thread=thread, reader=reader, lookups=lookups, send=send,
                  recv=recv, wal=wal, jobs=jobs or JobFailures())  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._writer)
            nursery.start_soon(store._lookup_batches)
            nursery.start_soon(_checkpoints, store)
            try:
                yield store
            finally:
                send.close()  # the writer drains what is queued, then ends
                await _wait_closed(store)
                nursery.cancel_scope.cancel()
    finally:
        await lookups.close()
        await thread.close()
        with trio.CancelScope(shield=True), suppress(StorageError):
            await reader.run(partial(_checkpoint, "TRUNCATE", path))
        await reader.close()


#: The operations database: audit log, security alerts, metric samples and alerts.
OPS_DB = "ops.sqlite3"

#: Seconds between deletions of rows past their retention.
RETENTION_INTERVAL = 3600.0


async def keep_pruning(
    prune: Callable[[], Awaitable[int]],
    job: str,
    jobs: JobFailures,
    interval: float = RETENTION_INTERVAL,
) -> NoReturn:
    """Call ``prune`` now and every ``interval`` seconds, until cancelled; a failing pruning
    is logged, counted as ``job`` in ``jobs`` and retried with a backoff."""
    await jobs.keep_running(job, prune, period=interval)


async def _checkpoints(store: Store) -> NoReturn:
    """Checkpoint the WAL every ``store.wal.interval`` seconds, or as soon as a commit found it
    past ``checkpoint_bytes``; a failure is logged and counted (:meth:`Store.checkpoint`, and
    ``wal_checkpoint`` in ``store.jobs``) and retried with a backoff."""

    async def step() -> None:
        with trio.move_on_after(store.wal.interval):  # a period, or sooner when asked
            await store._checkpoint_wanted.wait()
        store._checkpoint_wanted = trio.Event()
        await store.checkpoint()

    await store.jobs.keep_running("wal_checkpoint", step, instance=store.name)


def _checkpoint(mode: str, path: Path, conn: sqlite3.Connection) -> int:
    """Run a checkpoint; the WAL's size after it.

    Raises:
        sqlite3.OperationalError: it failed, or (TRUNCATE) a reader kept it from finishing.
    """
    busy, _log, _done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    if busy and mode == "TRUNCATE":
        raise sqlite3.OperationalError("a reader kept the WAL from being checkpointed in full")
    return _wal_size(path)


def _wal_size(path: Path) -> int:
    """The WAL file's size; -1 when it cannot be seen now (it runs right after a commit, which
    must not be reported as failed for that)."""
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0
    except OSError:
        return -1


async def _wait_closed(store: Store) -> None:
    with trio.CancelScope(shield=True):
        await store._writer_done.wait()


# -- statements and queries ----------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    # Of its own size: queued writes may wait a while.
    return tight(orjson.dumps(value))


def loads(value: bytes) -> Any:
    return orjson.loads(value)


def _by_label(family: Any, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    metric = family(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)
    return metric  # type: ignore[no-any-return]


@functools.cache
def _memory_used() -> Callable[[], int] | None:
    """``sqlite3_memory_used`` of the SQLite library the stdlib's sqlite3 is linked to (looked
    up through that module on first use), or None where it cannot be reached."""
    try:
        import _sqlite3

        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (OSError, AttributeError, ImportError):
        return None
    used.restype = ctypes.c_int64
    used.argtypes = []
    return lambda: int(used())


def sqlite_memory_bytes() -> int | None:
    """What SQLite's allocator holds in this process now (its page caches, statements and
    schema, over every connection), or None where that cannot be read."""
    used = _memory_used()
    return None if used is None else used()


def sqlite_metrics(stores: Iterable[Store]) -> Iterator[Metric]:
    """The WAL and checkpoint families of SQLite stores, labelled by database name (the
    server's operations database, and the SQLite backplane's)."""
    stores = list(stores)
    yield _by_label(GaugeMetricFamily, "crealia_sqlite_wal_bytes",
                    "Size of each SQLite database's write-ahead log file, as last seen.",
                    "db", {store.name: store.wal_bytes for store in stores})  # fmt: skip
    yield _by_label(GaugeMetricFamily, "crealia_sqlite_wal_max_bytes",
                    "The bound each WAL is kept under (a TRUNCATE checkpoint at half).",
                    "db", {store.name: store.wal.max_bytes for store in stores})  # fmt: skip
    checkpoints = CounterMetricFamily(
        "crealia_sqlite_checkpoints", "WAL checkpoints completed, by database and mode.",
        labels=["db", "mode"],
    )  # fmt: skip
    for store in stores:
        for mode, count in sorted(store.checkpoints.items()):
            checkpoints.add_metric([store.name, mode], count)
    yield checkpoints
    failures = {store.name: store.checkpoint_failures for store in stores}
    yield _by_label(CounterMetricFamily, "crealia_sqlite_checkpoint_failures",
                    "WAL checkpoints that failed (logged as 'WAL checkpoint failed').",
                    "db", failures)  # fmt: skip
