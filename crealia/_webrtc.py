"""WebRTC peers for Trio: the relay's side of a live session and a client peer.

The one module of crealia that speaks asyncio. aiortc (and aioice, PyAV) run on a trio-asyncio
loop that each :func:`open_relay` and :func:`open_peer` opens for itself and closes on exit,
with every asyncio task of it; what this module exposes is Trio-flavoured. Callers in other
Trio tasks (a session's reader answering a signal) reach the loop explicitly (``loop=``), not
through trio-asyncio's context variable, which only the opening task's children see.

What aiortc does not offer, and is done here, each in one small function that names what of
aiortc or aioice it relies on (``tests/test_webrtc.py`` fails if that changes):

- **Media addresses** (:func:`_scoped_host_addresses`): aioice gathers host candidates on every
  address of the machine but 127.0.0.1, with no option to choose. ``aioice.ice
  .get_host_addresses`` is replaced, once, by a function that answers the addresses of the peer
  gathering (a context variable set around its ``setLocalDescription``), and the original
  answer otherwise.
- **A bitrate cap** (:func:`_cap_encoder`): aiortc's sender keeps its encoder private and
  raises its target bitrate on every REMB the receiver sends. The encoder's class is swapped
  for a subclass whose ``target_bitrate`` setter clamps to the cap.
- **The nominated candidate pair** (:func:`_nominated`): read from aioice's connection.

Frames a relay sends are ``yuv420p``: other formats crashed or deadlocked ``MediaRelay`` with
two viewers or more.
"""

from __future__ import annotations

import asyncio
import contextvars
import fractions
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aioice.ice
import attrs
import av
import trio
import trio_asyncio
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.sdp import candidate_from_sdp

from ._quality import RUNGS, Rung, fit

log = logging.getLogger("crealia.webrtc")

VIDEO_CLOCK = 90_000  # RTP clock rate of video, for jitter in milliseconds


class PeerError(Exception):
    """A description or candidate the peer could not use (the message says why)."""


# -- media addresses ------------------------------------------------------------------------------

_original_host_addresses = aioice.ice.get_host_addresses
_listen_ips: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "crealia_listen_ips", default=()
)


def _scoped_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice's host addresses, or those of the peer gathering now (its ``listen_ips``)."""
    chosen = _listen_ips.get()
    if not chosen:
        return _original_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [ip for ip in chosen if (":" in ip and use_ipv6) or (":" not in ip and use_ipv4)]


aioice.ice.get_host_addresses = _scoped_host_addresses


async def _set_local(
    pc: RTCPeerConnection, description: RTCSessionDescription, listen_ips: tuple[str, ...]
) -> None:
    """``setLocalDescription`` (which gathers every candidate first) on ``listen_ips``."""
    token = _listen_ips.set(listen_ips)
    try:
        await pc.setLocalDescription(description)
    finally:
        _listen_ips.reset(token)


# -- aiortc's private parts -----------------------------------------------------------------------

_CAPPED: dict[type, type] = {}


def _capped_class(base: type) -> type:
    """A subclass of encoder class ``base`` whose ``target_bitrate`` never exceeds
    ``_crealia_cap`` (bits per second; None: no cap)."""
    capped = _CAPPED.get(base)
    if capped is None:
        inherited = base.target_bitrate  # type: ignore[attr-defined]

        def get(self: Any) -> int:
            return int(inherited.fget(self))

        def set_(self: Any, bitrate: int) -> None:
            cap = self._crealia_cap
            inherited.fset(self, bitrate if cap is None else min(bitrate, cap))

        capped = type(f"Capped{base.__name__}", (base,), {
            "_crealia_cap": None, "target_bitrate": property(get, set_),
        })  # fmt: skip
        _CAPPED[base] = capped
    return capped


