"""Ringing like a phone: the APNs VoIP channel (orchestration/channels/apns_voip.py) through the real
delivery loop, against the APNs stand-in (devstack/standins/apns_server.py: real HTTP/2, h2c).

`push_messages` rows of `apns_voip` devices on a database of this module's own; the loop's
re-queues are played in-process (`run_like_the_task`, as tests/integration/test_push.py does); each
test has a rate and an APNs retry loop of its own. The provider key is a P-256 key made here; the
stand-in checks every provider token's ES256 signature with its public half.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid

import pytest
import redis as redis_lib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from config.settings import build_settings
from devstack import services
from orchestration.channels import apns_voip
from orchestration.channels.apns_voip import (ONLY_RINGS, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, TIMEOUT_SECONDS,
                                              ApnsClient, ApnsVoipChannel, OutboxClient, ProviderTokens,
                                              apns_provider)
from orchestration.delivery.rate import Rate
from orchestration.shared_backoff import SharedBackoff
from tests.integration.test_notifications_delivery import redis_db_url, user_maker
from tests.integration.test_push import PushDelivery, run_like_the_task
from devstack.standins.apns_server import ApnsStandin

KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM456789"
TOPIC = "com.example.callflow"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture(scope="module")
def apns(key):
    with ApnsStandin(key.public_key(), KEY_ID, TEAM_ID, topic=TOPIC) as server:
        yield server


@pytest.fixture(scope="module")
def voip_database_url():
    with services.scratch_database("callflow_voip") as url:
        yield url


@pytest.fixture
def ddb(voip_database_url):
    from orchestration.db import connect

    with connect(voip_database_url, autocommit=True) as conn:
        yield conn


class _Settings:
    def __init__(self, rate: float) -> None:
        self.callflow_push_rate_per_second = rate


def delivery_for(database_url: str, redis_server, client, rate: float = 500) -> PushDelivery:
    """The channel's real deliverer, with a rate and an APNs retry loop of its own."""
    redis_client = redis_lib.Redis.from_url(redis_db_url(redis_server, 10))
    suffix = uuid.uuid4().hex[:6]
    backoff = SharedBackoff(redis_client, f"apns-test-{suffix}", RETRY_BASE_SECONDS, RETRY_MAX_SECONDS,
                            probe_seconds=TIMEOUT_SECONDS + 2)
    channel = ApnsVoipChannel(client, apns_provider(_Settings(rate)), database_url)
    return PushDelivery(channel, database_url, redis_client, rate=Rate(redis_client, rate, key=f"callflow:test:rate:{suffix}"),
                        loop=backoff)


@pytest.fixture
def client(apns, key_pem):
    c = ApnsClient(apns.url, TOPIC, ProviderTokens.of(KEY_ID, TEAM_ID, key_pem))
    yield c
    c.close()


def voip_token() -> str:
    return secrets.token_hex(32)


def voip_rows(ddb, n: int, deadline_in: float = 30.0, kind: str = "incoming_call") -> tuple[list[str], list[str]]:
    """n ringing invitations from Eve Caller, one PushKit device each, and their pending rows."""
    make_user = user_maker(ddb)
    caller = make_user("Eve Caller")
    ids, tokens = [], []
    for _ in range(n):
        callee, tok = make_user(), voip_token()
        tokens.append(tok)
        t = ddb.execute("""insert into public.push_tokens (user_id, provider, token, platform)
                           values (%s, 'apns_voip', %s, 'ios') returning id""", (callee, tok)).fetchone()["id"]
        inv = ddb.execute("""insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                             values (%s, %s, %s, 'audio') returning id""",
                          (f"voip-{uuid.uuid4().hex[:8]}", caller, callee)).fetchone()["id"]
        ddb.execute("""update public.call_invitations set status = 'ringing', ringing_at = now(),
                          ring_deadline = now() + make_interval(secs => %s) where id = %s""", (deadline_in, inv))
        ids.append(str(ddb.execute("""insert into public.push_messages (kind, invitation_id, push_token_id)
                                      values (%s, %s, %s) returning id""", (kind, inv, t)).fetchone()["id"]))
    return ids, tokens


