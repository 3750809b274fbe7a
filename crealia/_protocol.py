"""The protocol table: every client message type, and everything the code knows about it.

One :class:`MessageType` per ``type`` a client may send (docs/protocol.md §4) says

- ``data``: the attrs class of :mod:`crealia._wire` its ``data`` is decoded into (the one
  cattrs converter; :data:`CLIENT_MESSAGES` is the decoder's view of the table);
- ``role``: the least role that may send it (§4);
- ``rate_class``: the rate-limit class it counts against, one of :data:`RATE_CLASSES` (§11);
- ``presence``: what it does to its sender's presence (a :class:`Presence`: the slot it is
  coalesced in and the ``users_list`` field it sets), or ``None`` for a message that is not
  presence;
- ``handler``: the name of the :class:`~crealia._session.Hub` method that handles it.

Every part is a required keyword: an entry that forgets one does not build, so no type can fall
into the ``other`` rate class or share the typing slot by omission. The hub decodes, checks the
role and the rate, and dispatches through the table (binding and checking every handler when it
is built); the role matrix of :mod:`crealia._auth`, the classes of :mod:`crealia._ratelimit`,
the room's presence slots and the Python client's presence kinds are all read from it. Adding a
message type is one entry here plus its handler on the hub (a presence type can reuse
``handle_presence`` and needs no code at all); ``tests/test_protocol_table.py`` fails until the
type is complete and documented.

This module sits low in the import graph (it imports only :mod:`crealia._wire`,
:mod:`crealia._model` and :mod:`crealia._errors`) so that the client reads the same table
without importing any server module.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from . import _wire
from ._model import ROLES, Role

#: The rate-limit classes (docs/protocol.md §11). ``rest`` counts REST calls (the HTTP app
#: charges it) and has no message type; every message type names one of the others.
RATE_CLASSES: tuple[str, ...] = ("cursor", "edit", "comment", "signal", "rest", "other")


def _position(payload: Mapping[str, Any]) -> Any:
    return payload.get("position")


def _active_element(payload: Mapping[str, Any]) -> Any:
    # A null element_id says nothing is active.
    return payload if payload.get("element_id") else None


def _typing(payload: Mapping[str, Any]) -> Any:
    return payload.get("element_id") or True


def _not_typing(_payload: Mapping[str, Any]) -> Any:
    return None


def _identifier(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise ValueError(f"{attribute.name} must be a Python identifier, got {value!r}")


def _attrs_class(_inst: Any, attribute: attrs.Attribute[Any], value: type[Any]) -> None:
    if not (isinstance(value, type) and attrs.has(value)):
        raise TypeError(f"{attribute.name} must be an attrs class the converter decodes, "
                        f"got {value!r}")  # fmt: skip


@attrs.frozen(kw_only=True)
class Presence:
    """What a presence message does to its sender's presence in the room.

    Raises:
        ValueError: ``slot`` or ``field`` is not an identifier.
    """

    #: The coalescing slot: per user, the latest message of a slot supersedes the earlier ones
    #: still queued (here and, through the backplane, on the other processes).
    slot: str = attrs.field(validator=_identifier)
    #: The member's field in ``users_list`` (and the welcome's ``users``) that it sets.
    field: str = attrs.field(validator=_identifier)
    #: The field's value after the message, from the message's validated ``data``.
    state: Callable[[Mapping[str, Any]], Any]


@attrs.frozen(kw_only=True)
class MessageType:
    """One client message type: its data class, role, rate class, presence and handler.

    Raises:
        TypeError: a part is missing, or ``data`` is not an attrs class.
        ValueError: an unknown role or rate class, or a name or handler that is not an
            identifier.
    """

    #: The envelope's ``type``.
    name: str = attrs.field(validator=_identifier)
    #: The attrs class (in :mod:`crealia._wire`) the envelope's ``data`` is decoded into.
    data: type[Any] = attrs.field(validator=_attrs_class)
    #: The least role that may send it. ``None`` only for ``hello``, the handshake: its token is
    #: checked (and its rate counted) by the handshake, and in a session its handler refuses it
    #: before anything is counted.
    role: Role | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.in_(ROLES))
    )
    #: The rate-limit class it counts against: one of :data:`RATE_CLASSES`.
    rate_class: str = attrs.field(validator=attrs.validators.in_(RATE_CLASSES))
    #: What it does to its sender's presence; ``None``: it is not presence.
    presence: Presence | None
    #: The name of the :class:`~crealia._session.Hub` method that handles it.
    handler: str = attrs.field(validator=_identifier)


#: What a member in ``users_list`` has besides its presence fields.
_MEMBER_FIELDS = frozenset({"user_id", "name", "role", "connections"})


def table(entries: Iterable[MessageType]) -> Mapping[str, MessageType]:
    """A protocol table of ``entries``, read-only, keyed by type, in their order.

    Raises:
        ValueError: two entries for one type, a presence slot that two entries map to
            different fields, or a presence field that is a member's own (``user_id``, ``name``,
            ``role``, ``connections``).
    """
    out: dict[str, MessageType] = {}
    fields: dict[str, str] = {}
    for entry in entries:
        if entry.name in out:
            raise ValueError(f"protocol table: {entry.name!r} is listed twice")
        out[entry.name] = entry
        presence = entry.presence
        if presence is not None:
            if presence.field in _MEMBER_FIELDS:
                raise ValueError(f"protocol table: {entry.name!r} would set the member's "
                                 f"{presence.field!r}")  # fmt: skip
            field = fields.setdefault(presence.slot, presence.field)
            if field != presence.field:
                raise ValueError(
                    f"protocol table: {entry.name!r} puts slot {presence.slot!r} in field "
                    f"{presence.field!r}, another entry in {field!r}"
                )
    return MappingProxyType(out)


_CURSOR = Presence(slot="cursor", field="cursor", state=_position)
_ACTIVE = Presence(slot="active", field="active_element", state=_active_element)
_TYPING = Presence(slot="typing", field="typing", state=_typing)
_NOT_TYPING = Presence(slot="typing", field="typing", state=_not_typing)

#: Every client message type (docs/protocol.md §4, §8 and the §13 extension).
PROTOCOL: Mapping[str, MessageType] = table([
    MessageType(name="hello", data=_wire.Hello, role=None, rate_class="other",
                presence=None, handler="handle_hello"),
    MessageType(name="cursor_update", data=_wire.CursorUpdate, role="viewer", rate_class="cursor",
                presence=_CURSOR, handler="handle_presence"),
    MessageType(name="element_active", data=_wire.ElementActive, role="viewer",
                rate_class="cursor", presence=_ACTIVE, handler="handle_presence"),
    MessageType(name="typing_start", data=_wire.Typing, role="commenter", rate_class="cursor",
                presence=_TYPING, handler="handle_presence"),
    MessageType(name="typing_stop", data=_wire.Typing, role="commenter", rate_class="cursor",
                presence=_NOT_TYPING, handler="handle_presence"),
    MessageType(name="comment_add", data=_wire.CommentAdd, role="commenter",
                rate_class="comment", presence=None, handler="handle_comment_add"),
    MessageType(name="timeline_change", data=_wire.TimelineChange, role="editor",
                rate_class="edit", presence=None, handler="handle_timeline_change"),
    MessageType(name="conflict_resolve", data=_wire.ConflictResolve, role="editor",
                rate_class="edit", presence=None, handler="handle_conflict_resolve"),
    MessageType(name="conflict_dismiss", data=_wire.ConflictDismiss, role="editor",
                rate_class="edit", presence=None, handler="handle_conflict_dismiss"),
    MessageType(name="conflict_revert", data=_wire.ConflictRevert, role="editor",
                rate_class="edit", presence=None, handler="handle_conflict_revert"),
    MessageType(name="conflict_preview", data=_wire.ConflictPreview, role="editor",
                rate_class="edit", presence=None, handler="handle_conflict_preview"),
    MessageType(name="users_request", data=_wire.Empty, role="viewer", rate_class="other",
                presence=None, handler="handle_users_request"),
    MessageType(name="ping", data=_wire.Ping, role="viewer", rate_class="other",
                presence=None, handler="handle_ping"),
    # Live sessions (§8). The host (live_stop) and session members (webrtc_signal,
    # stream_stats) are checked where handled: the role here is the least any sender needs.
    MessageType(name="live_start", data=_wire.LiveStart, role="editor", rate_class="signal",
                presence=None, handler="handle_live_start"),
    *(MessageType(name=name, data=data, role="viewer", rate_class="signal", presence=None,
                  handler=f"handle_{name}")
      for name, data in (("live_join", _wire.LiveRef), ("live_leave", _wire.LiveRef),
                         ("live_stop", _wire.LiveRef), ("webrtc_signal", _wire.WebrtcSignal),
                         ("stream_stats", _wire.StreamStats))),
    MessageType(name="metrics_subscribe", data=_wire.Empty, role="owner", rate_class="other",
                presence=None, handler="handle_metrics_subscribe"),
    MessageType(name="metrics_unsubscribe", data=_wire.Empty, role="owner", rate_class="other",
                presence=None, handler="handle_metrics_unsubscribe"),
])  # fmt: skip


def data_classes(protocol: Mapping[str, MessageType]) -> dict[str, type[Any]]:
    """The decoder's view of ``protocol``: each type and the class its ``data`` decodes into."""
    return {name: entry.data for name, entry in protocol.items()}


def presence_fields(protocol: Mapping[str, MessageType]) -> tuple[str, ...]:
    """The ``users_list`` fields the presence types of ``protocol`` set, in table order."""
    fields = (entry.presence.field for entry in protocol.values() if entry.presence is not None)
    return tuple(dict.fromkeys(fields))


#: Every client message type and the class its ``data`` decodes into.
CLIENT_MESSAGES: Mapping[str, type[Any]] = MappingProxyType(data_classes(PROTOCOL))
#: The types that only describe presence (a newer one of the same user and slot supersedes
#: them): also the ``collaboration_event`` kinds they cause.
PRESENCE_KINDS: frozenset[str] = frozenset(
    name for name, entry in PROTOCOL.items() if entry.presence is not None
)
#: A member's presence fields in ``users_list``, in order.
PRESENCE_FIELDS: tuple[str, ...] = presence_fields(PROTOCOL)