def _cap_encoder(sender: RTCRtpSender, kbps: int | None) -> bool:
    """Cap the video encoder of ``sender`` at ``kbps``; False while it has none yet (aiortc
    creates it at the first frame). Relies on ``RTCRtpSender.__encoder`` and the encoder's
    ``target_bitrate`` property (aiortc 1.16's VP8 and H.264 encoders)."""
    encoder = getattr(sender, "_RTCRtpSender__encoder", None)
    if encoder is None or not isinstance(getattr(type(encoder), "target_bitrate", None), property):
        return False
    if type(encoder) not in _CAPPED.values():
        encoder.__class__ = _capped_class(type(encoder))
    cap = None if kbps is None else kbps * 1000
    encoder._crealia_cap = cap
    if cap is not None and encoder.target_bitrate > cap:
        encoder.target_bitrate = cap
    return True


def _nominated(pc: RTCPeerConnection) -> tuple[str, str] | None:
    """(local, remote) address of the ICE pair ``pc`` nominated for its first transport.
    Relies on ``RTCIceTransport._connection`` (aioice ``Connection``) and its ``_nominated``."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        connection = getattr(dtls.transport, "_connection", None)
        nominated = getattr(connection, "_nominated", None) or {}
        for pair in nominated.values():
            return pair.local_candidate.host, pair.remote_candidate.host
    return None


# -- shared ---------------------------------------------------------------------------------------


#: Worker threads one loop's encoders and scalers may use at once.
ENCODER_THREADS = 8


class _Executor(trio_asyncio.TrioExecutor):  # type: ignore[misc]
    """aiortc's encoders run in the loop's executor. trio-asyncio's waits, when the waiting
    asyncio task is cancelled, for the thread to hand back a result it resolves nothing with,
    and a sender being stopped then never ends (seen with audio: ``pc.close()`` hung). This
    one lets go of the thread when cancelled; the frame it was encoding is dropped."""

    def __init__(self) -> None:
        # Its own limit: media encoding cannot take the threads the rest of the server
        # (the stores) needs from Trio's default limiter.
        super().__init__(limiter=trio.CapacityLimiter(ENCODER_THREADS))

    async def submit(self, func: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(
            func, *args, abandon_on_cancel=True, limiter=self._limiter
        )


#: Seconds a loop has to wind down (its asyncio tasks cancelled) once its peers are closed.
LOOP_CLOSE_TIMEOUT = 5.0


@asynccontextmanager
async def _open_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """A trio-asyncio loop for the block, which cancelling the block does not stop: it runs in
    a shielded task until the block has ended, so that what the block opened on it (peer
    connections) can still be closed on it; it then winds down within
    :data:`LOOP_CLOSE_TIMEOUT`."""
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        loop: trio_asyncio.TrioEventLoop = await nursery.start(_run_loop, stop)
        try:
            yield loop
        finally:
            stop.set()


async def _run_loop(
    stop: trio.Event, *, task_status: trio.TaskStatus[trio_asyncio.TrioEventLoop]
) -> None:
    with trio.CancelScope(shield=True) as scope:
        async with trio_asyncio.open_loop() as loop:
            loop.set_default_executor(_Executor())
            task_status.started(loop)
            await stop.wait()
            scope.deadline = trio.current_time() + LOOP_CLOSE_TIMEOUT


def _configuration(ice_servers: Sequence[Mapping[str, Any]]) -> RTCConfiguration:
    """Always explicit: aiortc's default would be a public STUN server."""
    servers = []
    for server in ice_servers:
        urls = server.get("urls", [])
        servers.append(RTCIceServer(urls=list(urls) if not isinstance(urls, str) else urls,
                                    username=server.get("username"),
                                    credential=server.get("credential")))  # fmt: skip
    return RTCConfiguration(iceServers=servers)


def _description(value: Mapping[str, Any]) -> RTCSessionDescription:
    return RTCSessionDescription(sdp=str(value.get("sdp", "")), type=str(value["type"]))


def _wire(description: RTCSessionDescription) -> dict[str, Any]:
    return {"type": description.type, "sdp": description.sdp}


async def _add_candidate(pc: RTCPeerConnection, candidate: Mapping[str, Any] | None) -> None:
    line = (candidate or {}).get("candidate") or ""
    if not line:
        return  # the end of the other side's candidates: aiortc needs no word of it
    try:
        parsed = candidate_from_sdp(line.removeprefix("a=").removeprefix("candidate:"))
    except (ValueError, IndexError, AssertionError) as exc:  # aiortc asserts its field count
        raise PeerError(f"not an ICE candidate: {exc or 'too few fields'}") from None
    parsed.sdpMid = candidate.get("sdpMid") if candidate else None
    parsed.sdpMLineIndex = candidate.get("sdpMLineIndex") if candidate else None
    await pc.addIceCandidate(parsed)