def ring_again(ddb, tok: str) -> str:
    """Another ringing invitation to the device's owner, and its pending incoming_call row to it."""
    t = ddb.execute("select id, user_id from public.push_tokens where provider = 'apns_voip' and token = %s",
                    (tok,)).fetchone()
    caller = user_maker(ddb)("Eve Caller")
    inv = ddb.execute("""insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                         values (%s, %s, %s, 'audio') returning id""",
                      (f"voip-{uuid.uuid4().hex[:8]}", caller, t["user_id"])).fetchone()["id"]
    ddb.execute("""update public.call_invitations set status = 'ringing', ringing_at = now(),
                      ring_deadline = now() + interval '30 seconds' where id = %s""", (inv,))
    return str(ddb.execute("""insert into public.push_messages (kind, invitation_id, push_token_id)
                              values ('incoming_call', %s, %s) returning id""", (inv, t["id"])).fetchone()["id"])


def rows(ddb, ids: list[str]) -> dict[str, dict]:
    return {str(r["id"]): r for r in ddb.execute(
        """select m.id, m.status, m.attempts, m.ticket_id, m.last_error, m.invitation_id::text as invitation_id,
                  t.disabled_at, i.room_name, i.caller_id::text as caller_id, i.ring_deadline
             from public.push_messages m join public.push_tokens t on t.id = m.push_token_id
             join public.call_invitations i on i.id = m.invitation_id
            where m.id = any(%s::uuid[])""", (ids,)).fetchall()}


# ---- one push ----------------------------------------------------------------------------------

def test_one_voip_push_with_the_contracts_headers_and_payload_exactly_once(ddb, voip_database_url, apns, key_pem,
                                                                          redis_server):
    ids, tokens = voip_rows(ddb, 1)
    # Made from the settings, as a worker makes it: an http:// APNS_URL is spoken to as h2c.
    settings = build_settings(apns_key_id=KEY_ID, apns_team_id=TEAM_ID, apns_private_key=key_pem,
                              apns_topic=TOPIC, apns_url=apns.url, database_url=voip_database_url)
    channel = ApnsVoipChannel.from_settings(settings)
    assert isinstance(channel.client, ApnsClient)
    assert channel.provider.name == "apns" and channel.provider.rate_key == "callflow:ratelimit:apns"
    delivery = delivery_for(voip_database_url, redis_server, channel.client)
    run_like_the_task(delivery, ids)
    assert delivery.deliver(ids).sent == 0  # a second task finds it sent
    row = rows(ddb, ids)[ids[0]]
    [request] = apns.to(tokens[0])
    assert request.status == 200 and request.method == "POST" and request.path == f"/3/device/{tokens[0]}"
    h = request.headers
    assert h["apns-push-type"] == "voip" and h["apns-topic"] == f"{TOPIC}.voip" and h["apns-priority"] == "10"
    assert int(h["apns-expiration"]) == int(row["ring_deadline"].timestamp())
    assert h["apns-collapse-id"] == row["invitation_id"] and UUID_RE.match(h["apns-id"])
    assert h["authorization"] == f"bearer {request.jwt}"
    assert request.payload == {"kind": "incoming_call", "invitation_id": row["invitation_id"],
                               "room_name": row["room_name"], "call_type": "audio", "caller_id": row["caller_id"],
                               "caller_name": "Eve Caller", "ring_deadline": row["ring_deadline"].isoformat()}
    assert len(request.body) <= 5120
    assert row["status"] == "sent" and row["attempts"] == 1 and row["ticket_id"] == h["apns-id"]


