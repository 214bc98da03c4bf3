"""End-to-end calls: the real LiveKit server, real `livekit.rtc` participants, its webhooks to
the real `web` process, a real worker and beat. Invitation changes are put on the queue as the
listener does; each test asserts the final rows of call_invitations, calls and call_participants."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.calls import call_of, client_set_status, enqueue_change, insert_invitation, invitation
from tests.support.participants import Participant, eventually

pytestmark = pytest.mark.e2e


def participants_of(db, call_id):
    return db.execute("select * from public.call_participants where call_id = %s order by joined_at, participant_sid",
                      (call_id,)).fetchall()


def status_is(db, invitation_id, *statuses):
    return lambda: (lambda r: r if r["status"] in statuses else None)(invitation(db, invitation_id))


def call_status_is(db, invitation_id, *statuses):
    return lambda: (lambda r: r if r and r["status"] in statuses else None)(call_of(db, invitation_id))


async def ring(db, database_url, livekit, caller, callee, room=None, join_caller=True, call_type="video"):
    inv = insert_invitation(database_url, caller, callee, room=room, call_type=call_type)
    enqueue_change(inv["id"], "pending")
    await eventually(status_is(db, inv["id"], "ringing"), what="ringing")
    caller_p = await Participant(livekit.url, caller, inv["room_name"]).join() if join_caller else None
    return inv, caller_p


def test_answered_call_later_hung_up(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee = make_user("Ana"), make_user("Bo")
        inv, a = await ring(db, database_url, livekit, caller, callee)
        b = await Participant(livekit.url, callee, inv["room_name"]).join()  # answering = joining
        accepted = await eventually(status_is(db, inv["id"], "accepted"), what="answered by joining")
        assert accepted["end_reason"] == "answered" and accepted["answered_at"] is not None
        await eventually(call_status_is(db, inv["id"], "active"), what="call active")
        await asyncio.sleep(2.2)
        await b.leave()  # the callee hangs up; after the grace period the caller is released
        await eventually(lambda: a.disconnected.is_set(), timeout=20, what="caller released")
        call = await eventually(call_status_is(db, inv["id"], "completed"), what="call completed")
        assert call["end_reason"] == "hangup" and call["started_at"] is not None
        assert call["duration_seconds"] >= 2 and call["ended_at"] > call["started_at"]
        rows = await eventually(lambda: (lambda rs: rs if len(rs) == 2 and all(r["left_at"] for r in rs) else None)(
            participants_of(db, call["id"])), what="both sessions closed")
        assert {r["identity"] for r in rows} == {caller, callee}
        assert all(r["joined_at"] <= r["left_at"] for r in rows)
        assert invitation(db, inv["id"])["status"] == "accepted"

    asyncio.run(scenario())


def test_missed_call(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, caller, callee)
        missed = await eventually(status_is(db, inv["id"], "missed"), timeout=15, what="missed")
        assert missed["end_reason"] == "timeout"
        call = await eventually(call_status_is(db, inv["id"], "missed"), what="call missed")
        assert call["duration_seconds"] == 0 and call["started_at"] is None
        await eventually(lambda: a.disconnected.is_set(), what="caller released")
        await eventually(lambda: participants_of(db, call["id"]) and all(r["left_at"] for r in participants_of(db, call["id"])),
                         what="caller session recorded")
        assert [r["identity"] for r in participants_of(db, call["id"])] == [caller]
        assert db.execute("select count(*) as n from public.notifications where invitation_id = %s",
                          (inv["id"],)).fetchone()["n"] == 1

    asyncio.run(scenario())


def test_declined_call(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, caller, callee)
        client_set_status(database_url, callee, inv["id"], "declined")
        enqueue_change(inv["id"], "declined")
        call = await eventually(call_status_is(db, inv["id"], "declined"), what="call declined")
        assert call["end_reason"] == "declined"
        await eventually(lambda: a.disconnected.is_set(), what="caller released")
        assert invitation(db, inv["id"])["end_reason"] == "declined"

    asyncio.run(scenario())


def test_caller_gives_up(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, caller, callee)
        await asyncio.sleep(0.5)
        await a.leave()  # hangs up before an answer; cancelled once the grace period is over
        cancelled = await eventually(status_is(db, inv["id"], "cancelled"), timeout=15, what="cancelled")
        assert cancelled["end_reason"] == "caller_cancelled"
        call = await eventually(call_status_is(db, inv["id"], "cancelled"), what="call cancelled")
        assert call["end_reason"] == "caller_cancelled"

    asyncio.run(scenario())


def test_caller_who_comes_back_within_the_grace_period_keeps_ringing(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee = make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, caller, callee)
        await a.leave()
        a2 = await Participant(livekit.url, caller, inv["room_name"]).join()
        await asyncio.sleep(2.5)  # past the 1.5 s grace period
        assert invitation(db, inv["id"])["status"] == "ringing"
        await eventually(status_is(db, inv["id"], "missed"), timeout=15, what="missed at the deadline")
        await eventually(lambda: a2.disconnected.is_set(), what="caller released")

    asyncio.run(scenario())


def test_busy_callee(db, database_url, make_user, livekit):
    async def scenario():
        alice, bob, carol = make_user(), make_user(), make_user()
        first, a = await ring(db, database_url, livekit, alice, bob)
        b = await Participant(livekit.url, bob, first["room_name"]).join()
        await eventually(call_status_is(db, first["id"], "active"), what="first call active")
        second, c = await ring_or_end(db, database_url, livekit, carol, bob)
        busy = await eventually(status_is(db, second["id"], "busy"), what="busy")
        assert busy["end_reason"] == "callee_busy"
        call = await eventually(call_status_is(db, second["id"], "busy"), what="call busy")
        assert call["end_reason"] == "callee_busy"
        await eventually(lambda: c.disconnected.is_set(), what="busy caller released")
        await a.leave()
        await b.leave()

    async def ring_or_end(db, database_url, livekit, caller, callee):
        inv = insert_invitation(database_url, caller, callee)
        c = await Participant(livekit.url, caller, inv["room_name"]).join()
        enqueue_change(inv["id"], "pending")
        return inv, c

    asyncio.run(scenario())


def test_group_call_one_answers_one_misses(db, database_url, make_user, livekit):
    async def scenario():
        caller, bob, carol = make_user(), make_user(), make_user()
        room = f"group-{caller[:8]}"
        to_bob, a = await ring(db, database_url, livekit, caller, bob, room=room)
        to_carol = insert_invitation(database_url, caller, carol, room=room, call_type="audio")
        enqueue_change(to_carol["id"], "pending")
        await eventually(status_is(db, to_carol["id"], "ringing"), what="carol ringing")
        b = await Participant(livekit.url, bob, room).join()
        await eventually(status_is(db, to_bob["id"], "accepted"), what="bob answered")
        await eventually(call_status_is(db, to_bob["id"], "active"), what="call active")
        assert invitation(db, to_carol["id"])["status"] == "ringing"  # one answer does not stop the others
        missed = await eventually(status_is(db, to_carol["id"], "missed"), timeout=15, what="carol missed")
        assert missed["end_reason"] == "timeout"
        assert call_of(db, to_bob["id"])["status"] == "active"
        await b.leave()
        await asyncio.sleep(2.5)
        assert call_of(db, to_bob["id"])["status"] == "active"  # a group call ends only when the room finishes
        await a.leave()
        call = await eventually(call_status_is(db, to_bob["id"], "completed"), timeout=30, what="group call completed")
        assert call["end_reason"] == "hangup" and call["call_type"] == "video"
        assert call_of(db, to_carol["id"])["id"] == call["id"]
        assert {r["identity"] for r in participants_of(db, call["id"])} == {caller, bob}
        assert db.execute("select count(*) as n from public.notifications where invitation_id = %s",
                          (to_carol["id"],)).fetchone()["n"] == 1

    asyncio.run(scenario())


def test_stranger_joining_a_finished_room_is_removed(db, database_url, make_user, livekit):
    async def scenario():
        caller, callee, stranger = make_user(), make_user(), make_user()
        inv, a = await ring(db, database_url, livekit, caller, callee)
        client_set_status(database_url, callee, inv["id"], "declined")
        enqueue_change(inv["id"], "declined")
        await eventually(call_status_is(db, inv["id"], "declined"), what="call over")
        await eventually(lambda: a.disconnected.is_set(), what="caller released")
        # joinedAt has second resolution and a call's lifetime gets a second of slack either side:
        # join well after that.
        await asyncio.sleep(2.5)
        s = await Participant(livekit.url, stranger, inv["room_name"]).join()  # a stale token
        await eventually(lambda: s.disconnected.is_set(), timeout=15, what="stranger removed")
        event = db.execute("""select * from public.call_events where room_name = %s and type = 'participant_joined'
                               and payload->'participant'->>'identity' = %s""", (inv["room_name"], stranger)).fetchone()
        assert event is not None

    asyncio.run(scenario())
