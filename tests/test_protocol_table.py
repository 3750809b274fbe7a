"""The protocol table (crealia._protocol): every client message type is complete and documented,
and adding one is one entry plus its handler.

The meta-check :func:`problems` reads a table, the hub class that must handle it and
docs/protocol.md, and names every part a type lacks: its data class, role, rate class, presence
decision, handler, or its row in §4. It passes on the real table and reports each half-added
type it is shown. The servers here are real, on 127.0.0.1 port 0, each test under a deadline.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from crealia import Server
from crealia._client import Push
from crealia._model import ROLES
from crealia._protocol import (
    CLIENT_MESSAGES,
    PRESENCE_FIELDS,
    PRESENCE_KINDS,
    PROTOCOL,
    RATE_CLASSES,
    MessageType,
    Presence,
    table,
)
from crealia._room import Room
from crealia._session import Hub, Session
from crealia._wire import Envelope
from crealia.transports._trio_ws import TrioWebSocketTransport

from ._wsclient import RawClient, open_raw_client

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: Types whose docs row describes who may send them beyond the table's least role: the rest of
#: the check is their handler's (the session's host, a live session's members).
_CHECKED_WHERE_HANDLED = frozenset({"live_stop", "webrtc_signal", "stream_stats"})


def _section(doc: str, start: str, end: str) -> str:
    begin = doc.index(start)
    return doc[begin : doc.index(end, begin)]


def _rows(section: str) -> dict[str, list[str]]:
    """The rows of a markdown table in ``section``, by the type in their first cell."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        found = re.match(r"\| `([a-z_]+)` \|", line)
        if found:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[found.group(1)] = cells
    return rows


def problems(protocol: Any, hub: type[Hub], doc: str) -> list[str]:
    """Every part a type of ``protocol`` lacks, as ``"type: what"`` lines."""
    client = _rows(_section(doc, "### Client → server", "### Server → client"))
    pushes = _rows(_section(doc, "### Server → client", "## 5."))
    limits = _section(doc, "## 11. Rate limits", "## 12.")
    found: list[str] = []
    for name, entry in protocol.items():
        if not isinstance(entry, MessageType) or entry.name != name:
            found.append(f"{name}: not a MessageType of that name")
            continue
        if not attrs.has(entry.data):
            found.append(f"{name}: no data class the converter decodes")
        if entry.role not in ROLES and not (entry.role is None and name == "hello"):
            found.append(f"{name}: no role (only hello, the handshake, has none)")
        if entry.rate_class not in RATE_CLASSES or entry.rate_class == "rest":
            found.append(f"{name}: no rate class of a message (rest counts REST calls)")
        if entry.presence is not None and not isinstance(entry.presence, Presence):
            found.append(f"{name}: presence is neither a Presence nor None")
        if (entry.presence is not None) != (entry.handler == "handle_presence"):
            found.append(f"{name}: presence slot and handler disagree (a presence type is "
                         "handled by handle_presence, which needs its slot)")  # fmt: skip
        if not inspect.iscoroutinefunction(getattr(hub, entry.handler, None)):
            found.append(f"{name}: no handler {hub.__name__}.{entry.handler}")
        row = client.get(name)
        if row is None:
            found.append(f"{name}: no row in docs/protocol.md §4 (Client → server)")
            continue
        _type, _data, role, rate, _reply = row
        if entry.role is None:
            if role != "(token)":
                found.append(f"{name}: docs §4 gives role {role!r}, the table none")
        elif role != entry.role and name not in _CHECKED_WHERE_HANDLED:
            found.append(f"{name}: docs §4 gives role {role!r}, the table {entry.role!r}")
        if rate != f"`{entry.rate_class}`":
            found.append(f"{name}: docs §4 gives rate class {rate}, the table {entry.rate_class}")
    for name in client:
        if name not in protocol:
            found.append(f"{name}: documented in §4 but not in the table")
    handlers = {entry.handler for entry in protocol.values()}
    for method, _ in inspect.getmembers(hub, inspect.iscoroutinefunction):
        if method.startswith("handle_") and method not in handlers:
            found.append(f"{hub.__name__}.{method}: handles no type of the table")
    users = " ".join(pushes.get("users_list", []))
    fields = {e.presence.field for e in protocol.values() if isinstance(e.presence, Presence)}
    for field in sorted(fields):
        if f'"{field}"' not in users:
            found.append(f"presence field {field}: not in docs §4's users_list row")
    for cls in RATE_CLASSES:
        if f"`{cls}`" not in limits:
            found.append(f"rate class {cls}: not named in docs §11")
    return found


# -- the real table ----------------------------------------------------------------------------


def test_protocol_table_is_complete_and_documented() -> None:
    assert problems(PROTOCOL, Hub, DOC.read_text()) == []