def test_many_pushes_reuse_one_provider_token_and_one_connection(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 45)
    connections_before, first = apns.connections, len(apns.requests)
    run_like_the_task(delivery_for(voip_database_url, redis_server, client), ids)
    mine = apns.requests[first:]
    assert sorted(r.token for r in mine if r.status == 200) == sorted(tokens)  # each once
    assert len(mine) == 45
    assert len({r.jwt for r in mine}) == 1
    assert len({r.connection for r in mine}) == 1 and apns.connections == connections_before + 1
    assert {r["status"] for r in rows(ddb, ids).values()} == {"sent"}


def test_a_batchs_requests_go_at_once_over_the_one_connection(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 20)  # one batch
    first = len(apns.requests)
    apns.delay = 0.5  # each answer half a second late: 20 in turn would take 10 s
    try:
        started = time.monotonic()
        run_like_the_task(delivery_for(voip_database_url, redis_server, client), ids)
        took = time.monotonic() - started
    finally:
        apns.delay = 0.0
    # This batch's requests: the stand-in is the module's, and an earlier test's late request can
    # reach it meanwhile (a full run once counted one of those here).
    mine = [r for r in apns.requests[first:] if r.token in set(tokens)]
    assert sorted(r.token for r in mine if r.status == 200) == sorted(tokens)
    assert len({r.connection for r in mine}) == 1
    assert max(r.at for r in mine) - min(r.at for r in mine) < 0.5  # all in flight before the first answer
    assert took < 4, took


# ---- the device is gone ------------------------------------------------------------------------

def test_unregistered_and_bad_device_token_turn_the_device_off(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 3)
    apns.answer_token(tokens[0], 410, "Unregistered")
    apns.answer_token(tokens[1], 400, "BadDeviceToken")
    delivery = delivery_for(voip_database_url, redis_server, client)
    run_like_the_task(delivery, ids)
    got = rows(ddb, ids)
    assert got[ids[0]]["status"] == "failed" and "Unregistered" in got[ids[0]]["last_error"]
    assert "since" in got[ids[0]]["last_error"]  # APNs's timestamp of the unregistration
    assert got[ids[1]]["status"] == "failed" and "BadDeviceToken" in got[ids[1]]["last_error"]
    assert got[ids[0]]["disabled_at"] and got[ids[1]]["disabled_at"]
    assert got[ids[2]]["status"] == "sent" and got[ids[2]]["disabled_at"] is None
    assert [len(apns.to(t)) for t in tokens] == [1, 1, 1]
    # The next ring to a turned-off device is skipped, never sent.
    again = ring_again(ddb, tokens[0])
    assert delivery.deliver([again]).skipped == 1
    assert rows(ddb, [again])[again]["status"] == "skipped"
    assert len(apns.to(tokens[0])) == 1


def test_another_refusal_fails_the_message_and_keeps_the_device(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 1)
    apns.answer_token(tokens[0], 400, "DeviceTokenNotForTopic")
    run_like_the_task(delivery_for(voip_database_url, redis_server, client), ids)
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "failed" and "DeviceTokenNotForTopic" in got["last_error"] and got["disabled_at"] is None
    assert len(apns.to(tokens[0])) == 1


# ---- no answer: retried with backoff, sent once ------------------------------------------------

def test_429_then_503_then_200_is_sent_once(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 1)
    apns.answer_token(tokens[0], 429)
    apns.answer_token(tokens[0], 503)
    delivery = delivery_for(voip_database_url, redis_server, client)
    run_like_the_task(delivery, ids)
    assert [r.status for r in apns.to(tokens[0])] == [429, 503, 200]
    assert len(apns.delivered(tokens[0])) == 1
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "sent" and got["attempts"] == 3
    assert delivery.loop.failures == 0  # the loop starts again from its first step after the success


def test_a_messages_5xx_in_an_answered_batch_goes_again_alone(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 2)
    apns.answer_token(tokens[1], 500)
    run_like_the_task(delivery_for(voip_database_url, redis_server, client), ids)
    assert [r.status for r in apns.to(tokens[0])] == [200]
    assert [r.status for r in apns.to(tokens[1])] == [500, 200]
    got = rows(ddb, ids)
    assert (got[ids[0]]["status"], got[ids[0]]["attempts"]) == ("sent", 1)
    assert (got[ids[1]]["status"], got[ids[1]]["attempts"]) == ("sent", 2)


