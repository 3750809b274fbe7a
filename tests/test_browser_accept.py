"""The browser client (/crealia.js) in Debian's Chromium against a real ``crealia serve``:
the acceptance checks of docs/protocol.md §9, each through the module's own API."""

from __future__ import annotations

from typing import Any

import pytest

from ._browser import BrowserServer, Pages, evaluate, screenshot

pytestmark = pytest.mark.slow

CONNECT = """async ({token, project}) => {
  const { connect } = await import("/crealia.js");
  const c = connect({ url: `ws://${location.host}/ws`, token, projectId: project });
  window.c = c;
  await new Promise((resolve, reject) => {
    const stop = c.subscribe((s) => {
      if (s.isConnected) { stop(); resolve(); }
      if (s.connectionStatus === "error") { stop(); reject(new Error(s.error)); }
    });
  });
  return c.state.user;
}"""


def client_page(
    pages: Pages, server: BrowserServer, user: str, role: str = "editor", project: str = "p1"
) -> Any:
    """A page (its own browser context) with ``window.c`` connected as ``user``."""
    page = pages.open(server.url + "/api/info")
    token = server.token(user, project, role)
    assert evaluate(page, CONNECT, {"token": token, "project": project})["id"] == user
    return page


def wait_for(page: Any, predicate: str, arg: Any = None, timeout: float = 15_000) -> Any:
    """Wait until ``predicate(window.c.state, arg)`` (a JS expression) is truthy."""
    return page.wait_for_function(
        f"(arg) => {{ const s = window.c.state; return ({predicate}); }}", arg=arg, timeout=timeout
    ).json_value()


INSERT = [
    {
        "op": "insert",
        "element_id": "clip-1",
        "element_type": "clip",
        "props": {"start": 0, "duration": 5, "title": "Intro"},
    }
]


