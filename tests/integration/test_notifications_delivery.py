"""Missed-call emails end to end below the lifecycle: outbox row -> `callflow.deliver ["email", ids]`
on a real Celery worker -> the real `resend` SDK -> the Resend stand-in; and the retry command.

The lifecycle is driven by hand here: each test writes a terminal invitation and its outbox row
as the lifecycle does, then sends the task. These workers use their own Redis database and their
own Postgres database, so the run's shared worker and beat (no RESEND_API_KEY: the development
outbox; the pending sweep) never see their rows or tasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery

from devstack import services
from devstack.standins.resend_server import Answer, ResendStandIn
from tests.conftest import subprocess_env

from orchestration import names

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "re_test_standin_key_0001"
APP_URL = "https://app.example.test"


# ---- helpers ---------------------------------------------------------------------------------

def redis_db_url(redis_server, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


def mail_env(database_url: str, broker_url: str, resend_api: ResendStandIn, **extra) -> dict[str, str]:
    return subprocess_env(DATABASE_URL=database_url, REDIS_URL=broker_url, RESEND_API_KEY=API_KEY,
                          RESEND_API_URL=resend_api.url, CALLFLOW_APP_URL=APP_URL,
                          CALLFLOW_EMAIL_FROM="Calls <calls@example.test>", **extra)


def user_maker(conn):
    """Like the run's `make_user`, on another database."""

    def make(name: str | None = None, email: str | None = None, **meta) -> str:
        uid = str(uuid.uuid4())
        if name is not None:
            meta["full_name"] = name
        conn.execute("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                     (uid, email if email is not None else f"user-{uid[:8]}@example.test", json.dumps(meta)))
        return uid

    return make


def start_worker(env: dict[str, str], log_dir: Path, name: str, concurrency: int = 2) -> services.Process:
    proc = services.celery_worker(env, log_dir, name=f"{name}-{uuid.uuid4().hex[:4]}", concurrency=concurrency)
    services.wait_for(lambda: "ready." in proc.log() or not proc.alive(), timeout=60, what=f"{name} ready")
    if not proc.alive():
        raise RuntimeError(f"{name} died:\n{proc.log()[-4000:]}")
    return proc


class Producer:
    """Sends tasks the way the lifecycle does (by name, to the `notifications` queue)."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("notifications-test", broker=broker_url)

    def send(self, notification_id: str) -> None:
        self.app.send_task(names.DELIVER, args=[names.CHANNEL_EMAIL, [notification_id]], queue="notifications")

    def sweep(self, min_age_seconds: float = 0.0) -> None:
        self.app.send_task(names.SWEEP_OUTBOX, args=[names.CHANNEL_EMAIL, min_age_seconds], queue="sweeps")


def ended_invitation(db, caller: str, callee: str, status: str = "missed", rang: float | None = 30.0,
                     call_type: str = "video") -> str:
    """A terminal invitation as the lifecycle leaves it (written with triggers off: no NOTIFY, so a
    running listener of the test run never sees it)."""
    now = datetime.now(timezone.utc)
    ringing_at = now - timedelta(seconds=rang) if rang is not None else None
    end_reason = {"missed": "timeout", "busy": "callee_busy", "cancelled": "caller_cancelled",
                  "declined": "declined", "accepted": "answered", "failed": "error"}[status]
    with db.transaction():
        db.execute("set local session_replication_role = replica")
        row = db.execute(
            """insert into public.call_invitations
                 (room_name, caller_id, callee_id, call_type, status, created_at, ringing_at, ring_deadline,
                  answered_at, ended_at, end_reason)
               values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning id::text as id""",
            (f"room-{uuid.uuid4().hex[:8]}", caller, callee, call_type, status,
             (ringing_at or now) - timedelta(seconds=1), ringing_at,
             ringing_at + timedelta(seconds=30) if ringing_at else None,
             now if status == "accepted" else None, now, end_reason),
        ).fetchone()
    return row["id"]


def outbox_row(db, invitation_id: str, recipient_id: str, created_ago: float = 0.0) -> str:
    """The lifecycle's insert (recipient_email from auth.users; a second insert does nothing)."""
    db.execute(
        """insert into public.notifications (kind, invitation_id, recipient_id, recipient_email, status, created_at)
           select 'missed_call', %s, u.id, u.email, 'pending', now() - make_interval(secs => %s)
             from auth.users u where u.id = %s
           on conflict (kind, invitation_id, recipient_id) do nothing""",
        (invitation_id, created_ago, recipient_id),
    )
    return db.execute(
        "select id::text as id from public.notifications where invitation_id = %s and recipient_id = %s",
        (invitation_id, recipient_id),
    ).fetchone()["id"]


def notification(db, nid: str) -> dict:
    return db.execute("select * from public.notifications where id = %s", (nid,)).fetchone()


def wait_status(db, nid: str, statuses=("sent", "failed", "skipped"), timeout: float = 20.0) -> dict:
    return services.wait_for(
        lambda: (row := notification(db, nid))["status"] in statuses and row,
        timeout=timeout, what=f"notification {nid} in {statuses}",
    )


def email_of(db, user_id: str) -> str:
    return db.execute("select email from auth.users where id = %s", (user_id,)).fetchone()["email"]


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mail_database_url():
    with services.scratch_database("callflow_mail") as url:
        yield url


@pytest.fixture
def db(mail_database_url):
    """This module's database (not the run's): autocommit, service role."""
    from orchestration.db import connect

    with connect(mail_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_user(db):
    return user_maker(db)


@pytest.fixture(scope="module")
def resend_api():
    server = ResendStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def standin(resend_api):
    resend_api.reset()
    return resend_api


@pytest.fixture(scope="module")
def broker_url(redis_server):
    url = redis_db_url(redis_server, 12)
    redis_lib.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def mail_worker(mail_database_url, broker_url, resend_api, log_dir):
    proc = start_worker(mail_env(mail_database_url, broker_url, resend_api, CALLFLOW_EMAIL_RATE_PER_SECOND="50"),
                        log_dir, "mail")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def producer(broker_url):
    return Producer(broker_url)


@pytest.fixture
def people(make_user):
    caller = make_user("Ana Souza")
    callee = make_user("Bruno Lima", email=f"bruno-{uuid.uuid4().hex[:8]}@example.test", timezone="Asia/Tokyo")
    return caller, callee


# ---- one email for the outcomes that call for one, none for the others -----------------------

@pytest.mark.parametrize("status, rang, call_type", [
    ("missed", 30.0, "video"),
    ("busy", None, "audio"),
    ("cancelled", 5.0, "video"),
])
def test_one_email_for_missed_busy_and_cancelled_after_3s(db, people, standin, mail_worker, producer,
                                                           status, rang, call_type):
    caller, callee = people
    inv = ended_invitation(db, caller, callee, status, rang, call_type)
    nid = outbox_row(db, inv, callee)
    producer.send(nid)
    row = wait_status(db, nid)
    assert row["status"] == "sent", row
    [mail] = standin.emails_to(email_of(db, callee))
    assert row["provider_message_id"] == mail.email_id
    assert row["attempts"] == 1 and row["sent_at"] is not None and row["last_error"] is None
    assert mail.idempotency_key == f"callflow-notification-{nid}"
    assert mail.body["subject"] == f"Missed {call_type} call from Ana Souza"
    assert mail.body["from"] == "Calls <calls@example.test>"
    assert "Hi Bruno Lima," in mail.body["text"] and "Hi Bruno Lima," in mail.body["html"]
    assert f'href="{APP_URL}"' in mail.body["html"] and "Call back" in mail.body["html"]
    assert "(Asia/Tokyo)" in mail.body["text"]  # the callee's zone


@pytest.mark.parametrize("status, rang", [("cancelled", 1.5), ("cancelled", None), ("declined", 5.0),
                                          ("accepted", 5.0), ("failed", None)])
def test_no_email_for_a_quick_cancel_declined_accepted_or_failed(db, people, standin, mail_worker, producer,
                                                                  status, rang):
    # The lifecycle writes no row for these; if one appears anyway, the sender still refuses it.
    caller, callee = people
    inv = ended_invitation(db, caller, callee, status, rang)
    nid = outbox_row(db, inv, callee)
    producer.send(nid)
    row = wait_status(db, nid)
    assert row["status"] == "skipped" and "does not call for a missed-call email" in row["last_error"]
    assert standin.requests_to(email_of(db, callee)) == []


def test_skipped_when_opted_out_or_without_an_address(db, make_user, standin, mail_worker, producer):
    caller = make_user("Ana Souza")
    opted_out = make_user("Carla", missed_call_emails=False)
    no_email = make_user("Dora", email="")
    rows = {}
    for callee in (opted_out, no_email):
        rows[callee] = outbox_row(db, ended_invitation(db, caller, callee), callee)
        producer.send(rows[callee])
    a = wait_status(db, rows[opted_out])
    b = wait_status(db, rows[no_email])
    assert a["status"] == "skipped" and "missed_call_emails is false" in a["last_error"]
    assert b["status"] == "skipped" and "no email address" in b["last_error"]
    assert a["attempts"] == b["attempts"] == 0
    assert standin.requests == []


def test_hostile_display_name_is_escaped_in_the_html(db, make_user, standin, mail_worker, producer):
    caller = make_user('<script>alert("pwned")</script><img src=x onerror=alert(1)>\r\nBcc: x@evil.test')
    callee = make_user("Eva")
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
    producer.send(nid)
    assert wait_status(db, nid)["status"] == "sent"
    [mail] = standin.emails_to(email_of(db, callee))
    html = mail.body["html"]
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "\r" not in mail.body["subject"] and "\n" not in mail.body["subject"]


# ---- exactly once ----------------------------------------------------------------------------

def test_duplicate_tasks_give_one_email(db, people, standin, mail_worker, producer):
    caller, callee = people
    inv = ended_invitation(db, caller, callee)
    nid = outbox_row(db, inv, callee)
    assert outbox_row(db, inv, callee) == nid  # a duplicate triggering event inserts nothing
    standin.script(Answer(200, delay=0.5))  # keep the first send in flight while the others arrive
    for _ in range(6):
        producer.send(nid)
    assert wait_status(db, nid)["status"] == "sent"
    time.sleep(1.5)  # let every duplicate run to its end
    assert len(standin.emails_to(email_of(db, callee))) == 1
    assert notification(db, nid)["status"] == "sent"


# ---- Resend's answers --------------------------------------------------------------------------

def test_429_and_500_are_retried_honouring_retry_after(db, people, standin, mail_worker, producer):
    caller, callee = people
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
    standin.script(Answer(429, retry_after=1), Answer(500))
    producer.send(nid)
    row = wait_status(db, nid, timeout=30)
    assert row["status"] == "sent" and row["attempts"] == 3
    reqs = standin.requests_to(email_of(db, callee))
    assert [r.status for r in reqs] == [429, 500, 200]
    assert {r.idempotency_key for r in reqs} == {f"callflow-notification-{nid}"}
    assert reqs[1].at - reqs[0].at >= 0.95  # retry-after: 1
    assert len(standin.emails_to(email_of(db, callee))) == 1


def test_422_fails_at_once(db, people, standin, mail_worker, producer):
    caller, callee = people
    standin.fail_recipient(email_of(db, callee), Answer(422, name="validation_error", message="Invalid `to` field."))
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
    producer.send(nid)
    row = wait_status(db, nid)
    assert row["status"] == "failed" and row["attempts"] == 1 and row["provider_message_id"] is None
    assert "422" in row["last_error"] and "Invalid `to` field." in row["last_error"]
    time.sleep(1.0)
    assert len(standin.requests_to(email_of(db, callee))) == 1


def test_no_answer_is_never_failed_however_many_tries_it_takes(db, people, standin, mail_worker, producer):
    # Eight 503s in a row (more than the old give-up after six): the row stays pending with the
    # error, and the email goes once Resend answers.
    caller, callee = people
    standin.script(*[Answer(503, retry_after=0.2, message="try later")] * 8)
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
    producer.send(nid)
    services.wait_for(lambda: len(standin.requests_to(email_of(db, callee))) >= 7, timeout=30, what="seven tries")
    waiting = notification(db, nid)
    assert waiting["status"] == "pending" and "503" in waiting["last_error"]
    row = wait_status(db, nid, timeout=30)
    assert row["status"] == "sent" and row["attempts"] == 9 and row["last_error"] is None
    assert [r.status for r in standin.requests_to(email_of(db, callee))] == [503] * 8 + [200]
    assert len(standin.emails_to(email_of(db, callee))) == 1


# ---- the retry command and the sweep ----------------------------------------------------------

def callflow_cli(database_url: str, broker_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(services.VENV_BIN / "callflow"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(DATABASE_URL=database_url, REDIS_URL=broker_url), timeout=60)


def test_retry_command_resends_only_failed_rows_resend_never_accepted(db, make_user, standin, mail_worker,
                                                                       producer, broker_url, mail_database_url):
    caller = make_user("Ana Souza")
    bad, good, accepted_then_failed = make_user("F1"), make_user("S1"), make_user("F2")
    standin.fail_recipient(email_of(db, bad), 422)
    failed_id = outbox_row(db, ended_invitation(db, caller, bad), bad)
    sent_id = outbox_row(db, ended_invitation(db, caller, good), good)
    for nid in (failed_id, sent_id):
        producer.send(nid)
    assert wait_status(db, failed_id)["status"] == "failed"
    assert wait_status(db, sent_id)["status"] == "sent"
    # A failed row that Resend did accept (it has a message id) is never re-sent.
    other_id = outbox_row(db, ended_invitation(db, caller, accepted_then_failed), accepted_then_failed)
    db.execute("update public.notifications set status = 'failed', provider_message_id = 'msg-1', "
               "last_error = 'x' where id = %s", (other_id,))

    refused = callflow_cli(mail_database_url, broker_url, "notifications", "retry", "--id", sent_id)
    assert refused.returncode != 0 and "is sent" in refused.stderr

    standin.reset()  # the address is fixed: Resend now accepts it
    done = callflow_cli(mail_database_url, broker_url, "notifications", "retry")
    assert done.returncode == 0, done.stderr
    assert failed_id in done.stdout and other_id not in done.stdout and sent_id not in done.stdout
    row = wait_status(db, failed_id, statuses=("sent",))
    assert row["attempts"] == 2 and row["provider_message_id"] == standin.emails_to(email_of(db, bad))[0].email_id
    assert notification(db, other_id)["status"] == "failed"
    assert len(standin.requests_to(email_of(db, bad))) == 1
    assert standin.requests_to(email_of(db, good)) == standin.requests_to(email_of(db, accepted_then_failed)) == []

    again = callflow_cli(mail_database_url, broker_url, "notifications", "retry", "--id", failed_id)
    assert again.returncode != 0 and "is sent" in again.stderr


def test_retry_right_after_a_refusal_that_followed_a_wait_sends_at_once(db, people, standin, mail_worker, producer,
                                                                         broker_url, mail_database_url):
    """A row that waited for its send time carries a waiting mark (its task is coming back); once
    its outcome is recorded nothing waits for it, so the retry command's first try must not be
    turned away by the mark (it used to be, for the mark's 30 s of slack: found by a CI run)."""
    from orchestration.delivery.rate import Rate

    caller, callee = people
    standin.fail_recipient(email_of(db, callee), 422)
    Rate(redis_lib.Redis.from_url(broker_url), 50, names.RATELIMIT_RESEND).hold_off(1.0)  # a 429's retry-after
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
    producer.send(nid)
    assert wait_status(db, nid)["status"] == "failed"
    standin.reset()
    done = callflow_cli(mail_database_url, broker_url, "notifications", "retry", "--id", nid)
    assert done.returncode == 0 and nid in done.stdout, done.stderr
    row = wait_status(db, nid, statuses=("sent",), timeout=10)
    assert row["attempts"] == 2 and len(standin.emails_to(email_of(db, callee))) == 1


def test_sweep_resends_a_pending_row_whose_task_got_lost(db, people, standin, mail_worker, producer):
    caller, callee = people
    nid = outbox_row(db, ended_invitation(db, caller, callee), callee, created_ago=30)
    # No task was ever sent for it (the lifecycle's process died right after its commit).
    producer.sweep()
    row = wait_status(db, nid)
    assert row["status"] == "sent" and len(standin.emails_to(email_of(db, callee))) == 1


def test_beat_runs_the_notification_sweep_on_the_sweeps_queue():
    import workers.tasks  # noqa: F401 - registers the tasks, as the worker does
    from workers.app import app

    entry = next(e for e in app.conf.beat_schedule.values()
                 if e["task"] == names.SWEEP_OUTBOX and e["args"] == [names.CHANNEL_EMAIL])
    assert entry["options"]["queue"] == "sweeps"
    assert names.CHANNEL_QUEUES[names.CHANNEL_EMAIL] == "notifications"
    task = app.tasks[names.DELIVER]
    assert task.acks_late and task.reject_on_worker_lost


# ---- a worker killed mid-send ------------------------------------------------------------------

def pool_children(proc: services.Process) -> list[int]:
    pid = proc.proc.pid
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_worker_process_killed_mid_send_gives_one_email(db, people, standin, redis_server, resend_api, log_dir,
                                                        mail_database_url):
    """The pool process dies while Resend is answering: Celery redelivers the task
    (acks_late + reject_on_worker_lost), the repeat carries the same Idempotency-Key."""
    url = redis_db_url(redis_server, 13)
    redis_lib.Redis.from_url(url).flushdb()
    worker = start_worker(mail_env(mail_database_url, url, resend_api), log_dir, "killchild", concurrency=1)
    try:
        caller, callee = people
        nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
        standin.script(Answer(200, delay=3.0))
        Producer(url).send(nid)
        services.wait_for(lambda: standin.requests_to(email_of(db, callee)), timeout=20, what="the first request")
        [child] = pool_children(worker)
        os.kill(child, signal.SIGKILL)
        row = wait_status(db, nid, timeout=30)
        assert row["status"] == "sent"
        [mail] = standin.emails_to(email_of(db, callee))
        assert row["provider_message_id"] == mail.email_id
        reqs = standin.requests_to(email_of(db, callee))
        assert len(reqs) >= 2 and all(r.idempotency_key == f"callflow-notification-{nid}" for r in reqs)
    finally:
        worker.stop()


def test_whole_worker_killed_mid_send_gives_one_email_through_the_sweep(db, people, standin, redis_server,
                                                                         resend_api, log_dir, mail_database_url):
    """The whole worker dies (its unacked task comes back only after the visibility timeout): the
    row lock died with its connection, so the pending sweep re-sends it at once."""
    url = redis_db_url(redis_server, 14)
    redis_lib.Redis.from_url(url).flushdb()
    env = mail_env(mail_database_url, url, resend_api)
    first = start_worker(env, log_dir, "killall", concurrency=1)
    second = None
    try:
        caller, callee = people
        nid = outbox_row(db, ended_invitation(db, caller, callee), callee)
        standin.script(Answer(200, delay=1.0))
        Producer(url).send(nid)
        services.wait_for(lambda: standin.requests_to(email_of(db, callee)), timeout=20, what="the first request")
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
        assert notification(db, nid)["status"] == "pending"
        second = start_worker(env, log_dir, "survivor", concurrency=1)
        Producer(url).sweep(min_age_seconds=0)
        row = wait_status(db, nid, timeout=30)
        assert row["status"] == "sent"
        [mail] = standin.emails_to(email_of(db, callee))
        assert row["provider_message_id"] == mail.email_id
        assert standin.requests_to(email_of(db, callee))[-1].replayed
    finally:
        first.stop()
        if second:
            second.stop()


# ---- one rate for all workers -------------------------------------------------------------------

def test_two_workers_never_exceed_the_configured_rate(db, make_user, standin, redis_server, resend_api, log_dir,
                                                      mail_database_url):
    rate = 5
    url = redis_db_url(redis_server, 10)
    redis_lib.Redis.from_url(url).flushdb()
    env = mail_env(mail_database_url, url, resend_api, CALLFLOW_EMAIL_RATE_PER_SECOND=str(rate))
    workers = [start_worker(env, log_dir, f"rate{i}", concurrency=2) for i in range(2)]
    try:
        caller = make_user("Ana Souza")
        ids = []
        for i in range(40):
            callee = make_user(f"Callee {i}")
            ids.append(outbox_row(db, ended_invitation(db, caller, callee), callee))
        producer = Producer(url)
        for nid in ids:
            producer.send(nid)
        services.wait_for(
            lambda: db.execute("select count(*) as n from public.notifications where id = any(%s::uuid[]) "
                               "and status = 'sent'", (ids,)).fetchone()["n"] == 40,
            timeout=60, interval=0.25, what="40 emails sent")
        times = sorted(r.at for r in standin.requests)
        assert len(times) == 40 and len(standin.emails) == 40
        worst = max(sum(1 for t in times[i:] if t < t0 + 1.0) for i, t0 in enumerate(times))
        assert worst <= rate, f"{worst} requests within one second"
        # Both workers did send (the limit is global, not per worker).
        assert all("delivery: sent" in w.log() for w in workers)
    finally:
        for w in workers:
            w.stop()