async def _close(loop: trio_asyncio.TrioEventLoop, pc: RTCPeerConnection, seconds: float) -> None:
    """Close ``pc`` within ``seconds``, even while cancelled; abandoned past it."""
    with trio.CancelScope(shield=True), trio.move_on_after(seconds) as waited:
        try:
            await trio_asyncio.aio_as_trio(pc.close, loop=loop)()
        except (Exception, asyncio.CancelledError) as exc:
            # aiortc's close stops at the first transport that fails (an ICE monitor task
            # cancelled under it re-raises CancelledError): stop the rest, or their sockets
            # stay open.
            log.info("a WebRTC peer's close failed (%r); stopping its transports", exc)
            await trio_asyncio.aio_as_trio(_stop_transports, loop=loop)(pc)
    if waited.cancelled_caught:
        log.warning("a WebRTC peer took more than %s s to close; abandoned", seconds)


async def _stop_transports(pc: RTCPeerConnection) -> None:
    """Stop every DTLS and ICE transport of ``pc`` (public aiortc API), each on its own."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        for transport in (dtls, dtls.transport):
            try:
                await transport.stop()
            except (Exception, asyncio.CancelledError):
                log.debug("a transport failed to stop", exc_info=True)


async def _call(loop: trio_asyncio.TrioEventLoop, function: Any, *args: Any) -> Any:
    """Run asyncio ``function(*args)`` on ``loop`` from any Trio task; aiortc's refusals of
    what it was given become :class:`PeerError`."""
    try:
        return await trio_asyncio.aio_as_trio(function, loop=loop)(*args)
    except asyncio.CancelledError:
        raise PeerError("the peer has closed") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, AssertionError) as exc:
        # aiortc's SDP parser asserts what it expects.
        raise PeerError(f"{type(exc).__name__}: {exc}" if str(exc) else "malformed") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("aiortc", "aioice")):
            raise PeerError(f"{type(exc).__name__}: {exc}") from None
        raise


# -- the relay ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LinkStats:
    """The relay's own statistics of one viewer's connection, since the previous read."""

    bitrate_kbps: float
    rtt_ms: float
    packet_loss: float
    jitter_ms: float
    frames_sent: int
    width: int
    height: int


def _scale(frame: av.VideoFrame, size: tuple[int, int]) -> av.VideoFrame:
    return frame.reformat(width=size[0], height=size[1], format="yuv420p")


class _Relayed(MediaStreamTrack):  # type: ignore[misc]
    """One viewer's track of the host's media of one kind, through the relay. It exists
    before the host's media does (a viewer may join first) and waits for it."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self._relay = relay
        self._source: MediaStreamTrack | None = None

    async def _next(self) -> av.VideoFrame | av.AudioFrame:
        if self._source is None:
            await self._relay._host_ready[self.kind].wait()
            host = self._relay._host_tracks[self.kind]
            self._source = self._relay._media.subscribe(host, buffered=False)
        frame = await self._source.recv()
        assert isinstance(frame, av.VideoFrame | av.AudioFrame)  # a media track's frames
        return frame

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        return await self._next()

    def stop(self) -> None:
        if self._source is not None:
            self._source.stop()
        super().stop()


class _ViewerAudio(_Relayed):
    kind = "audio"


class _ViewerTrack(_Relayed):
    """One viewer's video: the host's frames scaled to the viewer's rung, its encoder capped."""

    kind = "video"

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.rung: Rung | None = None  # None: as the host sends
        self.sent = 0
        self.last: tuple[int, int] = (0, 0)
        self.sender: RTCRtpSender | None = None
        self.cap_kbps: int | None = None
        self._capped = False

    async def recv(self) -> av.VideoFrame:
        frame = await self._next()
        assert isinstance(frame, av.VideoFrame)
        if self.sender is not None and not self._capped:
            self._capped = _cap_encoder(self.sender, self.cap_kbps)
        size = (frame.width, frame.height)
        if self.rung is not None:
            size = fit(self.rung, *size)
        if (frame.width, frame.height) != size or frame.format.name != "yuv420p":
            # Scaling takes a millisecond or more: in a worker thread, off the event loop.
            scaled = await asyncio.get_running_loop().run_in_executor(None, _scale, frame, size)
            scaled.pts, scaled.time_base = frame.pts, frame.time_base
            frame = scaled
        self.sent += 1
        self.last = (frame.width, frame.height)
        return frame


