"""The project document of PROTOCOL.md §5, its per-property versions, and conflict detection.

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

from ._errors import BadRequest, NotFound
from ._wire import DeleteOp, InsertOp, Op, SetOp, unstructure


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
    """A deleted element: when, by whom, and what it held."""

    seq: int
    user_id: str
    element: Element


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
    op: SetOp, current: dict[str, Any], user_id: str, change_id: str, value_at: ValueAt
) -> ConflictSpec:
    return ConflictSpec(
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
    """A project's elements, versions and tombstones as of ``seq``."""

    project_id: str
    seq: int = 0
    elements: dict[str, Element] = attrs.Factory(dict)
    tombstones: dict[str, Tombstone] = attrs.Factory(dict)

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
        """
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
                    conflicts.append(_set_conflict(op, current, user_id, change_id, value_at))
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
                    conflicts.append(_set_conflict(op, current, user_id, change_id, value_at))
                    continue
                applied.append(unstructure(op))
            else:
                version, writer = element.version()
                if op.base is not None and op.base < version and writer != user_id:
                    conflicts.append(
                        ConflictSpec(
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
        return Plan(user_id=user_id, change_id=change_id, applied=applied, conflicts=conflicts)

    # -- writing --------------------------------------------------------------------------

    def apply(self, ops: Iterable[dict[str, Any]], seq: int, writer: str) -> None:
        """Write already-checked ops (wire form) at ``seq``; ``seq`` becomes the document's.

        An op may carry ``"writer"`` to be recorded as written by someone other than
        ``writer`` (a resolved conflict counts as the conflicting author's write).
        """
        for op in ops:
            by = op.get("writer", writer)
            eid = op["element_id"]
            kind = op["op"]
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
                self.tombstones.pop(eid, None)
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
                    self.tombstones[eid] = Tombstone(seq=seq, user_id=by, element=element)
        self.seq = seq

    def restore(self, element_id: str) -> Element | None:
        """Bring a deleted element back as it was (for a resolution that undoes a delete)."""
        tomb = self.tombstones.get(element_id)
        return copy.deepcopy(tomb.element) if tomb else None

    # -- views ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The wire snapshot of PROTOCOL.md §5."""
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
