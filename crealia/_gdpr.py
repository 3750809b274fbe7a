"""GDPR: everything stored about a user in a project, and its erasure.

Both work on the embedded store in one call of its worker thread (so in one transaction for the
erasure). Erasure deletes the user's comments (and blanks their text in the event log),
pseudonymizes every other trace (events, changes, conflicts, snapshots, audit events, security
alerts) under a fresh pseudonym, and drops addresses and user agents from the audit trail. The
timeline itself stays: it is the team's shared work, now attributed to the pseudonym.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

from ._backplane import Backplane
from ._errors import Overloaded, StorageError, Unsupported
from ._storage import dumps, loads

if TYPE_CHECKING:
    from ._security import SecurityMonitor
    from ._session import Hub

ERASED_TEXT = "[erased]"
#: Keys whose string values are free text, where the user id is replaced as a word.
_TEXT_KEYS = frozenset({"explanation", "message", "subject", "resource"})


async def erase_user(
    hub: Hub, security: SecurityMonitor, project_id: str, user_id: str
) -> tuple[str, dict[str, int]]:
    """Erase ``user_id`` from ``project_id``: close the project's room (its members reconnect
    and resume once it is done), rewrite the store, and return the pseudonym and the counts.

    Raises:
        Unsupported: the backplane cannot erase (the Redis backplane, for now).
        Overloaded: the store failed (nothing was changed).
    """
    if type(hub.backplane).erase_user is Backplane.erase_user:
        # Before anything is closed: refusing must not cost the project's members their session.
        raise Unsupported(f"GDPR erasure is not available with {type(hub.backplane).__name__}")
    pseudonym = f"erased-{uuid.uuid4().hex[:12]}"
    hub.rooms.blocked.add(project_id)
    try:
        await hub.rooms.close(project_id)
        await hub.audit.flush()
        await security.flush()
        counts = await hub.backplane.erase_user(project_id, user_id, pseudonym)
        try:
            trail = await hub.audit.store.read(
                partial(erase_trail, project_id=project_id, user_id=user_id, pseudonym=pseudonym)
            )
        except StorageError as exc:
            raise Overloaded(f"the audit trail was not pseudonymized: {exc}; retry") from exc
        counts.update(trail)
        await security.reload()
    finally:
        hub.rooms.blocked.discard(project_id)
    return pseudonym, counts


async def export_user(hub: Hub, project_id: str, user_id: str) -> dict[str, Any]:
    """Everything stored about ``user_id`` in ``project_id``: ``comments``, ``edits``,
    ``conflicts`` (the backplane's) and ``audit`` events (the operations store's).

    Raises:
        Unsupported: the backplane cannot (the Redis backplane, for now).
    """
    await hub.audit.flush()  # what was just done is stored, so it is exported too
    content = await hub.backplane.user_data(project_id, user_id)

    def audit(conn: sqlite3.Connection) -> list[Any]:
        rows = conn.execute(
            "SELECT data FROM audit_events WHERE project_id = ? AND user_id = ? ORDER BY at",
            (project_id, user_id),
        )
        return [loads(data) for (data,) in rows]

    try:
        return {**content, "audit": await hub.audit.store.read_aside(audit)}
    except StorageError as exc:
        raise Overloaded(f"storage unavailable: {exc}") from exc


def collect(conn: sqlite3.Connection, project_id: str, user_id: str) -> dict[str, Any]:
    """What the projects' store holds about ``user_id`` in ``project_id``: comments, edits
    authored, and conflicts they were part of."""
    comments = [
        {"id": cid, "seq": seq, "elementId": eid, "time": at_time, "text": text, "at": at}
        for cid, seq, eid, at_time, text, at in conn.execute(
            "SELECT comment_id, seq, element_id, time, text, at FROM comments "
            "WHERE project_id = ? AND user_id = ? ORDER BY seq",
            (project_id, user_id),
        )
    ]
    edits = [
        {"seq": seq, "kind": kind, "at": at, "payload": loads(payload)}
        for seq, kind, at, payload in conn.execute(
            "SELECT seq, kind, at, payload FROM events WHERE project_id = ? AND user_id = ? "
            "AND kind != 'comment_add' ORDER BY seq",
            (project_id, user_id),
        )
    ]
    conflicts = []
    for (data,) in conn.execute(
        "SELECT data FROM conflicts WHERE project_id = ? ORDER BY created_at", (project_id,)
    ):
        conflict = loads(data)
        if _mentions(conflict, user_id):
            conflicts.append(conflict)
    return {"comments": comments, "edits": edits, "conflicts": conflicts}


def erase(
    conn: sqlite3.Connection, project_id: str, user_id: str, pseudonym: str
) -> dict[str, int]:
    """Erase ``user_id`` from ``project_id`` in one transaction; returns counts per table."""
    counts: dict[str, int] = {}
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts["comments"] = conn.execute(
            "DELETE FROM comments WHERE project_id = ? AND user_id = ?", (project_id, user_id)
        ).rowcount
        rows = conn.execute(
            "SELECT seq, kind, user_id, payload, effects FROM events WHERE project_id = ?",
            (project_id,),
        ).fetchall()
        changed = 0
        for seq, kind, author, payload, effects in rows:
            new_payload = _rewrite(loads(payload), user_id, pseudonym)
            if kind == "comment_add" and author == user_id:
                new_payload["comment"]["text"] = ERASED_TEXT
            new_effects = _rewrite(loads(effects), user_id, pseudonym)
            new_author = pseudonym if author == user_id else author
            if (new_author, dumps(new_payload), dumps(new_effects)) != (author, payload, effects):
                conn.execute(
                    "UPDATE events SET user_id = ?, payload = ?, effects = ? "
                    "WHERE project_id = ? AND seq = ?",
                    (new_author, dumps(new_payload), dumps(new_effects), project_id, seq),
                )
                changed += 1
        counts["events"] = changed
        counts["changes"] = conn.execute(
            "UPDATE changes SET user_id = ? WHERE project_id = ? AND user_id = ?",
            (pseudonym, project_id, user_id),
        ).rowcount
        counts["conflicts"] = _rewrite_blobs(
            conn, "conflicts", "id", "data", "project_id = ?", (project_id,), user_id, pseudonym
        )
        counts["snapshots"] = _rewrite_blobs(
            conn, "snapshots", "project_id", "document", "project_id = ?", (project_id,),
            user_id, pseudonym,
        )  # fmt: skip
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return counts


def erase_trail(
    conn: sqlite3.Connection, project_id: str, user_id: str, pseudonym: str
) -> dict[str, int]:
    """Pseudonymize ``user_id`` in the operations store (audit events, security alerts) of
    ``project_id``, in one transaction; returns counts per table."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts = {
            "audit": _erase_audit(conn, project_id, user_id, pseudonym),
            "security_alerts": _rewrite_blobs(
                conn, "security_alerts", "id", "data", "project_id = ?", (project_id,),
                user_id, pseudonym,
            ),
        }  # fmt: skip
        _erase_alert_addresses(conn, project_id, pseudonym)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return counts


