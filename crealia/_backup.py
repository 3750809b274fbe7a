"""Backup and restore of the embedded store (``crealia backup`` / ``crealia restore``).

A backup is an online, consistent copy of the projects' database (``crealia.sqlite3``: events,
snapshots, comments, conflicts, settings) taken with SQLite's backup API while the server runs:
the copy is one read transaction, and in WAL mode a reader never blocks the server's writer, so
edits go on being acked while it runs. The copy is written beside its destination and renamed
into place once complete and checked, so a backup file is never half written.

A restore puts a backup back in place of a stopped server's database and gives every project a
new history epoch (docs/protocol.md §3): a client that resumes with what it had before (a ``seq``
and the old epoch) gets a snapshot of the restored document, never a replay on top of a state
the server no longer has. It refuses while a server has the database open.

The operations store (``ops.sqlite3``: audit log, security alerts, metric samples) is not part
of a backup: it is what happened, not what the projects are, and restoring it would rewrite the
audit log. These functions block (sqlite3); the CLI calls them outside any Trio run.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import attrs

from ._errors import ConfigurationError
from ._gdpr import new_epoch
from ._storage import SCHEMA_VERSION

#: The projects' database in a data dir.
PROJECTS_DB = "crealia.sqlite3"
#: Tables a file must have to be a backup of the projects' database.
_TABLES = frozenset({"events", "snapshots", "comments", "conflicts", "project_epochs"})


@attrs.frozen(kw_only=True)
class BackupReport:
    """What a backup or a restore did."""

    path: Path
    projects: int
    events: int
    size_bytes: int
    seconds: float

    def line(self, verb: str) -> str:
        return (
            f"{verb} {self.projects} project{'s' * (self.projects != 1)}, "
            f"{self.events} event{'s' * (self.events != 1)} ({self.size_bytes / 1e6:.1f} MB) "
            f"in {self.seconds:.2f} s: {self.path}"
        )


def _counts(conn: sqlite3.Connection) -> tuple[int, int]:
    projects = conn.execute(
        "SELECT COUNT(*) FROM (SELECT project_id FROM events UNION "
        "SELECT project_id FROM snapshots UNION SELECT project_id FROM project_epochs)"
    ).fetchone()[0]
    events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return int(projects), int(events)


def _check_backup(conn: sqlite3.Connection, path: Path) -> None:
    """Raises ConfigurationError unless ``conn`` holds a whole projects' database this version
    can read."""
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ConfigurationError(f"{path} is not a crealia backup: {exc}") from None
    missing = sorted(_TABLES - tables)
    if missing:
        raise ConfigurationError(
            f"{path} is not a crealia backup: it has no {', '.join(missing)} table"
        )
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} was written by a newer crealia (schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}): upgrade crealia to restore it"
        )
    if check != "ok":
        raise ConfigurationError(f"{path} is damaged: {check}")


def backup(data_dir: Path, to: Path) -> BackupReport:
    """Copy the projects' database of ``data_dir`` to the new file ``to``, online.

    Raises:
        ConfigurationError: no store in ``data_dir``, ``to`` exists or cannot be written.
    """
    source = Path(data_dir) / PROJECTS_DB
    if not source.is_file():
        raise ConfigurationError(f"--data-dir {data_dir}: there is no store ({source} is missing)")
    if to.exists():
        raise ConfigurationError(f"--to {to}: the file exists; choose a new name")
    if not to.parent.is_dir():
        raise ConfigurationError(f"--to {to}: {to.parent} is not a directory")
    partial = to.with_name(to.name + ".partial")
    started = time.monotonic()
    try:
        partial.unlink(missing_ok=True)
        src = sqlite3.connect(source, timeout=10)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # one read transaction: a consistent copy
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                _check_backup(dst, to)
                projects, events = _counts(dst)
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, to)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot back up {source}: {exc}") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigurationError(f"--to {to}: {exc.strerror or exc}") from None
    return BackupReport(path=to, projects=projects, events=events,
                        size_bytes=to.stat().st_size,
                        seconds=time.monotonic() - started)  # fmt: skip


def restore(data_dir: Path, source: Path) -> BackupReport:
    """Put the backup ``source`` in place of the projects' database of ``data_dir`` (its server
    stopped), every project with a new epoch.

    Raises:
        ConfigurationError: ``source`` is not a backup this version can read, or a server has
            the database open, or it cannot be written.
    """
    if not source.is_file():
        raise ConfigurationError(f"--from {source}: no such file")
    target = Path(data_dir) / PROJECTS_DB
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"--data-dir {data_dir}: {exc.strerror or exc}") from None
    started = time.monotonic()
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"--from {source}: {exc}") from None
    try:
        _check_backup(src, source)
        dst = sqlite3.connect(target, timeout=0.2, isolation_level=None)
        try:
            # An exclusive lock, kept to the end, that nobody else may hold meanwhile: a
            # running server keeps the database open, and this fails at once.
            dst.execute("PRAGMA locking_mode=EXCLUSIVE")
            try:
                dst.execute("BEGIN EXCLUSIVE")
                dst.execute("COMMIT")
            except sqlite3.OperationalError:
                raise ConfigurationError(
                    f"--data-dir {data_dir}: a server has {target} open: stop it first"
                ) from None
            src.backup(dst)
            dst.execute("BEGIN")
            projects = [row[0] for row in dst.execute(
                "SELECT project_id FROM events UNION SELECT project_id FROM snapshots "
                "UNION SELECT project_id FROM project_epochs"
            )]  # fmt: skip
            dst.execute("DELETE FROM project_epochs")
            dst.executemany("INSERT INTO project_epochs (project_id, epoch) VALUES (?, ?)",
                            [(project, new_epoch()) for project in projects])  # fmt: skip
            dst.execute("COMMIT")
            dst.execute("PRAGMA journal_mode=WAL")
            count, events = _counts(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot restore {source} into {target}: {exc}") from None
    finally:
        src.close()
    return BackupReport(path=target, projects=count, events=events,
                        size_bytes=target.stat().st_size,
                        seconds=time.monotonic() - started)  # fmt: skip
