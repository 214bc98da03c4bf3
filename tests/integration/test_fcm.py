"""Pushes to Android devices through FCM HTTP v1 (issue 25), against the FCM stand-in
(devstack/standins/fcm_server.py): the real channel (orchestration/channels/fcm.py) with its real
google-auth service account, through the real delivery loop, on a database of this module's own.

A test service account (an RSA key made here) signs its JWTs; the stand-in checks them, issues
access tokens, and checks every message (Bearer token it issued, project, data values strings,
HIGH priority, ttl form).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis as redis_lib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devstack import services
from orchestration.channels.fcm import (
    MISSED_CALL_TTL, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, SCOPE, TIMEOUT_SECONDS, FcmChannel, FcmClient,
    NotConfigured, OutboxClient, fcm_provider,
)
from orchestration.channels.fcm import client_for as client_for_settings
from orchestration.delivery.loop import Attempt, Deliverer
from orchestration.delivery.rate import Rate
from orchestration.push.messages import CALL_ENDED_TTL
from orchestration.shared_backoff import SharedBackoff
from tests.integration.test_notifications_delivery import redis_db_url, user_maker
from tests.integration.test_push import run_like_the_task
from devstack.standins.fcm_server import FcmStandin

PROJECT = "callflow-fcm-test"
EMAIL = "callflow-push@callflow-fcm-test.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def service_account() -> tuple[dict, object]:
    """A service account key file's fields (what Firebase's console hands out), and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": PROJECT, "private_key_id": uuid.uuid4().hex,
            "private_key": pem, "client_email": EMAIL, "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token", "universe_domain": "googleapis.com"}
    return info, key.public_key()


@pytest.fixture(scope="module")
def fcm(service_account):
    with FcmStandin(project_id=PROJECT) as server:
        server.add_account(EMAIL, service_account[1])
        yield server


@pytest.fixture(scope="module")
def fcm_database_url():
    with services.scratch_database("callflow_fcm") as url:
        yield url


@pytest.fixture
def fdb(fcm_database_url):
    from orchestration.db import connect

    with connect(fcm_database_url, autocommit=True) as conn:
        yield conn


class _Settings:
    callflow_push_rate_per_second = 500.0


def delivery(database_url: str, redis_server, client, loop: str | None = None) -> Deliverer:
    """The FCM channel's real deliverer, with a rate and a retry loop of its own (no other test's
    outage or booking in its way)."""
    redis_client = redis_lib.Redis.from_url(redis_db_url(redis_server, 10))
    channel = FcmChannel(client, fcm_provider(_Settings), database_url)
    rate = Rate(redis_client, channel.provider.rate_per_second, key=f"callflow:test:rate:fcm-{uuid.uuid4().hex[:6]}")
    backoff = SharedBackoff(redis_client, f"fcm-test-{loop or uuid.uuid4().hex[:6]}", RETRY_BASE_SECONDS,
                            RETRY_MAX_SECONDS, probe_seconds=TIMEOUT_SECONDS + 2)
    return Deliverer(channel, database_url, redis_client, rate=rate, loop=backoff)


def client_for(fcm: FcmStandin, service_account) -> FcmClient:
    return FcmClient(PROJECT, service_account[0], fcm.url, fcm.token_url)


def fcm_token() -> str:
    return f"f{uuid.uuid4().hex[:10]}:APA91b{uuid.uuid4().hex}{uuid.uuid4().hex}"


def pushes(fdb, n: int, kind: str = "incoming_call", deadline_in: float = 30.0,
           invitation_status: str = "ringing") -> tuple[list[str], list[str], list[str]]:
    """n invitations from Eve, one FCM device each, and their pending `kind` rows: (row ids, device
    tokens, invitation ids). `invitation_status` other than ringing: the call moved on (as the
    lifecycle leaves it for call_ended / missed_call)."""
    make_user = user_maker(fdb)
    caller = make_user("Eve Example")
    ids, tokens, invitations = [], [], []
    for _ in range(n):
        callee, tok = make_user(), fcm_token()
        t = fdb.execute("""insert into public.push_tokens (user_id, token, platform, provider)
                           values (%s, %s, 'android', 'fcm') returning id""", (callee, tok)).fetchone()["id"]
        inv = fdb.execute("""insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                             values (%s, %s, %s, 'audio') returning id""",
                          (f"fcm-{uuid.uuid4().hex[:8]}", caller, callee)).fetchone()["id"]
        fdb.execute("""update public.call_invitations set status = 'ringing', ringing_at = now(),
                          ring_deadline = now() + make_interval(secs => %s) where id = %s""", (deadline_in, inv))
        if invitation_status != "ringing":
            fdb.execute("update public.call_invitations set status = %s where id = %s", (invitation_status, inv))
        ids.append(str(fdb.execute("""insert into public.push_messages (kind, invitation_id, push_token_id)
                                      values (%s, %s, %s) returning id""", (kind, inv, t)).fetchone()["id"]))
        tokens.append(tok)
        invitations.append(str(inv))
    return ids, tokens, invitations


