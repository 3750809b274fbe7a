"""What a backplane does to a document for each durable write, without storing anything.

Both built-in backplanes (SQLite and Redis) prepare writes here, then make them durable their
own way and apply the prepared event to their copy of the document. Every function is pure: it
reads the document and returns what would happen; nothing changes until the caller applies the
event.

:class:`Sequencer` (public, ``crealia.Sequencer``) puts the same steps behind one object for
a new backplane: a project's document, recent history and pending conflicts in memory, a
``prepare_*`` per durable write (which checks it and changes nothing) and :meth:`Sequencer.commit`
once the backplane has made the prepared write durable. The backplane keeps the ids, the store
and the fan-out; the sequencer keeps the rules of docs/protocol.md §5 and §6.
"""

from __future__ import annotations

import copy
import hashlib
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs
import orjson

from . import _wire
from ._backplane import History
from ._config import Config
from ._document import ConflictSpec, Document, Quotas, ValueAt
from ._errors import BadRequest, NotFound, TooLarge
from ._model import ChangeOutcome, Conflict, DurableEvent, Resolution, Settled, User
from ._wire import DeleteOp, InsertOp, Op, SetOp


def now_ms() -> int:
    """The server's clock in epoch milliseconds (an event's ``at``)."""
    return int(time.time() * 1000)


@attrs.frozen(kw_only=True)
class ChangeRecord:
    """What a project remembers of an accepted ``change_id``: the outcome its ack had, who sent
    it and a digest of its operations, so that only the same change resent is a duplicate."""

    outcome: ChangeOutcome
    user_id: str
    #: :func:`change_digest` of the operations; ``None`` for changes stored before digests were.
    digest: str | None


def change_digest(change: _wire.TimelineChange) -> str:
    """A digest of a change's operations as validated (key order does not matter)."""
    canonical = orjson.dumps(_wire.unstructure(change.changes), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def record_of(user: User, change: _wire.TimelineChange, outcome: ChangeOutcome) -> ChangeRecord:
    """What to remember of ``change``'s id once its ``outcome`` is durable."""
    return ChangeRecord(
        outcome=attrs.evolve(outcome, detected=[]), user_id=user.id, digest=change_digest(change)
    )


def duplicate_of(first: ChangeRecord, user: User, change: _wire.TimelineChange) -> ChangeOutcome:
    """The ``duplicate`` outcome of ``change`` resent, whose ``change_id`` was first accepted as
    ``first``.

    Raises:
        BadRequest: the id was first used by another user or with other operations (an
            idempotency key names one request, like Stripe's); nothing is recorded.
    """
    if first.user_id != user.id:
        raise BadRequest(
            f"data.change_id: {change.change_id!r} is already taken in this project by another "
            "user's change; choose a new change_id"
        )
    if first.digest is not None and first.digest != change_digest(change):
        raise BadRequest(
            f"data.change_id: {change.change_id!r} was already used in this project for "
            "different changes; a resend must carry the same changes, a new change a new "
            "change_id"
        )
    return attrs.evolve(first.outcome, status="duplicate", detected=[])


def dry_run_of(
    doc: Document, history: Sequence[DurableEvent], user: User, change: _wire.TimelineChange
) -> dict[str, Any]:
    """What ``change`` would do to ``doc`` (with its kept ``history``), changing nothing: the
    answer of :meth:`crealia.abc.Backplane.dry_run` (every built-in backplane's).

    Raises:
        BadRequest, NotFound: the change contradicts the document.
    """
    plan = doc.plan(user.id, change.change_id, change.changes, value_at(history))
    return {
        "applies": plan.applied,
        "conflicts": [
            {"op": s.op, "element_id": s.element_id, "prop": s.prop, "base": s.base,
             "base_value": s.base_value, "current": s.current, "incoming": s.incoming}
            for s in plan.conflicts
        ],
    }  # fmt: skip


def value_at(history: Sequence[DurableEvent]) -> ValueAt:
    """Look up the value a property had at a seq, from kept history (newest first search).

    The lookup reads ``history`` as it is when called (no copy: it is called synchronously while
    a change is planned). With ``prop`` None it is the whole element (a delete conflict's base):
    its props at ``seq``, rebuilt from its insert on; ``None`` when the kept history no longer
    reaches back to the insert (unknown, as for a property written before the history).
    """
    events = history

    def element_at(element_id: str, seq: int) -> dict[str, Any] | None:
        props: dict[str, Any] | None = None
        for event in events:
            if event.seq > seq:
                break
            for op in event.effects:
                if op["element_id"] != element_id:
                    continue
                if op["op"] == "insert":
                    props = copy.deepcopy(op.get("props", {}))
                elif op["op"] == "set" and props is not None:
                    props[op["prop"]] = copy.deepcopy(op["value"])
                elif op["op"] == "delete":
                    props = None
        return props

    def lookup(element_id: str, prop: str | None, seq: int | None) -> Any:
        if seq is None:
            return None
        if prop is None:
            return element_at(element_id, seq)
        for event in reversed(events):
            if event.seq > seq:
                continue
            for op in reversed(event.effects):
                if op["element_id"] != element_id:
                    continue
                if op["op"] == "insert":
                    return copy.deepcopy(op.get("props", {}).get(prop))
                if op["op"] == "set" and op["prop"] == prop:
                    return copy.deepcopy(op["value"])
                if op["op"] == "delete":
                    return None
        return None

    return lookup


def new_conflict(
    project_id: str, spec: ConflictSpec, at: int, strategy: str, roles: dict[str, str]
) -> Conflict:
    authors = (spec.current.get("user_id"), spec.incoming.get("user_id"))
    return Conflict(
        id=uuid.uuid4().hex[:16],
        project_id=project_id,
        element_id=spec.element_id,
        prop=spec.prop,
        op=spec.op,  # type: ignore[arg-type]
        base=spec.base,
        base_value=spec.base_value,
        current=spec.current,
        incoming=spec.incoming,
        strategy=strategy,
        created_at=at,
        roles={u: roles[u] for u in authors if u is not None and u in roles},
    )


@attrs.frozen
class PendingLoad:
    """What a project's pending conflicts hold: how many, and their bytes
    (:func:`conflict_bytes`), against ``max_pending_conflicts`` and
    ``pending_conflicts_max_bytes``."""

    count: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, conflicts: Iterable[Conflict]) -> PendingLoad:
        """The load of these conflicts (those pending among them)."""
        pending = [c for c in conflicts if c.status == "pending"]
        return cls(len(pending), sum(conflict_bytes(c) for c in pending))


