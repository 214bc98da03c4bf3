"""Missed-call emails through the real lifecycle: invitation changes on the queue -> the lifecycle
worker ends the invitation and writes the outbox row -> `callflow.deliver ["email", ids]` -> Resend
stand-in (or, in development without RESEND_API_KEY, the `.eml` outbox)."""

from __future__ import annotations

import email
import email.policy
import time
import uuid

import redis as redis_lib
from celery import Celery

from devstack import services
from devstack.services import wait_for
from devstack.standins.resend_server import ResendStandIn
from tests.integration.test_notifications_delivery import (
    mail_env,
    redis_db_url,
    start_worker,
    user_maker,
    wait_status,
)
from tests.support.calls import client_set_status, enqueue_change, insert_invitation, wait_invitation


def note_of(db, invitation_id: str) -> dict | None:
    return db.execute("select * from public.notifications where invitation_id = %s", (invitation_id,)).fetchone()


def email_of(db, user_id: str) -> str:
    return db.execute("select email from auth.users where id = %s", (user_id,)).fetchone()["email"]


def test_lifecycle_outcomes_give_exactly_the_emails_they_call_for(livekit, redis_server, log_dir):
    # Its own Postgres and Redis databases: the run's shared worker and beat never see this call.
    from orchestration.db import connect

    database_url = services.create_database(prefix="callflow_mail")
    resend_api = ResendStandIn().start()
    url = redis_db_url(redis_server, 11)
    redis_lib.Redis.from_url(url).flushdb()
    worker = start_worker(mail_env(database_url, url, resend_api), log_dir, "lifecycle-mail", concurrency=4)
    producer = Celery("lifecycle-test", broker=url)
    conn = connect(database_url, autocommit=True)
    db, make_user = conn, user_maker(conn)
    try:
        caller = make_user("Ana Souza")
        missed_to, slow_to, quick_to, declined_to = (make_user(n) for n in ("Bo", "Cy", "Di", "Ed"))
        invs = {who: insert_invitation(database_url, caller, who) for who in (missed_to, slow_to, quick_to, declined_to)}
        for inv in invs.values():
            enqueue_change(inv["id"], "pending", app=producer)
        for inv in invs.values():
            wait_invitation(db, inv["id"], "ringing")
        client_set_status(database_url, caller, invs[quick_to]["id"], "cancelled")
        client_set_status(database_url, declined_to, invs[declined_to]["id"], "declined")
        for who, status in ((quick_to, "cancelled"), (declined_to, "declined")):
            for _ in range(2):  # a duplicate of the triggering event
                enqueue_change(invs[who]["id"], status, app=producer)
        time.sleep(3.1)
        client_set_status(database_url, caller, invs[slow_to]["id"], "cancelled")
        for _ in range(2):
            enqueue_change(invs[slow_to]["id"], "cancelled", app=producer)
        wait_invitation(db, invs[missed_to]["id"], "missed", timeout=20)

        for who in (missed_to, slow_to):
            note = wait_for(lambda: note_of(db, invs[who]["id"]), what="outbox row")
            assert wait_status(db, str(note["id"]))["status"] == "sent"
        enqueue_change(invs[missed_to]["id"], "missed", app=producer)  # late duplicate
        time.sleep(1.0)
        assert len(resend_api.emails_to(email_of(db, missed_to))) == 1
        assert len(resend_api.emails_to(email_of(db, slow_to))) == 1
        assert resend_api.emails_to(email_of(db, slow_to))[0].body["subject"] == "Missed video call from Ana Souza"
        for who in (quick_to, declined_to):
            assert note_of(db, invs[who]["id"]) is None
            assert resend_api.requests_to(email_of(db, who)) == []
        assert len(resend_api.emails) == 2
    finally:
        worker.stop()
        resend_api.stop()
        conn.close()
        services.drop_database(database_url)


def test_development_without_resend_key_writes_the_eml_outbox(db, database_url, make_user, worker, log_dir):
    """The run's shared worker has no RESEND_API_KEY: the email lands in CALLFLOW_OUTBOX_DIR."""
    caller = make_user("Ana Souza")
    callee = make_user("Bo", email=f"bo-{uuid.uuid4().hex[:8]}@example.test", timezone="Europe/Lisbon")
    inv = insert_invitation(database_url, caller, callee, call_type="audio")
    enqueue_change(inv["id"], "pending")
    wait_invitation(db, inv["id"], "missed", timeout=20)
    note = wait_for(lambda: note_of(db, inv["id"]), what="outbox row")
    row = wait_status(db, str(note["id"]))
    assert row["status"] == "sent" and row["provider_message_id"] == f"outbox:{note['id']}.eml"
    path = log_dir / "outbox" / f"{note['id']}.eml"
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Missed audio call from Ana Souza"
    assert parsed["To"] == email_of(db, callee)
    assert "(Europe/Lisbon)" in parsed.get_body(("plain",)).get_content()
    assert "Call back" in parsed.get_body(("html",)).get_content()
    # One log line for it, with the address redacted.
    lines = [ln for ln in worker.log().splitlines() if "delivery: sent" in ln and str(note["id"]) in ln and ".eml" in ln]
    assert len(lines) == 1 and email_of(db, callee) not in lines[0] and "[redacted]" in lines[0]