def _erase_audit(conn: sqlite3.Connection, project_id: str, user_id: str, pseudonym: str) -> int:
    """Pseudonymize the user in every audit event of the project: their own (whose address and
    user agent go too) and others' that name them (a strategy settling their conflict, an
    owner exporting their data)."""
    changed = 0
    rows = conn.execute(
        "SELECT rowid, user_id, data FROM audit_events WHERE project_id = ?", (project_id,)
    ).fetchall()
    for event_id, actor, data in rows:
        event = loads(data)
        new = _rewrite(event, user_id, pseudonym)
        if actor == user_id:
            new.update(user_id=pseudonym, ip_address="", user_agent="")
        if new != event:
            conn.execute(
                "UPDATE audit_events SET user_id = ?, data = ? WHERE rowid = ?",
                (new["user_id"], dumps(new), event_id),
            )
            changed += 1
    return changed


def _erase_alert_addresses(conn: sqlite3.Connection, project_id: str, pseudonym: str) -> None:
    """Security alerts about the (now pseudonymized) user lose the address they came from."""
    for alert_id, data in conn.execute(
        "SELECT id, data FROM security_alerts WHERE project_id = ?", (project_id,)
    ).fetchall():
        alert = loads(data)
        if alert.get("user_id") == pseudonym and alert.get("ip_address"):
            alert["ip_address"] = ""
            conn.execute(
                "UPDATE security_alerts SET data = ? WHERE id = ?", (dumps(alert), alert_id)
            )


def _rewrite_blobs(
    conn: sqlite3.Connection,
    table: str,
    key: str,
    column: str,
    where: str,
    params: tuple[Any, ...],
    user_id: str,
    pseudonym: str,
) -> int:
    changed = 0
    # Table and column names are this module's constants; values are parameters.
    select = f"SELECT {key}, {column} FROM {table} WHERE {where}"  # noqa: S608
    update = f"UPDATE {table} SET {column} = ? WHERE {key} = ?"  # noqa: S608
    rows = conn.execute(select, params).fetchall()
    for row_key, data in rows:
        value = loads(data)
        if _mentions(value, user_id):
            new = dumps(_rewrite(value, user_id, pseudonym))
            conn.execute(update, (new, row_key))
            changed += 1
    return changed


def _mentions(value: Any, user_id: str) -> bool:
    return bool(_rewrite(value, user_id, "\x00") != value)


def _rewrite(value: Any, user_id: str, pseudonym: str) -> Any:
    """``value`` with every string equal to ``user_id`` (values and keys) replaced, and the id
    replaced as a word inside free-text fields."""
    word = re.compile(rf"(?<![\w-]){re.escape(user_id)}(?![\w-])")

    def walk(item: Any, key: str = "") -> Any:
        if isinstance(item, str):
            if item == user_id:
                return pseudonym
            return word.sub(pseudonym, item) if key in _TEXT_KEYS else item
        if isinstance(item, dict):
            return {(pseudonym if k == user_id else k): walk(v, k) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v, key) for v in item]
        return item

    return walk(value)