def test_apns_unreachable_leaves_the_rows_pending_for_its_retry_loop(ddb, voip_database_url, key_pem, redis_server):
    ids, _ = voip_rows(ddb, 1)
    nobody = ApnsClient(f"http://127.0.0.1:{services.free_port()}", TOPIC, ProviderTokens.of(KEY_ID, TEAM_ID, key_pem))
    delivery = delivery_for(voip_database_url, redis_server, nobody)
    out = delivery.deliver(ids)
    nobody.close()
    assert out.sent == out.failed == 0 and out.come_back_in is not None and out.ids == ids
    assert "no answer" in out.cause and delivery.loop.failures == 1
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "pending" and "ConnectError" in got["last_error"]
    ddb.execute("update public.push_messages set status = 'skipped' where id = %s", (ids[0],))  # no other test's


def test_a_push_past_its_deadline_is_skipped_never_sent(ddb, voip_database_url, apns, client, redis_server):
    late, late_tokens = voip_rows(ddb, 1, deadline_in=-1)
    soon, soon_tokens = voip_rows(ddb, 1, deadline_in=2.5)
    apns.answer_token(soon_tokens[0], 503, times=1000)  # APNs never takes it before its deadline
    run_like_the_task(delivery_for(voip_database_url, redis_server, client), late + soon)
    got = rows(ddb, late + soon)
    assert got[late[0]]["status"] == "skipped" and "deadline" in got[late[0]]["last_error"]
    assert got[soon[0]]["status"] == "skipped" and "deadline" in got[soon[0]]["last_error"]
    assert not apns.to(late_tokens[0])
    assert apns.to(soon_tokens[0]) and not apns.delivered(soon_tokens[0])


# ---- the provider token ------------------------------------------------------------------------

def test_an_expired_provider_token_is_made_again_once_and_the_push_sent(ddb, voip_database_url, apns, client,
                                                                        redis_server):
    ids, tokens = voip_rows(ddb, 1)
    delivery = delivery_for(voip_database_url, redis_server, client)
    assert delivery.deliver(ids).sent == 1
    more, more_tokens = voip_rows(ddb, 2)
    ids, tokens = ids + more, tokens + more_tokens
    [old] = {r.jwt for r in apns.to(tokens[0])}
    apns.expire_seen_tokens()
    jwts_before = len(apns.jwts)
    run_like_the_task(delivery, ids[1:])  # two at once: both refused the old token, one new token made
    refused = [r for t in tokens[1:] for r in apns.to(t) if r.status == 403]
    assert refused and all(r.reason == "ExpiredProviderToken" and r.jwt == old for r in refused)
    assert all(len(apns.delivered(t)) == 1 for t in tokens[1:])
    assert len(apns.jwts) == jwts_before + 1
    new = apns.jwts[-1]
    assert {r.jwt for t in tokens[1:] for r in apns.delivered(t)} == {new}
    got = rows(ddb, ids)
    assert all(got[i]["status"] == "sent" and got[i]["attempts"] == 1 for i in ids)


def test_a_provider_token_is_reused_for_30_minutes(key_pem, monkeypatch):
    tokens = ProviderTokens(KEY_ID, TEAM_ID, key_pem)  # a cache of its own, not the process's
    now = [time.time()]
    monkeypatch.setattr(apns_voip.time, "time", lambda: now[0])
    first = tokens.current()
    now[0] += 29 * 60
    assert tokens.current() == first
    now[0] += 2 * 60
    second = tokens.current()
    assert second != first and tokens.current() == second
    # One refusal of a token makes one new token, however many requests it refused.
    third = tokens.refresh(second)
    assert third != second and tokens.refresh(second) == third
    import jwt

    assert jwt.get_unverified_header(third) == {"alg": "ES256", "kid": KEY_ID}
    assert jwt.decode(third, options={"verify_signature": False}) == {"iss": TEAM_ID, "iat": int(now[0])}