def test_protocol_table_lists_every_type_once_in_its_views() -> None:
    assert set(CLIENT_MESSAGES) == set(PROTOCOL)
    assert {"hello", "ping", "timeline_change", "webrtc_signal", "metrics_subscribe"} <= set(
        PROTOCOL
    )
    assert {"cursor_update", "element_active", "typing_start", "typing_stop"} == PRESENCE_KINDS
    assert PRESENCE_FIELDS == ("cursor", "active_element", "typing")
    # typing_start and typing_stop share a slot: a stop supersedes a start still queued.
    slots = {name: PROTOCOL[name].presence for name in PRESENCE_KINDS}
    assert {name: p.slot for name, p in slots.items() if p is not None} == {
        "cursor_update": "cursor", "element_active": "active", "typing_start": "typing",
        "typing_stop": "typing",
    }  # fmt: skip


def test_protocol_table_presence_kinds_are_what_the_client_drops() -> None:
    for name, entry in PROTOCOL.items():
        push = Push(type="collaboration_event", data={"kind": name, "user_id": "u"})
        assert push.droppable == (entry.presence is not None), name


# -- a half-added type is caught ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Selection:
    element_ids: list[str]


@attrs.frozen(kw_only=True)
class Echo:
    text: str


_SELECTION = Presence(slot="selection", field="selection", state=lambda data: data["element_ids"])
_ROW = "| `{name}` | `{{}}` | {role} | `{rate}` | `ack {{}}` |"


def _selection(**changes: Any) -> MessageType:
    values: dict[str, Any] = {"name": "selection_change", "data": Selection, "role": "viewer",
                              "rate_class": "cursor", "presence": _SELECTION,
                              "handler": "handle_presence"}  # fmt: skip
    values.update(changes)
    return MessageType(**values)


def _documented(doc: str, entry: MessageType, role: str | None = None) -> str:
    """``doc`` with a §4 row for ``entry`` (and the fields of its presence in users_list)."""
    row = _ROW.format(name=entry.name, role=role or entry.role, rate=entry.rate_class)
    anchor = "| `metrics_unsubscribe` |"
    doc = doc.replace(anchor, row + "\n" + anchor, 1)
    return doc.replace('"typing"}]}', '"typing", "selection"}]}', 1)


def test_protocol_table_check_passes_a_whole_new_type() -> None:
    entry = _selection()
    extended = table([*PROTOCOL.values(), entry])
    assert problems(extended, Hub, _documented(DOC.read_text(), entry)) == []


@pytest.mark.parametrize(
    ("broken", "role", "expected"),
    [
        (_selection(handler="handle_selection_change", presence=None), None,
         "selection_change: no handler Hub.handle_selection_change"),
        (_selection(presence=None), None, "selection_change: presence slot and handler disagree"),
        (_selection(rate_class="rest"), None, "selection_change: no rate class of a message"),
        (_selection(role=None), "(token)", "selection_change: no role"),
        (_selection(role="editor"), "viewer", "selection_change: docs §4 gives role 'viewer'"),
    ],
    ids=["handler", "slot", "rate class", "role", "docs role"],
)  # fmt: skip
def test_protocol_table_check_catches_a_half_added_type(
    broken: MessageType, role: str | None, expected: str
) -> None:
    doc = _documented(DOC.read_text(), broken, role)
    found = problems(table([*PROTOCOL.values(), broken]), Hub, doc)
    assert any(line.startswith(expected) for line in found), found


def test_protocol_table_check_catches_an_undocumented_type() -> None:
    found = problems(table([*PROTOCOL.values(), _selection()]), Hub, DOC.read_text())
    assert "selection_change: no row in docs/protocol.md §4 (Client → server)" in found
    assert "presence field selection: not in docs §4's users_list row" in found


def test_protocol_table_check_catches_a_handler_of_no_type() -> None:
    @attrs.define(eq=False)
    class Orphaned(Hub):
        async def handle_selection_change(
            self, session: Session, room: Room, envelope: Envelope
        ) -> tuple[str, Any]:
            return "ack", {}

    found = problems(PROTOCOL, Orphaned, DOC.read_text())
    assert found == ["Orphaned.handle_selection_change: handles no type of the table"]


@pytest.mark.parametrize("part", [a.name for a in attrs.fields(MessageType)])
def test_message_type_without_a_part_does_not_build(part: str) -> None:
    values = attrs.asdict(_selection(), recurse=False)
    del values[part]
    with pytest.raises(TypeError, match=part):
        MessageType(**values)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"rate_class": "cursors"}, ValueError, "rate_class"),
        ({"role": "admin"}, ValueError, "role"),
        ({"data": dict}, TypeError, "data must be an attrs class"),
        ({"handler": "handle presence"}, ValueError, "handler must be a Python identifier"),
    ],
)
def test_message_type_refuses_a_wrong_part(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _selection(**changes)


def test_protocol_table_refuses_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match="'ping' is listed twice"):
        table([*PROTOCOL.values(), PROTOCOL["ping"]])
    stray = Presence(slot="typing", field="typing_now", state=lambda data: True)
    with pytest.raises(ValueError, match="slot 'typing' in field 'typing_now'"):
        table([*PROTOCOL.values(), _selection(presence=stray)])
    impostor = Presence(slot="selection", field="role", state=lambda data: "owner")
    with pytest.raises(ValueError, match="would set the member's 'role'"):
        table([*PROTOCOL.values(), _selection(presence=impostor)])


# -- one entry plus its handler, served over a real socket ------------------------------------


