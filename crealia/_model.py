"""The values every layer shares: who is calling, what a project's history holds, and how a
conflict was settled.

These are plain frozen attrs classes with no behaviour beyond their wire form. They live here,
below the backplane, strategy, room and session modules, so that imports flow one way: the
contracts (``crealia.abc``) and their implementations all import from this module, never from
each other, to name a value.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import attrs

from . import _wire

Role = Literal["owner", "editor", "commenter", "viewer"]
ROLES: tuple[Role, ...] = ("viewer", "commenter", "editor", "owner")


@attrs.frozen(kw_only=True)
class User:
    """An authenticated caller: who, in which project, with which role."""

    id: str
    name: str
    role: Role
    project_id: str

    def to_wire(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": self.role}


DurableKind = Literal["timeline_change", "comment_add", "conflict_resolved"]


@attrs.frozen(kw_only=True)
class DurableEvent:
    """One sequenced, durable event of a project."""

    project_id: str
    seq: int
    kind: DurableKind
    user_id: str
    at: int
    #: What clients see as ``payload`` (or, for ``conflict_resolved``, the push's data).
    payload: dict[str, Any]
    #: The document operations this event applied (wire form, optionally with ``writer``).
    effects: list[dict[str, Any]] = attrs.Factory(list)

    def to_wire(self) -> dict[str, Any]:
        """The server envelope clients receive for this event, live and on replay."""
        if self.kind == "conflict_resolved":
            return {"type": "conflict_resolved", "data": self.payload}
        return {
            "type": "collaboration_event",
            "data": {
                "kind": self.kind,
                "user_id": self.user_id,
                "at": self.at,
                "seq": self.seq,
                "payload": self.payload,
            },
        }

    @functools.cached_property
    def encoded(self) -> bytes:
        """:meth:`to_wire`, encoded once and shared by every connection."""
        return _wire.dumps(self.to_wire())


@attrs.frozen(kw_only=True)
class Conflict:
    """A conflict of docs/protocol.md §5, with what the server needs to settle it."""

    id: str
    project_id: str
    element_id: str
    prop: str | None
    op: Literal["set", "delete"]
    base: int | None
    base_value: Any
    current: dict[str, Any]
    incoming: dict[str, Any]
    strategy: str
    status: Literal["pending", "resolved"] = "pending"
    created_at: int = 0
    resolution: dict[str, Any] | None = None
    #: The roles of the two authors when known ({user_id: role}); not part of the wire object.
    roles: dict[str, str] = attrs.Factory(dict)

    def to_wire(self) -> dict[str, Any]:
        """The conflict object clients see."""
        return {
            "id": self.id,
            "element_id": self.element_id,
            "prop": self.prop,
            "base_value": self.base_value,
            "current": self.current,
            "incoming": self.incoming,
            "strategy": self.strategy,
            "status": self.status,
        }


@attrs.frozen(kw_only=True)
class ChangeOutcome:
    """What happened to a ``timeline_change``: the data of its ack."""

    change_id: str
    seq: int | None
    status: Literal["applied", "partial", "conflict", "duplicate"]
    conflicts: list[str]
    #: The conflicts this change raised (empty for a duplicate); not part of the ack.
    detected: list[Conflict] = attrs.field(factory=list, eq=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "change_id": self.change_id,
            "seq": self.seq,
            "status": self.status,
            "conflicts": self.conflicts,
        }


@attrs.frozen(kw_only=True)
class Settled:
    """What settling a conflict did: the resolution's seq, and a conflict detected again."""

    seq: int
    redetected: Conflict | None = None


@attrs.frozen(kw_only=True)
class Ephemeral:
    """An ephemeral message for a project's members: never stored, may be dropped.

    ``key`` coalesces: of messages with the same key within one fan-out tick only the latest
    is delivered (``None``: never coalesced). ``origin`` is the connection that sent it, which
    does not receive it back.
    """

    project_id: str
    encoded: bytes
    origin: str | None = None
    key: tuple[str, str] | None = None


#: The first half of the key of the notice "this project's strategy chain changed", published
#: through the backplane like presence so that every process with the project's room open hears
#: it; rooms never send it to clients (it has no frame).
SETTINGS_CHANGED = "crealia.settings"


def settings_changed(project_id: str, token: str) -> Ephemeral:
    """The notice a settler (named by ``token``) publishes once it stored a new chain."""
    return Ephemeral(project_id=project_id, encoded=b"", key=(SETTINGS_CHANGED, token))


Choice = Literal["current", "incoming", "custom"]


def _confidence(_inst: Any, _attr: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"confidence must be a number in 0..1, got {value!r}")


@attrs.frozen(kw_only=True)
class Resolution:
    """How a conflict was settled. ``value`` becomes the property's value (for a conflicting
    ``delete``: ``None`` deletes the element, a mapping sets those props)."""

    value: Any
    choice: Choice
    strategy: str
    confidence: float = attrs.field(validator=_confidence)
    explanation: str
    #: Whether a person should look at it (docs/protocol.md §5): set by the server for a
    #: strategy's resolution, never by the strategy.
    review: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "choice": self.choice,
            "strategy": self.strategy,
            "confidence": self.confidence,
            "explanation": self.explanation,
            "review": self.review,
        }
