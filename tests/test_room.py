"""Rooms: slow consumers, lifetime, isolation, storage failures."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from crealia import Server, open_server
from crealia._session import _Outbox
from crealia.transports._trio_ws import _text_frame

from ._memory_backplane import MemoryBackplane
from ._wsclient import RawClient
from .conftest import Clients, data_store, make_config, opened
from .test_protocol import insert, set_op


async def open_stalled_client(nursery: trio.Nursery, port: int) -> RawClient:
    """A client with a tiny receive buffer that will stop reading when told to."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    ws = await trio_websocket.wrap_client_stream(
        nursery,
        trio.SocketStream(sock),
        "127.0.0.1",
        "/ws",
        message_queue_size=1,
        max_message_size=16 * 1024 * 1024,
    )
    return RawClient(ws)


async def test_slow_consumer_is_closed_with_4409_and_room_goes_on(
    tmp_path: Path, nursery: trio.Nursery, endpoint: str
) -> None:
    # Floods on purpose: not what the rate limits are for here.
    config = make_config(tmp_path, outbox_frames=64, outbox_bytes=2 * 1024 * 1024,
                         rate_limits={"comment": "off"})  # fmt: skip
    async with open_server(config) as server:
        clients = Clients(server, endpoint, nursery)
        writer = await clients.join("writer")
        reader = await clients.join("reader", role="viewer")
        port = server.ws_port if endpoint == "ws" else server.http_port
        slow = await open_stalled_client(nursery, port)
        await slow.hello(server.issue_token("slow", "p1", "viewer"), "p1")
        room = server.hub.rooms.rooms["p1"]
        stalled = next(s for s in room.sessions.values() if s.user.id == "slow")
        text = "x" * 9000
        seen: list[int] = []
        target = {"seq": 10**9}
        caught_up = trio.Event()

        async def consume() -> None:
            while True:
                env = await reader.event("comment_add")
                seen.append(env["data"]["seq"])
                if seen[-1] >= target["seq"]:
                    caught_up.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(consume)
                sent = 0
                while stalled.close_code is None and sent < 5000:
                    sent += 1
                    ack = await writer.request(
                        "comment_add", {"comment": {"id": f"k{sent}", "text": text}}
                    )
                    assert ack["type"] == "ack", ack
                    writer.inbox.clear()
                assert stalled.close_code == 4409, "the stalled client was never cut off"
                # It gets the frame that was in flight, then the close: the stream stays valid.
                assert await slow.closed() == 4409
                # The room went on: writes still work and the reader saw every comment.
                final = await writer.request("comment_add", {"comment": {"id": "z", "text": "ok"}})
                last = target["seq"] = final["data"]["seq"]
                if seen and seen[-1] >= last:
                    caught_up.set()
                await caught_up.wait()
                inner.cancel_scope.cancel()
            assert seen == list(range(1, last + 1))
            assert stalled.id not in room.sessions
        await clients.aclose()