def conflict_bytes(conflict: Conflict | ConflictSpec) -> int:
    """What a pending conflict counts for in ``pending_conflicts_max_bytes``: its incoming,
    current and base values, JSON-encoded."""
    return (
        _wire.value_bytes(conflict.incoming)
        + _wire.value_bytes(conflict.current)
        + _wire.value_bytes(conflict.base_value)
    )


def check_pending(specs: Sequence[ConflictSpec], load: PendingLoad, doc: Document) -> None:
    """Check that opening these conflicts keeps the project's pending conflicts within
    ``doc.quotas``.

    Raises:
        TooLarge: one of them would be past ``max_pending_conflicts`` or
            ``pending_conflicts_max_bytes``; the message names its op and the quota.
    """
    quotas = doc.quotas
    count, held = load.count, load.bytes
    for spec in specs:
        count += 1
        held += conflict_bytes(spec)
        where = f"data.changes[{spec.index}]"
        if count > quotas.pending_conflicts:
            raise TooLarge(
                f"{where}: max_pending_conflicts quota: the project would have {count} pending "
                f"conflicts, over {quotas.pending_conflicts}; resolve or dismiss some first"
            )
        if held > quotas.pending_bytes:
            raise TooLarge(
                f"{where}: pending_conflicts_max_bytes quota: the project's pending conflicts "
                f"would hold {held} bytes, over {quotas.pending_bytes}; resolve or dismiss some "
                "first"
            )


@attrs.frozen(kw_only=True)
class RevertChange(_wire.TimelineChange):
    """A ``conflict_revert`` (docs/protocol.md §5): the change that restores ``value``, the side
    ``side`` of ``conflict``, over what its resolution at ``resolution_seq`` wrote.

    The server builds it (no client message decodes into it); its operations are worked out
    against the document when it is prepared (:func:`revert_ops`), so ``changes`` stays empty.
    Its ``change_id`` is ``revert:<conflict id>``: a conflict is reverted at most once.
    """

    changes: list[Op] = attrs.field(factory=list)
    #: The id of the conflict whose resolution it undoes (the event's ``payload.revert_of``).
    revert_of: str
    conflict: Conflict
    side: Literal["current", "incoming"]
    value: Any
    resolution_seq: int


