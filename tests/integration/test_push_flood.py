"""One account's flood of pushes does not hold up anyone else's ringing (issue 23).

A worker of this module's own (its own database, its own Redis database, `EXPO_PUSH_URL` at the
Expo stand-in) runs the real lifecycle and the push tasks. The global push rate is scaled down to
100/s so that a flood a test can make in a few seconds is more than the whole rate (Expo allows 600
a second a project): one callee with 10 devices rung by 60 invitations asks for 600 incoming-call
pushes at once, 6 s of everyone's rate.
"""

from __future__ import annotations

import psycopg
import pytest
import redis as redis_lib
from celery import Celery

from devstack import services
from devstack.standins.expo_server import ExpoStandin
from tests.conftest import subprocess_env
from tests.integration.test_notifications_delivery import redis_db_url, start_worker, user_maker
from tests.integration.test_push import invite, pushes_to, register, token, wait

RING_TIMEOUT = 20
RATE = 100
FLOOD_INVITATIONS = 60
DEVICES = 10


@pytest.fixture(scope="module")
def flood_database_url():
    with services.scratch_database("callflow_pushf", invite_rate_per_minute=100_000) as url:
        yield url


@pytest.fixture
def db(flood_database_url):
    from orchestration.db import connect

    with connect(flood_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def expo():
    with ExpoStandin() as server:
        yield server


@pytest.fixture(scope="module")
def broker_url(redis_server):
    url = redis_db_url(redis_server, 11)
    redis_lib.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def flood_worker(flood_database_url, broker_url, expo, livekit, log_dir):
    env = subprocess_env(DATABASE_URL=flood_database_url, REDIS_URL=broker_url, EXPO_PUSH_URL=expo.url,
                         CALLFLOW_RING_TIMEOUT_SECONDS=str(RING_TIMEOUT), CALLFLOW_PUSH_RATE_PER_SECOND=str(RATE))
    proc = start_worker(env, log_dir, "pushflood", concurrency=3)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def producer(broker_url):
    return Celery("push-flood-test", broker=broker_url)


def first_arrival(expo: ExpoStandin, tok: str, kind: str) -> float | None:
    for record in expo.sends:
        if record.status == 200 and any(m["to"] == tok and m["data"]["kind"] == kind for m in record.messages):
            return record.at
    return None


def test_a_flood_on_one_callee_does_not_delay_another_users_incoming_call(db, flood_database_url, expo,
                                                                         flood_worker, producer):
    make_user = user_maker(db)
    flooded, accomplice = make_user("Flooded"), make_user("Accomplice")
    devices = [token() for _ in range(DEVICES)]
    for tok in devices:
        register(flood_database_url, flooded, tok)
    flood = [invite(flood_database_url, producer, accomplice, flooded) for _ in range(FLOOD_INVITATIONS)]
    wait(lambda: db.execute("select count(*) as n from public.push_messages where kind = 'incoming_call'"
                            " and invitation_id = any(%s::uuid[])", (flood,)).fetchone()["n"]
         == FLOOD_INVITATIONS * DEVICES, "the flood's pushes written", timeout=60)

    # Meanwhile someone else is called: their phone rings at once, not after the flood.
    caller, callee = make_user("Caller"), make_user("Callee")
    phone = token()
    register(flood_database_url, callee, phone)
    inv = invite(flood_database_url, producer, caller, callee)
    wait(lambda: first_arrival(expo, phone, "incoming_call"), "the other user's phone rings", timeout=RING_TIMEOUT)
    ringing_at = db.execute("select ringing_at from public.call_invitations where id = %s", (inv,)).fetchone()["ringing_at"]
    late = first_arrival(expo, phone, "incoming_call") - ringing_at.timestamp()
    assert late < 1.5, f"the other user's incoming_call went {late:.2f} s after ringing, behind the flood"
    # The stand-in has it; the worker writes `sent` once Expo's answer is back (a moment later).
    wait(lambda: db.execute("select status from public.push_messages where invitation_id = %s",
                            (inv,)).fetchone()["status"] == "sent", "the other user's push recorded sent", timeout=10)

    # The flooded account's pushes wait for its share (or are skipped once their ringing is over);
    # none failed, and its devices got no more than the share let through.
    rows = db.execute("select status, count(*) as n from public.push_messages where invitation_id = any(%s::uuid[])"
                      " and kind = 'incoming_call' group by status", (flood,)).fetchall()
    by_status = {r["status"]: r["n"] for r in rows}
    assert "failed" not in by_status
    assert by_status.get("pending", 0) + by_status.get("skipped", 0) > 0
    assert sum(len(pushes_to(expo, tok, "incoming_call")) for tok in devices) < FLOOD_INVITATIONS * DEVICES
