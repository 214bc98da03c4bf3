"""Retention on real Postgres and Redis (issue 26): what is pruned and what is kept, in several small
batches; a row someone holds is skipped, never waited for; an event a failed task may replay stays
recorded; usage deltas folded into their minutes leave the rollup's figures as they were; /metrics
shows the counts.

A database of the module's own (the run's worker prunes the run's), a Redis database of its own.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone

import pytest
import redis
from prometheus_client import CollectorRegistry

from devstack import services
from orchestration import names
from orchestration.adapters.postgres_store import PostgresStore
from orchestration.db import connect
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.livekit_event import handle_livekit_event
from orchestration.retention import Budget, prune
from orchestration.retention.metrics import RetentionCollector
from orchestration.retention.walks import Pruned, compact_deltas
from orchestration.usage import store
from orchestration.usage.figures import participant_minutes, peak_concurrency
from orchestration.usage.plans import PLANS
from orchestration.usage.report import month_usage
from tests.integration.test_usage import assert_matches_model
from tests.integration.test_usage_backlog import busy_november
from tests.support.fakes import FakeRooms, FakeScheduler

UTC = timezone.utc
SMALL = Budget(events_per_batch=7, blocks_per_batch=1, blocks_per_tick=10_000, minutes_per_batch=5, tick_seconds=60)


@pytest.fixture(scope="module")
def ret_db():
    with services.scratch_database("callflow_retention") as url:
        yield url


@pytest.fixture
def conn(ret_db):
    with connect(ret_db) as c:
        yield c


@pytest.fixture
def rds(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def counts(conn, table: str, where: str = "true") -> int:
    return conn.execute(f"select count(*) as n from public.{table} where {where}").fetchone()["n"]


def fill(ret_db, now: datetime) -> dict:
    """Old and young rows of every table, written with the rules off (their foreign keys point
    nowhere): retention looks at ages and statuses only."""
    old, young = now - timedelta(days=10), now - timedelta(hours=1)
    with connect(ret_db, autocommit=True) as c:
        c.execute("set session_replication_role = replica")
        for table in ("call_events", "push_messages", "notifications", "calls", "call_participants",
                      "call_invitations", "callflow_failed_tasks"):
            c.execute(f"delete from public.{table}")
        c.execute("""insert into public.call_events (event_id, source, type, room_name, received_at)
                     select 'EV_old_' || g, 'livekit', 'room_started', 'r', %s + g * interval '1 second'
                       from generate_series(1, 50) g""", (old,))
        # An old event of a room whose call is still live (a call longer than the retention).
        c.execute("""insert into public.call_events (event_id, source, type, room_name, received_at)
                     values ('grace:PA_live', 'sweep', 'grace_expired', 'room-live', %s)""",
                  (old + timedelta(seconds=100),))
        c.execute("""insert into public.call_events (event_id, source, type, room_name, received_at)
                     select 'EV_young_' || g, 'livekit', 'room_started', 'r', %s from generate_series(1, 5) g""",
                  (young,))
        # Two old events carried by failed tasks: one still to be retried (kept), one retried (pruned).
        for task, retried in (("EV_old_3", None), ("EV_old_4", now)):
            c.execute("""insert into public.callflow_failed_tasks (task_id, task_name, args, error, retried_at)
                         values (%s, %s, %s, 'boom', %s)""",
                      (uuid.uuid4().hex, names.LIVEKIT_EVENT, json.dumps([{"id": task, "event": "room_started"},
                                                                           now.isoformat()]), retried))
        c.execute("""insert into public.callflow_failed_tasks (task_id, task_name, args, error)
                     values (%s, %s, %s, 'boom')""",
                  (uuid.uuid4().hex, names.INVITATION_CHANGED, json.dumps([{"event_id": "EV_old_5"}])))
        for table, finished, pending, fresh in (("push_messages", 40, 3, 5), ("notifications", 30, 2, 4)):
            extra = "kind, push_token_id" if table == "push_messages" else "recipient_id"
            value = "'incoming_call', gen_random_uuid()" if table == "push_messages" else "gen_random_uuid()"
            c.execute(f"""insert into public.{table} (invitation_id, {extra}, status, created_at)
                          select gen_random_uuid(), {value}, (array['sent', 'failed', 'skipped'])[1 + g %% 3],
                                 %s + g * interval '1 second' from generate_series(1, %s) g""", (old, finished))
            c.execute(f"""insert into public.{table} (invitation_id, {extra}, status, created_at)
                          select gen_random_uuid(), {value}, 'pending', %s from generate_series(1, %s) g""",
                      (old, pending))
            c.execute(f"""insert into public.{table} (invitation_id, {extra}, status, created_at)
                          select gen_random_uuid(), {value}, 'sent', %s from generate_series(1, %s) g""",
                      (young, fresh))
        c.execute("""insert into public.calls (id, room_name, status, created_at, ended_at)
                     select gen_random_uuid(), 'room-' || g, 'completed', %s, %s from generate_series(1, 6) g""",
                  (old, old))
        c.execute("""insert into public.calls (id, room_name, status, created_at)
                     values (gen_random_uuid(), 'room-live', 'active', %s)""", (old,))
        c.execute("""insert into public.call_participants (id, call_id, identity, participant_sid, joined_at, left_at)
                     select gen_random_uuid(), id, 'u', 'PA_' || id, created_at, ended_at from public.calls""")
        c.execute("""insert into public.call_invitations (id, caller_id, callee_id, room_name, status, created_at, updated_at)
                     select gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), room_name, 'accepted',
                            created_at, created_at from public.calls""")
    return {"old": old, "young": young}


def test_old_rows_are_pruned_in_small_batches_and_everything_else_is_kept(ret_db, conn, rds):
    url, client = rds
    now = datetime.now(UTC)
    at = fill(ret_db, now)

    out = prune(conn, client, 1, now, SMALL)

    assert out.rows == {"call_events": 48, "push_messages": 40, "notifications": 30, "callflow_usage_deltas": 0}
    assert out.batches >= 48 // 7 + 2  # several batches for each table, each its own transaction
    kept = {r["event_id"] for r in conn.execute("select event_id from public.call_events").fetchall()}
    assert kept == {"EV_old_3", "EV_old_5", "grace:PA_live"} | {f"EV_young_{g}" for g in range(1, 6)}
    assert counts(conn, "push_messages", "status = 'pending'") == 3 and counts(conn, "push_messages") == 8
    assert counts(conn, "notifications", "status = 'pending'") == 2 and counts(conn, "notifications") == 6
    assert counts(conn, "push_messages", "status <> 'pending' and created_at < now() - interval '1 day'") == 0
    # The product's history is never pruned, however old.
    assert (counts(conn, "calls"), counts(conn, "call_participants"), counts(conn, "call_invitations")) == (7, 7, 7)

    registry = CollectorRegistry()
    registry.register(RetentionCollector(url))
    sample = registry.get_sample_value
    assert sample("callflow_retention_pruned_rows_total", {"table": "call_events"}) == 48
    assert sample("callflow_retention_pruned_rows_total", {"table": "push_messages"}) == 40
    assert sample("callflow_retention_pruned_rows_total", {"table": "notifications"}) == 30
    # The oldest call_events row kept is the one a failed task may replay; the outboxes' oldest
    # finished rows are the young ones.
    old_age = (now - at["old"]).total_seconds()
    assert old_age - 60 < sample("callflow_retention_oldest_row_age_seconds", {"table": "call_events"}) < old_age + 60
    for table in ("push_messages", "notifications"):
        assert 3500 < sample("callflow_retention_oldest_row_age_seconds", {"table": table}) < 3700

    again = prune(conn, client, 1, now, SMALL)
    assert sum(again.rows.values()) == 0
    assert sample("callflow_retention_pruned_rows_total", {"table": "call_events"}) == 48

    # Once its failed task is retried, the event's row goes too.
    conn.execute("update public.callflow_failed_tasks set retried_at = now()")
    conn.commit()
    assert prune(conn, client, 1, now, SMALL).rows["call_events"] == 2


def test_the_beat_task_on_a_real_worker_prunes_with_the_configured_retention(ret_db, conn, rds, log_dir):
    """`callflow.prune` as beat sends it, on a worker of its own (this module's database, its Redis db)."""
    from celery import Celery

    from tests.conftest import subprocess_env

    url, client = rds
    fill(ret_db, datetime.now(UTC))
    env = subprocess_env(DATABASE_URL=ret_db, REDIS_URL=url, CALLFLOW_RETENTION_DAYS="1")
    worker = services.celery_worker(env, log_dir, name=f"retention-{uuid.uuid4().hex[:4]}")
    try:
        services.wait_for(lambda: "ready." in worker.log() or not worker.alive(), timeout=60, what="retention worker")
        Celery("retention-test", broker=url).send_task(names.PRUNE, queue=names.Q_SWEEPS)
        services.wait_for(lambda: client.hget(names.RETENTION_PRUNED, "notifications") is not None, timeout=30,
                          what="the prune")
    finally:
        worker.stop()
    conn.rollback()
    assert (counts(conn, "call_events"), counts(conn, "push_messages"), counts(conn, "notifications")) == (8, 8, 6)
    assert {k.decode(): int(v) for k, v in client.hgetall(names.RETENTION_PRUNED).items()} == \
        {"call_events": 48, "push_messages": 40, "notifications": 30}
    assert "pruned" in worker.log()


def test_an_outbox_bigger_than_a_tick_is_walked_over_several_ticks(ret_db, conn, rds):
    _, client = rds
    now = datetime.now(UTC)
    fill(ret_db, now)
    with connect(ret_db, autocommit=True) as c:
        c.execute("set session_replication_role = replica")
        c.execute("""insert into public.notifications (invitation_id, recipient_id, status, created_at)
                     select gen_random_uuid(), gen_random_uuid(), 'sent', %s from generate_series(1, 2000) g""",
                  (now - timedelta(days=30),))
    blocks = conn.execute("select pg_relation_size('public.notifications') / 8192 as n").fetchone()["n"]
    conn.commit()
    assert blocks >= 8
    tick = Budget(events_per_batch=100, blocks_per_batch=2, blocks_per_tick=4, minutes_per_batch=100, tick_seconds=60)
    pruned, ticks = 0, 0
    while counts(conn, "notifications", "status = 'sent' and created_at < now() - interval '1 day'"):
        assert client.hget(names.RETENTION_OLDEST, "notifications") is None  # no full pass yet
        out = prune(conn, client, 1, now, tick)
        assert out.batches <= 2 + 2 + 2 + 1  # events, two outboxes, usage: each within its share
        pruned, ticks = pruned + out.rows["notifications"], ticks + 1
        conn.commit()
    assert pruned == 2030 and ticks == -(-blocks // 4)
    # The last tick went round the table's end (the 2,000 old rows were its last blocks): the pass
    # is over and the oldest finished row kept is known.
    assert 3500 < time.time() - float(client.hget(names.RETENTION_OLDEST, "notifications")) < 3700


def test_a_row_someone_holds_is_skipped_not_waited_for(ret_db, conn, rds):
    _, client = rds
    now = datetime.now(UTC)
    fill(ret_db, now)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with connect(ret_db) as other:
            other.execute("""select id from public.push_messages where status = 'sent' and created_at < now() - interval '1 day'
                              order by created_at limit 1 for update""")
            held.set()
            release.wait(30)
            other.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        began = time.monotonic()
        out = prune(conn, client, 1, now, SMALL)
        assert time.monotonic() - began < 10
        assert out.rows["push_messages"] == 39
    finally:
        release.set()
        holder.join()
    assert prune(conn, client, 1, now, SMALL).rows["push_messages"] == 1  # the next pass takes it


def test_the_retention_is_never_shorter_than_a_day(conn, rds):
    _, client = rds
    with pytest.raises(ValueError):
        prune(conn, client, 0)


def test_a_livekit_event_a_failed_task_carries_stays_a_duplicate_after_a_prune(ret_db, conn, rds):
    """The lifecycle knows an event by its row in call_events: the row of an event whose task failed
    (and may be retried by hand, days later) outlives the retention."""
    _, client = rds
    conn.execute("delete from public.call_events")
    conn.execute("delete from public.callflow_failed_tasks")
    conn.commit()
    ports = Ports(store=PostgresStore(ret_db), rooms=FakeRooms(), scheduler=FakeScheduler(),
                  config=LifecycleConfig(ring_timeout=30, grace=1.5))
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=3)
    events = [{"id": f"EV_{uuid.uuid4().hex[:12]}", "event": "room_started", "createdAt": str(int(long_ago.timestamp())),
               "room": {"sid": "RM_" + uuid.uuid4().hex[:10], "name": f"room-{uuid.uuid4().hex[:8]}"}}
              for _ in range(2)]
    for event in events:
        assert handle_livekit_event(event, long_ago.isoformat(), ports).result != "duplicate"
    conn.execute("update public.call_events set received_at = %s where event_id = any(%s)",
                 (long_ago, [e["id"] for e in events]))
    failed, forgotten = events
    conn.execute("""insert into public.callflow_failed_tasks (task_id, task_name, args, error)
                    values (%s, %s, %s, 'an effect failed after commit')""",
                 (uuid.uuid4().hex, names.LIVEKIT_EVENT, json.dumps([failed, long_ago.isoformat()])))
    conn.commit()

    prune(conn, client, 1, now, SMALL)

    assert handle_livekit_event(failed, long_ago.isoformat(), ports).result == "duplicate"
    left = {r["event_id"] for r in conn.execute("select event_id from public.call_events where event_id = any(%s)",
                                                ([e["id"] for e in events],)).fetchall()}
    assert left == {failed["id"]}


# ---- usage -----------------------------------------------------------------------------------------
NOV, DEC = date(2026, 11, 1), date(2026, 12, 1)
NOW = datetime(2026, 12, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def usage_conn():
    with services.scratch_database("callflow_retention_usage") as url:
        with connect(url, autocommit=True) as c:
            yield url, c


def test_usage_deltas_folded_into_their_minutes_leave_the_figures_as_they_were(usage_conn, rds):
    url, conn = usage_conn
    _, client = rds
    history = busy_november(conn, 240)
    store.refresh(conn)
    before = {m: month_usage(conn, PLANS["build"], m, NOW) for m in (NOV, DEC)}
    minutes_before = conn.execute("select * from public.callflow_usage_minutes order by minute").fetchall()
    deltas_before = counts(conn, "callflow_usage_deltas")

    out = Pruned()
    compact_deltas(conn, client, datetime(2026, 12, 1, tzinfo=UTC), time.monotonic() + 60, out, per_batch=25)
    assert out.batches > 3
    deltas_after = counts(conn, "callflow_usage_deltas")
    assert deltas_after < deltas_before and out.rows["callflow_usage_deltas"] == deltas_before - deltas_after
    assert conn.execute("select * from public.callflow_usage_minutes order by minute").fetchall() == minutes_before
    for m in (NOV, DEC):
        after = month_usage(conn, PLANS["build"], m, NOW)
        assert (after.participant_minutes, after.peak_concurrent_participants, after.peak_at) == \
            (before[m].participant_minutes, before[m].peak_concurrent_participants, before[m].peak_at)
    assert_matches_model(conn, history)

    # A late change to an old session still lands exactly in the minutes and the running level.
    pid = next(iter(history.sessions))
    history.leave(pid, history.sessions[pid][1] + timedelta(minutes=95, seconds=17))
    store.refresh(conn)
    assert month_usage(conn, PLANS["build"], NOV, NOW).participant_minutes == \
        participant_minutes(history.model(), NOV, NOW)
    dec = month_usage(conn, PLANS["build"], DEC, NOW)
    assert (dec.peak_concurrent_participants, dec.peak_at) == peak_concurrency(history.model(), DEC, NOW)
