"""Catch-up and the Redis dedupe behind both listener sources, against real Redis, Postgres and Celery.

The safety net must enqueue every missed transition once, must not re-enqueue old rows forever,
must survive a crash between claim and enqueue, and runs as a beat task in a real worker.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
import redis
from celery import Celery

from devstack import services
from orchestration import names
from orchestration.ingest.mapping import dedupe_key, from_row
from orchestration.ingest.sink import CHANGES_KEY, IngestSink, catch_up, read_watermark
from tests.conftest import subprocess_env, wait_for
from tests.integration.test_listener_support import event_counts, insert_invitations, queued, set_status

CATCH_UP_REDIS_DB = 10


@pytest.fixture(scope="module")
def database_url():
    """A database of this module's own: the run's worker and sweeps move rows in the shared one
    (they ring stale `pending` invitations), which catch-up would then rightly report as changes."""
    url = services.create_database(invite_rate_per_minute=100_000)  # bursts of one caller's inserts
    yield url
    services.drop_database(url)


@pytest.fixture
def broker(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/{CATCH_UP_REDIS_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    app = Celery("catch-up-test", broker=url)
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    yield url, client, app
    client.close()


@pytest.fixture
def sink(broker):
    _url, client, _app = broker
    return IngestSink(client)


@pytest.fixture
def users(make_user):
    return make_user(), make_user()


def run(database_url, sink, **kw):
    with psycopg.connect(database_url, autocommit=True) as conn:
        return catch_up(conn, sink, initial_horizon_seconds=kw.pop("horizon", 5), **kw)


def test_catch_up_enqueues_missed_changes_once_and_never_rereads_old_rows(database_url, sink, broker, users):
    _url, client, _app = broker
    caller, callee = users
    ids = insert_invitations(database_url, caller, callee, 5)
    first = run(database_url, sink, overlap_seconds=0.5)
    assert {c.invitation_id for c in first.enqueued} >= set(ids)
    assert read_watermark(client) is not None
    again = run(database_url, sink, overlap_seconds=0.5)
    assert not [c for c in again.enqueued if c.invitation_id in ids], "dedupe keys stop a second enqueue"
    time.sleep(1.0)  # older than the overlap now
    assert not run(database_url, sink, overlap_seconds=0.5).enqueued
    later = run(database_url, sink, overlap_seconds=0.5)
    assert later.scanned == 0, "rows behind the watermark and its overlap are not read again"
    # a status change moves updated_at forward: the next catch-up sees the new transition only
    set_status(database_url, callee, ids[0], "declined")
    changed = run(database_url, sink, overlap_seconds=0.5)
    assert [c.event_id for c in changed.enqueued] == [f"realtime:{ids[0]}:declined"]
    counts = event_counts(client, set(ids))
    assert set(counts.values()) == {1} and len(counts) == 6


def test_paging_through_a_backlog(database_url, sink, broker, users):
    _url, client, _app = broker
    caller, callee = users
    ids = insert_invitations(database_url, caller, callee, 25)
    result = run(database_url, sink, page_size=4, overlap_seconds=0.5)
    assert set(ids) <= {c.invitation_id for c in result.enqueued}
    assert len(event_counts(client, set(ids))) == 25


def test_mark_and_message_go_together_or_not_at_all(database_url, broker, users):
    _url, client, _app = broker
    caller, callee = users
    (invitation,) = insert_invitations(database_url, caller, callee, 1)
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("select * from public.call_invitations where id = %s", (invitation,))
        row = dict(zip([d.name for d in cur.description], cur.fetchone()))
    change = from_row(row)
    sink = IngestSink(client)
    client.set(CHANGES_KEY, "not a list")  # the push will fail (WRONGTYPE) inside the script
    with pytest.raises(redis.exceptions.ResponseError):
        sink.submit([change])
    assert client.get(dedupe_key(invitation, "pending")) is None, "no mark without its change"
    client.delete(CHANGES_KEY)
    assert [c.invitation_id for c in sink.submit([change, change]).enqueued] == [invitation]
    assert sink.submit([change]).duplicates == 1
    assert event_counts(client, {invitation}) == {f"realtime:{invitation}:pending": 1}


def test_the_beat_task_runs_in_a_real_worker(database_url, broker, users, log_dir):
    from workers.app import app as callflow_app

    entry = [e for e in callflow_app.conf.beat_schedule.values() if e["task"] == names.CATCH_UP_INVITATIONS]
    assert entry and entry[0]["options"]["queue"] == "sweeps" and entry[0]["schedule"].total_seconds() <= 10
    url, client, app = broker
    caller, callee = users
    ids = insert_invitations(database_url, caller, callee, 3)
    # a worker on its own broker database, consuming only `sweeps`: what it enqueues stays readable
    worker = services.celery_worker(subprocess_env(REDIS_URL=url, DATABASE_URL=database_url), log_dir, name="catchup", concurrency=1,
                                    extra=["-Q", "sweeps"])
    try:
        app.send_task(names.CATCH_UP_INVITATIONS, queue="sweeps")
        wait_for(lambda: len(event_counts(client, set(ids))) == 3 or not worker.alive(), timeout=60,
                 what="catch-up task enqueued the invitations")
        assert worker.alive(), worker.log()[-3000:]
        app.send_task(names.CATCH_UP_INVITATIONS, queue="sweeps")
        time.sleep(2)
    finally:
        worker.stop()
    assert set(event_counts(client, set(ids)).values()) == {1}
    assert all(c["source"] == "postgres" and c["payload"]["op"] == "CATCH_UP"
               for c in queued(client) if c["invitation_id"] in ids)
