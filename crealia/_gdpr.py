"""GDPR: everything stored about a user in a project, and its erasure.

Both work on the embedded store in one call of its worker thread (so in one transaction for the
erasure). Erasure deletes the user's comments (and blanks their text in the event log),
pseudonymizes every other trace under a fresh pseudonym, and drops addresses and user agents from
the audit trail. The timeline itself stays: it is the team's shared work, now attributed to the
pseudonym.

Only attribution is rewritten, field by field, never content: a user id is whatever string a
token's ``sub`` says (``"42"``, ``"clip"``), so the same string may well be another user's
element id, property name or value, and those must stay as they are. The attribution fields:

- events: the author (``user_id``), the ``writer`` of each effect, and the free-text
  ``explanation`` of a resolution the user took part in (as a word);
- changes and comments: ``user_id``;
- conflicts: ``current.user_id``, ``incoming.user_id``, the keys of ``roles``, and the
  ``explanation`` of their resolution;
- snapshots: each element's ``writers`` and ``created_by``, each tombstone's ``user_id``;
- audit events: ``user_id``, a ``user:<id>`` subject in ``resource``, the ``details`` keys that
  name a person (``author``, ``user_id``, ``userId``, ``by``), and the free text of the user's own
  events;
- security alerts: ``user_id``, a ``user:<id>`` subject, and the message of an alert about them.

Because erasure rewrites history that clients may hold, it gives the project a new *epoch*
(docs/protocol.md §3, §6): a client resuming with the old one gets a snapshot, never a replay.
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from ._erasure import Alias
from ._errors import Overloaded, StorageError, Unsupported
from ._storage import dumps, loads

if TYPE_CHECKING:
    from ._session import Hub


class SecurityAlerts(Protocol):
    """What an erasure needs of the security monitor (a Protocol: the monitor imports the
    audit log, which imports the operations store, which uses this module's rules)."""

    async def flush(self) -> None: ...

    async def reload(self) -> None: ...


ERASED_TEXT = "[erased]"


async def erase_user(
    hub: Hub, security: SecurityAlerts, project_id: str, user_id: str
) -> tuple[str, dict[str, int]]:
    """Erase ``user_id`` from ``project_id``: close the project's room (its members reconnect
    and resume once it is done), rewrite the store, and return the pseudonym and the counts.

    Raises:
        Unsupported: the backplane does not support GDPR (``supports_gdpr``).
        Overloaded: the store failed (nothing was changed).
    """
    if not hub.backplane.supports_gdpr:
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
            trail = await hub.audit.store.erase_trail(project_id, user_id, pseudonym)
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
        Unsupported: the backplane does not support GDPR (``supports_gdpr``).
    """
    if not hub.backplane.supports_gdpr:
        raise Unsupported(f"GDPR export is not available with {type(hub.backplane).__name__}")
    await hub.audit.flush()  # what was just done is stored, so it is exported too
    content = await hub.backplane.user_data(project_id, user_id)

    try:
        audit = [loads(data) for data in await hub.audit.store.user_audit(project_id, user_id)]
    except StorageError as exc:
        raise Overloaded(f"storage unavailable: {exc}") from exc
    return {**content, "audit": audit}


def collect(conn: sqlite3.Connection, project_id: str, user_id: str) -> dict[str, Any]:
    """What the projects' store holds about ``user_id`` in ``project_id``: comments, edits
    authored, and conflicts they were part of (as one of the two sides)."""
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
        if user_id in _parties(conflict):
            conflicts.append(conflict)
    return {"comments": comments, "edits": edits, "conflicts": conflicts}


def new_epoch() -> str:
    """A fresh epoch: names one version of a project's history (docs/protocol.md §3)."""
    return uuid.uuid4().hex


def erase(
    conn: sqlite3.Connection, project_id: str, user_id: str, pseudonym: str
) -> dict[str, int]:
    """Erase ``user_id`` from ``project_id`` in one transaction, and give the project a new
    epoch; returns counts per table."""
    alias = Alias(user_id, pseudonym)
    counts: dict[str, int] = {}
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts["comments"] = conn.execute(
            "DELETE FROM comments WHERE project_id = ? AND user_id = ?", (project_id, user_id)
        ).rowcount
        conflicts = conn.execute(
            "SELECT id, data FROM conflicts WHERE project_id = ?", (project_id,)
        ).fetchall()
        rows = conn.execute(
            "SELECT seq, kind, user_id, payload, effects FROM events WHERE project_id = ?",
            (project_id,),
        ).fetchall()
        # The conflicts whose free text may name the user: theirs, or settled by them.
        involved = {cid for cid, data in conflicts if user_id in _parties(loads(data))}
        for _seq, kind, author, payload, _effects in rows:
            if kind == "conflict_resolved" and author == user_id:
                involved.add(loads(payload).get("conflict_id"))
        changed = 0
        for seq, kind, author, payload, effects in rows:
            event = loads(payload)
            new_payload = _event_payload(kind, event, alias, involved)
            if kind == "comment_add" and author == user_id:
                new_payload["comment"]["text"] = ERASED_TEXT
            new_effects = dumps([_effect(op, alias) for op in loads(effects)])
            new_author = alias.id(author)
            if (new_author, dumps(new_payload), new_effects) != (author, payload, effects):
                conn.execute(
                    "UPDATE events SET user_id = ?, payload = ?, effects = ? "
                    "WHERE project_id = ? AND seq = ?",
                    (new_author, dumps(new_payload), new_effects, project_id, seq),
                )
                changed += 1
        counts["events"] = changed
        counts["changes"] = conn.execute(
            "UPDATE changes SET user_id = ? WHERE project_id = ? AND user_id = ?",
            (pseudonym, project_id, user_id),
        ).rowcount
        changed = 0
        for cid, data in conflicts:
            if cid in involved:
                new = dumps(_conflict(loads(data), alias))
                if new != data:
                    conn.execute("UPDATE conflicts SET data = ? WHERE id = ?", (new, cid))
                    changed += 1
        counts["conflicts"] = changed
        changed = 0
        for key, data in conn.execute(
            "SELECT project_id, document FROM snapshots WHERE project_id = ?", (project_id,)
        ).fetchall():
            new = dumps(_document(loads(data), alias))
            if new != data:
                conn.execute("UPDATE snapshots SET document = ? WHERE project_id = ?", (new, key))
                changed += 1
        counts["snapshots"] = changed
        conn.execute(
            "INSERT OR REPLACE INTO project_epochs (project_id, epoch) VALUES (?, ?)",
            (project_id, new_epoch()),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return counts


def _parties(conflict: dict[str, Any]) -> set[Any]:
    """The authors of a conflict's two sides."""
    return {side.get("user_id") for side in (conflict.get("current"), conflict.get("incoming"))
            if isinstance(side, dict)}  # fmt: skip


def _resolution(resolution: Any, alias: Alias) -> Any:
    if not isinstance(resolution, dict) or "explanation" not in resolution:
        return resolution
    return {**resolution, "explanation": alias.text(resolution["explanation"])}


def _event_payload(
    kind: str, payload: dict[str, Any], alias: Alias, involved: set[Any]
) -> dict[str, Any]:
    """An event's payload with its attribution rewritten: only a resolution's explanation,
    when the user took part in that conflict. Changes and comments are content."""
    if kind == "conflict_resolved" and payload.get("conflict_id") in involved:
        return {**payload, "resolution": _resolution(payload.get("resolution"), alias)}
    return dict(payload)


def _effect(op: Any, alias: Alias) -> Any:
    if isinstance(op, dict) and "writer" in op:
        return {**op, "writer": alias.id(op["writer"])}
    return op


def _conflict(conflict: dict[str, Any], alias: Alias) -> dict[str, Any]:
    new = dict(conflict)
    for side in ("current", "incoming"):
        if isinstance(conflict.get(side), dict):
            new[side] = {**conflict[side], "user_id": alias.id(conflict[side].get("user_id"))}
    if isinstance(conflict.get("roles"), dict):
        new["roles"] = {alias.id(user): role for user, role in conflict["roles"].items()}
    new["resolution"] = _resolution(conflict.get("resolution"), alias)
    return new


def _element(element: dict[str, Any], alias: Alias) -> dict[str, Any]:
    return {
        **element,
        "writers": {prop: alias.id(w) for prop, w in element.get("writers", {}).items()},
        "created_by": alias.id(element.get("created_by")),
    }


def _document(doc: dict[str, Any], alias: Alias) -> dict[str, Any]:
    """A stored document (``Document.dump``) with who wrote what rewritten; ids, props and
    values untouched."""
    return {
        **doc,
        "elements": {eid: _element(el, alias) for eid, el in doc.get("elements", {}).items()},
        "tombstones": {
            eid: {**t, "user_id": alias.id(t.get("user_id")),
                  "element": _element(t.get("element", {}), alias)}
            for eid, t in doc.get("tombstones", {}).items()
        },
    }  # fmt: skip