def _own_newer(seq: int | None, writer: str | None, user: User, at: int, what: str) -> None:
    """Raises:
    BadRequest: ``user`` wrote ``what`` after ``at`` (a revert writes over no newer edit; someone
        else's newer edit is a conflict, the plan's to find).
    """
    if seq is not None and seq > at and writer == user.id:
        raise BadRequest(
            f"data.conflict_id: you changed {what} at seq {seq}, after the resolution (seq {at}); "
            "a revert never writes over a newer edit: change it with a timeline_change instead"
        )


def revert_ops(doc: Document, user: User, change: RevertChange) -> list[Op]:
    """The operations that put ``change.value`` back where the conflict's resolution wrote.

    Each carries ``base`` = the resolution's seq, so a write by someone else since then makes it
    a conflict (the plan's usual check), never an overwrite. A deleted element comes back (an
    ``insert`` of its kept type) when the resolution deleted it, or kept it deleted.

    Raises:
        BadRequest: the resolution wrote nothing to revert (a newer value stood), the element
            was created again or deleted since in a way a revert cannot be checked against, or
            ``user`` changed the target since the resolution.
        NotFound: the element is gone (deleted and forgotten).
    """
    conflict, value, at = change.conflict, change.value, change.resolution_seq
    eid, prop = conflict.element_id, conflict.prop
    where = "data.conflict_id"
    element, tomb = doc.elements.get(eid), doc.tombstones.get(eid)
    if element is None and tomb is None:
        raise NotFound(f"{where}: element {eid!r} is no longer in this project")
    if prop is None:  # a conflicting delete: value is the element's props, or None (deleted)
        if element is not None and element.created > at:
            raise BadRequest(
                f"{where}: element {eid!r} was created again at seq "
                f"{element.created}, after the resolution (seq {at}); a revert "
                "does not replace it"
            )
        if not isinstance(value, dict | None):
            raise BadRequest(f"{where}: the {change.side} side of conflict {conflict.id!r} holds "
                             "no element's props to restore")  # fmt: skip
        if value is None:
            if element is None:
                raise BadRequest(f"{where}: element {eid!r} is deleted already; nothing to revert")
            _own_newer(*element.version(), user, at, f"element {eid!r}")
            return [DeleteOp(op="delete", element_id=eid, base=at)]
        if element is None:
            assert tomb is not None
            if tomb.seq != at:
                raise BadRequest(
                    f"{where}: element {eid!r} was deleted at seq {tomb.seq}, not by "
                    f"the resolution (seq {at}); a revert does not bring it back"
                )
            return [InsertOp(op="insert", element_id=eid, element_type=tomb.element.type,
                             props=dict(value))]  # fmt: skip
        for name in value:
            _own_newer(element.versions.get(name), element.writers.get(name), user, at,
                       f"{eid}.{name}")  # fmt: skip
        return [SetOp(op="set", element_id=eid, prop=name, value=v, base=at)
                for name, v in value.items()]  # fmt: skip
    what = f"{eid}.{prop}"
    if element is not None:
        restores_delete = change.side == "current" and conflict.current.get("value") is None
        if element.created == at and restores_delete:
            # The resolution brought a deleted element back: its other side had it deleted.
            _own_newer(*element.version(), user, at, f"element {eid!r}")
            return [DeleteOp(op="delete", element_id=eid, base=at)]
        version = element.versions.get(prop)
        if version is not None and version < at:
            raise BadRequest(
                f"{where}: the resolution (seq {at}) wrote nothing to {what} (a "
                "newer value stood); nothing to revert"
            )
        _own_newer(version, element.writers.get(prop), user, at, what)
        return [SetOp(op="set", element_id=eid, prop=prop, value=value, base=at)]
    assert tomb is not None
    if tomb.seq > at:  # deleted since the resolution: a set from before it conflicts
        _own_newer(tomb.seq, tomb.user_id, user, at, f"element {eid!r}")
        return [SetOp(op="set", element_id=eid, prop=prop, value=value, base=at)]
    if conflict.current.get("seq") != tomb.seq:
        raise BadRequest(
            f"{where}: element {eid!r} was deleted at seq {tomb.seq} while the "
            "conflict was being settled (that delete stood); nothing to revert"
        )
    if value is None:
        raise BadRequest(
            f"{where}: element {eid!r} is deleted, as the side restored had it; nothing to revert"
        )
    # The resolution kept the element deleted: restoring the edit brings it back.
    props = {**tomb.element.props, prop: value}
    return [InsertOp(op="insert", element_id=eid, element_type=tomb.element.type, props=props)]


