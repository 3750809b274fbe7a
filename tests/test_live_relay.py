"""Live sessions with real WebRTC peers (aiortc) through the server: p2p signalling, the relay
with two viewers (one joining before the host's media), quality applied to one viewer's frames,
and each of the four ways a session ends closing every peer in time.

Media stays on loopback: the suite runs in a loopback-only network namespace (``loopback_only``)
and every peer, the server's included, gathers candidates on 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio.lowlevel import Task

from crealia import Server, open_server
from crealia._metrics import live_metrics
from crealia._quality import RUNGS, fit
from crealia._webrtc import Peer, Source, open_peer

from ._wsclient import Envelope, RawClient
from .conftest import Clients, make_config, opened

pytestmark = pytest.mark.usefixtures("loopback_only")

TIMEOUT = 30
LOOPBACK = ("127.0.0.1",)


def relay_config(tmp_path: Path, **overrides: object) -> Any:
    return make_config(tmp_path / "data", webrtc_listen_ips=LOOPBACK, live_peer_timeout=5.0,
                       **overrides)  # fmt: skip


@pytest.fixture
async def relay_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with open_server(relay_config(tmp_path)) as server:
        yield server


async def signal(client: RawClient, sid: str, to: str, **fields: Any) -> None:
    reply = await client.request("webrtc_signal", {"session_id": sid, "to": to, **fields})
    assert reply["type"] == "ack", reply


async def answer_from(client: RawClient, sender: str) -> dict[str, Any]:
    """The next description ``client`` is sent by ``sender``."""

    def pred(env: Envelope) -> bool:
        data = env.get("data", {})
        return (
            env.get("type") == "webrtc_signal"
            and data.get("from") == sender
            and ("description" in data)
        )

    return dict((await client.expect(pred))["data"]["description"])


async def connect_to_server(
    stack: AsyncExitStack, client: RawClient, sid: str, ports: set[int] | None = None, **offer: Any
) -> Peer:
    """A new peer (closed with ``stack``) offering to the relay over ``client``'s session, its
    answer taken; the UDP ports of the server's candidates in it are added to ``ports``."""
    peer = await stack.enter_async_context(open_peer(listen_ips=LOOPBACK))
    description = await peer.offer(**offer)
    await signal(client, sid, "server", description=description)
    answer = await answer_from(client, "server")
    if ports is not None:
        ports.update(candidate_ports(answer["sdp"]))
    await peer.accept(answer)
    return peer


def candidate_ports(sdp: str) -> set[int]:
    """The ports of the 127.0.0.1 UDP host candidates in ``sdp``."""
    ports = set()
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            fields = line.split()
            if fields[2].lower() == "udp" and fields[4] == "127.0.0.1":
                ports.add(int(fields[5]))
    return ports


def udp_ports_bound() -> set[int]:
    """The ports of every UDP socket bound on 127.0.0.1 in this network namespace (the
    suite's own, loopback only: ``loopback_only``)."""
    ports = set()
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        address, port = line.split()[1].split(":")
        if address == "0100007F":  # 127.0.0.1, as the kernel writes it
            ports.add(int(port, 16))
    return ports


async def start(client: RawClient, mode: str) -> str:
    reply = await client.request("live_start", {"kind": "camera", "mode": mode})
    assert reply["type"] == "ack", reply
    return str(reply["data"]["session_id"])


async def join(client: RawClient, sid: str) -> None:
    reply = await client.request("live_join", {"session_id": sid})
    assert reply["type"] == "ack", reply


def on_loopback(peer: Peer) -> None:
    pair = peer.selected_pair()
    assert pair is not None and pair[0] == "127.0.0.1" and pair[1] == "127.0.0.1", pair


