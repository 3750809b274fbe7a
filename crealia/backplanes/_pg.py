"""psycopg behind one small thread adapter, and the PostgreSQL schema with its migrations.

The only module that imports psycopg. psycopg 3 is used synchronously, like sqlite3 in
``crealia._storage``: every call runs in a worker thread through :class:`PgConnection`, one
connection per purpose, one call at a time on each (a capacity limiter of one). psycopg's
errors become :class:`~crealia.Overloaded` at this boundary (a connection that broke is
reopened by its next call); a connection that cannot be opened at start is a
:class:`~crealia.TransportError` of one line.

Every session runs with ``synchronous_commit = on`` (a commit returns once its WAL is flushed:
an ack after it survives a crash of the database host), a ``statement_timeout`` and a
``lock_timeout``, and TCP keepalives, so no call waits forever on a database that went away.

:data:`MIGRATIONS` is the schema, versioned in the package: migration *n* (1-based) brings a
database from version *n - 1* to *n*. :func:`migrate` applies what is missing under an advisory
lock (two processes starting at once apply each once) and refuses a database whose schema is
newer than this package's, in one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
import trio

from .._config import redact_url_password
from .._errors import ConfigurationError, Overloaded, TransportError

log = logging.getLogger("crealia.postgresql")

T = TypeVar("T")

Cursor = psycopg.Cursor[Any]

#: The channel of the notices of committed writes (``pg_notify``): one JSON object each.
CHANNEL = "crealia_events"

#: Seconds allowed to open a connection, and TCP keepalive settings for a host that vanished.
CONNECT_TIMEOUT = 5
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
#: Milliseconds a statement, and a wait for a lock, may take.
STATEMENT_TIMEOUT_MS = 15_000
LOCK_TIMEOUT_MS = 10_000

#: A number for ``pg_advisory_xact_lock`` while migrating (``crealia`` in ASCII).
_MIGRATION_LOCK = 0x637265616C6961

#: The schema: each entry brings the database from the version before it to its own (1-based).
MIGRATIONS: tuple[str, ...] = (
    # 1: the projects' durable state, as the SQLite store keeps it (crealia/_storage.py), plus
    # each project's head: its seq (locked by every write), its epoch, and what its pending
    # conflicts hold (for the quotas, checked in the write's transaction).
    """
    CREATE TABLE projects (
        project_id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL DEFAULT 0,
        epoch TEXT NOT NULL,
        pending_count INTEGER NOT NULL DEFAULT 0,
        pending_bytes BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
        project_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        user_id TEXT NOT NULL,
        at BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        effects BYTEA NOT NULL,
        PRIMARY KEY (project_id, seq)
    );
    CREATE TABLE changes (
        project_id TEXT NOT NULL,
        change_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        seq BIGINT,
        status TEXT NOT NULL,
        conflicts BYTEA NOT NULL,
        digest TEXT,
        PRIMARY KEY (project_id, change_id)
    );
    CREATE TABLE snapshots (
        project_id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        document BYTEA NOT NULL
    );
    CREATE TABLE comments (
        project_id TEXT NOT NULL,
        comment_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        user_id TEXT NOT NULL,
        element_id TEXT,
        time DOUBLE PRECISION,
        text TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (project_id, comment_id)
    );
    CREATE TABLE conflicts (
        id TEXT PRIMARY KEY,
        -- Insertion order, for conflicts created in the same millisecond.
        ord BIGSERIAL,
        project_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX conflicts_project ON conflicts (project_id, status, created_at);
    CREATE TABLE project_settings (
        project_id TEXT PRIMARY KEY,
        settings BYTEA NOT NULL
    );
    CREATE TABLE project_roles (
        project_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (project_id, user_id)
    );
    CREATE TABLE health (
        id INTEGER PRIMARY KEY,
        at BIGINT NOT NULL
    );
    """,
    # 2: the operations data every process shares (crealia/backplanes/_pg_ops.py): audit events
    # (``ord`` and ``txid`` let each process read the rows the others committed, in order),
    # security alerts (one open alert per rule, subject and project: ``open_key``), metric
    # samples and alerts.
    """
    CREATE TABLE audit_events (
        ord BIGSERIAL PRIMARY KEY,
        txid XID8 NOT NULL DEFAULT pg_current_xact_id(),
        node TEXT NOT NULL,
        id TEXT NOT NULL,
        at BIGINT NOT NULL,
        project_id TEXT,
        user_id TEXT,
        action TEXT NOT NULL,
        severity TEXT NOT NULL,
        risk INTEGER NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX audit_at ON audit_events (at);
    CREATE INDEX audit_project ON audit_events (project_id, at);
    CREATE INDEX audit_user ON audit_events (user_id, at);
    CREATE INDEX audit_tail ON audit_events (txid, ord);
    CREATE TABLE security_alerts (
        id TEXT PRIMARY KEY,
        project_id TEXT,
        type TEXT NOT NULL,
        resolved BOOLEAN NOT NULL,
        created_at BIGINT NOT NULL,
        changed_at BIGINT NOT NULL,
        open_key TEXT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE UNIQUE INDEX security_alerts_open ON security_alerts (open_key) WHERE NOT resolved;
    CREATE INDEX security_alerts_project ON security_alerts (project_id, created_at);
    CREATE INDEX security_alerts_changed ON security_alerts (changed_at);
    CREATE TABLE metric_samples (
        ord BIGSERIAL PRIMARY KEY,
        node TEXT NOT NULL,
        scope TEXT NOT NULL,
        at BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX metric_samples_scope ON metric_samples (scope, at);
    CREATE INDEX metric_samples_at ON metric_samples (at);
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        project_id TEXT,
        level TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        resolved_at BIGINT,
        data BYTEA NOT NULL
    );
    CREATE INDEX alerts_started ON alerts (started_at);
    """,
    # 3: a write in one round trip (crealia/backplanes/postgresql.py ``_commit_batch``): the
    # writer's statements per write were nine round trips while the project's row was locked,
    # which held one project to ~25 writes a second. A batch is one call; each write runs in
    # a block of its own (a subtransaction), undone unless it is stored, stale or busy; a
    # stale one keeps its row locked, so the writer prepares it again and stores it in the
    # same transaction; a busy one (without ``wait``, its row locked by another process) goes
    # in the writer's next batch. ``w`` is one write (see ``_write_json``); its bytes are in
    # ``blobs``.
    """
    CREATE FUNCTION crealia_write(w JSONB, blobs BYTEA[]) RETURNS JSONB
    LANGUAGE plpgsql AS $$
    DECLARE
        p TEXT := w->>'p';
        base BIGINT := (w->>'base')::BIGINT;
        head BIGINT;
        named TEXT;
        cnt BIGINT;
        held BIGINT;
        dn BIGINT := (w->'pending'->>0)::BIGINT;
        db BIGINT := (w->'pending'->>1)::BIGINT;
        ev JSONB := w->'event';
        r RECORD;
        c JSONB;
    BEGIN
        IF (w->>'wait')::BOOLEAN THEN
            SELECT seq, pending_count, pending_bytes, epoch INTO head, cnt, held, named
                FROM projects WHERE project_id = p FOR UPDATE;
        ELSE
            -- Another process's transaction holds the row: this write goes in the next
            -- batch, so this one does not hold its other rows while it waits.
            SELECT seq, pending_count, pending_bytes, epoch INTO head, cnt, held, named
                FROM projects WHERE project_id = p FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                PERFORM 1 FROM projects WHERE project_id = p;
                IF FOUND THEN
                    RETURN jsonb_build_object('s', 'busy');
                END IF;
            END IF;
        END IF;
        IF NOT FOUND THEN
            -- A new epoch, as ``_new_epoch`` draws them (32 hex digits).
            INSERT INTO projects (project_id, epoch)
                VALUES (p, replace(gen_random_uuid()::TEXT, '-', ''))
                ON CONFLICT DO NOTHING;
            SELECT seq, pending_count, pending_bytes, epoch INTO head, cnt, held, named
                FROM projects WHERE project_id = p FOR UPDATE;
        END IF;
        IF w->>'mode' = 'settle' THEN
            PERFORM 1 FROM conflicts WHERE id = w->>'key' AND project_id = p
                AND status = 'pending';
            IF NOT FOUND THEN
                RETURN jsonb_build_object('s', 'gone');
            END IF;
        ELSIF w->>'mode' = 'change' THEN
            SELECT user_id, seq, status, convert_from(conflicts, 'UTF8') AS conflicts, digest
                INTO r FROM changes WHERE project_id = p AND change_id = w->>'key';
            IF FOUND THEN
                RETURN jsonb_build_object('s', 'dup', 'v',
                    jsonb_build_array(r.user_id, r.seq, r.status, r.conflicts, r.digest));
            END IF;
        ELSE
            SELECT seq INTO r FROM comments WHERE project_id = p AND comment_id = w->>'key';
            IF FOUND THEN
                RETURN jsonb_build_object('s', 'dup', 'v', r.seq);
            END IF;
        END IF;
        IF w->>'copy_epoch' IS NOT NULL AND named <> w->>'copy_epoch' THEN
            -- Prepared on a copy of a history since rewritten (an erasure, a restore): its
            -- values may be what was erased.
            RETURN jsonb_build_object('s', 'rewritten', 'v', named);
        END IF;
        IF head < base THEN
            RETURN jsonb_build_object('s', 'behind', 'v', head);
        END IF;
        IF head > base THEN
            RETURN jsonb_build_object('s', 'stale', 'v', head);
        END IF;
        IF w->>'mode' = 'change' AND (dn <> 0 OR db <> 0)
                AND (cnt + dn > (w->>'max_pending')::BIGINT
                     OR held + db > (w->>'max_pending_bytes')::BIGINT) THEN
            RETURN jsonb_build_object('s', 'quota', 'v', jsonb_build_array(cnt, held));
        END IF;
        IF ev IS NOT NULL AND ev <> 'null'::JSONB THEN
            head := head + 1;
            INSERT INTO events (project_id, seq, kind, user_id, at, payload, effects)
                VALUES (p, head, ev->>'kind', ev->>'user_id', (ev->>'at')::BIGINT,
                        blobs[(ev->>'payload')::INT], blobs[(ev->>'effects')::INT]);
        END IF;
        UPDATE projects SET seq = head, pending_count = GREATEST(0, pending_count + dn),
            pending_bytes = GREATEST(0, pending_bytes + db) WHERE project_id = p;
        IF w->>'mode' = 'change' THEN
            INSERT INTO changes (project_id, change_id, user_id, seq, status, conflicts, digest)
                VALUES (p, w->>'key', w->'row'->>0,
                        CASE WHEN ev IS NULL OR ev = 'null'::JSONB THEN NULL ELSE head END,
                        w->'row'->>1, blobs[(w->'row'->>2)::INT], w->'row'->>3);
        ELSIF w->>'mode' = 'comment' THEN
            INSERT INTO comments (project_id, comment_id, seq, user_id, element_id, time, text,
                                  at)
                VALUES (p, w->>'key', head, w->'row'->>0, w->'row'->>1,
                        (w->'row'->>2)::DOUBLE PRECISION, w->'row'->>3,
                        (w->'row'->>4)::BIGINT);
        END IF;
        FOR c IN SELECT * FROM jsonb_array_elements(w->'conflicts') LOOP
            INSERT INTO conflicts (id, project_id, status, created_at, data)
                VALUES (c->>0, p, c->>1, (c->>2)::BIGINT, blobs[(c->>3)::INT])
                ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, data = EXCLUDED.data;
        END LOOP;
        IF w->'role' IS NOT NULL AND w->'role' <> 'null'::JSONB THEN
            INSERT INTO project_roles (project_id, user_id, role)
                VALUES (p, w->'role'->>0, w->'role'->>1)
                ON CONFLICT (project_id, user_id) DO UPDATE SET role = EXCLUDED.role;
        END IF;
        PERFORM pg_notify('crealia_events', jsonb_build_object('p', p, 's', head,
            'n', w->>'node', 'c', w->'notice_conflicts')::TEXT);
        RETURN jsonb_build_object('s', 'ok', 'v', head);
    END $$;

    -- Every write of ``ws`` in its own block: a write that is neither stored nor stale is
    -- undone (its answer is raised as SQLSTATE CRW01 and caught), one that fails is undone and
    -- answered as an error; the others stand.
    CREATE FUNCTION crealia_write_batch(ws JSONB, blobs BYTEA[]) RETURNS JSONB
    LANGUAGE plpgsql AS $$
    DECLARE
        w JSONB;
        answer JSONB;
        answers JSONB := '[]'::JSONB;
    BEGIN
        FOR w IN SELECT * FROM jsonb_array_elements(ws) LOOP
            BEGIN
                answer := crealia_write(w, blobs);
                IF answer->>'s' NOT IN ('ok', 'stale', 'busy') THEN
                    RAISE SQLSTATE 'CRW01' USING MESSAGE = answer::TEXT;
                END IF;
            EXCEPTION
                WHEN SQLSTATE 'CRW01' THEN
                    answer := SQLERRM::JSONB;
                WHEN OTHERS THEN
                    answer := jsonb_build_object('s', 'error', 'v', SQLERRM);
            END;
            answers := answers || jsonb_build_array(answer);
        END LOOP;
        RETURN answers;
    END $$;
    """,
    # 4: the database's identity (its cluster's system identifier, the database's oid, the WAL
    # timeline), stored when first seen. A restore (pg_restore into a new database, a new
    # cluster), a point-in-time recovery or a failover to a replica (a new timeline) changes it
    # while the stored one comes back with the data: every project then gets a new epoch and a
    # notice, so clients resume with a snapshot, never a replay on top of what is gone.
    """
    CREATE TABLE crealia_identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        identity TEXT NOT NULL
    );
    CREATE FUNCTION crealia_check_identity() RETURNS INTEGER
    LANGUAGE plpgsql AS $$
    DECLARE
        live TEXT := (SELECT system_identifier::TEXT FROM pg_control_system()) || '/'
            || (SELECT oid::TEXT FROM pg_database WHERE datname = current_database()) || '/'
            || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);
        stored TEXT;
        renewed INTEGER := 0;
        r RECORD;
    BEGIN
        SELECT identity INTO stored FROM crealia_identity WHERE id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO crealia_identity (id, identity) VALUES (1, live) ON CONFLICT DO NOTHING;
            RETURN 0;
        END IF;
        IF stored = live THEN
            RETURN 0;
        END IF;
        FOR r IN UPDATE projects SET epoch = replace(gen_random_uuid()::TEXT, '-', '')
                RETURNING project_id, seq, epoch LOOP
            PERFORM pg_notify('crealia_events',
                jsonb_build_object('p', r.project_id, 's', r.seq, 'e', r.epoch)::TEXT);
            renewed := renewed + 1;
        END LOOP;
        UPDATE crealia_identity SET identity = live WHERE id = 1;
        RETURN renewed;
    END $$;
    """,
)

#: The schema version this package writes and reads.
SCHEMA_VERSION = len(MIGRATIONS)


def check_url(url: str) -> None:
    """Raises:
    ConfigurationError: ``url`` is not a ``postgresql://`` or ``postgres://`` URL libpq takes.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise ConfigurationError(f"database URL {redact_url_password(url)!r}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"database URL {redact_url_password(url)!r}: expected "
                                 "postgresql://[user[:password]@]host[:port]/database")  # fmt: skip
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"database URL {redact_url_password(url)!r}: {_one_line(exc)}"
        ) from None


