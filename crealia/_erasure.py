"""The rules that pseudonymize a user in the operations store (audit events, security alerts)
for a GDPR erasure (:mod:`crealia._gdpr`): pure, so that the operations stores (SQLite's in
:mod:`crealia._ops`, PostgreSQL's) apply them without importing the server."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from ._storage import dumps, loads

#: Keys of audit ``details`` whose value names a person.
_PERSON_KEYS = frozenset({"author", "user_id", "userId", "by"})
#: Keys of audit ``details`` that hold free text about the action.
_TEXT_KEYS = frozenset({"message", "reason", "explanation"})


def erase_trail(
    conn: sqlite3.Connection, project_id: str, user_id: str, pseudonym: str
) -> dict[str, int]:
    """Pseudonymize ``user_id`` in the operations store (audit events, security alerts) of
    ``project_id``, in one transaction; returns counts per table."""
    alias = Alias(user_id, pseudonym)
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts = {
            "audit": _erase_audit(conn, project_id, alias),
            "security_alerts": _erase_alerts(conn, project_id, alias),
        }
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return counts


def _erase_audit(conn: sqlite3.Connection, project_id: str, alias: Alias) -> int:
    """Pseudonymize the user in every audit event of the project: their own (whose address and
    user agent go too) and others' that name them (a strategy settling their conflict, an
    owner exporting their data)."""
    changed = 0
    rows = conn.execute(
        "SELECT rowid, user_id, data FROM audit_events WHERE project_id = ?", (project_id,)
    ).fetchall()
    for event_id, actor, data in rows:
        new = erased_audit(actor, loads(data), alias)
        if new is not None:
            conn.execute(
                "UPDATE audit_events SET user_id = ?, data = ? WHERE rowid = ?",
                (new["user_id"], dumps(new), event_id),
            )
            changed += 1
    return changed


def erased_audit(actor: str | None, event: dict[str, Any], alias: Alias) -> dict[str, Any] | None:
    """An audit event (its stored data; ``actor`` its user) with the user pseudonymized, or
    None when it does not name them."""
    new = dict(event)
    own = actor == alias.user_id
    new["resource"] = alias.subject(event.get("resource"))
    details = event.get("details")
    if isinstance(details, dict):
        new["details"] = {
            key: alias.id(value) if key in _PERSON_KEYS
            else alias.text(value) if own and key in _TEXT_KEYS else value
            for key, value in details.items()
        }  # fmt: skip
    if own:
        new.update(user_id=alias.pseudonym, ip_address="", user_agent="")
    return new if new != event else None


def _erase_alerts(conn: sqlite3.Connection, project_id: str, alias: Alias) -> int:
    """Security alerts about the user (their id, or ``user:<id>`` as subject) get the pseudonym
    and lose the address they came from."""
    changed = 0
    for alert_id, data in conn.execute(
        "SELECT id, data FROM security_alerts WHERE project_id = ? OR project_id IS NULL",
        (project_id,),
    ).fetchall():
        alert = erased_alert(loads(data), project_id, alias)
        if alert is not None:
            conn.execute("UPDATE security_alerts SET data = ? WHERE id = ?",
                         (dumps(alert), alert_id))  # fmt: skip
            changed += 1
    return changed


def erased_alert(alert: dict[str, Any], project_id: str, alias: Alias) -> dict[str, Any] | None:
    """A security alert (its stored data) of ``project_id`` or server-wide, with the user
    pseudonymized, or None when it is not about them (or does not concern the project)."""
    if alert.get("project_id") is None and project_id not in alert.get("projects", ()):
        return None  # an address's alert that does not concern this project
    if alert.get("user_id") != alias.user_id and alert.get("subject") != alias.subject_of:
        return None
    return {
        **alert,
        "user_id": alias.id(alert.get("user_id")),
        "subject": alias.subject(alert.get("subject")),
        "message": alias.text(alert.get("message")),
        "ip_address": "",
    }


class Alias:
    """Replaces one user id by its pseudonym where a field names a person."""

    def __init__(self, user_id: str, pseudonym: str) -> None:
        self.user_id = user_id
        self.pseudonym = pseudonym
        self.subject_of = f"user:{user_id}"
        self._word = re.compile(rf"(?<![\w-]){re.escape(user_id)}(?![\w-])")

    def id(self, value: Any) -> Any:
        """A field that holds a user id."""
        return self.pseudonym if value == self.user_id else value

    def subject(self, value: Any) -> Any:
        """A field that may hold ``user:<id>`` (an audit resource, an alert subject)."""
        return f"user:{self.pseudonym}" if value == self.subject_of else value

    def text(self, value: Any) -> Any:
        """Free text about an action: the id replaced as a word."""
        return self._word.sub(self.pseudonym, value) if isinstance(value, str) else value
