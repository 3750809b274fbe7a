"""The project document of docs/protocol.md §5, its per-property versions, and conflict detection.

A :class:`Document` is plain in-memory state with no I/O. Changing it takes two steps so that a
dry run and the real thing share one code path: :meth:`Document.plan` validates a change against
the document and sorts its operations into those that apply and those that conflict, without
touching anything; :meth:`Document.apply` then writes a plan's operations under a ``seq``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ._errors import BadRequest, NotFound, TooLarge
from ._wire import (
    MAX_VALUE_BYTES,
    DeleteOp,
    InsertOp,
    Op,
    SetOp,
    check_value,
    check_value_size,
    unstructure,
    value_bytes,
)


@attrs.frozen(kw_only=True)
class Quotas:
    """What one project may hold (``Config.value_max_bytes``, ``document_max_bytes``,
    ``history_max_bytes``, ``history_memory_bytes``, ``max_pending_conflicts``,
    ``pending_conflicts_max_bytes``), in JSON-encoded bytes, bytes of memory
    (``history_memory``) or (pending conflicts) a count."""

    value_bytes: int = MAX_VALUE_BYTES
    document_bytes: int = 16 << 20
    history_bytes: int = 64 << 20
    history_memory: int = 4 << 20
    pending_conflicts: int = 1000
    pending_bytes: int = 16 << 20

    @classmethod
    def of(cls, config: Any) -> Quotas:
        """The quotas a :class:`~crealia._config.Config` sets."""
        return cls(
            value_bytes=config.value_max_bytes,
            document_bytes=config.document_max_bytes,
            history_bytes=config.history_max_bytes,
            history_memory=config.history_memory_bytes,
            pending_conflicts=config.max_pending_conflicts,
            pending_bytes=config.pending_conflicts_max_bytes,
        )


#: What an element costs beside its prop values (its id, type, versions), roughly, in bytes.
_ELEMENT_OVERHEAD = 64
_PROP_OVERHEAD = 16


def prop_bytes(name: str, value: Any) -> int:
    """What one property counts for in the document quota."""
    return len(name) + _PROP_OVERHEAD + value_bytes(value)


def element_bytes(element_id: str, element_type: str, props: dict[str, Any]) -> int:
    """What one element counts for in the document quota."""
    return (
        len(element_id)
        + len(element_type)
        + _ELEMENT_OVERHEAD
        + sum(prop_bytes(k, v) for k, v in props.items())
    )


@attrs.define
class Element:
    """One element: its type, props, and who wrote each prop at which seq."""

    type: str
    props: dict[str, Any]
    versions: dict[str, int]
    writers: dict[str, str]
    created: int
    created_by: str

    def version(self) -> tuple[int, str]:
        """The highest seq that wrote any of this element's props (its insert included)."""
        seq, writer = self.created, self.created_by
        for prop, v in self.versions.items():
            if v > seq:
                seq, writer = v, self.writers[prop]
        return seq, writer


@attrs.define
class Tombstone:
    """A deleted element: when, by whom, and what it held.

    Kept so that an edit based on a version before the delete is a conflict (not ``not_found``)
    and a resolution can bring the element back. Tombstones count in the document quota with
    the live elements; the oldest are forgotten first when the two together would be over it.
    """

    seq: int
    user_id: str
    element: Element

    def byte_size(self, element_id: str) -> int:
        """What this tombstone counts for in the document quota: its element's size."""
        return element_bytes(element_id, self.element.type, self.element.props)


@attrs.frozen(kw_only=True)
class ConflictSpec:
    """A detected conflict before it is given an id and a strategy."""

    op: str  # "set" | "delete"
    element_id: str
    prop: str | None
    base: int | None
    base_value: Any
    current: dict[str, Any]
    incoming: dict[str, Any]
    #: The position of the op in its change (for errors naming ``data.changes[i]``).
    index: int = 0


@attrs.frozen(kw_only=True)
class Plan:
    """The outcome of checking one change: ops that apply and conflicts."""

    user_id: str
    change_id: str
    applied: list[dict[str, Any]]
    conflicts: list[ConflictSpec]


#: Looks up the value a property had at a seq: (element_id, prop, seq) -> value or None.
ValueAt = Callable[[str, str | None, int | None], Any]


