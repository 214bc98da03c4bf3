"""The invitation lifecycle with a real worker, Redis, Postgres and LiveKit server; the ingest
side is played by putting `callflow.invitation_changed` on the queue as the listener does."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from devstack.services import wait_for
from tests.support.calls import (
    call_of,
    client_set_status,
    enqueue_change,
    insert_invitation,
    invitation,
    wait_call,
    wait_invitation,
)

pytestmark = pytest.mark.usefixtures("worker")


def events_of(db, invitation_id):
    return db.execute("select event_id, source, type from public.call_events where invitation_id = %s order by id",
                      (invitation_id,)).fetchall()


def test_invitation_rings_then_is_missed_at_the_deadline(db, database_url, make_user, livekit):
    caller, callee = make_user("Ana Souza"), make_user("Bo")
    inv = insert_invitation(database_url, caller, callee)
    enqueue_change(inv["id"], "pending")
    ringing = wait_invitation(db, inv["id"], "ringing")
    assert ringing["ring_deadline"] is not None and ringing["ringing_at"] is not None
    assert (ringing["ring_deadline"] - ringing["ringing_at"]).total_seconds() == pytest.approx(4, abs=0.01)
    call = call_of(db, inv["id"])
    assert call["status"] == "ringing" and call["livekit_room_sid"].startswith("RM_")
    assert call["caller_id"] == ringing["caller_id"]

    missed = wait_invitation(db, inv["id"], "missed", timeout=15)
    assert missed["end_reason"] == "timeout"
    lateness = (missed["ended_at"] - missed["ring_deadline"]).total_seconds()
    assert 0 <= lateness < 1.5
    call = wait_call(db, inv["id"], "missed")
    assert call["end_reason"] == "timeout" and call["duration_seconds"] == 0 and call["ended_at"] is not None
    note = db.execute("select * from public.notifications where invitation_id = %s", (inv["id"],)).fetchone()
    assert note["kind"] == "missed_call" and str(note["recipient_id"]) == callee
    assert {e["event_id"] for e in events_of(db, inv["id"])} >= {f"realtime:{inv['id']}:pending", f"timeout:{inv['id']}"}
    # Ended once: by its bucket's countdown, or by the sweep if a beat runs (the whole suite's does:
    # the e2e tests start it) and the worker was busy for the sweep's quarter second past the deadline.
    assert [e["source"] for e in events_of(db, inv["id"]) if e["event_id"] == f"timeout:{inv['id']}"] in (["timer"], ["sweep"])


def test_accept_by_status_update_makes_the_call_active(db, database_url, make_user, livekit):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee, call_type="audio")
    enqueue_change(inv["id"], "pending")
    wait_invitation(db, inv["id"], "ringing")
    client_set_status(database_url, callee, inv["id"], "accepted")
    enqueue_change(inv["id"], "accepted")
    accepted = wait_invitation(db, inv["id"], "accepted")
    assert accepted["end_reason"] == "answered" and accepted["answered_at"] is not None
    call = wait_call(db, inv["id"], "active")
    assert call["call_type"] == "audio"
    time.sleep(5)  # past the ring deadline: the timeout finds nothing to do
    assert invitation(db, inv["id"])["status"] == "accepted"
    assert db.execute("select count(*) as n from public.notifications where invitation_id = %s",
                      (inv["id"],)).fetchone()["n"] == 0


def test_decline_ends_the_call_declined_and_releases_the_room(db, database_url, make_user, livekit):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    enqueue_change(inv["id"], "pending")
    wait_invitation(db, inv["id"], "ringing")
    client_set_status(database_url, callee, inv["id"], "declined")
    enqueue_change(inv["id"], "declined")
    call = wait_call(db, inv["id"], "declined")
    assert call["end_reason"] == "declined"
    assert db.execute("select count(*) as n from public.notifications where invitation_id = %s",
                      (inv["id"],)).fetchone()["n"] == 0


def test_cancel_after_three_seconds_of_ringing_earns_an_email_a_quick_one_does_not(db, database_url, make_user, livekit):
    caller, callee_slow, callee_quick = make_user(), make_user(), make_user()
    slow = insert_invitation(database_url, caller, callee_slow)
    quick = insert_invitation(database_url, caller, callee_quick)
    enqueue_change(slow["id"], "pending")
    enqueue_change(quick["id"], "pending")
    wait_invitation(db, quick["id"], "ringing")
    client_set_status(database_url, caller, quick["id"], "cancelled")
    enqueue_change(quick["id"], "cancelled")
    wait_invitation(db, slow["id"], "ringing")
    time.sleep(3.1)
    client_set_status(database_url, caller, slow["id"], "cancelled")
    enqueue_change(slow["id"], "cancelled")
    assert wait_call(db, slow["id"], "cancelled")["end_reason"] == "caller_cancelled"
    assert wait_call(db, quick["id"], "cancelled")
    count = "select count(*) as n from public.notifications where invitation_id = %s"
    assert db.execute(count, (slow["id"],)).fetchone()["n"] == 1
    assert db.execute(count, (quick["id"],)).fetchone()["n"] == 0


def test_callee_in_an_active_call_is_busy(db, database_url, make_user, livekit):
    alice, bob, carol = make_user(), make_user(), make_user()
    first = insert_invitation(database_url, alice, bob)
    enqueue_change(first["id"], "pending")
    wait_invitation(db, first["id"], "ringing")
    client_set_status(database_url, bob, first["id"], "accepted")
    enqueue_change(first["id"], "accepted")
    wait_call(db, first["id"], "active")

    second = insert_invitation(database_url, carol, bob)
    enqueue_change(second["id"], "pending")
    busy = wait_invitation(db, second["id"], "busy")
    assert busy["end_reason"] == "callee_busy"
    assert wait_call(db, second["id"], "busy")["end_reason"] == "callee_busy"
    assert db.execute("select count(*) as n from public.notifications where invitation_id = %s",
                      (second["id"],)).fetchone()["n"] == 1


def test_being_rung_elsewhere_is_not_busy(db, database_url, make_user, livekit):
    alice, bob, carol = make_user(), make_user(), make_user()
    first = insert_invitation(database_url, alice, bob)
    second = insert_invitation(database_url, carol, bob)
    enqueue_change(first["id"], "pending")
    enqueue_change(second["id"], "pending")
    wait_invitation(db, first["id"], "ringing")
    wait_invitation(db, second["id"], "ringing")


def test_accepted_before_the_worker_saw_it(db, database_url, make_user, livekit):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    client_set_status(database_url, callee, inv["id"], "accepted")
    enqueue_change(inv["id"], "pending")
    enqueue_change(inv["id"], "accepted")
    call = wait_call(db, inv["id"], "active")
    wait_for(lambda: db.execute("select livekit_room_sid from public.calls where id = %s", (call["id"],)).fetchone()["livekit_room_sid"],
             what="room made for an invitation accepted before it rang")


def test_duplicates_change_nothing(db, database_url, make_user, livekit):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    for _ in range(5):
        enqueue_change(inv["id"], "pending")
    wait_invitation(db, inv["id"], "ringing")
    time.sleep(1)
    rows = db.execute("select count(*) as n from public.call_events where event_id = %s",
                      (f"realtime:{inv['id']}:pending",)).fetchone()
    assert rows["n"] == 1
    assert db.execute("select count(*) as n from public.calls where room_name = %s", (inv["room_name"],)).fetchone()["n"] == 1


def test_unknown_invitation_is_recorded_and_dropped(db, worker):
    import uuid

    ghost = str(uuid.uuid4())
    enqueue_change(ghost, "pending")
    row = wait_for(lambda: db.execute("select * from public.call_events where event_id = %s",
                                      (f"realtime:{ghost}:pending",)).fetchone(), what="ghost recorded")
    assert row["payload"]["note"] == "no such invitation"


def test_timeout_and_accept_race_exactly_one_wins(db, database_url, make_user, livekit):
    caller, callee = make_user(), make_user()
    invs = [insert_invitation(database_url, caller, callee) for _ in range(6)]
    for inv in invs:
        enqueue_change(inv["id"], "pending")
    rows = [wait_invitation(db, inv["id"], "ringing") for inv in invs]
    deadline = max(r["ring_deadline"] for r in rows)
    # Accept each as close to its deadline as we can, from the client side.
    now = db.execute("select now() as n").fetchone()["n"]
    time.sleep(max(0, (deadline - now).total_seconds() - 0.02))
    outcomes = {}

    def accept(inv):
        try:
            client_set_status(database_url, callee, inv["id"], "accepted")
            outcomes[inv["id"]] = "accepted"
        except (psycopg.Error, AssertionError) as exc:
            outcomes[inv["id"]] = f"refused: {exc}"

    threads = [threading.Thread(target=accept, args=(inv,)) for inv in invs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for inv in invs:
        if outcomes[inv["id"]] == "accepted":
            enqueue_change(inv["id"], "accepted")
    for inv in invs:
        final = wait_for(lambda: (lambda r: r if r["status"] in ("accepted", "missed") else None)(invitation(db, inv["id"])),
                         what="race settled")
        if outcomes[inv["id"]] == "accepted":
            assert final["status"] == "accepted"
        else:
            assert final["status"] == "missed"
            assert "already missed" in outcomes[inv["id"]] or "0 rows" in outcomes[inv["id"]]
