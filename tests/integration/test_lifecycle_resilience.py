"""Timeouts stay certain when a worker dies, and an invitation no worker can serve ends `failed`."""

from __future__ import annotations

import signal
import time

import pytest
from celery import Celery

from tests.conftest import _wait_worker_ready, subprocess_env
from tests.support import services
from tests.support.calls import enqueue_change, insert_invitation, invitation, wait_invitation
from tests.support.services import wait_for


def test_timeouts_held_by_a_sigkilled_worker_fire_within_the_sweep_interval_plus_one_second(
        db, database_url, make_user, livekit, worker, beat, log_dir):
    # At DEBUG, so its log names the tasks it received (INFO leaves Celery's per-task lines out).
    doomed = services.celery_worker(subprocess_env(), log_dir, name="doomed", concurrency=2, extra=["-l", "DEBUG"])
    _wait_worker_ready(doomed)
    try:
        invs = []
        # Which worker fetches a countdown is a race (the idle one asks first): rounds of 30
        # ringing until the doomed one holds at least one. Each round has a caller of its own: the
        # database admits 30 invitations a minute from one caller (CALLFLOW_INVITE_RATE_PER_MINUTE),
        # so a second round from the same caller would be refused `rate_limited`.
        for _ in range(5):
            caller = make_user()
            batch = [insert_invitation(database_url, caller, make_user()) for _ in range(30)]
            for inv in batch:
                enqueue_change(inv["id"], "pending")
            for inv in batch:
                wait_invitation(db, inv["id"], "ringing")
            invs += batch
            try:
                wait_for(lambda: doomed.log().count("callflow.ring_timeouts_due[") >= 1, timeout=1.5,
                         what="the doomed worker holding ring timeouts")
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("the doomed worker took no ring-timeout countdown in five rounds")
        time.sleep(0.5)
        doomed.kill(signal.SIGKILL)
        for inv in invs:
            wait_invitation(db, inv["id"], "missed", timeout=20)
        lateness = [(invitation(db, inv["id"])["ended_at"] - invitation(db, inv["id"])["ring_deadline"]).total_seconds()
                    for inv in invs]
        sweep_interval = 0.5
        assert max(lateness) <= sweep_interval + 1.0, lateness
        held = doomed.log().count("callflow.ring_timeouts_due[")
        assert held >= 1
    finally:
        doomed.stop()


def test_an_invitation_whose_room_cannot_be_made_ends_failed(redis_server, log_dir):
    # A worker of its own (its own database and broker, so no other worker or sweep serves the
    # invitation first) whose LiveKit is unreachable.
    import json
    import uuid

    from orchestration.db import connect

    database_url = services.create_database()
    broker = redis_server.url.rsplit("/", 1)[0] + "/9"
    proc = services.celery_worker(subprocess_env(REDIS_URL=broker, DATABASE_URL=database_url,
                                                 LIVEKIT_URL="ws://127.0.0.1:9"), log_dir, name="nolivekit", concurrency=1)
    _wait_worker_ready(proc)
    db = connect(database_url, autocommit=True)
    try:
        caller, callee = str(uuid.uuid4()), str(uuid.uuid4())
        for uid in (caller, callee):
            db.execute("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                       (uid, f"{uid[:8]}@example.test", json.dumps({})))
        inv = insert_invitation(database_url, caller, callee)
        app = Celery("sender", broker=broker)
        enqueue_change(inv["id"], "pending", app=app)
        failed = wait_invitation(db, inv["id"], "failed", timeout=30)
        assert failed["end_reason"] == "error"
        call = db.execute("select * from public.calls where id = %s", (failed["call_id"],)).fetchone()
        assert call["status"] == "failed" and call["end_reason"] == "error"
        event = db.execute("select payload from public.call_events where event_id = %s",
                           (f"realtime:{inv['id']}:pending",)).fetchone()
        assert "LiveKit" in event["payload"]["error"]
    finally:
        proc.stop()
        db.close()
        services.drop_database(database_url)