def prepare_change(
    doc: Document,
    user: User,
    change: _wire.TimelineChange,
    *,
    strategy: str,
    roles: dict[str, str],
    lookup: ValueAt,
    at: int,
    pending: PendingLoad | None,
) -> tuple[ChangeOutcome, DurableEvent | None]:
    """The outcome and (when something applies) the event of ``change`` at ``doc.seq + 1``.

    ``pending`` is what the project's pending conflicts hold (``None``: the caller checks the
    quotas itself, atomically, with :func:`check_pending`).

    Raises:
        BadRequest, NotFound: the change contradicts the document.
        TooLarge: it would grow the document, a value, or the pending conflicts past a quota
            (the message names it); nothing changes.
    """
    ops = revert_ops(doc, user, change) if isinstance(change, RevertChange) else change.changes
    plan = doc.plan(user.id, change.change_id, ops, lookup)
    if pending is not None:
        check_pending(plan.conflicts, pending, doc)
    event = None
    seq = None
    if plan.applied:
        seq = doc.seq + 1
        payload: dict[str, Any] = {"change_id": change.change_id, "changes": plan.applied}
        if isinstance(change, RevertChange):
            payload["revert_of"] = change.revert_of
        event = DurableEvent(
            project_id=doc.project_id,
            seq=seq,
            kind="timeline_change",
            user_id=user.id,
            at=at,
            payload=payload,
            effects=plan.applied,
        )
    roles = {**roles, user.id: user.role}
    conflicts = [new_conflict(doc.project_id, spec, at, strategy, roles) for spec in plan.conflicts]
    status: Literal["applied", "partial", "conflict"] = (
        "applied" if not conflicts else ("partial" if plan.applied else "conflict")
    )
    outcome = ChangeOutcome(
        change_id=change.change_id,
        seq=seq,
        status=status,
        conflicts=[c.id for c in conflicts],
        detected=conflicts,
    )
    return outcome, event


def prepare_comment(doc: Document, user: User, comment: _wire.Comment, at: int) -> DurableEvent:
    return DurableEvent(
        project_id=doc.project_id,
        seq=doc.seq + 1,
        kind="comment_add",
        user_id=user.id,
        at=at,
        payload={"comment": _wire.unstructure(comment)},
    )


def prepare_settle(
    doc: Document,
    conflict: Conflict,
    resolution: Resolution,
    *,
    by: str,
    writer: str,
    expect_seq: int | None,
    at: int,
    redetect: bool = True,
) -> tuple[DurableEvent, Conflict, Conflict | None]:
    """The resolution event, the conflict as resolved, and a conflict detected again.

    If the target moved since ``expect_seq``, the newer value stands and, when someone other
    than the incoming author wrote it, the incoming value conflicts with it anew.

    Raises:
        BadRequest, TooLarge: the resolution's value could not be written by a client either
            (not JSON, over ``value_max_bytes``, or growing the document past
            ``document_max_bytes``); nothing changes.
    """
    redetected: Conflict | None = None
    if expect_seq is not None and target_state(doc, conflict)[0] != expect_seq:
        latest_seq, latest_writer, latest_value = target_state(doc, conflict)
        if redetect and latest_writer != conflict.incoming["user_id"]:
            redetected = attrs.evolve(
                conflict,
                id=uuid.uuid4().hex[:16],
                current={"value": latest_value, "user_id": latest_writer, "seq": latest_seq},
                created_at=at,
            )
        again = f"; detected again as {redetected.id}" if redetected else ""
        resolution = Resolution(
            value=latest_value,
            choice="current",
            strategy=resolution.strategy,
            confidence=1.0,
            explanation=f"{latest_writer} changed it again while it was being settled: "
            f"their newer value stands{again}.",
        )
        effects: list[dict[str, Any]] = []
    else:
        effects = resolution_effects(doc, conflict, resolution.value, writer)
        # A resolution is a write like any other: within the value and document quotas.
        doc.check_effects(effects, path="data.value")
    seq = doc.seq + 1
    wire = resolution.to_wire()
    # The stored record also keeps the resolution's seq: what a revert is checked against.
    resolved = attrs.evolve(conflict, status="resolved", resolution={**wire, "seq": seq})
    event = DurableEvent(
        project_id=doc.project_id,
        seq=seq,
        kind="conflict_resolved",
        user_id=by,
        at=at,
        payload={
            "conflict_id": conflict.id,
            "seq": seq,
            "element_id": conflict.element_id,
            "prop": conflict.prop,
            "resolution": wire,
            "changes": [wire_op(effect) for effect in effects],
        },
        effects=effects,
    )
    return event, resolved, redetected