def _conninfo(url: str, name: str) -> str:
    """``url`` with the connect timeout, keepalives and application name added."""
    return psycopg.conninfo.make_conninfo(
        url, connect_timeout=CONNECT_TIMEOUT, application_name=name, **_KEEPALIVES
    )


def _one_line(exc: BaseException) -> str:
    """A libpq message (often several lines, with hints) as one line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)


class NotSent(Exception):
    """Raised by a function given to :meth:`PgConnection.run` when its connection failed
    before anything was sent (its ``BEGIN``): it may run again on a new connection."""


def begin(conn: psycopg.Connection[Any]) -> None:
    """Open a transaction on an autocommit connection (``COMMIT`` or ``ROLLBACK`` ends it).

    Raises:
        NotSent: the connection is lost (nothing was done).
    """
    try:
        conn.execute("BEGIN")
    except psycopg.OperationalError as exc:
        raise NotSent(_one_line(exc)) from exc


class PgConnection:
    """One psycopg connection, used from worker threads one call at a time.

    The connection is opened on first use and again after it broke; a call on a broken
    connection fails (:class:`~crealia.Overloaded`) and the next one reconnects.
    """

    def __init__(self, url: str, *, name: str = "crealia") -> None:
        self.url = url
        self.name = name
        #: Run on every connection opened after it is set (:func:`check_identity`).
        self.on_connect: Callable[[psycopg.Connection[Any]], object] | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._conn: psycopg.Connection[Any] | None = None
        self.closed = False
        #: Connections opened so far (a reconnect is the second).
        self.opened = 0

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(_conninfo(self.url, self.name), autocommit=True)
        conn.execute("SET synchronous_commit = on")
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        if self.on_connect is not None:
            self.on_connect(conn)
        self.opened += 1
        return conn

    def connection(self) -> psycopg.Connection[Any]:
        """In the worker thread: the open connection (reopened if it broke or was never
        opened).

        Raises:
            psycopg.Error: it cannot be opened.
        """
        if self.closed:
            raise psycopg.OperationalError("the backplane is closed")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = None
            conn = self._conn = self._connect()
        return conn

    def _call(self, fn: Callable[[psycopg.Connection[Any]], T], idempotent: bool) -> T:
        conn = self.connection()
        try:
            return fn(conn)
        except NotSent as exc:
            # The connection died while idle (a database restart): nothing of ``fn`` reached
            # the database, so it runs again on a new connection, once.
            log.warning("postgresql connection %s lost (%s); reconnecting", self.name, exc)
            try:
                return fn(self.connection())
            except NotSent as again:
                raise again.__cause__ or again from None
        except psycopg.OperationalError as exc:
            if not idempotent or not (conn.broken or conn.closed):
                raise
            log.warning("postgresql connection %s lost (%s); reconnecting", self.name,
                        _one_line(exc))  # fmt: skip
            return fn(self.connection())

    async def run(
        self, fn: Callable[[psycopg.Connection[Any]], T], *, idempotent: bool = True
    ) -> T:
        """Run ``fn(connection)`` in a worker thread (reconnecting first if need be).

        The connection is in autocommit: ``fn`` opens its transactions itself
        (``with conn.transaction():``, which rolls back when it raises). An ``idempotent``
        ``fn`` that finds the connection lost runs again, once, on a new one; any ``fn`` that
        raises :class:`NotSent` does. Cancellation waits for the call, which the statement and
        connect timeouts bound.

        Raises:
            Overloaded: the database is unreachable or failed the call.
        """
        try:
            return await trio.to_thread.run_sync(self._call, fn, idempotent,
                                                 limiter=self._limiter)  # fmt: skip
        except psycopg.Error as exc:
            raise Overloaded(f"postgresql unavailable: {_one_line(exc)}") from exc

    async def open(self) -> None:
        """Open the connection now.

        Raises:
            TransportError: the database cannot be reached (one line, password masked).
        """
        try:
            await trio.to_thread.run_sync(self.connection, limiter=self._limiter)
        except psycopg.Error as exc:
            raise TransportError(f"database {redact_url_password(self.url)!r}: cannot connect: "
                                 f"{_one_line(exc)}") from exc  # fmt: skip

    async def close(self) -> None:
        """Close the connection (shielded: also when cancelled)."""
        self.closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)


# -- migrations ----------------------------------------------------------------------------------


def schema_version(cur: Cursor) -> int:
    """The database's schema version (0: empty)."""
    cur.execute("SELECT to_regclass('crealia_schema') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return 0
    cur.execute("SELECT COALESCE(MAX(version), 0) FROM crealia_schema")
    row = cur.fetchone()
    return int(row[0]) if row else 0


def check_identity(conn: psycopg.Connection[Any]) -> int:
    """In the worker thread, on a connection of a migrated database: compare the database's
    identity with the stored one (migration 4), renewing every project's epoch when they
    differ (a restore, a point-in-time recovery, a failover); the projects renewed."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT crealia_check_identity()")
        row = cur.fetchone()
    renewed = int(row[0]) if row else 0
    if renewed:
        log.warning("database %s: its identity changed (restored, recovered to a point in time, "
                    "or failed over): %d projects got a new epoch, so their clients resume "
                    "with a snapshot", redact_url_password(conn.info.dsn), renewed)  # fmt: skip
    return renewed


def newer_schema(url: str, version: int) -> ConfigurationError:
    return ConfigurationError(
        f"database {redact_url_password(url)!r} has schema version {version}, newer than this "
        f"crealia's {SCHEMA_VERSION}: upgrade crealia (or use another database)"
    )


def migrate_sync(conn: psycopg.Connection[Any], url: str) -> tuple[int, int]:
    """In the worker thread: apply the missing migrations, each in a transaction of its own,
    under an advisory lock; ``(version before, version after)``.

    Raises:
        ConfigurationError: the database's schema is newer than this package's.
        psycopg.Error: the database failed.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        before = schema_version(cur)
        if before > SCHEMA_VERSION:
            raise newer_schema(url, before)
        if before == 0:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS crealia_schema (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
        for version in range(before + 1, SCHEMA_VERSION + 1):
            started = time.monotonic()
            cur.execute(MIGRATIONS[version - 1].encode())
            cur.execute("INSERT INTO crealia_schema (version) VALUES (%s)", (version,))
            log.info("database %s: schema migrated to version %d (%.0f ms)",
                        redact_url_password(url), version,
                        (time.monotonic() - started) * 1000)  # fmt: skip
        return before, SCHEMA_VERSION


async def migrate(url: str) -> tuple[int, int]:
    """Bring the database at ``url`` up to :data:`SCHEMA_VERSION`; ``(before, after)``.

    Raises:
        ConfigurationError: a bad URL, or a schema newer than this package's.
        TransportError: the database cannot be reached or failed.
    """
    check_url(url)
    conn = PgConnection(url, name="crealia-migrate")
    try:
        await conn.open()
        try:
            return await conn.run(lambda c: migrate_sync(c, url))
        except Overloaded as exc:
            raise TransportError(f"database {redact_url_password(url)!r}: migration failed: "
                                 f"{exc}") from exc  # fmt: skip
    finally:
        await conn.close()


# -- the listening connection ----------------------------------------------------------------------


def listen(
    url: str,
    stop: list[bool],
    on_notices: Callable[[list[str]], None],
    on_state: Callable[[bool, BaseException | None], None],
) -> None:
    """The listener thread's loop: ``LISTEN`` on :data:`CHANNEL` on a connection of its own,
    handing each group of notice payloads to ``on_notices`` (which hops to Trio) until
    ``stop[0]``; a lost connection is reported to ``on_state(False, exc)`` and reopened with a
    backoff, then ``on_state(True, None)`` (notices may have been missed meanwhile).
    ``trio.RunFinishedError`` from a callback ends it.
    """
    backoff = 0.1
    conn: psycopg.Connection[Any] | None = None
    try:
        while not stop[0]:
            try:
                if conn is None:
                    conn = psycopg.connect(_conninfo(url, "crealia-listen"), autocommit=True)
                    conn.execute(f"LISTEN {CHANNEL}")
                    on_state(True, None)
                    backoff = 0.1
                # A short timeout so that ``stop`` is noticed quickly.
                batch = [n.payload for n in conn.notifies(timeout=0.1, stop_after=1)]
                if batch:
                    batch += [n.payload for n in _pending(conn)]
                    on_notices(batch)
            except psycopg.Error as exc:
                if conn is not None:
                    conn.close()
                conn = None
                on_state(False, exc)
                time.sleep(backoff)  # in the listener thread, not the event loop
                backoff = min(backoff * 2, 2.0)
    except trio.RunFinishedError:
        return
    finally:
        if conn is not None:
            conn.close()


def _pending(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Notify]:
    """The notices already received (up to 1,000), without waiting."""
    yield from conn.notifies(timeout=0.0, stop_after=1000)