@attrs.define(eq=False)
class EchoHub(Hub):
    """A hub with one handler more: the only code a new non-presence type needs."""

    async def handle_echo(
        self, session: Session, room: Room, envelope: Envelope
    ) -> tuple[str, Any]:
        return "ack", {"text": envelope.data.text, "user_id": session.user.id}


_ECHO = MessageType(name="echo", data=Echo, role="commenter", rate_class="other", presence=None,
                    handler="handle_echo")  # fmt: skip


def _rebuilt(hub: Hub, cls: type[Hub], protocol: Any) -> Hub:
    """A hub of class ``cls`` sharing everything with ``hub`` but its protocol table."""
    values: dict[str, Any] = {
        str(a.alias): getattr(hub, a.name) for a in attrs.fields(Hub) if a.init
    }
    values["protocol"] = protocol
    return cls(**values)


async def test_hub_refuses_a_table_it_cannot_serve(server: Server) -> None:
    with pytest.raises(TypeError, match=r"'echo' is handled by 'handle_echo', which is no "):
        _rebuilt(server.hub, Hub, table([*PROTOCOL.values(), _ECHO]))
    broken = table([*PROTOCOL.values(), _selection(handler="check_rate")])
    with pytest.raises(
        TypeError, match="'selection_change' is handled by 'check_rate', which is no coroutine"
    ):
        _rebuilt(server.hub, Hub, broken)
    slotless = table([*PROTOCOL.values(), _selection(presence=None)])
    with pytest.raises(TypeError, match="'selection_change' is handled as presence but has no"):
        _rebuilt(server.hub, Hub, slotless)
    no_hello = table(e for e in PROTOCOL.values() if e.name != "hello")
    with pytest.raises(TypeError, match="no hello"):
        _rebuilt(server.hub, Hub, no_hello)


async def _join(url: str, server: Server, nursery: trio.Nursery, user: str, role: str) -> RawClient:
    client = await open_raw_client(nursery, url)
    client.welcome = await client.hello(server.issue_token(user, "p1", role), "p1")  # type: ignore[arg-type]
    return client


async def test_protocol_table_new_types_are_served_over_a_real_socket(
    server: Server, nursery: trio.Nursery
) -> None:
    # A tick far longer than the test (and than any setting allows: the room reads it at each
    # tick): the room flushes only when the test says so, so two presence messages are
    # coalesced exactly when they share a slot.
    object.__setattr__(server.config, "tick_ms", 600_000.0)
    object.__setattr__(server.config, "batch_frames_per_s", 1e-9)  # the interval is the tick
    extended = table([*PROTOCOL.values(), _selection(), _ECHO])
    hub = _rebuilt(server.hub, EchoHub, extended)
    with trio.fail_after(20):
        port = await nursery.start(TrioWebSocketTransport("127.0.0.1", 0).serve, hub.acceptor())
        url = f"ws://127.0.0.1:{port}/ws"
        ann = await _join(url, server, nursery, "ann", "editor")
        bob = await _join(url, server, nursery, "bob", "viewer")

        # The non-presence type: decoded into its class, its role checked, its handler run.
        reply = await ann.request("echo", {"text": "hi"})
        assert reply == {"type": "ack", "ref": reply["ref"],
                         "data": {"text": "hi", "user_id": "ann"}}  # fmt: skip
        refused = await bob.request("echo", {"text": "hi"})
        assert refused["data"]["code"] == "forbidden"
        assert "echo needs role commenter" in refused["data"]["message"]
        bad = await ann.request("echo", {"text": 5})
        assert bad["data"]["code"] == "bad_request"
        assert "data.text" in bad["data"]["message"]

        # The presence type: no code of its own; its slot is its own, not typing's.
        selected = await ann.request("selection_change", {"element_ids": ["clip-1"]})
        assert selected["data"] == {}
        assert (await ann.request("typing_start", {"element_id": "clip-1"}))["data"] == {}
        server.hub.rooms.rooms["p1"].flush()
        assert bob.inbox == []
        # One frame: the batch of both (a lone envelope, had one superseded the other).
        batch = orjson.loads(await bob.ws.get_message())
        assert isinstance(batch, list), f"one presence message superseded the other: {batch}"
        assert [(e["data"]["kind"], e["data"]["payload"]) for e in batch] == [
            ("selection_change", {"element_ids": ["clip-1"]}),
            ("typing_start", {"element_id": "clip-1"}),
        ]
        users = await bob.request("users_request")
        mine = next(u for u in users["data"]["users"] if u["user_id"] == "ann")
        assert mine["selection"] == ["clip-1"]
        assert mine["typing"] == "clip-1"

        # The server's own table knows neither type.
        plain = await open_raw_client(nursery, f"ws://127.0.0.1:{server.ws_port}/ws")
        await plain.hello(server.issue_token("cy", "p1", "editor"), "p1")
        unknown = await plain.request("echo", {"text": "hi"})
        assert unknown["data"]["code"] == "bad_request"
        assert "unknown event type 'echo'" in unknown["data"]["message"]
        for client in (ann, bob, plain):
            await client.ws.aclose()
