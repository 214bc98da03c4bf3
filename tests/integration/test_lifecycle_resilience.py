"""Timeouts stay certain when a worker dies; an invitation whose room LiveKit refuses ends `failed`,
and one whose room LiveKit gives no answer about rings all the same."""

from __future__ import annotations

import signal
import time

import pytest
from celery import Celery

from devstack import services
from devstack.services import wait_for
from tests.conftest import _wait_worker_ready, subprocess_env
from tests.support.calls import enqueue_change, insert_invitation, invitation, wait_invitation

from orchestration import names


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
                wait_for(lambda: doomed.log().count(names.RING_TIMEOUTS_DUE + "[") >= 1, timeout=1.5,
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
        held = doomed.log().count(names.RING_TIMEOUTS_DUE + "[")
        assert held >= 1
    finally:
        doomed.stop()


def _lone_worker(redis_server, log_dir, name: str, **env):
    """A worker of its own (its own database and broker, so no other worker or sweep serves its
    invitations first), with the settings given."""
    database_url = services.create_database()
    broker = redis_server.url.rsplit("/", 1)[0] + "/9"
    import redis

    redis.Redis.from_url(broker).flushdb()
    proc = services.celery_worker(subprocess_env(REDIS_URL=broker, DATABASE_URL=database_url, **env), log_dir,
                                  name=name, concurrency=1)
    _wait_worker_ready(proc)
    return proc, database_url, Celery("sender", broker=broker)


def _two_users(db) -> tuple[str, str]:
    import json
    import uuid

    caller, callee = str(uuid.uuid4()), str(uuid.uuid4())
    for uid in (caller, callee):
        db.execute("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                   (uid, f"{uid[:8]}@example.test", json.dumps({})))
    return caller, callee


def test_an_invitation_whose_room_livekit_refuses_ends_failed(redis_server, livekit, log_dir):
    # LiveKit answers, and the answer is no (a key it does not know signs the request: 401).
    from orchestration.db import connect

    proc, database_url, app = _lone_worker(redis_server, log_dir, "refused",
                                           LIVEKIT_API_SECRET="not-the-secret-livekit-knows-000000")
    db = connect(database_url, autocommit=True)
    try:
        inv = insert_invitation(database_url, *_two_users(db))
        enqueue_change(inv["id"], "pending", app=app)
        failed = wait_invitation(db, inv["id"], "failed", timeout=30)
        assert failed["end_reason"] == "error"
        call = db.execute("select * from public.calls where id = %s", (failed["call_id"],)).fetchone()
        assert call["status"] == "failed" and call["end_reason"] == "error"
        event = db.execute("select payload from public.call_events where event_id = %s",
                           (f"realtime:{inv['id']}:pending",)).fetchone()
        assert "refused" in event["payload"]["error"]
    finally:
        proc.stop()
        db.close()
        services.drop_database(database_url)


def test_an_invitation_rings_while_livekit_gives_no_answer_and_its_room_is_made_later(redis_server, log_dir):
    # Nothing listens where this worker's LiveKit should be: no answer is not a refusal. The
    # invitation rings (LiveKit makes a room on the first join anyway); making the room is written
    # down as a room action and retried with backoff.
    from orchestration.db import connect

    proc, database_url, app = _lone_worker(redis_server, log_dir, "nolivekit", LIVEKIT_URL="ws://127.0.0.1:9")
    db = connect(database_url, autocommit=True)
    try:
        inv = insert_invitation(database_url, *_two_users(db))
        enqueue_change(inv["id"], "pending", app=app)
        ringing = wait_invitation(db, inv["id"], "ringing", timeout=30)
        call = db.execute("select * from public.calls where id = %s", (ringing["call_id"],)).fetchone()
        assert call["status"] == "ringing" and call["livekit_room_sid"] is None
        action = wait_for(lambda: db.execute(
            "select * from public.callflow_room_actions where key = %s and attempts >= 1",
            (f"make:{call['id']}",)).fetchone(), timeout=10, what="the room's making written down and retried")
        assert action["action"] == "make" and action["room_name"] == inv["room_name"]
        assert "no answer" in action["last_error"]
    finally:
        proc.stop()
        db.close()
        services.drop_database(database_url)