def test_a_token_apns_cannot_verify_is_made_again_once_then_the_push_fails(ddb, voip_database_url, apns,
                                                                            redis_server):
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    wrong = ApnsClient(apns.url, TOPIC, ProviderTokens.of(KEY_ID, TEAM_ID, other_key))
    ids, tokens = voip_rows(ddb, 1)
    try:
        run_like_the_task(delivery_for(voip_database_url, redis_server, wrong), ids)
    finally:
        wrong.close()
    requests = apns.to(tokens[0])
    assert [(r.status, r.reason) for r in requests] == [(403, "InvalidProviderToken")] * 2
    assert requests[0].jwt != requests[1].jwt  # made again once, then no more
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "failed" and "InvalidProviderToken" in got["last_error"] and got["disabled_at"] is None


def test_the_payload_stays_within_5_kb(ddb):
    from datetime import datetime, timedelta, timezone

    from orchestration.delivery.channel import Record

    now = datetime.now(timezone.utc)
    row = Record(kind="incoming_call", token=voip_token(), invitation_id=str(uuid.uuid4()), room_name="r" * 256,
                 call_type="video", caller_id=str(uuid.uuid4()), caller_name="Ü" * 10000,
                 ring_deadline=now + timedelta(seconds=30))
    message = apns_voip.voip_message(row, now)
    assert len(json.dumps(message["payload"]).encode()) <= 5120 and message["payload"]["caller_name"].startswith("Ü")
    assert message["expiration"] == int(row.ring_deadline.timestamp()) and message["collapse_id"] == row.invitation_id


# ---- only rings; development -------------------------------------------------------------------

def test_another_kind_is_refused_never_sent(ddb, voip_database_url, apns, client, redis_server):
    ids, tokens = voip_rows(ddb, 1, kind="missed_call")
    run_like_the_task(delivery_for(voip_database_url, redis_server, client), ids)
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "failed" and got["last_error"] == ONLY_RINGS and got["disabled_at"] is None
    assert not apns.to(tokens[0])


def test_development_writes_voip_pushes_as_json_files(ddb, voip_database_url, redis_server, tmp_path):
    settings = build_settings(callflow_outbox_dir=tmp_path, database_url=voip_database_url)
    assert not settings.apns_configured
    channel = ApnsVoipChannel.from_settings(settings)
    assert isinstance(channel.client, OutboxClient)
    ids, tokens = voip_rows(ddb, 1)
    assert delivery_for(voip_database_url, redis_server, channel.client).deliver(ids).sent == 1
    got = rows(ddb, ids)[ids[0]]
    files = list((tmp_path / "push").glob("apns_voip-*.json"))
    assert len(files) == 1 and re.fullmatch(rf"apns_voip-{got['invitation_id']}-[0-9a-f]{{8}}\.json", files[0].name)
    record = json.loads(files[0].read_text())
    assert record["token"] == tokens[0] and record["headers"]["apns-push-type"] == "voip"
    assert record["headers"]["apns-collapse-id"] == got["invitation_id"] and "authorization" not in record["headers"]
    assert record["payload"]["kind"] == "incoming_call" and record["payload"]["caller_name"] == "Eve Caller"
    assert got["status"] == "sent" and got["ticket_id"].startswith("outbox-")


def test_production_without_apns_sends_nothing(ddb, voip_database_url, redis_server, tmp_path):
    settings = build_settings(callflow_outbox_dir=tmp_path, database_url=voip_database_url)
    settings = settings.model_copy(update={"callflow_env": "production"})
    channel = ApnsVoipChannel.from_settings(settings)
    ids, _ = voip_rows(ddb, 1)
    assert delivery_for(voip_database_url, redis_server, channel.client).deliver(ids).failed == 1
    assert "not configured" in rows(ddb, ids)[ids[0]]["last_error"]
    assert not (tmp_path / "push").exists()


