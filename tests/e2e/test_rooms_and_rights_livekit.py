"""Who may stay in a room, with real `livekit.rtc` participants holding valid LiveKit tokens.

Anyone who is not one of the room's parties is removed by the worker within a couple of seconds
of joining, every time they join; the join and the removal are both in `call_events`. Tokens here
are minted by hand (a stale token, a token for a reused name): the token route would refuse them.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import api

from tests.support.calls import call_of, client_set_status, enqueue_change, insert_invitation, invitation
from tests.support.flows import Phone, participants_in_room
from tests.support.participants import eventually

pytestmark = pytest.mark.e2e

REMOVAL_WITHIN = 2.0


def status_is(db, invitation_id, *statuses):
    return lambda: (lambda r: r if r["status"] in statuses else None)(invitation(db, invitation_id))


def removals(db, room_name, identity):
    return db.execute("""select * from public.call_events where type = 'participant_removed' and room_name = %s
                           and payload->>'identity' = %s order by id""", (room_name, identity)).fetchall()


def joins(db, room_name, identity):
    return db.execute("""select * from public.call_events where type = 'participant_joined' and room_name = %s
                           and payload->'participant'->>'identity' = %s order by id""", (room_name, identity)).fetchall()


async def removed_in_time(livekit, phone: Phone) -> float:
    """Seconds from LiveKit admitting the participant (ACTIVE: its media connected, when LiveKit sends
    `participant_joined`) until LiveKit no longer lists it (the server's word: the SDK may take
    longer to notice, trying to reconnect first). Under load the SDK's own connection can take
    longer than the removal (its log: "wait_pc_connection timed out, retrying"): that is not counted.
    One that LiveKit drops before admitting it took 0 s."""
    await phone.join()
    admitted = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = (await participants_in_room(livekit, phone.room_name)).get(phone.identity)
        now = time.monotonic()
        if state is None:
            await phone.leave()  # stop the SDK from trying to reconnect
            return 0.0 if admitted is None else now - admitted
        if admitted is None and state == api.ParticipantInfo.ACTIVE:
            admitted = now
        if admitted is not None and now - admitted > 10:
            break
        await asyncio.sleep(0.1)
    await phone.leave()
    raise AssertionError(f"{phone.identity[:8]} still in {phone.room_name}: admitted "
                         f"{'never' if admitted is None else f'{time.monotonic() - admitted:.1f} s ago'}")


def test_a_stranger_with_a_token_for_a_live_call_is_removed_every_time(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo, mallory = make_user("Ana"), make_user("Bo"), make_user("Mallory")
        inv = insert_invitation(database_url, ana, bo)
        enqueue_change(inv["id"], "pending")
        await eventually(status_is(db, inv["id"], "ringing"), what="ringing")
        room_name = inv["room_name"]
        a = await Phone(livekit.url, ana, room_name).join()
        b = await Phone(livekit.url, bo, room_name).join()
        await eventually(lambda: (call_of(db, inv["id"]) or {}).get("status") == "active", what="call active")

        for attempt in (1, 2):
            took = await removed_in_time(livekit, Phone(livekit.url, mallory, room_name))
            assert took < REMOVAL_WITHIN + 1.0, f"attempt {attempt}: removed after {took:.1f} s"
        await eventually(lambda: len(removals(db, room_name, mallory)) >= 2, what="both removals recorded")
        assert len(joins(db, room_name, mallory)) >= 2
        # The call goes on, with no stranger in its history.
        assert a.connected and b.connected
        call = call_of(db, inv["id"])
        assert call["status"] == "active"
        rows = db.execute("select identity from public.call_participants where call_id = %s", (call["id"],)).fetchall()
        assert mallory not in {r["identity"] for r in rows}
        await a.leave()
        await b.leave()

    asyncio.run(scenario())


def test_a_callee_who_declined_is_removed_when_joining_with_an_earlier_token(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo, cy = make_user("Ana"), make_user("Bo"), make_user("Cy")
        room_name = f"group-{time.monotonic_ns()}"
        to_bo = insert_invitation(database_url, ana, bo, room=room_name)
        to_cy = insert_invitation(database_url, ana, cy, room=room_name)
        for inv in (to_bo, to_cy):
            enqueue_change(inv["id"], "pending")
            await eventually(status_is(db, inv["id"], "ringing"), what="ringing")
        a = await Phone(livekit.url, ana, room_name).join()
        c = await Phone(livekit.url, cy, room_name).join()  # Cy answers by joining
        await eventually(status_is(db, to_cy["id"], "accepted"), what="Cy answered")
        client_set_status(database_url, bo, to_bo["id"], "declined")
        enqueue_change(to_bo["id"], "declined")
        await eventually(status_is(db, to_bo["id"], "declined"), what="Bo declined")

        for _ in range(2):  # with the token Bo took while it rang, and again
            took = await removed_in_time(livekit, Phone(livekit.url, bo, room_name))
            assert took < REMOVAL_WITHIN + 1.0
        await eventually(lambda: len(removals(db, room_name, bo)) >= 2, what="removals recorded")
        assert a.connected and c.connected
        await a.leave()
        await c.leave()

    asyncio.run(scenario())


def test_a_stranger_reusing_the_name_of_an_ended_call_is_removed(db, database_url, make_user, livekit):
    async def scenario():
        ana, bo, mallory = make_user("Ana"), make_user("Bo"), make_user("Mallory")
        inv = insert_invitation(database_url, ana, bo)
        enqueue_change(inv["id"], "pending")
        await eventually(status_is(db, inv["id"], "ringing"), what="ringing")
        client_set_status(database_url, bo, inv["id"], "declined")
        enqueue_change(inv["id"], "declined")
        await eventually(lambda: (call_of(db, inv["id"]) or {}).get("status") == "declined", what="call over")
        # A valid token for the old name brings the room back; nothing of ours lives there.
        took = await removed_in_time(livekit, Phone(livekit.url, mallory, inv["room_name"]))
        assert took < REMOVAL_WITHIN + 1.0
        await eventually(lambda: removals(db, inv["room_name"], mallory), what="removal recorded")
        assert db.execute("select count(*) as n from public.calls where room_name = %s and status in ('ringing', 'active')",
                          (inv["room_name"],)).fetchone()["n"] == 0

    asyncio.run(scenario())
