"""Live sessions over the wire (docs/protocol.md §8): starting, joining, leaving and stopping,
signals forwarded only to whom they name, statistics and quality in p2p mode, every refusal,
the limits, the JSON API and the metrics. The relay (the server as a WebRTC peer) is in
test_live_relay.py."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from crealia import Server

from ._scrape import parse_metrics
from ._wsclient import Envelope, RawClient
from .conftest import Clients, opened

TIMEOUT = 10

OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}
ANSWER = {"type": "answer", "sdp": OFFER["sdp"]}
CANDIDATE = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
             "sdpMid": "0", "sdpMLineIndex": 0}  # fmt: skip

_probes = itertools.count(1)


@pytest.fixture
async def room(server: Server, nursery: trio.Nursery) -> AsyncIterator[Clients]:
    async with opened(server, nursery) as clients:
        yield clients


async def quiet(client: RawClient, prober: RawClient) -> list[Envelope]:
    """Everything ``client`` receives before a probe that ``prober`` sends now (a cursor, which
    every other member gets): what was to arrive before it has arrived."""
    x = next(_probes)
    await prober.send("cursor_update", {"position": {"x": x, "y": 0}})
    seen = []
    while True:
        envelope = await client.next()
        data = envelope.get("data", {})
        if data.get("kind") == "cursor_update" and data["payload"]["position"]["x"] == x:
            return seen
        seen.append(envelope)


def live_frames(envelopes: list[Envelope]) -> list[Envelope]:
    """The envelopes about live sessions among ``envelopes``."""
    kinds = ("live_started", "live_joined", "live_left", "live_ended")
    return [e for e in envelopes if e["type"] in ("webrtc_signal", "quality_change")
            or e.get("data", {}).get("kind") in kinds]  # fmt: skip


async def start(host: RawClient, kind: str = "camera", mode: str = "p2p") -> str:
    reply = await host.request("live_start", {"kind": kind, "mode": mode})
    assert reply["type"] == "ack", reply
    return str(reply["data"]["session_id"])


async def join(viewer: RawClient, session_id: str) -> dict[str, Any]:
    reply = await viewer.request("live_join", {"session_id": session_id})
    assert reply["type"] == "ack", reply
    return dict(reply["data"])


def error(reply: Envelope, code: str, *words: str) -> None:
    assert reply["type"] == "error", reply
    assert reply["data"]["code"] == code, reply
    for word in words:
        assert word in reply["data"]["message"], reply


async def test_a_session_is_started_joined_left_and_stopped(room: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana", role="editor")
        olga = await room.join("olga", role="viewer")
        reply = await hana.request("live_start", {"kind": "screen", "mode": "p2p"})
        assert reply["type"] == "ack", reply
        sid = reply["data"]["session_id"]
        assert reply["data"] == {"session_id": sid, "kind": "screen", "mode": "p2p",
                                 "ice_servers": []}  # fmt: skip
        started = await olga.event("live_started", user_id="hana")
        assert started["data"]["payload"] == {"session_id": sid, "host": "hana", "kind": "screen",
                                              "mode": "p2p", "ice_servers": []}  # fmt: skip
        assert "seq" not in started["data"]

        joined = await join(olga, sid)
        assert joined == {"session_id": sid, "host": "hana", "kind": "screen", "mode": "p2p",
                          "ice_servers": [], "viewers": ["olga"]}  # fmt: skip
        event = await hana.event("live_joined")
        assert event["data"]["payload"] == {"session_id": sid, "user_id": "olga"}
        # Joining twice answers the same and announces nothing more.
        assert (await join(olga, sid))["viewers"] == ["olga"]

        # A member arriving now finds the session in its welcome.
        pete = await room.join("pete", role="commenter")
        [listed] = pete.welcome["live_sessions"]
        assert listed["session_id"] == sid and listed["host"] == "hana"
        assert listed["viewers"] == ["olga"] and listed["mode"] == "p2p"

        assert (await olga.request("live_leave", {"session_id": sid}))["type"] == "ack"
        left = await hana.event("live_left")
        assert left["data"]["payload"] == {"session_id": sid, "user_id": "olga"}

        await join(olga, sid)
        assert (await hana.request("live_stop", {"session_id": sid}))["type"] == "ack"
        for member in (hana, olga, pete):
            ended = await member.event("live_ended")
            assert ended["data"]["payload"] == {"session_id": sid, "reason": "stopped"}
        error(await olga.request("live_join", {"session_id": sid}), "not_found", sid)
        late = await room.join("late", role="viewer")
        assert late.welcome["live_sessions"] == []


async def test_signals_reach_only_the_named_members_connections(room: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        pete = await room.join("pete", role="viewer")
        rita = await room.join("rita", role="viewer")  # in the room, not in the session
        olga_tab = await room.join("olga", role="viewer")  # olga's second tab, not joined
        sid = await start(hana)
        for viewer in (olga, pete):
            await join(viewer, sid)

        reply = await olga.request("webrtc_signal", {"session_id": sid, "to": "hana",
                                                      "description": OFFER})  # fmt: skip
        assert reply["type"] == "ack", reply
        signal = await hana.expect_type("webrtc_signal")
        assert signal["data"] == {"session_id": sid, "to": "hana", "from": "olga",
                                  "description": OFFER}  # fmt: skip
        assert "ref" not in signal

        reply = await hana.request("webrtc_signal", {"session_id": sid, "to": "olga",
                                                      "description": ANSWER,
                                                      "candidate": CANDIDATE})  # fmt: skip
        assert reply["type"] == "ack", reply
        signal = await olga.expect_type("webrtc_signal")
        assert signal["data"]["from"] == "hana"
        assert signal["data"]["description"] == ANSWER
        assert signal["data"]["candidate"] == CANDIDATE
        # End of candidates: an empty candidate line.
        done = {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}
        reply = await olga.request("webrtc_signal", {"session_id": sid, "to": "hana",
                                                      "candidate": done})  # fmt: skip
        assert reply["type"] == "ack", reply
        assert (await hana.expect_type("webrtc_signal"))["data"]["candidate"] == done

        # Neither the other viewer, nor the member outside, nor olga's tab outside heard any.
        for bystander in (pete, rita, olga_tab):
            heard = await quiet(bystander, hana)
            assert [e for e in heard if e["type"] == "webrtc_signal"] == [], heard
        # The sender does not hear its own signal back.
        assert [e for e in await quiet(olga, pete) if e["type"] == "webrtc_signal"] == []


async def test_every_refusal_names_its_reason_and_changes_nothing(
    server: Server, room: Clients
) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        rita = await room.join("rita", role="editor")
        sid = await start(hana)
        await join(olga, sid)
        await quiet(hana, rita)  # what came so far (olga joining)
        ref = {"session_id": sid}

        # A viewer may not start a session; nobody hears of one.
        error(await olga.request("live_start", {"kind": "camera"}), "forbidden", "editor")
        # A member of the room that has not joined may not signal in it, nor report stats.
        error(await rita.request("webrtc_signal", {**ref, "to": "hana", "description": OFFER}),
              "forbidden", "live_join")  # fmt: skip
        error(await rita.request("stream_stats", {**ref, "bitrate_kbps": 1, "rtt_ms": 1,
                                                  "packet_loss": 0}), "forbidden")  # fmt: skip
        # Leaving a session one is not in.
        error(await rita.request("live_leave", ref), "forbidden")
        # A target that is not in the session, and the server in a p2p session.
        error(await olga.request("webrtc_signal", {**ref, "to": "rita", "candidate": CANDIDATE}),
              "not_found", "rita")  # fmt: skip
        error(await olga.request("webrtc_signal", {**ref, "to": "server", "description": OFFER}),
              "not_found", "relay")  # fmt: skip
        # Unknown sessions.
        for kind in ("live_join", "live_leave", "live_stop"):
            error(await olga.request(kind, {"session_id": "nope"}), "not_found", "nope")
        # A viewer (and an editor who is not the host) may not stop it.
        error(await olga.request("live_stop", ref), "forbidden", "host")
        error(await rita.request("live_stop", ref), "forbidden", "host")

        limit = server.config.live_sdp_max_bytes
        big = {"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * (limit // 5)}
        bad: list[tuple[dict[str, Any], str, str]] = [
            ({"description": big}, "too_large", f"{limit} bytes"),
            ({"description": {"type": "bogus", "sdp": OFFER["sdp"]}}, "bad_request",
             "data.description.type"),
            ({"description": {"type": "offer", "sdp": "hello"}}, "bad_request", "not an SDP"),
            ({"description": {"type": "offer", "sdp": 5}}, "bad_request", "data.description.sdp"),
            ({"description": {**OFFER, "extra": 1}}, "bad_request", "'extra'"),
            ({"description": "v=0"}, "bad_request", "data.description"),
            ({"candidate": {"candidate": "x" * 2000, "sdpMid": "0"}}, "too_large",
             "data.candidate.candidate"),
            ({"candidate": {"candidate": "hello", "sdpMid": "0"}}, "bad_request", "ICE candidate"),
            ({"candidate": {"candidate": CANDIDATE["candidate"]}}, "bad_request", "sdpMid"),
            ({"candidate": {**CANDIDATE, "sdpMLineIndex": -1}}, "bad_request", "sdpMLineIndex"),
            ({"candidate": {**CANDIDATE, "port": 1}}, "bad_request", "'port'"),
            ({}, "bad_request", "description or a candidate"),
        ]  # fmt: skip
        for fields, code, words in bad:
            error(await olga.request("webrtc_signal", {**ref, "to": "hana", **fields}),
                  code, words)  # fmt: skip
        stats = {**ref, "bitrate_kbps": 500, "rtt_ms": 20, "packet_loss": 0.0}
        for name, value, words in (("packet_loss", 1.5, "fraction"), ("rtt_ms", -1, "0 or more"),
                                   ("width", 100_000, "16384"),
                                   ("bitrate_kbps", "fast", "data.bitrate_kbps")):  # fmt: skip
            error(await olga.request("stream_stats", {**stats, name: value}), "bad_request",
                  words)  # fmt: skip

        # Nothing reached the host but what was valid (none of the above), the session stands.
        assert live_frames(await quiet(hana, rita)) == []
        listed = await (await room.join("late", role="viewer")).request("users_request")
        assert listed["type"] == "users_list"
        assert (await join(olga, sid))["viewers"] == ["olga"]


async def test_the_host_leaving_ends_the_session_and_an_owner_may_stop_one(
    room: Clients,
) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        hana_tab = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        sid = await start(hana)
        await join(olga, sid)
        # The host's other tab joins as the host: its leaving ends nothing.
        assert (await join(hana_tab, sid))["viewers"] == ["olga"]
        await hana_tab.aclose()
        await hana.aclose()
        ended = await olga.event("live_ended")
        assert ended["data"]["payload"] == {"session_id": sid, "reason": "host_left"}

        rita = await room.join("rita")
        owner = await room.join("oscar", role="owner")
        sid = await start(rita)
        assert (await owner.request("live_stop", {"session_id": sid}))["type"] == "ack"
        ended = await rita.event("live_ended")
        assert ended["data"]["payload"] == {"session_id": sid, "reason": "stopped"}

        # The host's live_leave ends it too.
        sid = await start(rita)
        await join(olga, sid)
        assert (await rita.request("live_leave", {"session_id": sid}))["type"] == "ack"
        # It arrives, or the deadline fails the test.
        await olga.event("live_ended", payload={"session_id": sid, "reason": "host_left"})


async def test_a_viewers_bad_statistics_lower_its_quality_for_it_and_the_host(
    room: Clients,
) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        pete = await room.join("pete", role="viewer")
        sid = await start(hana)
        await join(olga, sid)
        await join(pete, sid)
        ref = {"session_id": sid}
        # The host sends 1280x720: viewers start at 720p.
        host_stats = {**ref, "bitrate_kbps": 2000, "rtt_ms": 10, "packet_loss": 0, "fps": 30,
                      "width": 1280, "height": 720}  # fmt: skip
        assert (await hana.request("stream_stats", host_stats))["type"] == "ack"
        good = {**ref, "bitrate_kbps": 1800, "rtt_ms": 20, "packet_loss": 0.0, "fps": 30,
                "width": 1280, "height": 720}  # fmt: skip
        assert (await pete.request("stream_stats", good))["type"] == "ack"
        lossy = {**good, "packet_loss": 0.12}
        assert (await olga.request("stream_stats", lossy))["type"] == "ack"
        for member in (olga, hana):
            change = await member.expect_type("quality_change")
            assert change["data"] == {"session_id": sid, "quality": "480p",
                                      "max_bitrate_kbps": 1200, "reason": "loss",
                                      "viewer": "olga"}  # fmt: skip
        # The bitrate says 360p: down again, at once, for bandwidth.
        slow = {**good, "bitrate_kbps": 300}
        assert (await olga.request("stream_stats", slow))["type"] == "ack"
        change = await olga.expect_type("quality_change")
        assert change["data"]["quality"] == "360p" and change["data"]["reason"] == "bandwidth"
        # Pete's rung did not move, and he heard nothing of olga's.
        assert [e for e in await quiet(pete, hana) if e["type"] == "quality_change"] == []


@pytest.mark.settings(live_sessions_per_project=1, live_p2p_viewers=1)
async def test_the_session_and_viewer_limits_answer_overloaded(room: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        rita = await room.join("rita")
        olga = await room.join("olga", role="viewer")
        pete = await room.join("pete", role="viewer")
        sid = await start(hana)
        error(await rita.request("live_start", {"kind": "camera"}), "overloaded", "at most 1")
        await join(olga, sid)
        error(await pete.request("live_join", {"session_id": sid}), "overloaded", "at most 1")
        # The host's own tabs are not viewers.
        assert (await join(await room.join("hana"), sid))["viewers"] == ["olga"]
        assert (await olga.request("live_leave", {"session_id": sid}))["type"] == "ack"
        await join(pete, sid)


@pytest.mark.settings(
    webrtc_stun_servers=("stun:stun.example.org:3478",),
    webrtc_turn_servers=("turn:turn.example.org:3478?transport=udp",),
    webrtc_turn_username="crealia",
    webrtc_turn_credential="s3cret",
)
async def test_ice_servers_come_from_the_configuration(room: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        reply = await hana.request("live_start", {"kind": "camera"})
        assert reply["data"]["ice_servers"] == [
            {"urls": ["stun:stun.example.org:3478"]},
            {"urls": ["turn:turn.example.org:3478?transport=udp"], "username": "crealia",
             "credential": "s3cret"},
        ]  # fmt: skip
        assert reply["data"]["mode"] == "p2p"  # the default


async def test_the_json_api_and_the_metrics_show_live_sessions(
    server: Server, room: Clients
) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        sid = await start(hana)
        await join(olga, sid)
        stats = {"session_id": sid, "bitrate_kbps": 900, "rtt_ms": 42, "packet_loss": 0.01,
                 "fps": 24, "width": 640, "height": 360}  # fmt: skip
        # The host sends 640x360 (its own report says): its viewers are at 360p.
        assert (await hana.request("stream_stats", {**stats, "rtt_ms": 5}))["type"] == "ack"
        assert (await olga.request("stream_stats", stats))["type"] == "ack"
        base = f"http://127.0.0.1:{server.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            token = server.issue_token("olga", "p1", "viewer")
            answer = await http.get("/api/collaboration/live", params={"projectId": "p1"},
                                    headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert answer.status_code == 200, answer.text
            [session] = answer.json()["sessions"]
            assert session["session_id"] == sid and session["viewers"] == ["olga"]
            members = {m["user_id"]: m for m in session["members"]}
            assert members["hana"]["role"] == "host"
            assert members["olga"]["stats"]["rtt_ms"] == 42
            assert members["olga"]["quality"] == "360p"
            # Members of the project only.
            other = server.issue_token("mallory", "p2", "owner")
            refused = await http.get("/api/collaboration/live", params={"projectId": "p1"},
                                     headers={"Authorization": f"Bearer {other}"})  # fmt: skip
            assert refused.status_code == 403, refused.text
            assert (await http.get("/api/collaboration/live")).status_code == 401
            metrics = parse_metrics((await http.get("/metrics")).text)
        assert metrics["crealia_webrtc_streams"] == 1
        assert metrics["crealia_live_sessions{mode=p2p}"] == 1
        assert metrics["crealia_live_sessions{mode=relay}"] == 0
        assert metrics["crealia_live_viewers{quality=360p}"] == 1
        assert metrics["crealia_live_viewer_stat{of=max,stat=rtt_ms}"] == 42
        assert metrics["crealia_live_sessions_started_total{mode=p2p}"] == 1
        samples = await server.monitor.take_sample()
        assert samples[0]["webrtcStreams"] == 1  # the server's
        [project] = [s for s in samples if s["projectId"] == "p1"]
        assert project["webrtcStreams"] == 1
        [live] = project["webrtc"]
        assert live["sessionId"] == sid and live["mode"] == "p2p"
        assert live["viewers"] == [{"userId": "olga", "quality": "360p", "bitrate_kbps": 900,
                                    "rtt_ms": 42, "packet_loss": 0.01, "fps": 24}]  # fmt: skip


async def test_the_python_client_drives_a_session_and_it_is_audited(server: Server) -> None:
    from crealia import open_session

    url = f"ws://127.0.0.1:{server.ws_port}/ws"
    hana_token = server.issue_token("hana", "p1", "editor")
    olga_token = server.issue_token("olga", "p1", "viewer")
    with trio.fail_after(TIMEOUT):
        async with (
            open_session(url, hana_token, "p1") as hana,
            open_session(url, olga_token, "p1") as olga,
        ):
            started = await hana.live_start("screen", "p2p")
            assert started["kind"] == "screen" and started["ice_servers"] == []
            sid = started["session_id"]
            joined = await olga.live_join(sid)
            assert joined["host"] == "hana" and joined["viewers"] == ["olga"]
            await olga.signal(sid, "hana", description=OFFER)
            async for push in hana:
                if push.type == "webrtc_signal":
                    assert push.data["from"] == "olga" and push.data["description"] == OFFER
                    break
            await olga.stream_stats(sid, bitrate_kbps=100, rtt_ms=20, packet_loss=0.3)
            async for push in olga:
                if push.type == "quality_change":
                    assert push.data["viewer"] == "olga" and push.data["reason"] == "loss"
                    break
            with pytest.raises(Exception, match="forbidden"):
                await olga.live_stop(sid)
            await olga.live_leave(sid)
            await hana.live_stop(sid)
        await server.hub.audit.flush()
        events = await server.hub.audit.query(project_id="p1")
    actions = [(e.action, e.user_id) for e in events if e.action.startswith("live_")]
    assert sorted(actions) == sorted([("live_start", "hana"), ("live_join", "olga"),
                                      ("live_leave", "olga"), ("live_stop", "hana")])  # fmt: skip


async def test_the_servers_name_is_reserved_in_live_sessions(room: Clients) -> None:
    # A member named "server" could pass its signals off as the server's peer's.
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        mallory = await room.join("server", role="editor")
        sid = await start(hana)
        error(await mallory.request("live_start", {"kind": "camera"}), "forbidden", "reserved")
        error(await mallory.request("live_join", {"session_id": sid}), "forbidden", "reserved")


@pytest.mark.settings(live_stable_period=120.0)
async def test_a_long_stable_period_is_taken(room: Clients) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        olga = await room.join("olga", role="viewer")
        sid = await start(hana)
        assert (await join(olga, sid))["viewers"] == ["olga"]


async def test_closing_the_room_ends_its_sessions_as_room_closed(
    server: Server, room: Clients
) -> None:
    with trio.fail_after(TIMEOUT):
        hana = await room.join("hana")
        sid = await start(hana)
        live_room = server.hub.rooms.rooms["p1"]
        live = live_room.live.sessions[sid]
        live_room.close()
        assert live.ended and live.reason == "room_closed"  # ended by the closing, announced
        with trio.fail_after(5):
            await live.closed.wait()
        assert live.reason == "room_closed"
        assert server.hub.rooms.live_totals.ended == {"stopped": 0, "host_left": 0,
                                                      "room_closed": 1}  # fmt: skip