# ---- a first try from the process that decided it (the scheduler's) ----------------------------

def queued_deliveries(broker: redis_lib.Redis, queue: str = "push") -> list[dict]:
    """The task messages waiting on `queue` (Celery's JSON, its body base64): task, args, kwargs, eta."""
    out = []
    for raw in broker.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": args, "kwargs": kwargs,
                    "eta": message["headers"].get("eta")})
    return out


@pytest.fixture
def scheduler_for(redis_server):
    """A Celery scheduler on a broker database of its own, with first tries here for `deliverers`."""
    from celery import Celery

    from orchestration.adapters.celery_scheduler import CeleryScheduler

    url = redis_db_url(redis_server, 11)
    broker = redis_lib.Redis.from_url(url)
    broker.flushdb()
    apps = []

    def make(**deliverers) -> tuple[CeleryScheduler, redis_lib.Redis]:
        app = Celery("first-try-test", broker=url)
        apps.append(app)
        return CeleryScheduler(app, redis_client=broker, first_try_here=deliverers), broker

    yield make
    broker.flushdb()
    broker.close()


def test_a_rings_first_try_goes_from_the_deciding_process_without_a_task(ddb, voip_database_url, apns, client,
                                                                        redis_server, scheduler_for):
    ids, tokens = voip_rows(ddb, 2)
    scheduler, broker = scheduler_for(apns_voip=delivery_for(voip_database_url, redis_server, client))
    scheduler.deliver("apns_voip", ids)
    assert all(r["status"] == "sent" and r["attempts"] == 1 for r in rows(ddb, ids).values())
    assert [len(apns.delivered(t)) for t in tokens] == [1, 1]
    assert queued_deliveries(broker) == []  # nothing went through the queue


def test_a_first_try_that_must_wait_leaves_a_countdown_task(ddb, voip_database_url, apns, client, redis_server,
                                                            scheduler_for):
    """APNs gives no answer: the first try does not wait for the retry (no sleeping slot); the
    rows come back in a `callflow.deliver` task with a countdown and the attempt it left."""
    ids, tokens = voip_rows(ddb, 1)
    apns.answer_token(tokens[0], 503)
    scheduler, broker = scheduler_for(apns_voip=delivery_for(voip_database_url, redis_server, client))
    began = time.monotonic()
    scheduler.deliver("apns_voip", ids)
    assert time.monotonic() - began < 2.0
    queued = queued_deliveries(broker)
    assert len(queued) == 1 and queued[0]["task"] == "callflow.deliver" and queued[0]["args"] == ["apns_voip", ids]
    assert queued[0]["kwargs"]["failures"] == 1 and queued[0]["kwargs"]["back"] is True and queued[0]["eta"]
    got = rows(ddb, ids)[ids[0]]
    assert got["status"] == "pending" and got["attempts"] == 1 and "503" in got["last_error"]


def test_a_first_try_that_cannot_run_here_is_handed_to_a_task(ddb, voip_database_url, apns, client, redis_server,
                                                              scheduler_for):
    """Redis does not answer the deciding process (its decision is committed all the same): the
    rows go to a task as they would have without a first try here, and nothing is raised to the
    lifecycle."""
    ids, tokens = voip_rows(ddb, 1)
    gone = redis_lib.Redis(host="127.0.0.1", port=services.free_port(), socket_connect_timeout=1)
    channel = ApnsVoipChannel(client, apns_provider(_Settings(500)), voip_database_url)
    scheduler, broker = scheduler_for(apns_voip=PushDelivery(channel, voip_database_url, gone))
    scheduler.deliver("apns_voip", ids)
    queued = queued_deliveries(broker)
    assert [(q["args"], q["kwargs"], q["eta"]) for q in queued] == [(["apns_voip", ids], {}, None)]
    assert apns.delivered(tokens[0]) == [] and rows(ddb, ids)[ids[0]]["status"] == "pending"