def test_client_two_people_see_each_others_cursors_and_edits(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    ann = client_page(pages, crealia_server, "ann")
    bob = client_page(pages, crealia_server, "bob")
    ack = evaluate(ann, "(ops) => c.sendTimelineChanges(ops)", INSERT)
    assert ack["status"] == "applied" and ack["seq"] == 1
    wait_for(bob, "s.document.elements['clip-1']?.props.title === 'Intro'")
    base = evaluate(bob, "c.state.document.versions['clip-1'].title")
    evaluate(
        bob,
        "(base) => c.sendTimelineChanges([{op: 'set', element_id: 'clip-1', "
        "prop: 'title', value: 'Opening', base}])",
        base,
    )
    wait_for(ann, "s.document.elements['clip-1'].props.title === 'Opening'")
    evaluate(
        bob,
        "() => { c.updateCursor({x: 10, y: 20, time: 1.5, track: 'v1'}); "
        "c.updateCursor({x: 30, y: 40, time: 2.5, track: 'v1'}); }",
    )
    cursor = wait_for(
        ann,
        "s.users.find(u => u.user_id === 'bob')?.cursor?.x === 30 && "
        "s.users.find(u => u.user_id === 'bob').cursor",
    )
    assert cursor == {"x": 30, "y": 40, "time": 2.5, "track": "v1"}
    docs = [evaluate(p, "JSON.stringify(c.state.document)") for p in (ann, bob)]
    assert docs[0] == docs[1]
    status, snapshot = crealia_server.request(
        "GET", "/api/projects/p1/snapshot", crealia_server.token("ann", "p1", "viewer")
    )
    assert status == 200
    state = evaluate(ann, "c.state.document")
    assert (state["seq"], state["elements"], state["versions"]) == (
        snapshot["seq"],
        snapshot["elements"],
        snapshot["versions"],
    )
    assert wait_for(ann, "s.latency !== null && s.latency") >= 0
    screenshot(ann, "client-two-people")


def test_client_a_change_sent_while_the_server_is_down_is_acked_after_it_returns(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    # While the server is down the browser says so on the console, which is expected here.
    pages.allow(r"WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed")
    ann = client_page(pages, crealia_server, "ann")
    bob = client_page(pages, crealia_server, "bob")
    evaluate(ann, "(ops) => c.sendTimelineChanges(ops)", INSERT)
    wait_for(bob, "s.document.seq === 1")
    crealia_server.stop(kill=True)
    wait_for(ann, "s.connectionStatus !== 'connected'")
    # Sent while the server is down: pending, then resent with its change_id after reconnect.
    evaluate(
        ann,
        "() => { window.pending = c.sendTimelineChanges([{op: 'set', "
        "element_id: 'clip-1', prop: 'start', value: 7, base: 1}], "
        "{changeId: 'offline-1'}); }",
    )
    assert evaluate(ann, "c.state.document.seq") == 1
    crealia_server.start()
    ack = evaluate(ann, "window.pending", timeout=30)
    assert ack["change_id"] == "offline-1" and ack["status"] == "applied" and ack["seq"] == 2
    wait_for(bob, "s.isConnected && s.document.elements['clip-1']?.props.start === 7")
    docs = [evaluate(p, "JSON.stringify(c.state.document)") for p in (ann, bob)]
    assert docs[0] == docs[1]


def test_client_conflict_appears_with_its_card_data_and_resolves(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    owner = crealia_server.token("olga", "p1", "owner")
    status, _ = crealia_server.request(
        "PUT", "/api/projects/p1/strategies", owner, {"strategies": ["manual"]}
    )
    assert status == 200
    ann = client_page(pages, crealia_server, "ann")
    bob = client_page(pages, crealia_server, "bob")
    evaluate(ann, "(ops) => c.sendTimelineChanges(ops)", INSERT)
    wait_for(bob, "s.document.seq === 1")
    evaluate(
        ann,
        "c.sendTimelineChanges([{op: 'set', element_id: 'clip-1', prop: 'title', "
        "value: 'Ann', base: 1}])",
    )
    wait_for(bob, "s.document.seq === 2")
    ack = evaluate(
        bob,
        "c.sendTimelineChanges([{op: 'set', element_id: 'clip-1', prop: 'title', "
        "value: 'Bob', base: 1}])",
    )
    assert ack["status"] == "conflict" and len(ack["conflicts"]) == 1
    conflict = wait_for(ann, "s.conflicts.length === 1 && s.conflicts[0]")
    assert conflict["current"]["value"] == "Ann" and conflict["incoming"]["value"] == "Bob"
    evaluate(ann, "(id) => c.resolveConflict(id, 'incoming')", conflict["id"])
    for page in (ann, bob):
        wait_for(
            page, "s.conflicts.length === 0 && s.document.elements['clip-1'].props.title === 'Bob'"
        )
        settled = evaluate(page, "c.state.resolvedConflicts[0]")
        assert settled["resolution"]["choice"] == "incoming"
    docs = [evaluate(p, "JSON.stringify(c.state.document)") for p in (ann, bob)]
    assert docs[0] == docs[1]


def test_client_bad_input_rejects_naming_the_field_and_goes_on(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    ann = client_page(pages, crealia_server, "ann")
    error = evaluate(
        ann,
        "c.sendTimelineChanges([{op: 'explode', element_id: 'x'}])"
        ".then(() => null, (e) => ({code: e.code, message: e.message}))",
    )
    assert error["code"] == "bad_request" and "op" in error["message"]
    ack = evaluate(ann, "(ops) => c.sendTimelineChanges(ops)", INSERT)
    assert ack["status"] == "applied"
    viewer = client_page(pages, crealia_server, "vic", role="viewer")
    refused = evaluate(
        viewer,
        "c.sendTimelineChanges([{op: 'set', element_id: 'clip-1', "
        "prop: 'title', value: 'x'}]).then(() => null, (e) => e.code)",
    )
    assert refused == "forbidden"


LIVE_VIDEO = """async (sessionId) => {
  const live = await c.joinLiveSession(sessionId);
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.append(video);
  video.srcObject = live.remoteStream;
  await new Promise((resolve) => {
    const check = () => video.videoWidth > 0 ? resolve() : setTimeout(check, 50);
    check();
  });
  return {width: video.videoWidth, height: video.videoHeight, mode: live.mode};
}"""


@pytest.mark.usefixtures("loopback_only")
@pytest.mark.parametrize("mode", ["p2p", "relay"])
def test_client_live_session_shows_video_to_a_viewer(
    crealia_server: BrowserServer, pages: Pages, mode: str
) -> None:
    host = client_page(pages, crealia_server, "ann")
    viewer = client_page(pages, crealia_server, "bob", role="viewer")
    session_id = evaluate(
        host,
        "(mode) => c.startLiveSession({kind: 'camera', mode}).then(s => { window.live = s; "
        "return s.id; })",
        mode,
    )
    wait_for(viewer, "s.liveSessions.some(x => x.session_id === arg)", session_id)
    video = evaluate(viewer, LIVE_VIDEO, session_id)
    assert video["width"] > 0 and video["height"] > 0 and video["mode"] == mode
    screenshot(viewer, f"client-live-{mode}")
    evaluate(host, "window.live.stop()")
    wait_for(viewer, "s.liveSessions.length === 0")