def rows(fdb, ids: list[str]) -> dict[str, dict]:
    return {str(r["id"]): r for r in fdb.execute(
        "select id, status, attempts, ticket_id, last_error from public.push_messages where id = any(%s::uuid[])",
        (ids,)).fetchall()}


def invitation(fdb, inv: str) -> dict:
    return fdb.execute("""select i.*, u.raw_user_meta_data->>'full_name' as caller_name from public.call_invitations i
                          join auth.users u on u.id = i.caller_id where i.id = %s""", (inv,)).fetchone()


# ---- the messages --------------------------------------------------------------------------------

def test_an_incoming_call_is_one_high_priority_data_message_that_lives_until_the_deadline(
        fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, invs = pushes(fdb, 1, deadline_in=20)
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    [message] = fcm.delivered(token=tokens[0])
    inv = invitation(fdb, invs[0])
    assert message["data"] == {
        "kind": "incoming_call", "invitation_id": invs[0], "room_name": inv["room_name"], "call_type": "audio",
        "caller_id": str(inv["caller_id"]), "caller_name": "Eve Example",
        "ring_deadline": inv["ring_deadline"].isoformat()}
    assert all(isinstance(v, str) for v in message["data"].values())
    assert "notification" not in message and message["token"] == tokens[0]
    android = message["android"]
    assert android["priority"] == "HIGH" and android["collapse_key"] == invs[0]
    assert android["ttl"].endswith("s") and 10 <= int(android["ttl"][:-1]) <= 20  # to the ring deadline
    assert fcm.answered(tokens[0]) == [200]  # exactly once
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "sent" and row["attempts"] == 1
    assert row["ticket_id"].startswith(f"projects/{PROJECT}/messages/")


def test_call_ended_and_missed_call_are_data_messages_too(fdb, fcm_database_url, fcm, service_account, redis_server):
    ended, ended_tokens, ended_invs = pushes(fdb, 1, kind="call_ended", invitation_status="accepted")
    missed, missed_tokens, missed_invs = pushes(fdb, 1, kind="missed_call", invitation_status="missed")
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ended + missed)
    [end] = fcm.delivered(token=ended_tokens[0])
    assert end["data"]["kind"] == "call_ended" and end["data"]["invitation_id"] == ended_invs[0]
    assert (end["data"]["status"], end["data"]["end_reason"]) == ("accepted", "answered")
    assert "ring_deadline" not in end["data"]
    assert end["android"] == {"priority": "HIGH", "ttl": f"{CALL_ENDED_TTL}s", "collapse_key": ended_invs[0]}
    [miss] = fcm.delivered(token=missed_tokens[0])
    assert miss["data"]["kind"] == "missed_call" and miss["data"]["caller_name"] == "Eve Example"
    assert miss["data"]["call_type"] == "audio" and "status" not in miss["data"]
    assert miss["android"] == {"priority": "HIGH", "ttl": f"{MISSED_CALL_TTL}s", "collapse_key": missed_invs[0]}
    for m in (end, miss):
        assert all(isinstance(v, str) for v in m["data"].values()) and "notification" not in m
    assert {r["status"] for r in rows(fdb, ended + missed).values()} == {"sent"}


