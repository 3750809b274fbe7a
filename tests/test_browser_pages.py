"""The pages (/, /demo, /dashboard, /security) in Debian's Chromium against a real server:
what a person does on each, with no console error and no failed request (the ``pages``
fixture fails the test otherwise). Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

from typing import Any

import pytest

from ._browser import BrowserServer, Pages, evaluate, screenshot

pytestmark = pytest.mark.slow


def demo(pages: Pages, server: BrowserServer, user: str, role: str = "editor") -> Any:
    page = pages.open(server.page_url("/demo?project=p1", server.token(user, "p1", role)))
    page.locator("#connection.connected").wait_for()
    page.locator("[data-clip=clip-intro]").wait_for()
    return page


def clip_start(page: Any, clip: str) -> float:
    return float(evaluate(page, f"crealiaClient.state.document.elements['{clip}'].props.start"))


def test_demo_two_editors_drag_rename_and_see_each_other(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    ann = demo(pages, crealia_server, "ann")
    bob = demo(pages, crealia_server, "bob")
    # The starting timeline was inserted once, whoever came first.
    assert evaluate(bob, "crealiaClient.state.document.seq") == 1
    # Ann drags the intro 4 s (160 px) to the right, with the mouse.
    box = ann.locator("[data-clip=clip-intro] .clip-title").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    ann.mouse.move(x, y)
    ann.mouse.down()
    ann.mouse.move(x + 80, y, steps=5)
    ann.mouse.move(x + 160, y, steps=5)
    ann.mouse.up()
    bob.wait_for_function(
        "() => crealiaClient.state.document.elements['clip-intro'].props.start === 4"
    )
    # Bob sees Ann's cursor, with her name, over the timeline.
    ann.mouse.move(x + 300, y + 20)
    bob.locator("[data-cursor=ann] .name").wait_for()
    assert bob.locator("[data-cursor=ann] .name").inner_text() == "Ann"
    # Bob renames the beach clip in place; Ann sees him typing, then the new title.
    bob.locator("[data-clip=clip-beach] .clip-title").dblclick()
    ann.locator("[data-clip=clip-beach] .others", has_text="Bob is typing").wait_for()
    bob.keyboard.press("Control+A")
    bob.keyboard.type("Sunset beach")
    bob.keyboard.press("Enter")
    ann.locator("[data-clip=clip-beach] .clip-title", has_text="Sunset beach").wait_for()
    # The keyboard moves a clip too.
    bob.locator("[data-clip=clip-drone]").focus()
    bob.keyboard.press("ArrowRight")
    ann.wait_for_function(
        "() => crealiaClient.state.document.elements['clip-drone'].props.start === 3.5"
    )
    # And the project title is edited in place.
    ann.fill("#project-title", "Autumn trailer")
    ann.keyboard.press("Enter")
    bob.wait_for_function(
        "() => document.getElementById('project-title').value === 'Autumn trailer'"
    )
    # Both documents are the server's.
    docs = [evaluate(p, "JSON.stringify(crealiaClient.state.document)") for p in (ann, bob)]
    assert docs[0] == docs[1]
    assert "connected" in ann.locator("#connection").inner_text()
    ann.locator("#latency", has_text="ms").wait_for()
    screenshot(ann, "demo-editor")


def test_demo_conflict_card_shows_both_sides_resolves_and_explains(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    owner = crealia_server.token("olga", "p1", "owner")
    status, _ = crealia_server.request(
        "PUT", "/api/projects/p1/strategies", owner, {"strategies": ["manual"]}
    )
    assert status == 200
    ann = demo(pages, crealia_server, "ann")
    bob = demo(pages, crealia_server, "bob")
    # Both retitle the intro from the same version: Bob's comes second and conflicts.
    base = evaluate(ann, "crealiaClient.state.document.versions['clip-intro'].title")
    set_title = (
        "([value, base]) => crealiaClient.sendTimelineChanges([{op: 'set', "
        "element_id: 'clip-intro', prop: 'title', value, base}])"
    )
    evaluate(ann, set_title, ["Cold open", base])
    ack = evaluate(bob, set_title, ["Teaser", base])
    assert ack["status"] == "conflict"
    card = ann.locator(".conflict.pending")
    card.wait_for()
    assert "Cold open" in card.inner_text() and "Teaser" in card.inner_text()
    screenshot(ann, "demo-conflict-card")
    card.get_by_role("button", name="Take incoming").click()
    for page in (ann, bob):
        resolved = page.locator(".conflict.resolved")
        resolved.wait_for()
        assert "Settled by hand" in resolved.locator(".explanation").inner_text()
        assert "confidence 100 %" in resolved.inner_text()
        page.locator("[data-clip=clip-intro] .clip-title", has_text="Teaser").wait_for()
    screenshot(bob, "demo-conflict-resolved")
    # Undo: the value the resolution did not keep comes back, for both.
    bob.locator(".conflict.resolved").get_by_role("button", name="Undo").click()
    for page in (ann, bob):
        page.locator("[data-clip=clip-intro] .clip-title", has_text="Cold open").wait_for()


def test_demo_comments_pin_to_clips_and_viewers_cannot_edit(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    ann = demo(pages, crealia_server, "ann")
    vic = demo(pages, crealia_server, "vic", role="viewer")
    ann.locator("[data-clip=clip-drone]").click()
    ann.fill("#comment-text", "Too long, cut at 6 s")
    ann.fill("#comment-time", "6")
    ann.get_by_role("button", name="Add comment").click()
    comment = vic.locator(".comments li", has_text="Too long, cut at 6 s")
    comment.wait_for()
    assert "on Drone shot" in comment.inner_text() and "at 6.0 s" in comment.inner_text()
    vic.locator("[data-clip=clip-drone] .marks").wait_for()
    # The viewer is told why, and the controls are off.
    assert "viewer" in vic.locator("#readonly").inner_text()
    assert vic.locator("#project-title").is_disabled()
    assert vic.locator("#comment-text").is_disabled()
    assert vic.locator("#go-live-button").is_disabled()
    vic.locator("[data-clip=clip-drone]").focus()
    vic.keyboard.press("ArrowRight")
    assert evaluate(vic, "crealiaClient.state.document.seq") == 2  # the seed and the comment


@pytest.mark.usefixtures("loopback_only")
@pytest.mark.parametrize("mode", ["p2p", "relay"])
def test_demo_live_panel_goes_live_and_a_viewer_watches(
    crealia_server: BrowserServer, pages: Pages, mode: str
) -> None:
    ann = demo(pages, crealia_server, "ann")
    bob = demo(pages, crealia_server, "bob", role="viewer")
    ann.select_option("#live-mode", mode)
    ann.get_by_role("button", name="Go live").click()
    ann.locator("#stage:not([hidden])").wait_for()
    bob.locator(".sessions li", has_text="Ann").get_by_role("button", name="Watch").click()
    bob.wait_for_function("() => document.getElementById('video').videoWidth > 0", timeout=20_000)
    if mode == "relay":
        # The server picks the viewer's rung from the start: its quality_change shows.
        bob.locator("#quality", has_text="quality").wait_for(timeout=20_000)
    screenshot(bob, f"demo-live-{mode}")
    ann.get_by_role("button", name="Stop").click()
    bob.locator("#stage[hidden]").wait_for(state="attached")
    bob.locator(".sessions li", has_text="Nobody is live").wait_for()


def test_landing_says_what_runs_and_mints_a_token_that_opens_the_dashboard(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    page = pages.open(crealia_server.url + "/")
    page.locator("dd[data-key=server]", has_text="crealia").wait_for()
    assert "development" in page.locator("dd[data-key=mode]").inner_text()
    page.locator("[data-probe='/healthz'].good").wait_for()
    for link in ("/openapi.json", "/metrics", "/dashboard", "/security"):
        assert page.locator(f"a[href='{link}']").count() >= 1
    page.fill("#mint-user", "olga")
    page.select_option("#mint-role", "owner")
    page.get_by_role("button", name="Mint token").click()
    screenshot(page, "landing")
    page.locator("#minted").get_by_role("link", name="Open the dashboard").click()
    page.locator("#feed.connected").wait_for()
    assert "#token=" not in page.url  # taken out of the address bar
    assert "olga · owner" in page.locator("header .who").inner_text()


@pytest.mark.crealia_server(
    args=["--metrics-interval", "0.5"],
    env={"CREALIA_ALERT_ACTIVE_USERS_WARNING": "1", "CREALIA_ALERT_HOLD": "0"},
)
def test_dashboard_shows_moving_figures_and_an_alert(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    owner = crealia_server.token("olga", "p1", "owner")
    page = pages.open(crealia_server.page_url("/dashboard", owner))
    page.locator("#feed.connected").wait_for()
    figure = page.locator("[data-metric=websocketConnections] .figure")
    first = figure.inner_text()
    demo(pages, crealia_server, "ann")
    page.wait_for_function(
        "(before) => document.querySelector('[data-metric=websocketConnections] .figure')"
        ".textContent !== before",
        arg=first,
    )
    page.locator("#alerts li[data-rule=active_users]").first.wait_for()
    assert page.locator(".chart svg path.line").count() >= 1
    screenshot(page, "dashboard")
    with page.expect_download() as download:
        page.get_by_role("button", name="Report (CSV)").click()
    assert download.value.suggested_filename.endswith(".csv")


def test_security_lists_audit_events_and_filters_them(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    demo(pages, crealia_server, "ann")  # a join, an edit
    for _ in range(6):  # refused tokens: audited, and an alert
        crealia_server.request("GET", "/api/collaboration/audit?projectId=p1", "forged.token.x")
    owner = crealia_server.token("olga", "p1", "owner")
    page = pages.open(crealia_server.page_url("/security", owner))
    page.locator("#audit tr[data-action=join]").first.wait_for()
    assert page.locator("#audit tr[data-action=edit]").count() >= 1
    page.select_option("#f-action", "edit")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#audit tbody tr').length > 0 && "
                           "[...document.querySelectorAll('#audit tbody tr')]"
                           ".every(r => r.dataset.action === 'edit')")  # fmt: skip
    screenshot(page, "security")
    # GDPR erasure asks for the user id again before it does anything.
    page.fill("#gdpr-user", "ann")
    page.get_by_role("button", name="Erase…").click()
    go = page.get_by_role("button", name="Erase for good")
    assert go.is_disabled()
    page.fill("#erase-typed", "ann")
    go.click()
    page.locator("#gdpr-result", has_text="Erased ann").wait_for()


def test_dashboard_tells_a_non_owner_it_is_for_owners(
    crealia_server: BrowserServer, pages: Pages
) -> None:
    pages.allow(r"HTTP 403: GET .*/api/collaboration/performance/metrics")
    pages.allow(r"status of 403")
    editor = crealia_server.token("ann", "p1", "editor")
    page = pages.open(crealia_server.page_url("/dashboard", editor))
    # An editor's token does not fit: the page asks for an owner's instead.
    page.locator("#token-title").wait_for()
    assert "owner" in page.locator(".token-box").inner_text()