@attrs.define(eq=False)
class _Viewer:
    pc: RTCPeerConnection
    video: _ViewerTrack
    audio: _ViewerAudio
    #: (trio time, bytes sent) at the previous statistics read.
    mark: tuple[float, int] | None = None


class Relay:
    """The server's peers of one relay session: the host's, and one per viewer connection.

    Made by :func:`open_relay`; every method may be called from any Trio task.
    """

    def __init__(
        self,
        loop: trio_asyncio.TrioEventLoop,
        nursery: trio.Nursery,
        ice_servers: Sequence[Mapping[str, Any]],
        listen_ips: Sequence[str],
        close_timeout: float,
    ) -> None:
        self._loop = loop
        self._nursery = nursery
        self._configuration = ice_servers
        self._listen_ips = tuple(listen_ips)
        self._close_timeout = close_timeout
        self._media = MediaRelay()
        self._host: RTCPeerConnection | None = None
        self._host_tracks: dict[str, MediaStreamTrack] = {}
        #: Set (in asyncio) once the host's track of each kind is there for viewers to take.
        self._host_ready = {"video": asyncio.Event(), "audio": asyncio.Event()}
        self._viewers: dict[str, _Viewer] = {}
        self._made: list[RTCPeerConnection] = []
        self._closing = False
        #: The size of the host's latest decoded video frame (None until its media arrives).
        self.host_size: tuple[int, int] | None = None
        self._host_media = trio.Event()

    async def wait_host_media(self) -> None:
        """Wait for the host's first decoded video frame."""
        await self._host_media.wait()

    async def accept_host(self, offer: Mapping[str, Any]) -> dict[str, Any]:
        """The host's offer (send-only video, audio optional): the server's answer.

        Raises:
            PeerError: not an offer the relay can take (a second one from the host too).
        """
        if self._host is not None:
            raise PeerError("the host's media is already connected; stop and start again")
        pc = self._host = self._new_pc()
        try:
            answer = await _call(self._loop, self._answer_host, pc, _description(offer))
        except BaseException:
            self._host = None  # the host may offer again
            await _close(self._loop, pc, self._close_timeout)
            raise
        video = self._host_tracks.get("video")
        if video is not None:
            self._nursery.start_soon(self._watch_host, video)
        return answer  # type: ignore[no-any-return]

    async def _answer_host(
        self, pc: RTCPeerConnection, offer: RTCSessionDescription
    ) -> dict[str, Any]:
        await pc.setRemoteDescription(offer)
        for transceiver in pc.getTransceivers():
            transceiver.direction = "recvonly"
        await _set_local(pc, await pc.createAnswer(), self._listen_ips)
        for transceiver in pc.getTransceivers():
            track = transceiver.receiver.track
            if track is None or transceiver.kind in self._host_tracks:
                continue
            self._host_tracks[transceiver.kind] = track
            if transceiver.kind == "audio":
                self._host_ready["audio"].set()
        return _wire(pc.localDescription)

    async def _watch_host(self, track: MediaStreamTrack) -> None:
        """Read the host's video as it is decoded: its size, and no queue left to grow when
        no viewer watches. Viewers' tracks are let through once the first frame is here."""
        source = await _call(self._loop, self._subscribe, track)
        try:
            while True:
                try:
                    frame = await trio_asyncio.aio_as_trio(source.recv, loop=self._loop)()
                except (MediaStreamError, asyncio.CancelledError):
                    return  # the host's track ended (or the loop is stopping)
                self.host_size = (frame.width, frame.height)
                if not self._host_media.is_set():
                    self._host_media.set()
                    await _call(self._loop, self._open_video)
        finally:
            source.stop()

    async def _subscribe(self, track: MediaStreamTrack) -> MediaStreamTrack:
        return self._media.subscribe(track, buffered=False)

    async def _open_video(self) -> None:
        self._host_ready["video"].set()

    async def accept_viewer(self, key: str, offer: Mapping[str, Any]) -> dict[str, Any]:
        """A viewer's offer (receive-only transceivers): the server's answer. A new offer of
        the same ``key`` replaces its earlier connection.

        Raises:
            PeerError: not an offer the relay can take.
        """
        await self.drop(key)
        pc = self._new_pc()
        viewer = self._viewers[key] = _Viewer(pc=pc, video=_ViewerTrack(self),
                                              audio=_ViewerAudio(self))  # fmt: skip
        try:
            answer = await _call(self._loop, self._answer_viewer, viewer, _description(offer))
        except BaseException:
            if self._viewers.get(key) is viewer:
                del self._viewers[key]
            await _close(self._loop, pc, self._close_timeout)  # shielded: also when cancelled
            raise
        return answer  # type: ignore[no-any-return]

    async def _answer_viewer(self, viewer: _Viewer, offer: RTCSessionDescription) -> dict[str, Any]:
        pc = viewer.pc
        await pc.setRemoteDescription(offer)
        for transceiver in pc.getTransceivers():
            track = viewer.video if transceiver.kind == "video" else viewer.audio
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendonly"
            if transceiver.kind == "video":
                viewer.video.sender = transceiver.sender
        await _set_local(pc, await pc.createAnswer(), self._listen_ips)
        return _wire(pc.localDescription)

    async def add_candidate(self, key: str, candidate: Mapping[str, Any] | None) -> None:
        """A trickled candidate of the host (``key`` ``"host"``) or a viewer.

        Raises:
            PeerError: no connection for ``key`` yet (send the offer first), or not a candidate.
        """
        pc = self._host if key == "host" else getattr(self._viewers.get(key), "pc", None)
        if pc is None:
            raise PeerError("no connection to add the candidate to: send the offer first")
        await _call(self._loop, _add_candidate, pc, candidate)

    def set_quality(self, key: str, *, quality: str, max_bitrate_kbps: int) -> None:
        """Send viewer ``key`` the host's frames scaled down to fit rung ``quality`` (never up,
        aspect kept) with its encoder capped at ``max_bitrate_kbps``. Unknown keys are
        ignored."""
        viewer = self._viewers.get(key)
        if viewer is None:
            return
        track = viewer.video
        track.rung = RUNGS[quality]
        track.cap_kbps = max_bitrate_kbps
        if track.sender is not None:
            track._capped = _cap_encoder(track.sender, max_bitrate_kbps)

    async def stats(self, key: str) -> LinkStats | None:
        """The relay's statistics of viewer ``key``'s connection (None: no such viewer)."""
        viewer = self._viewers.get(key)
        if viewer is None:
            return None
        report = await _call(self._loop, viewer.pc.getStats)
        sent = rtt = loss = jitter = 0.0
        for stats in report.values():
            if getattr(stats, "kind", None) != "video":
                continue
            if stats.type == "outbound-rtp":
                sent += stats.bytesSent
            elif stats.type == "remote-inbound-rtp":
                rtt = max(rtt, float(stats.roundTripTime or 0.0) * 1000)
                loss = max(loss, float(stats.fractionLost or 0.0))
                jitter = max(jitter, float(stats.jitter or 0) * 1000 / VIDEO_CLOCK)
        now = trio.current_time()
        bitrate = 0.0
        if viewer.mark is not None and now > viewer.mark[0]:
            bitrate = (sent - viewer.mark[1]) * 8 / (now - viewer.mark[0]) / 1000
        viewer.mark = (now, int(sent))
        width, height = viewer.video.last
        return LinkStats(bitrate_kbps=max(bitrate, 0.0), rtt_ms=rtt, packet_loss=loss,
                         jitter_ms=jitter, frames_sent=viewer.video.sent, width=width,
                         height=height)  # fmt: skip

    async def drop(self, key: str) -> None:
        """Close viewer ``key``'s connection (bounded); nothing if there is none."""
        viewer = self._viewers.pop(key, None)
        if viewer is not None:
            await _close(self._loop, viewer.pc, self._close_timeout)

    def open_peers(self) -> int:
        """How many of the peer connections this relay made are not closed."""
        return sum(1 for pc in self._made if pc.connectionState != "closed")

    def loop_tasks(self) -> list[str]:
        """The asyncio tasks of this relay's loop that are not done, each described: none
        once the relay has closed (its loop closed with every task of it)."""
        return [repr(task) for task in asyncio.all_tasks(self._loop)]

    @property
    def loop_closed(self) -> bool:
        """Whether this relay's asyncio loop has closed."""
        return bool(self._loop.is_closed())

    def _new_pc(self) -> RTCPeerConnection:
        if self._closing:
            raise PeerError("the relay is closing")
        pc = RTCPeerConnection(configuration=_configuration(self._configuration))
        self._made.append(pc)
        del self._made[:-256]
        return pc

    async def _close_all(self) -> None:
        peers = [v.pc for v in self._viewers.values()]
        self._viewers.clear()
        if self._host is not None:
            peers.append(self._host)
        async with trio.open_nursery() as nursery:
            for pc in peers:
                nursery.start_soon(_close, self._loop, pc, self._close_timeout)


