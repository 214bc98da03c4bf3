"""End-to-end lifecycle flows the contract asks for (CONTRACT.md: "calls", "Invitation state
machine", "Rooms and who may be in them", "Glare").

The whole stack runs: the real LiveKit server (its webhooks to the real `web` process), a real
worker and beat, with the run's timings (tests/conftest.py TEST_ENV: ring timeout 4 s, grace 1.5 s,
sweep every 0.5 s). Clients are real `livekit.rtc` participants; invitations are inserted and
moved as a client (RLS), and their changes put on the queue as the listener would (or, where the
flow is about a lost message, not at all). Each test asserts the rows it ends with.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from livekit import rtc

from tests.support.calls import call_of, client_set_status, enqueue_change, hold_back_from_catch_up, insert_invitation, invitation
from tests.support.flows import (
    Phone,
    calls_in_room,
    delete_room,
    events_of,
    identities_in_room,
    mark_change_taken,
    notifications_of,
    room_sid,
    session,
    sessions_of,
    user_access_token,
)
from tests.support.participants import eventually

pytestmark = pytest.mark.e2e

RING_TIMEOUT, GRACE, SWEEP = 4.0, 1.5, 0.5  # tests/conftest.py TEST_ENV
OPEN = ("pending", "ringing")
LIVE = ("ringing", "active")


# ---- small helpers ---------------------------------------------------------------------------------

def new_room(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def status_is(db, invitation_id, *statuses):
    return lambda: (lambda r: r if r["status"] in statuses else None)(invitation(db, invitation_id))


def left_open(db, invitation_id):
    """The invitation once it is neither pending nor ringing (whatever it became)."""
    return lambda: (lambda r: r if r["status"] not in OPEN else None)(invitation(db, invitation_id))


def call_status_is(db, invitation_id, *statuses):
    return lambda: (lambda r: r if r and r["status"] in statuses else None)(call_of(db, invitation_id))


def call_row(db, call_id):
    return db.execute("select * from public.calls where id = %s", (call_id,)).fetchone()


def call_row_is(db, call_id, *statuses):
    return lambda: (lambda r: r if r and r["status"] in statuses else None)(call_row(db, call_id))


def invite(database_url, caller, callee, room=None, call_type="video", enqueue=True):
    inv = insert_invitation(database_url, caller, callee, room=room, call_type=call_type)
    if enqueue:
        enqueue_change(inv["id"], "pending")
    return inv


async def ring(db, database_url, livekit, caller, callee, room=None, join_caller=True, call_type="video"):
    inv = invite(database_url, caller, callee, room=room, call_type=call_type)
    await eventually(status_is(db, inv["id"], "ringing"), what=f"invitation {inv['id']} ringing")
    caller_p = await Phone(livekit.url, caller, inv["room_name"]).join() if join_caller else None
    return inv, caller_p


async def row_of_session(db, phone: Phone, what: str):
    return await eventually(lambda: session(db, phone.sid), what=f"session row of {what}")


async def seconds_since_ringing(db, invitation_id) -> float:
    return db.execute("select extract(epoch from now() - ringing_at)::float8 as s from public.call_invitations"
                      " where id = %s", (invitation_id,)).fetchone()["s"]


async def leave_all(*phones):
    for p in phones:
        if p is not None and p.connected:
            await p.leave()


# ---- 1. redial in the same room -----------------------------------------------------------------

def test_redial_in_the_same_room_is_a_new_call(db, database_url, make_user, livekit):
    """A missed call, then at once a redial in the same room name: a second call with its own
    participants and times; the first is left as it ended."""

    async def scenario():
        ana, bo, cy = make_user("Ana"), make_user("Bo"), make_user("Cy")
        room = new_room("redial")

        first, a1 = await ring(db, database_url, livekit, ana, bo, room=room)
        a1_sid = a1.sid
        missed = await eventually(status_is(db, first["id"], "missed"), timeout=15, what="first invitation missed")
        assert missed["end_reason"] == "timeout"
        call1 = await eventually(call_status_is(db, first["id"], "missed"), what="first call missed")
        assert call1["started_at"] is None and call1["duration_seconds"] == 0 and call1["ended_at"] is not None
        await eventually(lambda: a1.disconnected.is_set(), what="caller removed as the first call's room is deleted")
        assert not a1.left_by_itself

        # Right away, the same caller calls the same callee in the same room name.
        second, a2 = await ring(db, database_url, livekit, ana, bo, room=room)
        b = await Phone(livekit.url, bo, room).join()  # answers by joining
        answered = await eventually(status_is(db, second["id"], "accepted"), what="second invitation answered")
        assert answered["end_reason"] == "answered"
        call2 = await eventually(call_status_is(db, second["id"], "active"), what="second call active")
        assert str(call2["id"]) != str(call1["id"]), "the redial was filed under the missed call"
        live_sid = await room_sid(livekit, room)
        assert live_sid is not None
        await eventually(lambda: call_row(db, call2["id"])["livekit_room_sid"] == live_sid,
                         what=f"second call on the room LiveKit serves now ({live_sid})")

        await asyncio.sleep(2.2)  # they talk
        await b.leave()
        await a2.leave()
        call2 = await eventually(call_row_is(db, call2["id"], "completed"), timeout=15, what="second call completed")
        assert call2["end_reason"] == "hangup"
        assert call2["started_at"] is not None and call2["livekit_room_sid"]
        assert call2["duration_seconds"] >= 1

        rows = calls_in_room(db, room)
        assert [str(r["id"]) for r in rows] == [str(call1["id"]), str(call2["id"])], rows
        assert not [r for r in rows if r["status"] in LIVE], "a call of the room is still ringing or active"

        # The first call is as it ended: nothing of the second call's events touched it.
        after = call_row(db, call1["id"])
        assert after["status"] == "missed" and after["started_at"] is None and after["duration_seconds"] == 0
        # Its end may be refined by its own room_finished (LiveKit's createdAt, whole seconds), never
        # moved by the second call.
        assert call1["ended_at"] - timedelta(seconds=1) < after["ended_at"] <= call1["ended_at"], (
            f"first call's ended_at moved from {call1['ended_at']} to {after['ended_at']}")
        first_sessions = await eventually(
            lambda: (lambda rs: rs if rs and all(r["left_at"] for r in rs) else None)(sessions_of(db, call1["id"])),
            what="first call's sessions closed")
        assert [(r["identity"], r["participant_sid"]) for r in first_sessions] == [(ana, a1_sid)]
        second_sessions = await eventually(
            lambda: (lambda rs: rs if len(rs) == 2 and all(r["left_at"] for r in rs) else None)(
                sessions_of(db, call2["id"])), what="second call's two sessions closed")
        assert {r["participant_sid"] for r in second_sessions} == {a2.sid, b.sid}
        assert {r["identity"] for r in second_sessions} == {ana, bo}

        # Bo is free again: a new call to him rings.
        third = invite(database_url, cy, bo)
        rung = await eventually(status_is(db, third["id"], "ringing", "busy", "failed"), what="third invitation taken")
        assert rung["status"] == "ringing", f"Bo is {rung['status']} ({rung['end_reason']}) after his call ended"
        client_set_status(database_url, cy, third["id"], "cancelled")
        enqueue_change(third["id"], "cancelled")

    asyncio.run(scenario())


# ---- 2. a client's transition whose change was lost --------------------------------------------

# The listener took the client's change (its dedupe mark is set, so the beat's catch-up will not
# enqueue it again) and the task was lost: only the sweep can notice.

def test_lost_accept_is_recovered_by_the_sweep(db, database_url, make_user, livekit, redis_client):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, ana, bo)
        mark_change_taken(redis_client, inv["id"], "accepted")
        client_set_status(database_url, bo, inv["id"], "accepted")  # answered by a button ...
        # ... and the listener's message is lost: nothing is enqueued.
        call = await eventually(call_status_is(db, inv["id"], "active"), timeout=8,
                                what="call active after the lost accept")
        assert call["end_reason"] is None
        events = await eventually(lambda: events_of(db, inv["id"], "transition_recovered"), timeout=5,
                                  what="transition_recovered event")
        assert len(events) == 1 and events[0]["source"] == "sweep"
        row = invitation(db, inv["id"])
        assert row["status"] == "accepted" and row["end_reason"] == "answered"
        await a.leave()

    asyncio.run(scenario())


def test_lost_cancel_is_recovered_by_the_sweep(db, database_url, make_user, livekit, redis_client):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, _ = await ring(db, database_url, livekit, ana, bo, join_caller=False)
        # Let it ring at least 3 s (so a missed-call email is due), but cancel well before the 4 s deadline.
        await asyncio.sleep(max(0.0, 3.3 - await seconds_since_ringing(db, inv["id"])))
        mark_change_taken(redis_client, inv["id"], "cancelled")
        client_set_status(database_url, ana, inv["id"], "cancelled")  # no change enqueued: lost
        row = invitation(db, inv["id"])
        assert row["status"] == "cancelled" and row["end_reason"] == "caller_cancelled"
        assert (row["ended_at"] - row["ringing_at"]).total_seconds() >= 3, "harness: cancelled too early"
        call = await eventually(call_status_is(db, inv["id"], "cancelled", "missed", "completed"), timeout=8,
                                what="call ended after the lost cancel")
        assert call["status"] == "cancelled" and call["end_reason"] == "caller_cancelled", call
        await eventually(lambda: notifications_of(db, inv["id"]), timeout=5, what="missed-call email row")
        await asyncio.sleep(2 * SWEEP + 0.5)  # later sweeps must not add another
        rows = notifications_of(db, inv["id"])
        assert len(rows) == 1 and rows[0]["kind"] == "missed_call" and str(rows[0]["recipient_id"]) == bo
        events = events_of(db, inv["id"], "transition_recovered")
        assert len(events) == 1 and events[0]["source"] == "sweep", f"transition_recovered events: {events}"

    asyncio.run(scenario())


# ---- 3. glare ----------------------------------------------------------------------------------------

def test_glare_two_users_calling_each_other_get_one_call(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo = make_user("Ana"), make_user("Bo")
        r1, r2 = new_room("glare1"), new_room("glare2")
        earlier = invite(database_url, ana, bo, room=r1)
        later = invite(database_url, bo, ana, room=r2)  # while the first is still pending or ringing
        rows = {str(r["id"]): r for r in map(lambda i: invitation(db, i["id"]), (earlier, later))}
        assert (rows[earlier["id"]]["created_at"], earlier["id"]) < (rows[later["id"]]["created_at"], later["id"])

        lost = await eventually(left_open(db, later["id"]), timeout=10, what="the later invitation ended")
        assert (lost["status"], lost["end_reason"]) == ("cancelled", "glare"), lost
        won = await eventually(left_open(db, earlier["id"]), timeout=10, what="the earlier invitation ended")
        assert (won["status"], won["end_reason"]) == ("accepted", "answered"), won
        glare_events = db.execute(
            "select * from public.call_events where type = 'glare' and (invitation_id in (%s, %s)"
            " or room_name in (%s, %s))", (earlier["id"], later["id"], r1, r2)).fetchall()
        assert glare_events, "no call_events row of type glare"
        call = await eventually(call_status_is(db, earlier["id"], "active"), what="the earlier invitation's call active")

        # Both clients join the earlier one's room, and stay.
        a = await Phone(livekit.url, ana, r1).join()
        b = await Phone(livekit.url, bo, r1).join()
        await asyncio.sleep(GRACE + 2.0)  # removal of non-parties is "within a couple of seconds"
        assert a.connected and b.connected, (a.reason_name, b.reason_name)
        assert sorted(await identities_in_room(livekit, r1)) == sorted([ana, bo])
        assert call_row(db, call["id"])["status"] == "active"
        assert not notifications_of(db, later["id"]), "a missed-call email for the glare invitation"
        await leave_all(b, a)
        done = await eventually(call_row_is(db, call["id"], "completed"), timeout=15, what="call completed")
        assert done["started_at"] is not None

    asyncio.run(scenario())


def test_glare_in_the_same_room_keeps_the_call_one_to_one(db, database_url, make_user, livekit):
    """(extra) Two invitations between the same two users in one room are still a 1:1 call: one side
    leaving for longer than the grace period hangs it up."""

    async def scenario():
        ana, bo = make_user(), make_user()
        room = new_room("glare-same")
        earlier = invite(database_url, ana, bo, room=room)
        later = invite(database_url, bo, ana, room=room)
        lost = await eventually(left_open(db, later["id"]), timeout=10, what="the later invitation ended")
        assert (lost["status"], lost["end_reason"]) == ("cancelled", "glare"), lost
        call = await eventually(call_status_is(db, earlier["id"], "active"), what="call active")
        a = await Phone(livekit.url, ana, room).join()
        b = await Phone(livekit.url, bo, room).join()
        await eventually(lambda: len(sessions_of(db, call["id"])) == 2, what="both sessions recorded")
        await asyncio.sleep(1.0)
        await b.leave()
        await eventually(lambda: a.disconnected.is_set(), timeout=GRACE + 5, what="Ana released: a 1:1 call ends")
        done = await eventually(call_row_is(db, call["id"], "completed"), what="call completed")
        assert done["end_reason"] == "hangup"

    asyncio.run(scenario())


# ---- 4. the same identity from another device --------------------------------------------------

def test_moving_a_call_to_another_device_does_not_end_it(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, ana, bo)
        b1 = await Phone(livekit.url, bo, inv["room_name"]).join()
        call = await eventually(call_status_is(db, inv["id"], "active"), what="call active")
        await row_of_session(db, b1, "Bo's first device")

        b2 = await Phone(livekit.url, bo, inv["room_name"]).join()  # the same identity, another device
        await eventually(lambda: b1.disconnected.is_set(), what="first device disconnected by LiveKit")
        assert b1.reason_name == "DUPLICATE_IDENTITY", b1.reason_name
        await row_of_session(db, b2, "Bo's second device")
        await asyncio.sleep(GRACE + 1.5)

        assert call_row(db, call["id"])["status"] == "active", call_row(db, call["id"])
        assert session(db, b2.sid)["left_at"] is None
        assert a.connected, f"Ana was disconnected ({a.reason_name})"
        assert b2.connected, f"Bo's second device was disconnected ({b2.reason_name})"

        await b2.leave()
        await a.leave()
        done = await eventually(call_row_is(db, call["id"], "completed"), timeout=15, what="call completed")
        assert done["end_reason"] == "hangup" and done["started_at"] is not None
        sessions = sessions_of(db, call["id"])
        assert {r["participant_sid"] for r in sessions} == {a.sid, b1.sid, b2.sid}

    asyncio.run(scenario())


# ---- 5. a 1:1 call ends when one side leaves for good -------------------------------------------

def test_one_to_one_call_ends_when_the_callee_leaves_for_good(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, ana, bo)
        b = await Phone(livekit.url, bo, inv["room_name"]).join()
        call = await eventually(call_status_is(db, inv["id"], "active"), what="call active")
        await eventually(lambda: len(sessions_of(db, call["id"])) == 2, what="both sessions recorded")
        await asyncio.sleep(1.0)
        await b.leave()
        left = time.monotonic()
        await asyncio.sleep(GRACE / 2)
        assert a.connected and call_row(db, call["id"])["status"] == "active", "ended within the grace period"
        await eventually(lambda: a.disconnected.is_set(), timeout=GRACE + 5, what="Ana disconnected by the server")
        assert not a.left_by_itself
        assert a.reason_name in ("ROOM_DELETED", "PARTICIPANT_REMOVED"), a.reason_name
        assert time.monotonic() - left >= GRACE - 0.2
        done = await eventually(call_row_is(db, call["id"], "completed"), what="call completed")
        assert done["end_reason"] == "hangup" and done["started_at"] is not None
        assert await room_sid(livekit, inv["room_name"]) is None, "the room was not deleted"

    asyncio.run(scenario())


# ---- 6. answered by a button, never joined -------------------------------------------------------

def test_accepted_call_nobody_joins_ends_completed_with_no_duration(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, _ = await ring(db, database_url, livekit, ana, bo, join_caller=False)
        client_set_status(database_url, bo, inv["id"], "accepted")
        answered = time.monotonic()
        enqueue_change(inv["id"], "accepted")
        call = await eventually(call_status_is(db, inv["id"], "active", "completed"), what="call answered")
        assert call["status"] == "active", call
        done = await eventually(call_row_is(db, call["id"], "completed", "missed", "declined", "cancelled", "busy",
                                            "failed"), timeout=RING_TIMEOUT + 6, what="the unjoined call ended")
        ended_after = time.monotonic() - answered
        assert done["status"] == "completed", done
        assert done["duration_seconds"] == 0 and done["started_at"] is None, done
        assert ended_after >= RING_TIMEOUT - 0.5, f"ended {ended_after:.1f} s after the answer"
        assert done["end_reason"] == "hangup", done
        assert sessions_of(db, call["id"]) == []

    asyncio.run(scenario())


# ---- 7. group call: the caller leaves for good ---------------------------------------------------

def test_group_call_caller_leaving_for_good_stops_the_ringing(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo, cy = make_user(), make_user(), make_user()
        room = new_room("group")
        to_bo, a = await ring(db, database_url, livekit, ana, bo, room=room)
        b = await Phone(livekit.url, bo, room).join()
        await eventually(status_is(db, to_bo["id"], "accepted"), what="Bo answered by joining")
        await eventually(call_status_is(db, to_bo["id"], "active"), what="call active")
        # Cy is invited into the same call last, so that her 4 s of ringing outlast Ana's grace period.
        to_cy = invite(database_url, ana, cy, room=room, call_type="audio")
        await eventually(status_is(db, to_cy["id"], "ringing"), what="Cy ringing")
        assert str(call_of(db, to_cy["id"])["id"]) == str(call_of(db, to_bo["id"])["id"])
        await a.leave()  # for good
        left = time.monotonic()
        ended = await eventually(left_open(db, to_cy["id"]), timeout=GRACE + 3, what="Cy no longer ringing")
        took = time.monotonic() - left
        assert (ended["status"], ended["end_reason"]) == ("cancelled", "caller_cancelled"), (ended, f"{took:.1f} s")
        assert invitation(db, to_bo["id"])["status"] == "accepted"
        await leave_all(b)

    asyncio.run(scenario())


# ---- 8. the call keeps the invitation's reason --------------------------------------------------

def test_room_closed_while_ringing_ends_the_call_room_closed(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, ana, bo)
        await row_of_session(db, a, "the caller")
        await delete_room(livekit, inv["room_name"])
        ended = await eventually(left_open(db, inv["id"]), timeout=RING_TIMEOUT + 4, what="invitation ended")
        assert (ended["status"], ended["end_reason"]) == ("cancelled", "room_closed"), ended
        call = await eventually(call_status_is(db, inv["id"], "cancelled", "missed", "completed", "failed"),
                                what="call ended")
        assert (call["status"], call["end_reason"]) == ("cancelled", "room_closed"), call
        await eventually(lambda: a.disconnected.is_set(), what="caller out of the deleted room")

    asyncio.run(scenario())


# ---- 9. an answer the worker has not linked yet -------------------------------------------------

def test_accepted_invitation_not_yet_linked_to_a_call_gets_join_tokens(db, database_url, make_user, livekit, web):
    async def scenario():
        ana, bo = make_user("Ana"), make_user("Bo")
        inv = invite(database_url, ana, bo, enqueue=False)  # the worker has not seen it yet
        # Nor will it until the test hands it on: the beat's catch-up (every 5 s) skips a change
        # whose dedupe mark is set, as it does one the listener listed already.
        hold_back_from_catch_up(inv["id"], "pending", "accepted")
        client_set_status(database_url, bo, inv["id"], "accepted")  # answered before it rang
        async with httpx.AsyncClient(base_url=web, timeout=10) as http:
            bo_resp = await http.post("/api/livekit/token", content=json.dumps({"invitation_id": inv["id"]}),
                                      headers={"Authorization": f"Bearer {user_access_token(bo)}"})
            ana_resp = await http.post("/api/livekit/token", content=json.dumps({"room_name": inv["room_name"]}),
                                       headers={"Authorization": f"Bearer {user_access_token(ana)}"})
        row = invitation(db, inv["id"])
        assert row["status"] == "accepted" and row["call_id"] is None, "harness: the answer was linked already"
        assert bo_resp.status_code == 200, f"callee: {bo_resp.status_code} {bo_resp.text}"
        assert ana_resp.status_code == 200, f"caller: {ana_resp.status_code} {ana_resp.text}"
        assert bo_resp.json()["identity"] == bo and ana_resp.json()["identity"] == ana

        # The tokens work, and both may stay while the worker catches up with the answer.
        enqueue_change(inv["id"], "accepted")
        rooms = []
        for data in (ana_resp.json(), bo_resp.json()):
            room = rtc.Room()
            await asyncio.wait_for(room.connect(livekit.url, data["token"]), 20)
            rooms.append(room)
        call = await eventually(call_status_is(db, inv["id"], "active"), what="call active")
        await asyncio.sleep(GRACE + 1.5)
        assert all(r.isconnected() for r in rooms), "a party was removed from the room"
        assert sorted(await identities_in_room(livekit, inv["room_name"])) == sorted([ana, bo])
        for r in rooms:
            await r.disconnect()
        await eventually(call_row_is(db, call["id"], "completed"), timeout=15, what="call completed")

    asyncio.run(scenario())
