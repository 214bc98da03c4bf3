"""The history of an answered call does not depend on the order or the number of times its
LiveKit events arrive: hypothesis shuffles and duplicates them and the `calls` and
`call_participants` rows always come out the same.

The use cases run in-process against the real Postgres and LiveKit; the scheduler is the real Celery
one on a Redis database that no worker consumes, so grace countdowns never fire mid-example.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from orchestration.adapters.celery_scheduler import CeleryScheduler
from orchestration.adapters.livekit_rooms import LiveKitRooms
from orchestration.adapters.postgres_store import PostgresStore
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.ingest.mapping import Change
from orchestration.lifecycle.invitation_changed import handle_invitation_changed
from orchestration.lifecycle.livekit_event import handle_livekit_event
from orchestration.lifecycle.reconcile import reconcile_live_calls
from tests.support.calls import change_event, client_set_status, insert_invitation

# The events' clock (unix seconds): ahead of the calls the examples make, as a webhook's times are
# (a call's history is clamped to the call's own creation; a fixed date here would pass it one day).
T0 = int(time.time()) + 86_400


@pytest.fixture(scope="module")
def ports(database_url, redis_server, livekit):
    from config.settings import get_settings

    s = get_settings()
    idle_app = Celery("idle", broker=redis_server.url.rsplit("/", 1)[0] + "/15")
    p = Ports(
        store=PostgresStore(database_url),
        rooms=LiveKitRooms(livekit.url.replace("ws://", "http://"), s.livekit_api_key, s.livekit_api_secret.get_secret_value()),
        scheduler=CeleryScheduler(idle_app),
        config=LifecycleConfig(ring_timeout=30, grace=1.5),
    )
    yield p
    p.rooms.close()


def answered_call(ports, database_url, make_user):
    """An invitation rung and accepted through the use cases; returns (invitation, call row, events)."""
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    handle_invitation_changed(Change.from_wire(change_event(inv["id"], "pending")), ports)
    client_set_status(database_url, callee, inv["id"], "accepted")
    handle_invitation_changed(Change.from_wire(change_event(inv["id"], "accepted")), ports)
    with ports.store.transaction() as tx:
        call = tx.conn.execute("select * from public.calls where id = %s",
                               (tx.live_call_ids([inv["room_name"]])[inv["room_name"]],)).fetchone()
    assert call["status"] == "active"
    room = {"sid": call["livekit_room_sid"], "name": inv["room_name"], "creationTime": str(T0)}

    def p(identity, sid, joined):
        return {"sid": sid, "identity": identity, "state": "ACTIVE", "joinedAt": str(joined)}

    def ev(kind, at, **extra):
        return {"id": f"EV_{uuid.uuid4().hex[:12]}", "event": kind, "createdAt": str(at), "room": room, **extra}

    a, b, b2 = p(caller, "PA_" + uuid.uuid4().hex[:10], T0 + 1), p(callee, "PA_" + uuid.uuid4().hex[:10], T0 + 4), \
        p(callee, "PA_" + uuid.uuid4().hex[:10], T0 + 20)
    events = [
        ev("room_started", T0),
        ev("participant_joined", T0 + 1, participant=a),
        ev("participant_joined", T0 + 4, participant=b),
        ev("track_published", T0 + 5, participant=b, track={"sid": "TR_x", "type": "AUDIO"}),
        ev("participant_left", T0 + 15, participant=b),       # the callee drops ...
        ev("participant_joined", T0 + 20, participant=b2),    # ... and comes back
        ev("participant_left", T0 + 70, participant=b2),
        ev("participant_left", T0 + 71, participant=a),
        ev("room_finished", T0 + 80),
    ]
    return inv, call, events


def snapshot(ports, call_id):
    with ports.store.transaction() as tx:
        call = tx.conn.execute("select * from public.calls where id = %s", (call_id,)).fetchone()
        parts = tx.conn.execute(
            """select identity, participant_sid, joined_at, left_at, duration_seconds from public.call_participants
                where call_id = %s order by participant_sid""", (call_id,)).fetchall()
    keep = ("status", "started_at", "ended_at", "duration_seconds", "end_reason", "call_type")
    return {k: call[k] for k in keep}, parts


@hyp_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_answered_call_history_is_order_and_duplicate_independent(ports, database_url, make_user, data):
    inv, call, events = answered_call(ports, database_url, make_user)
    order = data.draw(st.permutations(range(len(events))))
    repeats = data.draw(st.lists(st.sampled_from(range(len(events))), max_size=12))
    delivered = [events[i] for i in order] + [events[i] for i in repeats]
    delivered = data.draw(st.permutations(delivered))
    for event in delivered:
        handle_livekit_event(event, None, ports)

    got_call, got_parts = snapshot(ports, str(call["id"]))
    at = lambda s: datetime.fromtimestamp(T0 + s, tz=timezone.utc)  # noqa: E731
    assert got_call == {
        "status": "completed", "started_at": at(4), "ended_at": at(80), "duration_seconds": 76,
        "end_reason": "hangup", "call_type": "video",
    }
    by_sid = {p["participant_sid"]: p for p in got_parts}
    assert len(got_parts) == 3
    expected = {events[1]["participant"]["sid"]: (1, 71), events[2]["participant"]["sid"]: (4, 15),
                events[5]["participant"]["sid"]: (20, 70)}
    for sid, (joined, left) in expected.items():
        row = by_sid[sid]
        assert (row["joined_at"], row["left_at"], row["duration_seconds"]) == (at(joined), at(left), left - joined)
    with ports.store.transaction() as tx:
        # Each event once (the real server's own webhooks for this room may be there too).
        n = tx.conn.execute("select count(*) as n from public.call_events where event_id = any(%s)",
                            ([e["id"] for e in events],)).fetchone()["n"]
    assert n == len(events)


def test_a_live_call_whose_room_is_gone_is_ended_by_reconciliation(ports, db):
    """room_finished can be lost (LiveKit drops events older than 30 s): the sweep ends the call.

    The calls are younger than the running beat's own reconciliation looks at (60 s), and their
    leaves' grace periods judged, so only this test's call can end them: a beat sweep that ended
    the call first made this call count none (seen once on CI)."""
    room = f"gone-{uuid.uuid4().hex[:8]}"
    call = db.execute("""insert into public.calls (room_name, status, created_at, started_at)
                         values (%s, 'active', now() - interval '20 seconds', now() - interval '18 seconds') returning *""",
                      (room,)).fetchone()
    for identity, left in (("a", "8 seconds"), ("b", "12 seconds")):
        sid = f"PA_{uuid.uuid4().hex[:8]}"
        db.execute("""insert into public.call_participants (call_id, identity, participant_sid, joined_at, left_at)
                      values (%s, %s, %s, now() - interval '18 seconds', now() - %s::interval)""",
                   (call["id"], identity, sid, left))
        # Their leaves' grace periods already judged (as in a group call, which a leave does not end):
        # else the running beat's grace sweep could hang the call up before reconciliation looks.
        db.execute("""insert into public.call_events (event_id, source, type, room_name)
                      values (%s, 'sweep', 'grace_expired', %s)""", (f"grace:{sid}", room))
    live_room = f"live-{uuid.uuid4().hex[:8]}"
    ports.rooms.create_room(live_room, empty_timeout=60, departure_timeout=5, max_participants=5, metadata="{}")
    still = db.execute("""insert into public.calls (room_name, status, created_at) values (%s, 'active', now() - interval '20 seconds')
                          returning *""", (live_room,)).fetchone()
    assert reconcile_live_calls(ports, older_than=5) >= 1
    ended = db.execute("select * from public.calls where id = %s", (call["id"],)).fetchone()
    assert ended["status"] == "completed" and ended["end_reason"] == "hangup"
    last_left = db.execute("select max(left_at) as t from public.call_participants where call_id = %s", (call["id"],)).fetchone()["t"]
    assert ended["ended_at"] == last_left and ended["duration_seconds"] == 10
    assert db.execute("select * from public.call_events where event_id = %s", (f"room_reconciled:{call['id']}",)).fetchone()
    assert db.execute("select status from public.calls where id = %s", (still["id"],)).fetchone()["status"] == "active"
    ports.rooms.delete_room(live_room)
    db.execute("update public.calls set status = 'completed', ended_at = now() where id = %s", (still["id"],))
