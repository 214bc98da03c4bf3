"""Ringing like a phone, through the whole lifecycle (issue 25): a callee with an iPhone (a PushKit
VoIP token and an Expo token) and an Android phone (an FCM token).

A worker of this module's own (its own database and Redis database) has APNS_*, FCM_* and
EXPO_PUSH_URL pointed at the stand-ins (devstack/standins: APNs over real HTTP/2 checking the
provider JWT's ES256 signature, FCM with its OAuth token endpoint checking the service account's
RS256 assertion, Expo). The invitation is made and answered as a client makes them (under RLS).
"""

from __future__ import annotations

import json
import secrets
import time

import psycopg
import pytest
import redis as redis_lib
from celery import Celery

from devstack import services
from devstack.standins.expo_server import ExpoStandin
from tests.conftest import subprocess_env
# The test APNs key and FCM service account, and their stand-ins: those of the channels' own tests.
from tests.integration.test_apns_voip import KEY_ID, TEAM_ID, TOPIC, apns, key, key_pem  # noqa: F401 - fixtures
from tests.integration.test_fcm import PROJECT, fcm, service_account  # noqa: F401 - fixtures
from tests.integration.test_notifications_delivery import redis_db_url, start_worker, user_maker
from tests.integration.test_push import changed, invite, pushes_to, register, token, wait
from tests.support.calls import as_client

RING_TIMEOUT = 12


@pytest.fixture(scope="module")
def expo():
    with ExpoStandin() as server:
        yield server


@pytest.fixture(scope="module")
def ring_database_url():
    with services.scratch_database("callflow_ring") as url:
        yield url


