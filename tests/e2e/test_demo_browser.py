"""The `/demo` page in a real Chromium (Debian's, driven by Playwright) against the whole stack.

Two or three pages, each a signed-in user with a fake camera and microphone: a call rings,
is answered, both sides decode each other's video, one hangs up and both histories show the
`calls` row; a decline, a missed call, and a stranger who cannot join.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.calls import invitation, wait_call, wait_invitation

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
BUNDLE = Path(__file__).resolve().parents[2] / "web" / "demo" / "dist" / "demo.js"

WATCH_INCOMING = """() => new MutationObserver((_, observer) => {
    if (document.querySelector('[data-testid=incoming-call]')) { window.incomingShownAt = Date.now(); observer.disconnect(); }
}).observe(document.body, { childList: true, subtree: true })"""

PLAYING_VIDEO = """() => [...document.querySelectorAll('video.remote')].some(
    v => v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 10 && !v.paused)"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert BUNDLE.is_file(), "the demo bundle is not built: make setup (or cd web/demo && npm ci && npm run build)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--no-sandbox",
            "--autoplay-policy=no-user-gesture-required"])
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, web):
    contexts = []

    def open_as(user_id: str):
        context = browser.new_context(permissions=["camera", "microphone"], viewport={"width": 1100, "height": 760})
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{web}/demo?user={user_id}")
        page.get_by_test_id("whoami").filter(has_text="signed in as").wait_for(timeout=10_000)
        page.wait_for_function("() => window.callflowDemo.events && window.callflowDemo.events.readyState === 1")
        return page

    yield open_as
    for context in contexts:
        context.close()


def call_from(page, callee_id: str, kind: str = "video") -> None:
    page.get_by_test_id("callee").fill(callee_id)
    page.get_by_test_id(f"call-{kind}").click()


def test_a_whole_call_between_two_browsers(open_page, db, make_user):
    alice, bob = make_user("Alice Browser"), make_user("Bob Browser")
    alice_page, bob_page = open_page(alice), open_page(bob)

    bob_page.evaluate(WATCH_INCOMING)
    call_from(alice_page, bob)
    incoming = bob_page.get_by_test_id("incoming-call")
    incoming.wait_for(timeout=5_000)
    assert "Alice Browser is calling" in incoming.inner_text()
    invitation_id = incoming.get_attribute("data-invitation-id")
    # the insert's time (the database's now(), same host clock) to the moment bob's page showed it
    inserted_ms = invitation(db, invitation_id)["created_at"].timestamp() * 1000
    shown_after = (bob_page.evaluate("() => window.incomingShownAt") - inserted_ms) / 1000
    assert 0 <= shown_after < 1.0, f"bob's page showed the incoming call {shown_after:.3f} s after the insert"
    print(f"incoming call shown {shown_after * 1000:.0f} ms after the insert")

    bob_page.get_by_test_id("accept").click()
    for page in (alice_page, bob_page):  # each decodes the other's camera: frames, not just a track object
        page.wait_for_function(PLAYING_VIDEO, timeout=20_000)
    identities = {p: p.eval_on_selector("video.remote", "v => v.dataset.identity") for p in (alice_page, bob_page)}
    assert identities == {alice_page: bob, bob_page: alice}
    wait_call(db, invitation_id, "active")
    ARTIFACTS.mkdir(exist_ok=True)
    alice_page.screenshot(path=str(ARTIFACTS / "call-in-progress-alice.png"))
    bob_page.screenshot(path=str(ARTIFACTS / "call-in-progress-bob.png"))

    time.sleep(2)  # a call that lasts
    alice_page.get_by_test_id("hang-up").click()
    call = wait_call(db, invitation_id, "completed", timeout=20)
    assert call["duration_seconds"] >= 2
    for page in (alice_page, bob_page):
        row = page.locator(f"[data-testid=history-row][data-call-id='{call['id']}'][data-status=completed]")
        row.wait_for(timeout=10_000)
        assert row.get_attribute("data-duration") == str(call["duration_seconds"])
        assert f"{call['duration_seconds']} s" in row.inner_text()
    bob_page.get_by_test_id("status").filter(has_text="Call ended").wait_for(timeout=10_000)
    alice_page.screenshot(path=str(ARTIFACTS / "call-ended-alice.png"))