@asynccontextmanager
async def open_relay(
    *,
    ice_servers: Sequence[Mapping[str, Any]] = (),
    listen_ips: Sequence[str] = (),
    close_timeout: float = 5.0,
) -> AsyncIterator[Relay]:
    """The server's side of one relay session, for the duration of the block.

    On exit (cancelled too) every peer connection is closed, each within ``close_timeout``
    seconds (abandoned past it, logged), then the asyncio loop with every task of it.
    """
    async with _open_loop() as loop, trio.open_nursery() as nursery:
        relay = Relay(loop, nursery, ice_servers, listen_ips, close_timeout)
        try:
            yield relay
        finally:
            relay._closing = True  # no new peer from here on: it would outlive the loop
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await relay._close_all()


# -- a client peer --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Source:
    """A synthetic camera: a picture that changes every frame (so the encoder sends real
    data), ``fps`` frames a second, ``yuv420p``."""

    width: int = 640
    height: int = 360
    fps: int = 15


class _SyntheticVideo(MediaStreamTrack):  # type: ignore[misc]
    kind = "video"

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source = source
        self._count = 0
        self._start: float | None = None
        self._frames = [self._picture(i) for i in range(8)]

    def _picture(self, phase: int) -> av.VideoFrame:
        frame = av.VideoFrame(self._source.width, self._source.height, "yuv420p")
        for index, plane in enumerate(frame.planes):
            if index == 0:
                row = bytes((x * 4 + phase * 32) % 256 for x in range(plane.line_size))
                plane.update(row * plane.height)
            else:
                plane.update(bytes([128 + 16 * (phase % 4) * index % 64]) * plane.buffer_size)
        return frame

    async def recv(self) -> av.VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._count / self._source.fps
        if due > now:
            await asyncio.sleep(due - now)
        template = self._frames[self._count % len(self._frames)]
        frame = template.reformat(format="yuv420p")
        frame.pts = self._count * (VIDEO_CLOCK // self._source.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._count += 1
        return frame


_RTP_HEADER = 12


class Peer:
    """One WebRTC peer connection driven from Trio: a host sending a :class:`Source`, or a
    viewer receiving. Made by :func:`open_peer`."""

    def __init__(
        self,
        loop: trio_asyncio.TrioEventLoop,
        nursery: trio.Nursery,
        pc: RTCPeerConnection,
        listen_ips: tuple[str, ...],
    ) -> None:
        self._loop = loop
        self._nursery = nursery
        self._pc = pc
        self._listen_ips = listen_ips
        self._sizes: list[tuple[int, int]] = []
        self._arrived = trio.Event()
        self._reading = False
        #: Audio frames received (decoded) so far.
        self.audio_frames = 0
        #: Bytes of video RTP received so far (12-byte headers and payloads).
        self.rtp_bytes = 0

    async def offer(
        self, *, send: Source | None = None, audio: bool = False, receive: bool = False
    ) -> dict[str, Any]:
        """An offer: send-only tracks of ``send`` (and silence if ``audio``), or receive-only
        video (and audio) transceivers if ``receive``."""
        return await _call(self._loop, self._offer, send, audio, receive)  # type: ignore[no-any-return]

    async def _offer(self, send: Source | None, audio: bool, receive: bool) -> dict[str, Any]:
        pc = self._pc
        if send is not None:
            pc.addTransceiver(_SyntheticVideo(send), direction="sendonly")
            if audio:
                pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        if receive:
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
        await _set_local(pc, await pc.createOffer(), self._listen_ips)
        return _wire(pc.localDescription)

    async def answer(self, offer: Mapping[str, Any], *, send: Source) -> dict[str, Any]:
        """A p2p host's answer to a viewer's offer, with ``send``'s video."""
        return await _call(self._loop, self._answer, _description(offer), send)  # type: ignore[no-any-return]

    async def _answer(self, offer: RTCSessionDescription, send: Source) -> dict[str, Any]:
        pc = self._pc
        await pc.setRemoteDescription(offer)
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.sender.replaceTrack(_SyntheticVideo(send))
                transceiver.direction = "sendonly"
            else:
                transceiver.direction = "inactive"
        await _set_local(pc, await pc.createAnswer(), self._listen_ips)
        return _wire(pc.localDescription)

    async def accept(self, answer: Mapping[str, Any]) -> None:
        """The other side's answer to this peer's offer."""
        await _call(self._loop, self._pc.setRemoteDescription, _description(answer))
        self._read_video()

    async def add_candidate(self, candidate: Mapping[str, Any] | None) -> None:
        await _call(self._loop, _add_candidate, self._pc, candidate)

    def _read_video(self) -> None:
        if self._reading:
            return
        for transceiver in self._pc.getTransceivers():
            track = transceiver.receiver.track
            if transceiver.currentDirection == "recvonly" and track is not None:
                self._reading = True
                self._count_rtp(transceiver.receiver)
                self._nursery.start_soon(self._read, track)

    async def _read(self, track: MediaStreamTrack) -> None:
        recv = trio_asyncio.aio_as_trio(track.recv, loop=self._loop)
        while True:
            try:
                frame = await recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.AudioFrame):
                self.audio_frames += 1
                continue
            self._sizes.append((frame.width, frame.height))
            del self._sizes[:-64]
            self._arrived.set()
            self._arrived = trio.Event()

    async def frames(self, count: int) -> list[tuple[int, int]]:
        """Wait for ``count`` more decoded video frames; their sizes (the caller bounds it)."""
        seen: list[tuple[int, int]] = []
        while len(seen) < count:
            await self._arrived.wait()
            seen.append(self._sizes[-1])
        return seen

    def selected_pair(self) -> tuple[str, str] | None:
        """(local, remote) address of the nominated ICE candidate pair, once connected."""
        return _nominated(self._pc)

    def _count_rtp(self, receiver: Any) -> None:
        """Count the RTP bytes ``receiver`` is handed (aiortc's own statistics count no bytes
        per stream, and its transport's count stops after the DTLS handshake)."""
        handle = receiver._handle_rtp_packet

        async def counted(packet: Any, arrival_time_ms: int) -> None:
            self.rtp_bytes += _RTP_HEADER + len(packet.payload)
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = counted


@asynccontextmanager
async def open_peer(
    *,
    ice_servers: Sequence[Mapping[str, Any]] = (),
    listen_ips: Sequence[str] = ("127.0.0.1",),
    close_timeout: float = 5.0,
) -> AsyncIterator[Peer]:
    """A client peer for the duration of the block, gathering candidates on ``listen_ips``
    (empty: every address but loopback); closed within ``close_timeout`` on exit."""
    async with _open_loop() as loop, trio.open_nursery() as nursery:
        pc = RTCPeerConnection(configuration=_configuration(ice_servers))
        try:
            yield Peer(loop, nursery, pc, tuple(listen_ips))
        finally:
            nursery.cancel_scope.cancel()
            await _close(loop, pc, close_timeout)