async def test_room_closes_after_last_member_and_reopens(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        await a.request(
            "timeline_change",
            {
                "change_id": "c",
                "changes": [
                    {"op": "insert", "element_id": "e", "element_type": "clip", "props": {}}
                ],
            },
        )
        room = clients.server.hub.rooms.rooms["p1"]
        await a.aclose()
        await room.done.wait()
        assert "p1" not in clients.server.hub.rooms.rooms
        b = await clients.join("bob")
        assert b.welcome["seq"] == 1
        assert clients.server.hub.rooms.rooms["p1"] is not room


async def test_projects_are_isolated(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice", project="pa")
        b = await clients.join("bob", project="pb")
        await a.request(
            "timeline_change",
            {
                "change_id": "same",
                "changes": [
                    {"op": "insert", "element_id": "e", "element_type": "clip", "props": {"v": 1}}
                ],
            },
        )
        await a.request("comment_add", {"comment": {"id": "k", "text": "in pa"}})
        reply = await b.request(
            "timeline_change",
            {
                "change_id": "same",
                "changes": [
                    {"op": "insert", "element_id": "e", "element_type": "clip", "props": {"v": 2}}
                ],
            },
        )
        assert reply["data"]["status"] == "applied" and reply["data"]["seq"] == 1
        touch = await b.request(
            "timeline_change",
            {
                "change_id": "x",
                "changes": [{"op": "set", "element_id": "nope", "prop": "v", "value": 3}],
            },
        )
        assert touch["data"]["code"] == "not_found"
        await b.request("ping", {})
        assert not [
            e
            for e in b.inbox
            if e["type"] == "collaboration_event" and e["data"].get("user_id") == "alice"
        ]
        c = await clients.join("carol", project="pa")
        assert c.welcome["seq"] == 2
        assert c.welcome["snapshot"]["elements"]["e"]["props"] == {"v": 1}


async def test_storage_failure_is_overloaded_and_applies_nothing(clients: Clients) -> None:
    with trio.fail_after(10):
        a = await clients.join("alice")
        b = await clients.join("bob")
        await a.request(
            "timeline_change",
            {
                "change_id": "c1",
                "changes": [
                    {"op": "insert", "element_id": "e", "element_type": "clip", "props": {"v": 1}}
                ],
            },
        )
        store = data_store(clients.server)
        store.fail_commits = True
        failed = await a.request(
            "timeline_change",
            {
                "change_id": "c2",
                "changes": [{"op": "set", "element_id": "e", "prop": "v", "value": 2}],
            },
        )
        assert failed["type"] == "error" and failed["data"]["code"] == "overloaded"
        comment = await a.request("comment_add", {"comment": {"id": "k", "text": "t"}})
        assert comment["data"]["code"] == "overloaded"
        store.fail_commits = False
        # Nothing of the failed writes exists: same change id applies now, at the next seq.
        ok = await a.request(
            "timeline_change",
            {
                "change_id": "c2",
                "changes": [{"op": "set", "element_id": "e", "prop": "v", "value": 3}],
            },
        )
        assert ok["data"]["status"] == "applied" and ok["data"]["seq"] == 2
        seqs = []
        while len(seqs) < 2:
            env = await b.expect(
                lambda e: e["type"] == "collaboration_event" and "seq" in e["data"]
            )
            seqs.append((env["data"]["seq"], env["data"]["payload"]["change_id"]))
        assert seqs == [(1, "c1"), (2, "c2")]
        late = await clients.join("late")
        assert late.welcome["snapshot"]["elements"]["e"]["props"] == {"v": 3}


async def test_flood_of_garbage_is_closed_with_4429_and_others_go_on(clients: Clients) -> None:
    with trio.fail_after(20):
        calm = await clients.join("calm")
        flooder = await clients.join("flooder")
        limit = clients.server.config.abuse_errors
        for i in range(limit + 50):
            try:
                await flooder.send_raw(f'{{"type": "no_such_event", "ref": {i + 1}}}')
            except trio_websocket.ConnectionClosed:
                break
        assert await flooder.closed() == 4429
        errors = [e for e in flooder.inbox if e["type"] == "error"]
        assert len(errors) > limit // 2
        assert all(e["data"]["code"] == "bad_request" for e in errors)
        reply = await calm.request("ping", {})
        assert reply["type"] == "pong"


# Floods on purpose: not what the rate limits are for here. A budget of 1,000 frames a second
# makes the room of two flush at most every 2 ms, so the flood coalesces.
@pytest.mark.settings(
    rate_limits={"cursor": "off", "edit": "off", "comment": "off"}, batch_frames_per_s=1000
)
async def test_flood_of_cursors_is_coalesced_and_others_go_on(clients: Clients) -> None:
    with trio.fail_after(20):
        watcher = await clients.join("watcher")
        flooder = await clients.join("flooder")
        for i in range(5000):
            await flooder.send("cursor_update", {"position": {"x": i, "y": 0}})
        await flooder.send("element_active", {"element_id": "end"})
        await watcher.event("element_active")
        cursors = [
            e
            for e in watcher.inbox
            if e["type"] == "collaboration_event" and e["data"]["kind"] == "cursor_update"
        ]
        assert cursors[-1]["data"]["payload"]["position"]["x"] == 4999.0
        assert len(cursors) < 5000
        reply = await watcher.request("ping", {})
        assert reply["type"] == "pong"
        assert (await flooder.request("ping", {}))["type"] == "pong"


@pytest.mark.settings(tick_ms=600)
async def test_a_message_after_a_quiet_spell_does_not_wait_for_the_tick(
    clients: Clients,
) -> None:
    """Batching coalesces only what comes faster than the room's interval (members over
    ``batch_frames_per_s``, here 0.1 ms): two edits in a row both go out at once, where a
    fixed 600 ms tick held the second one until the tick."""
    with trio.fail_after(20):
        writer = await clients.join("writer")
        reader = await clients.join("reader")
        assert (await writer.request("timeline_change", insert("c0", "clip")))["type"] == "ack"
        await reader.event("timeline_change")
        for n in range(3):
            change = set_op(f"c{n + 1}", "clip", "x", n, None)
            reply = await writer.request("timeline_change", change)
            assert reply["data"]["status"] == "applied", reply
            with trio.fail_after(0.4):  # well under the tick
                await reader.event("timeline_change", seq=reply["data"]["seq"])


@pytest.mark.settings(tick_ms=5, batch_frames_per_s=1000)
async def test_the_flush_interval_grows_with_the_members_up_to_the_tick(
    server: Server, clients: Clients
) -> None:
    with trio.fail_after(20):
        first = await clients.join("a")
        room = server.hub.rooms.rooms["p1"]
        assert room.interval() == pytest.approx(0.001)  # 1 member / 1000 frames a second
        others = [await clients.join(f"u{i}", project="p2") for i in range(3)]
        # the budget is the process's: members of every room count
        assert room.interval() == pytest.approx(0.004)
        second = await clients.join("b")
        assert room.interval() == 0.005  # capped by the tick
        await second.aclose()
        await first.event("user_left")  # announced once the room has let b go
        assert room.interval() == pytest.approx(0.004)
        assert len(others) == 3


def test_a_backlog_of_small_flushes_merges_instead_of_filling_the_outbox() -> None:
    """Adaptive batching flushes often; a writer stuck behind a slow socket must not see its
    frame limit reached by hundreds of tiny items (the byte budget still applies)."""
    merging = _Outbox(8, merge=True)
    for n in range(1000):
        assert merging.put_nowait((1, b'{"n":%d}' % n, float(n)))
    items = merging._items
    assert len(items) <= 8
    assert sum(count for count, _body, _since in items) == 1000
    joined = b",".join(b",".join(body) if isinstance(body, list) else body
                       for _count, body, _since in items)  # fmt: skip
    assert [value["n"] for value in json.loads(b"[" + joined + b"]")] == list(range(1000))
    assert items[-1][2] < 1000  # the oldest message's time, for the fan-out latency
    plain = _Outbox(8)
    assert all(plain.put_nowait((1, b"{}", 0.0)) for _ in range(8))
    assert not plain.put_nowait((1, b"{}", 0.0))  # batching off: one frame per item


async def test_merged_outbox_items_keep_the_byte_count_exact(
    server: Server, nursery: trio.Nursery
) -> None:
    """The bytes a session counts as queued go back to 0 once its writer sent everything,
    merged items (and the commas between them) included."""
    with trio.fail_after(10):
        async with opened(server, nursery) as clients:
            ann = await clients.join("ann")
            (session,) = server.hub.rooms.rooms["p1"].sessions.values()
            half = session.outbox.limit // 2
            for n in range(half + 50):  # the last 50 merge (the writer has not run yet)
                session.push(1, b'{"type":"x","data":{"n":%d}}' % n)
            assert len(session.outbox._items) == half
            assert session.queued_bytes > 0
            last = half + 49
            await ann.expect(lambda env: env.get("data", {}).get("n") == last)
            assert session.queued_bytes == 0  # what a merge counts on, the writer counts off
            assert session.close_code is None


async def test_an_open_connection_keeps_nothing_of_its_handshake(
    server: Server, nursery: trio.Nursery
) -> None:
    """wsproto keeps the whole h11 handshake for a connection's life (about 2.5 KiB of an idle
    connection); the fast path drops it once the connection is open, and messages still flow
    both ways."""
    with trio.fail_after(10):
        async with opened(server, nursery) as clients:
            ann = await clients.join("ann")
            bob = await clients.join("bob")
            room = server.hub.rooms.rooms["p1"]
            for session in room.sessions.values():
                wsproto_connection = session.conn._ws._wsproto  # type: ignore[attr-defined]
                assert type(wsproto_connection.handshake).__name__ == "_SpentHandshake"
            await ann.send("cursor_update", {"position": {"x": 1, "y": 2}})
            await bob.event("cursor_update")
            assert (await bob.request("ping", {}))["type"] == "pong"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_plain_text_frames_are_framed_as_wsproto_frames_them(size: int) -> None:
    """The fast path frames uncompressed text itself; byte for byte what wsproto sends."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/ws")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    payload = ('{"n":"' + "é" * size + '"}').encode()
    assert _text_frame(payload) == server.send(TextMessage(data=payload.decode()))
    client.receive_data(_text_frame(payload))
    (event,) = client.events()
    assert isinstance(event, TextMessage) and event.data == payload.decode()


@attrs.define(eq=False)
class SlowToUnsubscribe(MemoryBackplane):
    """Leaving a project's subscription waits for a gate (10 s at most): a room whose tasks
    have ended while it still winds down."""

    unsubscribing: trio.Event = attrs.Factory(trio.Event)
    gate: trio.Event = attrs.Factory(trio.Event)

    @asynccontextmanager
    async def _subscription(self, project_id: str, listener: Any) -> AsyncIterator[None]:
        try:
            async with MemoryBackplane._subscription(self, project_id, listener):
                yield
        finally:
            self.unsubscribing.set()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                await self.gate.wait()


async def test_a_member_leaving_while_its_room_winds_down_is_let_go(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The room's nursery has closed, its subscription not yet: a member whose connection ends
    then is told to the others without a task (a task started there raised out of the
    session's handler and the session never ended)."""
    config = make_config(tmp_path)
    with trio.fail_after(20):
        backplane = SlowToUnsubscribe(config=config)
        async with (
            open_server(config, backplane=backplane) as server,
            opened(server, nursery) as clients,
        ):
            ann = await clients.join("ann")
            await clients.join("bob")
            room = server.hub.rooms.rooms["p1"]
            session = next(s for s in room.sessions.values() if s.user.id == "ann")
            room.close()
            await backplane.unsubscribing.wait()
            await ann.aclose()  # ann leaves while the room winds down
            await session.ended.wait()
            backplane.gate.set()
            await room.done.wait()
            cy = await clients.join("cy")  # the project opens again
            assert [user["user_id"] for user in cy.welcome["users"]] == ["cy"]