def test_bob_declines_and_alice_sees_it(open_page, db, make_user):
    alice, bob = make_user("Alice Decline"), make_user("Bob Decline")
    alice_page, bob_page = open_page(alice), open_page(bob)
    call_from(alice_page, bob, "audio")
    bob_page.get_by_test_id("incoming-call").wait_for(timeout=5_000)
    invitation_id = bob_page.get_by_test_id("incoming-call").get_attribute("data-invitation-id")
    bob_page.get_by_test_id("decline").click()
    try:
        alice_page.get_by_test_id("status").filter(has_text="declined").wait_for(timeout=5_000)
    except Exception as timed_out:  # what the page said instead, and what the database says
        ARTIFACTS.mkdir(exist_ok=True)
        alice_page.screenshot(path=str(ARTIFACTS / "declined-alice-failed.png"))
        raise AssertionError(f"alice's page says {alice_page.get_by_test_id('status').inner_text()!r}; the invitation "
                             f"is {invitation(db, invitation_id)['status']!r}") from timed_out
    assert wait_invitation(db, invitation_id, "declined")["end_reason"] == "declined"
    bob_page.get_by_test_id("incoming-call").wait_for(state="detached", timeout=5_000)
    alice_page.locator("[data-testid=history-row][data-status=declined]").wait_for(timeout=15_000)


def test_nobody_answers_and_the_call_is_missed(open_page, db, make_user):
    alice, bob = make_user("Alice Missed"), make_user("Bob Missed")
    alice_page, bob_page = open_page(alice), open_page(bob)
    call_from(alice_page, bob)
    bob_page.get_by_test_id("incoming-call").wait_for(timeout=5_000)
    invitation_id = bob_page.get_by_test_id("incoming-call").get_attribute("data-invitation-id")
    # CALLFLOW_RING_TIMEOUT_SECONDS is 4 in tests
    alice_page.get_by_test_id("status").filter(has_text="missed").wait_for(timeout=15_000)
    wait_invitation(db, invitation_id, "missed")
    bob_page.get_by_test_id("incoming-call").wait_for(state="detached", timeout=5_000)
    for page in (alice_page, bob_page):
        page.locator("[data-testid=history-row][data-status=missed]").wait_for(timeout=15_000)


def test_a_stranger_cannot_join_the_room(open_page, db, livekit, make_user):
    alice, bob, mallory = make_user("Alice Room"), make_user("Bob Room"), make_user("Mallory")
    alice_page, bob_page, mallory_page = open_page(alice), open_page(bob), open_page(mallory)
    call_from(alice_page, bob)
    incoming = bob_page.get_by_test_id("incoming-call")
    incoming.wait_for(timeout=5_000)
    invitation_id = incoming.get_attribute("data-invitation-id")
    alice_page.get_by_test_id("room-name").filter(has_text="call-").wait_for(timeout=10_000)  # alice is in the room
    room_name = alice_page.get_by_test_id("room-name").inner_text()
    mallory_page.get_by_test_id("room-to-join").fill(room_name)
    mallory_page.get_by_test_id("join-room").click()
    mallory_page.get_by_test_id("status").filter(has_text="Cannot join").wait_for(timeout=5_000)
    assert mallory_page.evaluate("() => window.callflowDemo.room") is None
    alice_page.get_by_test_id("hang-up").click()  # still ringing: cancels bob's invitation
    incoming.wait_for(state="detached", timeout=5_000)
    assert wait_invitation(db, invitation_id, "cancelled")["end_reason"] == "caller_cancelled"