def _no_history(_element_id: str, _prop: str | None, _seq: int | None) -> Any:
    return None


def _set_conflict(
    op: SetOp, current: dict[str, Any], user_id: str, change_id: str, value_at: ValueAt, index: int
) -> ConflictSpec:
    return ConflictSpec(
        index=index,
        op="set",
        element_id=op.element_id,
        prop=op.prop,
        base=op.base,
        base_value=value_at(op.element_id, op.prop, op.base),
        current=current,
        incoming={"value": op.value, "user_id": user_id, "change_id": change_id},
    )


@attrs.define
class Document:
    """A project's elements, versions and tombstones as of ``seq``.

    What it holds is bounded by ``quotas.document_bytes``: the live elements may not grow past
    it (:meth:`plan` refuses), and the tombstones live in what is left: :meth:`apply` forgets
    the oldest ones (in the order of their deletes) as long as the two together are over it.
    Which tombstones go depends only on the document and the ops, so every copy of a document
    (the Redis backplane's mirrors, one reloaded from a stored snapshot) forgets the same ones.
    """

    project_id: str
    seq: int = 0
    elements: dict[str, Element] = attrs.Factory(dict)
    tombstones: dict[str, Tombstone] = attrs.Factory(dict)
    #: What the document may hold; the backplane that owns it sets this from its config.
    quotas: Quotas = attrs.Factory(Quotas)
    #: The live elements' size in bytes, as the document quota counts it (None: not counted yet).
    _bytes: int | None = attrs.field(default=None, init=False, repr=False)
    #: The tombstones' size in bytes, likewise.
    _tomb_bytes: int | None = attrs.field(default=None, init=False, repr=False)

    @property
    def byte_size(self) -> int:
        """The live elements' size in JSON-encoded bytes (what a change may not grow past
        ``document_max_bytes``)."""
        if self._bytes is None:
            self._bytes = sum(
                element_bytes(eid, el.type, el.props) for eid, el in self.elements.items()
            )
        return self._bytes

    @property
    def tombstone_bytes(self) -> int:
        """The tombstones' size, counted like the live elements'."""
        if self._tomb_bytes is None:
            self._tomb_bytes = sum(t.byte_size(eid) for eid, t in self.tombstones.items())
        return self._tomb_bytes

    @property
    def held_bytes(self) -> int:
        """Everything the document holds, live and deleted (at most ``document_max_bytes``
        after every :meth:`apply`)."""
        return self.byte_size + self.tombstone_bytes

    def _check_quotas(self, ops: list[Op], applied: list[dict[str, Any]]) -> None:
        """Raises:
        BadRequest: a value is not acceptable JSON.
        TooLarge: a value is over ``value_max_bytes``, or the applied ops would grow the
            document past ``document_max_bytes``.
        """
        # The converter checked these values as JSON when it built the ops: sizes only here.
        limit = self.quotas.value_bytes
        for i, op in enumerate(ops):
            if isinstance(op, SetOp):
                check_value_size(op.value, path=f"data.changes[{i}].value", max_bytes=limit)
            elif isinstance(op, InsertOp):
                for name, value in op.props.items():
                    check_value_size(value, path=f"data.changes[{i}].props.{name}",
                                     max_bytes=limit)  # fmt: skip
        self.check_growth(applied, path="data.changes")

    def check_effects(self, effects: list[dict[str, Any]], *, path: str) -> None:
        """Check ops the server itself writes (a conflict's resolution) as a client's change is:
        each value within ``value_max_bytes``, the document within ``document_max_bytes``.

        Raises:
            BadRequest: a value is not acceptable JSON.
            TooLarge: a value or the document would be over its quota (the message names
                ``path`` and the quota).
        """
        limit = self.quotas.value_bytes
        for op in effects:
            if op["op"] == "set":
                check_value(op["value"], path=path, max_bytes=limit)
            elif op["op"] == "insert":
                for name, value in op.get("props", {}).items():
                    check_value(value, path=f"{path}.{name}", max_bytes=limit)
        self.check_growth(effects, path=path)

    def check_growth(self, applied: Iterable[dict[str, Any]], *, path: str) -> None:
        """Check that ops (wire form, as :meth:`apply` takes them) keep the live elements within
        ``document_max_bytes``; tombstones do not count here (they make room).

        Raises:
            TooLarge: they would grow the document past it; the message names ``path`` and
                the quota.
        """
        growth = 0
        for done in applied:
            eid = done["element_id"]
            element = self.elements.get(eid)
            if done["op"] == "insert":
                growth += element_bytes(eid, done["element_type"], done.get("props", {}))
            elif done["op"] == "set":
                growth += prop_bytes(done["prop"], done["value"])
                if element is not None and done["prop"] in element.props:
                    growth -= prop_bytes(done["prop"], element.props[done["prop"]])
            elif element is not None:
                growth -= element_bytes(eid, element.type, element.props)
        if growth > 0 and self.byte_size + growth > self.quotas.document_bytes:
            raise TooLarge(
                f"{path}: document_max_bytes quota: the document would hold "
                f"{self.byte_size + growth} bytes, over {self.quotas.document_bytes}"
            )

    # -- checking -------------------------------------------------------------------------

    def plan(
        self, user_id: str, change_id: str, ops: Iterable[Op], value_at: ValueAt = _no_history
    ) -> Plan:
        """Check a change against the document without changing it.

        Raises:
            BadRequest: an op contradicts the document (inserting an existing element, touching
                an element deleted earlier in the same change).
            NotFound: an op names an element that does not exist and was not deleted since the
                op's ``base``.
            TooLarge: a value over ``value_max_bytes``, or a change that would grow the document
                past ``document_max_bytes`` (the message names the quota).
        """
        ops = list(ops)
        local: dict[str, str] = {}  # element id -> "inserted" | "deleted" within this change
        applied: list[dict[str, Any]] = []
        conflicts: list[ConflictSpec] = []
        for i, op in enumerate(ops):
            where = f"data.changes[{i}].element_id"
            eid = op.element_id
            state = local.get(eid)
            element = self.elements.get(eid)
            tomb = self.tombstones.get(eid)
            if isinstance(op, InsertOp):
                if state == "inserted" or (state is None and element is not None):
                    raise BadRequest(f"{where}: element {eid!r} already exists")
                local[eid] = "inserted"
                applied.append(unstructure(op))
                continue
            if state == "deleted":
                raise BadRequest(f"{where}: element {eid!r} was deleted earlier in this change")
            if state == "inserted":
                if isinstance(op, DeleteOp):
                    local[eid] = "deleted"
                applied.append(unstructure(op))
                continue
            if element is None:
                if tomb is None:
                    raise NotFound(f"{where}: no element {eid!r} in this project")
                stale = op.base is not None and op.base < tomb.seq
                if isinstance(op, SetOp) and stale and tomb.user_id != user_id:
                    current = {"value": None, "user_id": tomb.user_id, "seq": tomb.seq}
                    conflicts.append(_set_conflict(op, current, user_id, change_id, value_at, i))
                    continue
                raise NotFound(f"{where}: element {eid!r} was deleted at seq {tomb.seq}")
            if isinstance(op, SetOp):
                version = element.versions.get(op.prop)
                writer = element.writers.get(op.prop)
                if (
                    op.base is not None
                    and version is not None
                    and op.base < version
                    and writer != user_id
                ):
                    current = {"value": element.props.get(op.prop), "user_id": writer,
                               "seq": version}  # fmt: skip
                    conflicts.append(_set_conflict(op, current, user_id, change_id, value_at, i))
                    continue
                applied.append(unstructure(op))
            else:
                version, writer = element.version()
                if op.base is not None and op.base < version and writer != user_id:
                    conflicts.append(
                        ConflictSpec(
                            index=i,
                            op="delete",
                            element_id=eid,
                            prop=None,
                            base=op.base,
                            base_value=value_at(eid, None, op.base),
                            current={
                                "value": copy.deepcopy(element.props),
                                "user_id": writer,
                                "seq": version,
                            },
                            incoming={"value": None, "user_id": user_id, "change_id": change_id},
                        )
                    )
                    continue
                local[eid] = "deleted"
                applied.append(unstructure(op))
        self._check_quotas(ops, applied)
        return Plan(user_id=user_id, change_id=change_id, applied=applied, conflicts=conflicts)

    # -- writing --------------------------------------------------------------------------

    def apply(self, ops: Iterable[dict[str, Any]], seq: int, writer: str) -> None:
        """Write already-checked ops (wire form) at ``seq``; ``seq`` becomes the document's.

        An op may carry ``"writer"`` to be recorded as written by someone other than
        ``writer`` (a resolved conflict counts as the conflicting author's write).
        """
        # Counted before the ops change what is held, then kept up to date op by op.
        live, dead = self.byte_size, self.tombstone_bytes
        for op in ops:
            by = op.get("writer", writer)
            eid = op["element_id"]
            kind = op["op"]
            live += self._growth(op)
            if kind == "insert":
                props = copy.deepcopy(op.get("props", {}))
                self.elements[eid] = Element(
                    type=op["element_type"],
                    props=props,
                    versions=dict.fromkeys(props, seq),
                    writers=dict.fromkeys(props, by),
                    created=seq,
                    created_by=by,
                )
                tomb = self.tombstones.pop(eid, None)
                if tomb is not None:
                    dead -= tomb.byte_size(eid)
            elif kind == "set":
                element = self.elements.get(eid)
                if element is None:
                    continue
                element.props[op["prop"]] = copy.deepcopy(op["value"])
                element.versions[op["prop"]] = seq
                element.writers[op["prop"]] = by
            elif kind == "delete":
                element = self.elements.pop(eid, None)
                if element is not None:
                    tomb = Tombstone(seq=seq, user_id=by, element=element)
                    self.tombstones[eid] = tomb
                    dead += tomb.byte_size(eid)
        self.seq = seq
        # Over the quota: the oldest tombstones go (deletes are appended: the first is oldest).
        limit = self.quotas.document_bytes
        while self.tombstones and live + dead > limit:
            eid = next(iter(self.tombstones))
            dead -= self.tombstones.pop(eid).byte_size(eid)
        self._bytes, self._tomb_bytes = live, dead

    def _growth(self, op: dict[str, Any]) -> int:
        """How much applying ``op`` changes :attr:`byte_size`."""
        eid = op["element_id"]
        element = self.elements.get(eid)
        if op["op"] == "insert":
            old = element_bytes(eid, element.type, element.props) if element else 0
            return element_bytes(eid, op["element_type"], op.get("props", {})) - old
        if element is None:
            return 0
        if op["op"] == "set":
            prop = op["prop"]
            old = prop_bytes(prop, element.props[prop]) if prop in element.props else 0
            return prop_bytes(op["prop"], op["value"]) - old
        return -element_bytes(eid, element.type, element.props)

    def restore(self, element_id: str) -> Element | None:
        """Bring a deleted element back as it was (for a resolution that undoes a delete)."""
        tomb = self.tombstones.get(element_id)
        return copy.deepcopy(tomb.element) if tomb else None

    # -- views ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The wire snapshot of docs/protocol.md §5."""
        return {
            "project_id": self.project_id,
            "seq": self.seq,
            "elements": {
                eid: {"type": el.type, "props": copy.deepcopy(el.props)}
                for eid, el in self.elements.items()
            },
            "versions": {eid: dict(el.versions) for eid, el in self.elements.items()},
        }

    def dump(self) -> dict[str, Any]:
        """Everything needed to rebuild this document exactly (storage form)."""
        return {
            "seq": self.seq,
            "elements": {eid: attrs.asdict(el) for eid, el in self.elements.items()},
            "tombstones": {
                eid: {"seq": t.seq, "user_id": t.user_id, "element": attrs.asdict(t.element)}
                for eid, t in self.tombstones.items()
            },
        }

    @classmethod
    def load(cls, project_id: str, data: dict[str, Any]) -> Document:
        """Rebuild a document from :meth:`dump` output."""
        return cls(
            project_id=project_id,
            seq=data["seq"],
            elements={eid: Element(**el) for eid, el in data["elements"].items()},
            tombstones={
                eid: Tombstone(seq=t["seq"], user_id=t["user_id"], element=Element(**t["element"]))
                for eid, t in data["tombstones"].items()
            },
        )