@pytest.fixture
def db(ring_database_url):
    from orchestration.db import connect

    with connect(ring_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def broker_url(redis_server):
    url = redis_db_url(redis_server, 12)
    redis_lib.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def ring_worker(ring_database_url, broker_url, apns, key_pem, fcm, service_account, expo, livekit, log_dir):
    env = subprocess_env(DATABASE_URL=ring_database_url, REDIS_URL=broker_url, EXPO_PUSH_URL=expo.url,
                         APNS_KEY_ID=KEY_ID, APNS_TEAM_ID=TEAM_ID, APNS_PRIVATE_KEY=key_pem, APNS_TOPIC=TOPIC,
                         APNS_URL=apns.url, FCM_PROJECT_ID=PROJECT,
                         FCM_SERVICE_ACCOUNT_JSON=json.dumps(service_account[0]), FCM_URL=fcm.url,
                         FCM_TOKEN_URL=fcm.token_url, CALLFLOW_RING_TIMEOUT_SECONDS=str(RING_TIMEOUT))
    proc = start_worker(env, log_dir, "ring", concurrency=3)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def producer(broker_url):
    return Celery("ring-test", broker=broker_url)


def phones(database_url: str, callee: str) -> dict[str, str]:
    """An iPhone (PushKit VoIP token and Expo token) and an Android phone (FCM token)."""
    devices = {"voip": secrets.token_hex(32), "expo": token(), "fcm": f"fcm-{secrets.token_urlsafe(40)}"}
    register(database_url, callee, devices["voip"], "ios", "iPhone", provider="apns_voip")
    register(database_url, callee, devices["expo"], "ios", "iPhone")
    register(database_url, callee, devices["fcm"], "android", "Pixel", provider="fcm")
    return devices


def test_ringing_reaches_callkit_and_the_android_call_screen_once_and_the_answer_stops_the_others(
        db, ring_database_url, apns, fcm, expo, ring_worker, producer):
    make_user = user_maker(db)
    caller, callee = make_user("Ana Souza"), make_user("Bo")
    devices = phones(ring_database_url, callee)
    inv = invite(ring_database_url, producer, caller, callee)
    wait(lambda: apns.delivered(devices["voip"]) and fcm.delivered("incoming_call", devices["fcm"])
         and pushes_to(expo, devices["expo"], "incoming_call"), "the three devices ring", timeout=RING_TIMEOUT)
    ringing = db.execute("select room_name, ring_deadline from public.call_invitations where id = %s",
                         (inv,)).fetchone()

    [voip] = apns.delivered(devices["voip"])
    assert voip.headers["apns-push-type"] == "voip" and voip.headers["apns-topic"] == f"{TOPIC}.voip"
    assert voip.headers["apns-priority"] == "10" and voip.headers["apns-collapse-id"] == inv
    assert int(voip.headers["apns-expiration"]) == int(ringing["ring_deadline"].timestamp())
    assert {k: voip.payload[k] for k in ("kind", "invitation_id", "room_name", "call_type", "caller_id",
                                         "caller_name")} == {
        "kind": "incoming_call", "invitation_id": inv, "room_name": ringing["room_name"], "call_type": "video",
        "caller_id": caller, "caller_name": "Ana Souza"}

    [android] = fcm.delivered("incoming_call", devices["fcm"])
    assert "notification" not in android and android["android"]["priority"] == "HIGH"
    assert all(isinstance(v, str) for v in android["data"].values())
    assert android["data"]["invitation_id"] == inv and android["data"]["caller_name"] == "Ana Souza"
    assert 1 <= int(android["android"]["ttl"].rstrip("s")) <= RING_TIMEOUT

    with psycopg.connect(ring_database_url) as conn:  # answered on the iPhone (CallKit → accept)
        as_client(conn, callee)
        conn.execute("update public.call_invitations set status = 'accepted' where id = %s", (inv,))
    changed(producer, inv, "accepted")
    wait(lambda: pushes_to(expo, devices["expo"], "call_ended") and fcm.delivered("call_ended", devices["fcm"]),
         "the others stop ringing")
    time.sleep(3)  # nothing more comes
    assert len(apns.delivered(devices["voip"])) == len(apns.to(devices["voip"])) == 1  # never a second VoIP push
    assert len(fcm.delivered("incoming_call", devices["fcm"])) == 1 and len(fcm.delivered("call_ended", devices["fcm"])) == 1
    assert len(pushes_to(expo, devices["expo"], "incoming_call")) == 1
    assert fcm.delivered("call_ended", devices["fcm"])[0]["data"]["status"] == "accepted"
    rows = db.execute("""select m.kind, t.provider, m.status from public.push_messages m
                           join public.push_tokens t on t.id = m.push_token_id
                          where m.invitation_id = %s order by t.provider, m.kind""", (inv,)).fetchall()
    assert [(r["provider"], r["kind"], r["status"]) for r in rows] == [
        ("apns_voip", "incoming_call", "sent"),
        ("expo", "call_ended", "sent"), ("expo", "incoming_call", "sent"),
        ("fcm", "call_ended", "sent"), ("fcm", "incoming_call", "sent")]


def test_an_unregistered_iphone_is_turned_off_and_apns_trouble_is_retried_within_the_ring(
        db, ring_database_url, apns, fcm, expo, ring_worker, producer):
    make_user = user_maker(db)
    caller, callee, other = make_user("Cy"), make_user("Di"), make_user("Ed")
    gone = phones(ring_database_url, callee)
    apns.answer_token(gone["voip"], 410, "Unregistered")
    inv = invite(ring_database_url, producer, caller, callee)
    wait(lambda: db.execute("select disabled_at from public.push_tokens where token = %s",
                            (gone["voip"],)).fetchone()["disabled_at"], "the unregistered VoIP token turned off")
    wait(lambda: fcm.delivered("incoming_call", gone["fcm"]), "the others still ring")

    busy = phones(ring_database_url, other)
    apns.answer_token(busy["voip"], 429, "TooManyRequests")
    apns.answer_token(busy["voip"], 503, "ServiceUnavailable")
    invite(ring_database_url, producer, caller, other)
    wait(lambda: apns.delivered(busy["voip"]), "the VoIP push after APNs' 429 and 503", timeout=RING_TIMEOUT)
    assert [r.status for r in apns.to(busy["voip"])] == [429, 503, 200]
    assert inv