async def test_p2p_the_server_signals_and_the_viewer_decodes_the_hosts_frames(
    server: Server, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        async with opened(server, nursery) as clients, AsyncExitStack() as stack:
            hana = await clients.join("hana")
            olga = await clients.join("olga", role="viewer")
            sid = await start(hana, "p2p")
            await join(olga, sid)
            host = await stack.enter_async_context(open_peer(listen_ips=LOOPBACK))
            viewer = await stack.enter_async_context(open_peer(listen_ips=LOOPBACK))
            # The viewer offers to the host through the server; the host answers with its tracks.
            await signal(olga, sid, "hana", description=await viewer.offer(receive=True))
            offer = await answer_from(hana, "olga")
            answer = await host.answer(offer, send=Source(width=320, height=240, fps=15))
            await signal(hana, sid, "olga", description=answer)
            await viewer.accept(await answer_from(olga, "hana"))
            sizes = await viewer.frames(5)
            assert sizes[-1] == (320, 240)
            on_loopback(viewer)
            on_loopback(host)


async def test_relay_two_viewers_one_before_the_hosts_media_both_decode(
    relay_server: Server, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        async with opened(relay_server, nursery) as clients, AsyncExitStack() as stack:
            hana = await clients.join("hana")
            olga = await clients.join("olga", role="viewer")
            pete = await clients.join("pete", role="viewer")
            sid = await start(hana, "relay")
            # Olga joins and connects before the host has sent anything.
            await join(olga, sid)
            early = await connect_to_server(stack, olga, sid, receive=True)
            source = Source(width=640, height=360, fps=15)
            host = await connect_to_server(stack, hana, sid, send=source, audio=True)
            await join(pete, sid)
            late = await connect_to_server(stack, pete, sid, receive=True)
            for viewer in (early, late):
                sizes = await viewer.frames(5)
                assert sizes[-1] == (640, 360)
                on_loopback(viewer)
            on_loopback(host)
            # The host's audio is relayed too (aiortc's silence, 50 frames a second).
            await early.frames(10)
            assert early.audio_frames > 0 and late.audio_frames > 0


async def test_relay_bad_statistics_shrink_one_viewers_frames_and_not_the_others(
    relay_server: Server, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        async with opened(relay_server, nursery) as clients, AsyncExitStack() as stack:
            hana = await clients.join("hana")
            olga = await clients.join("olga", role="viewer")
            pete = await clients.join("pete", role="viewer")
            sid = await start(hana, "relay")
            await connect_to_server(stack, hana, sid, send=Source(width=854, height=480, fps=15))
            viewers = {}
            for name, client in (("olga", olga), ("pete", pete)):
                await join(client, sid)
                viewers[name] = peer = await connect_to_server(stack, client, sid, receive=True)
                assert (await peer.frames(3))[-1] == (854, 480)
            # Every frame pete decodes from here on, while olga's quality falls.
            pete_sizes: list[tuple[int, int]] = []

            async def watch_pete() -> None:
                while True:
                    pete_sizes.extend(await viewers["pete"].frames(1))

            async with trio.open_nursery() as watching:
                watching.start_soon(watch_pete)
                lossy = {"session_id": sid, "bitrate_kbps": 900, "rtt_ms": 30,
                         "packet_loss": 0.2, "fps": 15, "width": 854, "height": 480}  # fmt: skip
                assert (await olga.request("stream_stats", lossy))["type"] == "ack"
                for member in (olga, hana):
                    change = await member.expect_type("quality_change")
                    assert change["data"] == {"session_id": sid, "quality": "360p",
                                              "max_bitrate_kbps": 800, "reason": "loss",
                                              "viewer": "olga"}  # fmt: skip
                # Within seconds olga's frames fit 360p (aspect kept: 640x358), and stay so;
                # pete's stay as the host sends them, every one of them.
                shrunk = fit(RUNGS["360p"], 854, 480)
                assert shrunk == (640, 358)
                with trio.fail_after(10):
                    while (await viewers["olga"].frames(1))[-1] != shrunk:
                        pass
                assert set(await viewers["olga"].frames(5)) == {shrunk}
                assert set(await viewers["pete"].frames(10)) == {(854, 480)}
                watching.cancel_scope.cancel()
            assert len(pete_sizes) >= 10
            assert set(pete_sizes) == {(854, 480)}, pete_sizes
            # Neither pete nor the host heard of a change of pete's: what the server sent them
            # before the answer to a request of theirs (joining again answers the same ack
            # and announces nothing) is all in their inboxes.
            for member in (pete, hana):
                await join(member, sid)
                changes = [env["data"] for env in member.inbox
                           if env.get("type") == "quality_change"]  # fmt: skip
                assert not [c for c in changes if c["viewer"] != "olga"], changes
            assert not [env for env in pete.inbox if env.get("type") == "quality_change"]
            members = {p.user_id: p for p in live_session(relay_server, sid).participants.values()}
            assert members["pete"].controller.current == "480p"
            assert members["olga"].controller.current == "360p"


@attrs.define
class Relayed:
    """A relay session with its host's media flowing to one viewer (:func:`live_relay`)."""

    hana: RawClient
    olga: RawClient
    sid: str
    #: The UDP ports of the server's two peers (host and viewer), from its answers.
    ports: set[int]


@asynccontextmanager
async def live_relay(
    server: Server, clients: Clients, stack: AsyncExitStack
) -> AsyncIterator[Relayed]:
    """A relay session with its host's media flowing to one viewer."""
    hana = await clients.join("hana")
    olga = await clients.join("olga", role="viewer")
    sid = await start(hana, "relay")
    ports: set[int] = set()
    await connect_to_server(stack, hana, sid, send=Source(width=320, height=240, fps=15),
                            ports=ports)  # fmt: skip
    await join(olga, sid)
    viewer = await connect_to_server(stack, olga, sid, receive=True, ports=ports)
    await viewer.frames(2)
    assert len(ports) == 2, ports
    assert ports <= udp_ports_bound()
    yield Relayed(hana=hana, olga=olga, sid=sid, ports=ports)


def live_session(server: Server, sid: str) -> Any:
    room = server.hub.rooms.rooms["p1"]
    return room.live.sessions[sid]


#: The name of the task that runs a live session, in its room's nursery.
SESSION_TASK = "crealia._live.LiveSessions._run"


def every_task() -> set[Task]:
    """Every task of this run now: the tree from its root task."""
    found: set[Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


def session_tasks(live: Any) -> set[Task]:
    """The task running ``live`` and every task under it (its relay's loop and peers)."""
    (own,) = [task for task in every_task() if task.name == SESSION_TASK
              and getattr(task.coro, "cr_frame", None) is not None
              and task.coro.cr_frame.f_locals.get("live") is live]  # type: ignore[attr-defined]  # fmt: skip
    found, todo = set(), [own]
    while todo:
        task = todo.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


def ended_counts(server: Server) -> dict[str, float]:
    """``crealia_live_sessions_ended_total`` by reason, from the collector ``/metrics`` renders
    (readable after the server has stopped serving HTTP)."""
    (family,) = [f for f in live_metrics(server.hub.rooms)
                 if f.name == "crealia_live_sessions_ended"]  # fmt: skip
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


async def wait_closed(
    live: Any, relay: Any, session: Relayed, tasks: set[Task], *, since: float, deadline: float
) -> None:
    """Within ``deadline`` seconds of ``since`` the session's peers (host and viewer) are
    closed, their sockets too, its relay's asyncio loop is closed with no task of it left,
    and no task of the session's own (``tasks``) runs any more."""
    with trio.fail_at(since + deadline):
        await live.closed.wait()
    assert live.relay is None
    assert relay.open_peers() == 0
    assert not session.ports & udp_ports_bound()
    assert relay.loop_closed
    assert relay.loop_tasks() == []
    left = tasks & every_task()
    assert not left, left
    assert not [task for task in every_task() if task.name == SESSION_TASK]


async def erase(server: Server, user_id: str) -> None:
    """A GDPR erasure in project p1, by an owner: it closes the project's room."""
    token = server.issue_token("owen", "p1", "owner")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
        response = await http.post("/api/collaboration/gdpr/erase", json={"userId": user_id},
                                   headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("cause", ["stopped", "host_left", "room_closed"])
async def test_relay_ending_closes_every_peer_within_its_deadline(
    tmp_path: Path, nursery: trio.Nursery, cause: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_server(relay_config(tmp_path)) as server,
            opened(server, nursery) as clients,
            AsyncExitStack() as stack,
            live_relay(server, clients, stack) as session,
        ):
            hana, olga, sid = session.hana, session.olga, session.sid
            room = server.hub.rooms.rooms["p1"]
            live = live_session(server, sid)
            tasks_before = len(room.nursery.child_tasks) - 1  # the session's own task
            tasks = session_tasks(live)
            assert len(tasks) > 1  # its relay's loop and peers run under it
            relay = live.relay
            assert relay.open_peers() == 2
            assert relay.loop_tasks()  # aiortc's tasks, while the peers are up
            since = trio.current_time()
            async with trio.open_nursery() as ending:
                if cause == "stopped":
                    reply = await hana.request("live_stop", {"session_id": sid})
                    assert reply["type"] == "ack", reply
                elif cause == "host_left":
                    await hana.aclose()
                else:
                    # A GDPR erasure closes the project's room with its members connected (its
                    # answer waits for their connections to close too).
                    ending.start_soon(erase, server, "zed")
                await wait_closed(live, relay, session, tasks, since=since,
                                  deadline=server.config.live_peer_timeout + 1)  # fmt: skip
            assert live.reason == cause
            ended = await olga.event("live_ended")
            assert ended["data"]["payload"] == {"session_id": sid, "reason": cause}
            if cause == "room_closed":
                # Sent just before the member's connection closed with the room.
                assert await olga.closed() == 1011
                assert room.nursery is None and room.done.is_set()
            else:
                assert len(room.nursery.child_tasks) == tasks_before
            expected = {"stopped": 0.0, "host_left": 0.0, "room_closed": 0.0, cause: 1.0}
            assert server.hub.rooms.live_totals.ended == {k: int(v) for k, v in expected.items()}
            assert ended_counts(server) == expected


async def test_relay_server_shutdown_closes_every_peer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_server(relay_config(tmp_path)) as server,
            opened(server, nursery) as clients,
            AsyncExitStack() as stack,
            live_relay(server, clients, stack) as session,
        ):
            hana, olga, sid = session.hana, session.olga, session.sid
            live = live_session(server, sid)
            tasks = session_tasks(live)
            relay = live.relay
            assert relay.open_peers() == 2
            config = server.config
            # Shutdown closes every connection at once, the host's included (its client reads,
            # so at once), which ends the session: its peers close within live_peer_timeout of
            # the shutdown's start, timed from there, not from aclose's return (which waits up
            # to shutdown_grace for the connections).
            since = trio.current_time()
            async with trio.open_nursery() as stopping:
                stopping.start_soon(server.aclose)
                await wait_closed(live, relay, session, tasks, since=since,
                                  deadline=config.live_peer_timeout + 1)  # fmt: skip
            assert trio.current_time() - since < config.shutdown_grace + 1
            assert live.reason == "host_left"
            assert server.hub.rooms.live_totals.ended == {"stopped": 0, "host_left": 1,
                                                          "room_closed": 0}  # fmt: skip
            assert ended_counts(server) == {"stopped": 0.0, "host_left": 1.0,
                                            "room_closed": 0.0}  # fmt: skip
            # Members learn it from their connection closing with 1001 (docs/protocol.md §8):
            # they are sent no live_ended.
            for member in (hana, olga):
                assert await member.closed() == 1001
                assert not [env for env in member.inbox if env.get("type") == "collaboration_event"
                            and env["data"]["kind"] == "live_ended"]  # fmt: skip


async def test_relay_refusals_name_what_the_servers_peer_cannot_take(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A budget that pays for one viewer at the host's rung (camera: 720p before its frames).
    config = relay_config(tmp_path, live_relay_cpu_budget=40.0)
    with trio.fail_after(TIMEOUT):
        async with open_server(config) as server, opened(server, nursery) as clients:
            hana = await clients.join("hana")
            olga = await clients.join("olga", role="viewer")
            pete = await clients.join("pete", role="viewer")
            sid = await start(hana, "relay")
            ref = {"session_id": sid, "to": "server"}
            refusals = [
                ({"description": {"type": "answer", "sdp": "v=0\r\n"}}, "answers offers"),
                ({"description": {"type": "offer", "sdp": "v=0\r\nm=video x\r\n"}},
                 "refused it"),
                ({"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host",
                                "sdpMid": "0"}}, "send the offer first"),
            ]  # fmt: skip
            for fields, words in refusals:
                reply = await hana.request("webrtc_signal", {**ref, **fields})
                assert reply["type"] == "error", reply
                assert reply["data"]["code"] == "bad_request", reply
                assert words in reply["data"]["message"], reply
            await join(olga, sid)
            reply = await pete.request("live_join", {"session_id": sid})
            assert reply["data"]["code"] == "overloaded", reply
            assert "live_relay_cpu_budget" in reply["data"]["message"], reply
            # The session still takes the host's offer after all that, and its trickled
            # candidates (the one in its SDP again, then the end of them).
            async with open_peer(listen_ips=LOOPBACK) as host:
                description = await host.offer(send=Source(width=320, height=240))
                await signal(hana, sid, "server", description=description)
                await host.accept(await answer_from(hana, "server"))
                line = next(part for part in description["sdp"].split("\r\n")
                            if part.startswith("a=candidate:"))  # fmt: skip
                for candidate in ({"candidate": line[2:], "sdpMid": "0", "sdpMLineIndex": 0},
                                  {"candidate": "", "sdpMid": "0"}):  # fmt: skip
                    await signal(hana, sid, "server", candidate=candidate)