def target_state(doc: Document, conflict: Conflict) -> tuple[int | None, str | None, Any]:
    """(seq, writer, value) of what the conflict is about, as the document holds it now."""
    element = doc.elements.get(conflict.element_id)
    if element is None:
        tomb = doc.tombstones.get(conflict.element_id)
        return (tomb.seq, tomb.user_id, None) if tomb else (None, None, None)
    if conflict.prop is None:
        seq, writer = element.version()
        return seq, writer, copy.deepcopy(element.props)
    prop = conflict.prop
    return element.versions.get(prop), element.writers.get(prop), element.props.get(prop)


def wire_op(effect: dict[str, Any]) -> dict[str, Any]:
    """A document op as clients see it: what it does, not who counts as its writer."""
    return {key: value for key, value in effect.items() if key != "writer"}


def resolution_effects(
    doc: Document, conflict: Conflict, value: Any, writer: str
) -> list[dict[str, Any]]:
    """The document ops that make ``value`` the settled state of the conflicted target."""
    eid = conflict.element_id
    element = doc.elements.get(eid)
    if conflict.op == "delete" or conflict.prop is None:
        if value is None:
            return [{"op": "delete", "element_id": eid, "writer": writer}] if element else []
        if not isinstance(value, dict):
            return []
        if element is None:
            restored = doc.restore(eid)
            if restored is None:
                return []
            return [{"op": "insert", "element_id": eid, "element_type": restored.type,
                     "props": value, "writer": writer}]  # fmt: skip
        return [{"op": "set", "element_id": eid, "prop": k, "value": v, "writer": writer}
                for k, v in value.items()]  # fmt: skip
    if element is None:
        restored = doc.restore(eid)
        if restored is None or (conflict.current["value"] is None and value is None):
            return []
        props = dict(restored.props)
        props[conflict.prop] = value
        return [{"op": "insert", "element_id": eid, "element_type": restored.type,
                 "props": props, "writer": writer}]  # fmt: skip
    return [{"op": "set", "element_id": eid, "prop": conflict.prop, "value": value,
             "writer": writer}]  # fmt: skip


@attrs.frozen(kw_only=True)
class PreparedWrite:
    """A durable write checked by a :class:`Sequencer` at ``base_seq``; nothing changed yet.

    The backplane stores what it says (the event, the conflicts, the change's id with
    ``record``) atomically, then hands it to :meth:`Sequencer.commit` and tells its listeners.
    """

    #: The sequencer's ``seq`` when it was prepared: it may only be committed at that seq.
    base_seq: int
    #: The event to store at ``base_seq + 1``; ``None`` when nothing applies (a change whose
    #: operations all conflict), which takes no seq.
    event: DurableEvent | None
    #: The conflicts to store, as they must be stored: a change's new pending ones, or a settled
    #: one (resolved) and the one detected again (pending).
    conflicts: list[Conflict]
    #: Who wrote it (their role is remembered for strategies weighing roles).
    user: User | None = None
    #: A change's outcome (its ack's data), and what to remember of its ``change_id``.
    outcome: ChangeOutcome | None = None
    record: ChangeRecord | None = None
    #: A settlement's answer.
    settled: Settled | None = None

    @property
    def new_conflicts(self) -> list[Conflict]:
        """The pending conflicts this write raises (what listeners hear in ``on_conflicts``)."""
        return [c for c in self.conflicts if c.status == "pending"]