def test_an_incoming_call_past_its_deadline_is_not_pushed(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, invs = pushes(fdb, 1)
    fdb.execute("update public.call_invitations set ring_deadline = now() - interval '1 second' where id = %s", (invs[0],))
    d = delivery(fcm_database_url, redis_server, client_for(fcm, service_account))
    assert d.run(ids, Attempt()).skipped == 1
    assert fcm.answered(tokens[0]) == []
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "skipped" and "deadline" in row["last_error"]


def test_a_probe_that_waits_for_its_send_time_hands_the_probe_on(fdb, fcm_database_url, fcm, service_account,
                                                                 redis_server):
    """After no answer, FCM's retry loop lets one probe ask. A probe whose rows must first wait for
    their booked send time asks nothing, so it ends its lease at once: the next probe (its own task,
    back at its send time) goes then, not a whole lease (the client's timeout) later."""
    d = delivery(fcm_database_url, redis_server, client_for(fcm, service_account))
    d.rate = Rate(d.redis, 1.0, key=f"callflow:test:rate:fcm-{uuid.uuid4().hex[:6]}")
    d.rate.book(3)  # the line is booked ahead: the next request waits for its send time
    time.sleep(d.loop.failed(d.loop.turn()) + 0.05)  # an outage's first step is over
    ids, tokens, _ = pushes(fdb, 1, deadline_in=30)
    out = d.run(ids, Attempt())
    assert out.sent == 0 and out.come_back_in > 1 and "booked send time" in out.cause, out.summary
    after = d.loop.turn()
    assert after.wait == 0 and after.probe is not None  # the probe is free for whoever comes next
    d.loop.release(after)
    time.sleep(out.come_back_in)
    assert d.run(out.ids, out.again).sent == 1  # back at its send time: it probes, and FCM answers
    assert fcm.answered(tokens[0]) == [200] and d.loop.failures == 0


def test_what_a_run_delivered_is_counted_for_metrics(fdb, fcm_database_url, fcm, service_account, redis_server):
    from orchestration import names
    from orchestration.delivery.metrics import DeliveryCollector

    d = delivery(fcm_database_url, redis_server, client_for(fcm, service_account))
    field = lambda status: f"{d.channel.name}:{status}"  # noqa: E731
    before = {k.decode(): int(v) for k, v in d.redis.hgetall(names.DELIVERY_OUTCOMES).items()}
    ids, _, _ = pushes(fdb, 2)
    late, _, late_invs = pushes(fdb, 1)
    fdb.execute("update public.call_invitations set ring_deadline = now() - interval '1 second' where id = %s",
                (late_invs[0],))
    out = d.run(ids + late, Attempt())
    assert (out.sent, out.skipped) == (2, 1)
    after = {k.decode(): int(v) for k, v in d.redis.hgetall(names.DELIVERY_OUTCOMES).items()}
    assert after[field("sent")] - before.get(field("sent"), 0) == 2
    assert after[field("skipped")] - before.get(field("skipped"), 0) == 1
    [family] = DeliveryCollector(redis_db_url(redis_server, 10)).collect()
    samples = {(s.labels["channel"], s.labels["status"]): s.value for s in family.samples}
    assert samples[(d.channel.name, "sent")] == after[field("sent")]


# ---- the access token ----------------------------------------------------------------------------

def test_one_access_token_serves_many_messages(fdb, fcm_database_url, fcm, service_account, redis_server):
    client = client_for(fcm, service_account)
    issued, first = len(fcm.tokens_issued), len(fcm.sends)
    ids, tokens, _ = pushes(fdb, 25)  # two batches (20 + 5): 25 requests
    run_like_the_task(delivery(fcm_database_url, redis_server, client), ids)
    more, more_tokens, _ = pushes(fdb, 3)  # a later run of the same process
    run_like_the_task(delivery(fcm_database_url, redis_server, client), more)
    sends = fcm.sends[first:]
    assert sorted(r.token for r in sends) == sorted(tokens + more_tokens) and {r.status for r in sends} == {200}
    assert len(fcm.tokens_issued) == issued + 1 and client.refreshes == 1
    assert {r.access_token for r in sends} == {fcm.tokens_issued[-1]}
    assert len({r.peer for r in sends}) <= 10  # kept-alive connections, at most one per sending thread
    grant = fcm.token_requests[-1]
    assert grant.status == 200 and grant.claims["iss"] == EMAIL and grant.claims["aud"] == fcm.token_url
    assert SCOPE in grant.claims["scope"].split() and grant.claims["exp"] - grant.claims["iat"] <= 3600
    assert {r["status"] for r in rows(fdb, ids + more).values()} == {"sent"}


def test_a_401_refreshes_the_access_token_once_and_sends_the_message(fdb, fcm_database_url, fcm, service_account,
                                                                    redis_server):
    client = client_for(fcm, service_account)
    ids, tokens, _ = pushes(fdb, 3)
    fcm.fail(401, token=tokens[1])  # the token is revoked: every message in flight with it gets 401
    issued = len(fcm.tokens_issued)
    run_like_the_task(delivery(fcm_database_url, redis_server, client), ids)
    assert len(fcm.tokens_issued) == issued + 2 and client.refreshes == 2  # the first, and one refresh
    assert fcm.answered(tokens[1]) == [401, 200]
    first_try, second_try = [r.access_token for r in fcm.sends if r.token == tokens[1]]
    assert first_try != second_try == fcm.tokens_issued[-1]
    assert all(len(fcm.delivered(token=t)) == 1 for t in tokens)
    assert {(r["status"], r["attempts"]) for r in rows(fdb, ids).values()} == {("sent", 1)}


def test_an_access_token_near_its_expiry_is_refreshed_before_a_send(fdb, fcm_database_url, fcm, service_account,
                                                                   redis_server):
    from google.auth import _helpers

    client = client_for(fcm, service_account)
    first, tokens, _ = pushes(fdb, 1)
    run_like_the_task(delivery(fcm_database_url, redis_server, client), first)
    assert client.refreshes == 1
    client.credentials.expiry = _helpers.utcnow() + timedelta(seconds=60)  # within google-auth's margin
    more, more_tokens, _ = pushes(fdb, 2)
    run_like_the_task(delivery(fcm_database_url, redis_server, client), more)
    assert client.refreshes == 2
    assert [r.status for r in fcm.sends if r.token in more_tokens] == [200, 200]  # no 401 first
    assert {r.access_token for r in fcm.sends if r.token in more_tokens} == {fcm.tokens_issued[-1]}


def test_a_service_account_the_token_url_refuses_fails_the_batch(fdb, fcm_database_url, fcm, service_account,
                                                                redis_server):
    ids, tokens, _ = pushes(fdb, 2)
    fcm.fail_token(400)  # invalid_grant: a revoked key
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    got = rows(fdb, ids)
    assert {r["status"] for r in got.values()} == {"failed"}
    assert all("refused the service account" in r["last_error"] for r in got.values())
    assert fcm.token_requests[-1].status == 400 and all(fcm.answered(t) == [] for t in tokens)


# ---- FCM's answers -------------------------------------------------------------------------------

def test_an_unregistered_device_is_turned_off(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, _ = pushes(fdb, 2)
    fcm.unregister(tokens[1])
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    got = rows(fdb, ids)
    assert got[ids[0]]["status"] == "sent"
    assert got[ids[1]]["status"] == "failed" and "UNREGISTERED" in got[ids[1]]["last_error"]
    assert fcm.answered(tokens[1]) == [404]  # not tried again
    disabled = {r["token"]: r["disabled_at"] for r in fdb.execute(
        "select token, disabled_at from public.push_tokens where token = any(%s)", (tokens,)).fetchall()}
    assert disabled[tokens[1]] is not None and disabled[tokens[0]] is None


def test_an_invalid_argument_fails_the_message_only(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, _ = pushes(fdb, 2)
    fcm.fail(400, token=tokens[0])
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    got = rows(fdb, ids)
    assert got[ids[0]]["status"] == "failed" and "INVALID_ARGUMENT" in got[ids[0]]["last_error"]
    assert got[ids[1]]["status"] == "sent" and fcm.answered(tokens[0]) == [400]
    assert fdb.execute("select disabled_at from public.push_tokens where token = %s",
                       (tokens[0],)).fetchone()["disabled_at"] is None


def test_a_429_is_retried_after_its_retry_after_and_sent_once(fdb, fcm_database_url, fcm, service_account,
                                                             redis_server):
    ids, tokens, _ = pushes(fdb, 1)
    fcm.fail(429, token=tokens[0], retry_after=1.5)
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    assert fcm.answered(tokens[0]) == [429, 200]
    first, second = [r.at for r in fcm.sends if r.token == tokens[0]]
    assert second - first >= 1.4  # Retry-After honoured
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "sent" and row["attempts"] == 2


def test_503s_then_a_200_give_one_delivery(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, _ = pushes(fdb, 1)
    fcm.fail(503, times=2, token=tokens[0])
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    assert fcm.answered(tokens[0]) == [503, 503, 200] and len(fcm.delivered(token=tokens[0])) == 1
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "sent" and row["attempts"] == 3


def test_in_a_batch_only_the_unanswered_messages_go_again(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, _ = pushes(fdb, 3)
    fcm.fail(500, token=tokens[0])
    fcm.fail(429, token=tokens[2], retry_after=1)
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    assert fcm.answered(tokens[0]) == [500, 200] and fcm.answered(tokens[1]) == [200]
    assert fcm.answered(tokens[2]) == [429, 200]
    got = rows(fdb, ids)
    assert [got[i]["attempts"] for i in ids] == [2, 1, 2] and {r["status"] for r in got.values()} == {"sent"}


def test_fcm_away_until_past_the_deadline_skips_the_ring(fdb, fcm_database_url, fcm, service_account, redis_server):
    ids, tokens, _ = pushes(fdb, 1, deadline_in=2.5)
    fcm.fail(503, times=50, token=tokens[0])
    run_like_the_task(delivery(fcm_database_url, redis_server, client_for(fcm, service_account)), ids)
    assert fcm.delivered(token=tokens[0]) == [] and fcm.answered(tokens[0])[0] == 503
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "skipped" and "deadline" in row["last_error"]


def test_no_answer_from_fcm_is_no_answer(fdb, fcm_database_url, service_account, redis_server):
    ids, _, _ = pushes(fdb, 1, deadline_in=60)
    nowhere = f"http://127.0.0.1:{services.free_port()}"
    client = FcmClient(PROJECT, service_account[0], nowhere, nowhere + "/token", timeout=2)
    out = delivery(fcm_database_url, redis_server, client).run(ids, Attempt())
    assert out.sent == out.failed == 0 and out.come_back_in is not None and out.ids == ids
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "pending" and "token URL gave no answer" in row["last_error"]


# ---- development ---------------------------------------------------------------------------------

def test_development_writes_fcm_messages_as_json_files(fdb, fcm_database_url, redis_server, tmp_path):
    ids, tokens, invs = pushes(fdb, 1)
    out = delivery(fcm_database_url, redis_server, OutboxClient(tmp_path / "push")).run(ids, Attempt())
    assert out.sent == 1
    [path] = (tmp_path / "push").glob("fcm-*.json")
    assert path.name.startswith(f"fcm-incoming_call-{invs[0]}-") and len(path.stem.rsplit("-", 1)[1]) == 8
    body = json.loads(path.read_text())
    assert body["message"]["token"] == tokens[0] and body["message"]["data"]["kind"] == "incoming_call"
    assert rows(fdb, ids)[ids[0]]["ticket_id"].endswith(path.stem.rsplit("-", 1)[1])


def test_from_settings_takes_the_key_as_json_text_or_a_path(fcm, service_account, tmp_path):
    from config.settings import Settings

    info = service_account[0]
    (tmp_path / "key.json").write_text(json.dumps(info))
    for value in (json.dumps(info), str(tmp_path / "key.json")):
        channel = FcmChannel.from_settings(Settings(fcm_project_id=PROJECT, fcm_service_account_json=value,
                                                    fcm_url=fcm.url, fcm_token_url=fcm.token_url))
        assert isinstance(channel.client, FcmClient) and channel.limited
        assert channel.client.url == f"{fcm.url}/v1/projects/{PROJECT}/messages:send"
        assert channel.client.access_token() in fcm.tokens_issued
        assert channel.provider.rate_key == "callflow:ratelimit:fcm"
    development = FcmChannel.from_settings(Settings(callflow_outbox_dir=tmp_path / "outbox"))
    assert isinstance(development.client, OutboxClient) and not development.limited
    assert development.client.folder == tmp_path / "outbox" / "push"


def test_production_without_fcm_sends_nothing_and_says_why(fdb, fcm_database_url, redis_server):
    ids, _, _ = pushes(fdb, 1)
    client = client_for_settings(SimpleNamespace(fcm_configured=False, is_production=True))
    assert isinstance(client, NotConfigured)
    assert delivery(fcm_database_url, redis_server, client).run(ids, Attempt()).failed == 1
    row = rows(fdb, ids)[ids[0]]
    assert row["status"] == "failed" and "FCM is not configured" in row["last_error"]
