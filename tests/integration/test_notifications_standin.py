"""The Resend mailer (real `resend` SDK) against the stand-in, and the Redis token bucket."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from devstack.standins.resend_server import Answer, ResendStandIn
from orchestration.notifications.mailers import (
    OutgoingEmail,
    PermanentSendError,
    ResendMailer,
    RetryableSendError,
    idempotency_key,
)
from orchestration.delivery.rate import Rate


@pytest.fixture(scope="module")
def standin():
    server = ResendStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def resend_api(standin):
    standin.reset()
    return standin


def message(to="bruno@example.test", subject="Missed video call from Ana Souza") -> OutgoingEmail:
    nid = str(uuid.uuid4())
    return OutgoingEmail(notification_id=nid, idempotency_key=idempotency_key(nid), sender="Calls <calls@example.test>",
                         to=to, subject=subject, html="<p>hi</p>", text="hi", tags=(("kind", "missed_call"),))


def test_send_returns_the_message_id_and_sends_the_idempotency_key(resend_api):
    mailer = ResendMailer("re_test_standin_0001", resend_api.url)
    msg = message()
    message_id = mailer.send(msg)
    [req] = resend_api.requests
    assert req.email_id == message_id and req.status == 200
    assert req.idempotency_key == msg.idempotency_key
    assert req.headers["Authorization"] == "Bearer re_test_standin_0001"
    assert req.body["to"] == ["bruno@example.test"] and req.body["subject"] == msg.subject
    assert req.body["html"] == "<p>hi</p>" and req.body["text"] == "hi"
    assert req.body["tags"] == [{"name": "kind", "value": "missed_call"}]


def test_a_repeated_key_gets_the_first_answer_without_a_second_email(resend_api):
    mailer = ResendMailer("re_test_standin_0001", resend_api.url)
    msg = message()
    assert mailer.send(msg) == mailer.send(msg)
    assert len(resend_api.emails) == 1 and resend_api.requests[1].replayed


def test_a_key_in_flight_gets_409_concurrent_which_is_retryable(resend_api):
    resend_api.script(Answer(200, delay=1.0))
    mailer = ResendMailer("re_test_standin_0001", resend_api.url)
    msg = message()
    first: list = []
    t = threading.Thread(target=lambda: first.append(mailer.send(msg)))
    t.start()
    time.sleep(0.3)
    with pytest.raises(RetryableSendError) as err:
        mailer.send(msg)
    assert err.value.status == 409 and err.value.error_type == "concurrent_idempotent_requests"
    t.join()
    assert mailer.send(msg) == first[0]
    assert len(resend_api.emails) == 1


def test_same_key_other_body_is_a_permanent_error(resend_api):
    mailer = ResendMailer("re_test_standin_0001", resend_api.url)
    msg = message()
    mailer.send(msg)
    changed = OutgoingEmail(**{**msg.__dict__, "subject": "something else"})
    with pytest.raises(PermanentSendError) as err:
        mailer.send(changed)
    assert err.value.error_type == "invalid_idempotent_request"


def test_429_500_422_are_sorted_and_a_failed_request_does_not_use_up_its_key(resend_api):
    resend_api.script(Answer(429, retry_after=2), 500, 422)
    mailer = ResendMailer("re_test_standin_0001", resend_api.url)
    msg = message()
    with pytest.raises(RetryableSendError) as e429:
        mailer.send(msg)
    assert e429.value.status == 429 and e429.value.retry_after == 2.0
    with pytest.raises(RetryableSendError) as e500:
        mailer.send(msg)
    assert e500.value.status == 500
    with pytest.raises(PermanentSendError) as e422:
        mailer.send(msg)
    assert e422.value.status == 422
    assert mailer.send(msg)  # the key still works after failed requests
    assert len(resend_api.emails) == 1


def test_connection_refused_is_retryable():
    mailer = ResendMailer("re_test_standin_0001", "http://127.0.0.1:9", timeout=2)
    with pytest.raises(RetryableSendError):
        mailer.send(message())


# ---- the token bucket ------------------------------------------------------------------------

@pytest.fixture
def bucket_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_bucket_spaces_grants_on_redis_clock(bucket_redis):
    key = f"test:bucket:{uuid.uuid4().hex}"
    bucket = Rate(bucket_redis, rate_per_second=10, margin=0.1, key=key)
    assert bucket.try_acquire() == 0.0
    wait = bucket.try_acquire()
    assert 0.09 <= wait <= 0.111  # (1 + margin) / rate
    time.sleep(wait + 0.005)
    assert bucket.try_acquire() == 0.0


def test_bucket_shared_by_threads_with_their_own_connections_never_bursts(redis_server):
    key = f"test:bucket:{uuid.uuid4().hex}"
    grants: list[float] = []
    lock = threading.Lock()

    def work():
        client = redis.Redis.from_url(redis_server.url)
        bucket = Rate(client, rate_per_second=20, margin=0.1, key=key)
        for _ in range(4):
            # Each grant's time on Redis's clock (what the bucket decides on): the moment a thread
            # got to note it carries the scheduler's jitter, tens of ms on a loaded machine.
            while True:
                wait, slot = bucket.book(1, horizon=0.0)  # what `acquire` asks, with the slot's time
                if wait <= 0:
                    break
                time.sleep(wait + 0.001)
            with lock:
                grants.append(slot)
        client.close()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grants.sort()
    assert len(grants) == 24
    gaps = [b - a for a, b in zip(grants, grants[1:])]
    assert min(gaps) >= 0.0549, gaps  # 1.1 / 20 = 55 ms (slots are whole milliseconds)
    for i, t0 in enumerate(grants):
        assert sum(1 for t in grants[i:] if t < t0 + 1.0) <= 20


def test_acquire_says_when_to_come_back_instead_of_waiting_long(bucket_redis):
    key = f"test:bucket:{uuid.uuid4().hex}"
    bucket = Rate(bucket_redis, rate_per_second=0.5, margin=0.1, key=key)  # one per 2.2 s
    assert bucket.acquire(max_wait=0.1) == 0.0
    started = time.monotonic()
    come_back = bucket.acquire(max_wait=0.1)
    assert time.monotonic() - started < 0.1
    assert 2.0 <= come_back <= 2.2 + 2.2


def test_hold_off_stops_everybody(bucket_redis):
    key = f"test:bucket:{uuid.uuid4().hex}"
    bucket = Rate(bucket_redis, rate_per_second=100, margin=0.1, key=key)
    bucket.hold_off(1.0)
    assert 0.9 <= bucket.try_acquire() <= 1.0


def test_a_configured_rate_above_the_accounts_limit_is_reported_once(resend_api):
    from structlog.testing import capture_logs

    resend_api.rate_limit = 2  # the stand-in's ratelimit-limit header
    mailer = ResendMailer("re_test_standin_0001", resend_api.url, configured_rate=10)
    with capture_logs() as logs:
        mailer.send(message())
        mailer.send(message())
    warnings = [e for e in logs if "above the Resend account's limit" in e["event"]]
    assert len(warnings) == 1 and warnings[0]["resend_limit"] == 2.0 and warnings[0]["configured"] == 10
