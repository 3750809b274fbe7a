"""crealia/_webrtc.py on its own: what it relies on in aiortc and aioice (these tests fail when an
upgrade changes it), media addresses, the bitrate cap against REMB, the executor that lets a
stopping sender go, ICE servers, candidates, and bounded closing."""

from __future__ import annotations

import inspect

import aioice.ice
import pytest
import trio
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.codecs.vpx import MAX_BITRATE, Vp8Encoder

from crealia import _webrtc
from crealia._webrtc import PeerError, Source, open_peer, open_relay

TIMEOUT = 20
LOOPBACK = ("127.0.0.1",)


def test_aioice_gathers_host_candidates_through_the_patched_function() -> None:
    # aioice calls its module's get_host_addresses when gathering: the patch sees every call.
    assert aioice.ice.get_host_addresses is _webrtc._scoped_host_addresses
    source = inspect.getsource(aioice.ice.Connection.gather_candidates)
    assert "get_host_addresses(" in source
    # Outside a gathering peer: aioice's own answer (which leaves 127.0.0.1 out).
    assert "127.0.0.1" not in _webrtc._scoped_host_addresses(use_ipv4=True, use_ipv6=False)
    token = _webrtc._listen_ips.set(("127.0.0.1", "::1"))
    try:
        assert _webrtc._scoped_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        both = _webrtc._scoped_host_addresses(use_ipv4=True, use_ipv6=True)
        assert both == ["127.0.0.1", "::1"]
    finally:
        _webrtc._listen_ips.reset(token)


def test_the_bitrate_cap_holds_against_remb() -> None:
    # aiortc's sender keeps its encoder in a private attribute and sets its target bitrate on
    # every REMB (RTCRtpSender._handle_rtcp_packet).
    assert "self.__encoder.target_bitrate = bitrate" in inspect.getsource(
        RTCRtpSender._handle_rtcp_packet
    )
    sender = object.__new__(RTCRtpSender)
    assert _webrtc._cap_encoder(sender, 800) is False  # no encoder yet: tried again later
    sender._RTCRtpSender__encoder = Vp8Encoder()  # type: ignore[attr-defined]
    assert _webrtc._cap_encoder(sender, 800) is True
    encoder = sender._RTCRtpSender__encoder  # type: ignore[attr-defined]
    assert isinstance(encoder, Vp8Encoder)
    encoder.target_bitrate = MAX_BITRATE  # what a REMB asking for more does
    assert encoder.target_bitrate == 800_000
    encoder.target_bitrate = 300_000  # less is taken as it comes
    assert encoder.target_bitrate == 300_000
    _webrtc._cap_encoder(sender, 1200)  # a new rung: the cap moves, the class stays
    encoder.target_bitrate = MAX_BITRATE
    assert encoder.target_bitrate == 1_200_000
    assert type(encoder).__mro__[1] is Vp8Encoder


def test_the_executor_lets_go_of_a_thread_when_cancelled() -> None:
    source = inspect.getsource(_webrtc._Executor.submit)
    assert "abandon_on_cancel=True" in source
    # trio-asyncio's run_in_executor takes only its own executor class, and awaits submit.
    assert issubclass(_webrtc._Executor, _webrtc.trio_asyncio.TrioExecutor)
    assert "executor.submit" in inspect.getsource(
        _webrtc.trio_asyncio.TrioEventLoop.run_in_executor
    )


async def test_the_executor_runs_jobs_on_its_own_thread_limit() -> None:
    executor = _webrtc._Executor()
    assert executor._limiter.total_tokens == _webrtc.ENCODER_THREADS
    assert await executor.submit(sum, [1, 2, 3]) == 6


def test_ice_servers_are_always_explicit() -> None:
    # aiortc's default configuration would ask a public STUN server.
    assert _webrtc._configuration([]).iceServers == []
    [server] = _webrtc._configuration(
        [{"urls": ["turn:t.example:3478"], "username": "u", "credential": "c"}]
    ).iceServers
    assert (server.urls, server.username, server.credential) == (["turn:t.example:3478"], "u",
                                                                  "c")  # fmt: skip


async def test_the_nominated_pair_is_read_from_aioice() -> None:
    pc = RTCPeerConnection()
    assert _webrtc._nominated(pc) is None  # nothing yet, and no error
    assert aioice.ice.Connection(ice_controlling=True)._nominated == {}
    await trio.lowlevel.checkpoint()


@pytest.mark.usefixtures("loopback_only")
async def test_trickled_candidates_and_bad_ones(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_relay(listen_ips=LOOPBACK) as relay, open_peer() as host:
            offer = await host.offer(send=Source(width=160, height=120))
            with pytest.raises(PeerError, match="malformed"):
                await relay.accept_host({"type": "offer", "sdp": "v=0\r\nm=video x\r\n"})
            with pytest.raises(PeerError, match="send the offer first"):
                await relay.add_candidate("host", {"candidate": "candidate:1 1 udp 1 1.2.3.4 1 "
                                                   "typ host", "sdpMid": "0"})  # fmt: skip
            await host.accept(await relay.accept_host(offer))
            # A candidate line trickled after the SDP (aiortc also carries them in it).
            line = next(part for part in offer["sdp"].split("\r\n")
                        if part.startswith("a=candidate:"))  # fmt: skip
            await relay.add_candidate("host", {"candidate": line[2:], "sdpMid": "0",
                                               "sdpMLineIndex": 0})  # fmt: skip
            await relay.add_candidate("host", {"candidate": "", "sdpMid": "0"})  # end of them
            with pytest.raises(PeerError, match="not an ICE candidate"):
                await relay.add_candidate("host", {"candidate": "candidate:x", "sdpMid": "0"})
            with pytest.raises(PeerError, match="already connected"):
                await relay.accept_host(offer)
            with pytest.raises(PeerError):
                await relay.accept_viewer("v", {"type": "offer", "sdp": "v=0\r\nm=video x\r\n"})
            assert relay.open_peers() == 1  # the refused connections were closed
            with trio.fail_after(5):
                await relay.wait_host_media()
            assert relay.host_size == (160, 120)


@pytest.mark.usefixtures("loopback_only")
async def test_leaving_a_relay_while_cancelled_closes_its_peers_in_time() -> None:
    with trio.fail_after(TIMEOUT):
        peers = None
        with trio.CancelScope() as scope:
            async with (
                open_relay(listen_ips=LOOPBACK, close_timeout=3) as relay,
                open_peer() as host,
            ):
                await host.accept(await relay.accept_host(await host.offer(
                    send=Source(width=160, height=120), audio=True)))  # fmt: skip
                viewer_offer = None
                async with open_peer() as viewer:
                    viewer_offer = await viewer.offer(receive=True)
                    await viewer.accept(await relay.accept_viewer("v", viewer_offer))
                    await viewer.frames(2)
                    peers = relay
                    assert relay.open_peers() == 2
                    started = trio.current_time()
                    scope.cancel()  # the room closing: every peer closed on the way out
                    await trio.sleep_forever()
        assert scope.cancelled_caught
        assert peers is not None and peers.open_peers() == 0
        assert trio.current_time() - started < 3 + 1