class Sequencer:
    """One project's document at its latest ``seq``, its recent history and its pending
    conflicts, in memory: the pure part of a backplane (docs/protocol.md §5, §6).

    ``prepare_change``, ``prepare_comment`` and ``prepare_settle`` check a write against the
    document (the rules, the quotas of ``config``, conflict detection) and return a
    :class:`PreparedWrite` without changing anything; :meth:`commit` applies it once the
    backplane made it durable; :meth:`apply` applies an event sequenced elsewhere (another
    process, a reload). No I/O, no awaits: a backplane serializes a project's writes (a lock,
    or an atomic compare-and-set on ``base_seq``) and calls these in between.

    Build one empty, or restore it from what a backplane stored: ``document`` (a :meth:`dump`),
    the ``events`` after it (and before it, to fill the history kept for resume) and the
    ``pending`` conflicts.

    Raises (the constructor):
        ValueError: ``events`` leave a gap after the document's seq.
    """

    def __init__(
        self,
        project_id: str,
        *,
        config: Config | None = None,
        document: Mapping[str, Any] | None = None,
        events: Iterable[DurableEvent] = (),
        pending: Iterable[Conflict] = (),
        roles: Mapping[str, str] | None = None,
    ) -> None:
        config = config or Config()
        quotas = Quotas.of(config)
        doc = (
            Document.load(project_id, dict(document))
            if document
            else Document(project_id=project_id)
        )
        doc.quotas = quotas
        history = History(limit=config.history_limit, max_bytes=quotas.history_bytes)
        for event in events:
            if event.seq > doc.seq + 1:
                raise ValueError(f"events {doc.seq + 1}..{event.seq - 1} are missing")
            if event.seq == doc.seq + 1:
                doc.apply(event.effects, event.seq, event.user_id)
            history.append(event)
        self.project_id = project_id
        self._doc = doc
        self._history = history
        self._pending = {c.id: c for c in pending if c.status == "pending"}
        self._pending_bytes = PendingLoad.of(self._pending.values()).bytes
        self._roles = dict(roles or {})

    @property
    def seq(self) -> int:
        """The seq of the latest event applied (0 for a new project)."""
        return self._doc.seq

    @property
    def history(self) -> Sequence[DurableEvent]:
        """The recent events kept for resume, oldest first (read only)."""
        return self._history

    @property
    def pending(self) -> list[Conflict]:
        """The pending conflicts, oldest first."""
        return list(self._pending.values())

    # -- prepared writes ----------------------------------------------------------------------

    def prepare_change(
        self,
        user: User,
        change: _wire.TimelineChange,
        *,
        strategy: str = "manual",
        at: int | None = None,
    ) -> PreparedWrite:
        """Check ``change`` and sort its operations into the event that applies and the
        conflicts it raises (naming ``strategy`` as the one settling them). Its ``change_id`` is
        not looked at: the backplane checks it was not used before (:meth:`duplicate`).

        Raises:
            BadRequest, NotFound: the change contradicts the document.
            TooLarge: it would take the document, a value or the pending conflicts past a quota.
        """
        outcome, event = prepare_change(
            self._doc, user, change, strategy=strategy, roles=self._roles,
            lookup=value_at(self._history), at=now_ms() if at is None else at,
            pending=PendingLoad(len(self._pending), self._pending_bytes),
        )  # fmt: skip
        return PreparedWrite(base_seq=self.seq, event=event, conflicts=list(outcome.detected),
                             user=user, outcome=outcome,
                             record=record_of(user, change, outcome))  # fmt: skip

    def prepare_comment(
        self, user: User, comment: _wire.Comment, *, at: int | None = None
    ) -> PreparedWrite:
        """The ``comment_add`` event of ``comment`` (its id is the backplane's to check)."""
        event = prepare_comment(self._doc, user, comment, now_ms() if at is None else at)
        return PreparedWrite(base_seq=self.seq, event=event, conflicts=[], user=user)

    def prepare_settle(
        self,
        conflict_id: str,
        resolution: Resolution,
        *,
        by: str,
        writer: str,
        expect_seq: int | None = None,
        redetect: bool = True,
        at: int | None = None,
    ) -> PreparedWrite:
        """The ``conflict_resolved`` event settling a pending conflict (see
        :meth:`crealia.abc.Backplane.settle` for ``by``, ``writer``, ``expect_seq`` and
        ``redetect``).

        Raises:
            NotFound: no pending conflict ``conflict_id``.
            BadRequest, TooLarge: the resolved value could not be written by a client either.
        """
        conflict = self._pending.get(conflict_id)
        if conflict is None:
            raise NotFound(f"data.conflict_id: no pending conflict {conflict_id!r} in this project")
        event, resolved, redetected = prepare_settle(
            self._doc, conflict, resolution, by=by, writer=writer, expect_seq=expect_seq,
            at=now_ms() if at is None else at, redetect=redetect,
        )  # fmt: skip
        return PreparedWrite(
            base_seq=self.seq,
            event=event,
            conflicts=[resolved] + ([redetected] if redetected else []),
            settled=Settled(seq=event.seq, redetected=redetected),
        )

    def commit(self, prepared: PreparedWrite) -> None:
        """Apply a prepared write the backplane made durable: its event to the document and
        the history, its conflicts to the pending ones.

        Raises:
            ValueError: it was prepared at another seq (prepare it again); nothing changes.
        """
        if prepared.base_seq != self.seq:
            raise ValueError(
                f"prepared at seq {prepared.base_seq}, the project is at {self.seq}: prepare it "
                "again"
            )
        if prepared.user is not None:
            self._roles[prepared.user.id] = prepared.user.role
        if prepared.event is not None:
            self.apply(prepared.event)
        for conflict in prepared.conflicts:
            self._forget(conflict.id)
            if conflict.status == "pending":
                self._pending[conflict.id] = conflict
                self._pending_bytes += conflict_bytes(conflict)

    def apply(self, event: DurableEvent) -> None:
        """Apply the project's next event, sequenced elsewhere (another process, a reload); a
        ``conflict_resolved`` one settles its conflict here too.

        Raises:
            ValueError: it is not the next event (``seq`` must be ``self.seq + 1``).
        """
        if event.seq != self.seq + 1:
            raise ValueError(f"event {event.seq} is not the next one (the project is at "
                             f"{self.seq})")  # fmt: skip
        self._doc.apply(event.effects, event.seq, event.user_id)
        self._history.append(event)
        if event.kind == "conflict_resolved":
            self._forget(str(event.payload.get("conflict_id")))

    def _forget(self, conflict_id: str) -> None:
        gone = self._pending.pop(conflict_id, None)
        if gone is not None:
            self._pending_bytes -= conflict_bytes(gone)

    @staticmethod
    def duplicate(first: ChangeRecord, user: User, change: _wire.TimelineChange) -> ChangeOutcome:
        """The ``duplicate`` outcome of ``change`` resent, its ``change_id`` first accepted as
        ``first`` (a :attr:`PreparedWrite.record` the backplane kept).

        Raises:
            BadRequest: the id was first used by another user or for other operations.
        """
        return duplicate_of(first, user, change)

    # -- reads --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The wire snapshot of docs/protocol.md §5 at :attr:`seq`."""
        return self._doc.snapshot()

    def dump(self) -> dict[str, Any]:
        """Everything that rebuilds the document exactly (for storing a snapshot; pass it back
        as ``document``)."""
        return self._doc.dump()

    def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        """What ``change`` would do now (:meth:`crealia.abc.Backplane.dry_run`).

        Raises:
            BadRequest, NotFound: the change contradicts the document.
        """
        return dry_run_of(self._doc, self._history, user, change)

    def events_since(self, seq: int) -> list[DurableEvent] | None:
        """The kept events after ``seq`` (:meth:`crealia.abc.Backplane.events_since`): ``[]``
        at :attr:`seq`, ``None`` beyond it or before what is kept."""
        head = self.seq
        if seq > head:
            return None
        if seq == head:
            return []
        history = self._history
        if not history or history[0].seq > seq + 1:
            return None
        return list(history)[seq + 1 - history[0].seq :]
