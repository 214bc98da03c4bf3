"""The usage rollup folds a backlog of changes (after an outage, or the first migration of a big
history) in bounded steps, one transaction each, with the right totals; the beat's check folds for
a bounded time and keeps no figures of a half-folded rollup (issue 26)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from devstack import services
from orchestration.db import connect
from orchestration.usage import store
from orchestration.usage.check import check_usage
from orchestration.usage.plans import PLANS
from tests.integration.test_usage import History, assert_matches_model

UTC = timezone.utc
NOV = date(2026, 11, 1)


@pytest.fixture
def usage_conn():
    with services.scratch_database("callflow_usage_backlog") as url:
        with connect(url, autocommit=True) as c:
            yield url, c


def counts(conn, table: str) -> int:
    return conn.execute(f"select count(*) as n from public.{table}").fetchone()["n"]


def busy_november(conn, sessions: int) -> History:
    history = History(conn)
    start = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
    for i in range(sessions // 3):
        begun = start + timedelta(minutes=7 * i, seconds=i % 50)
        cid = history.add_call(begun, begun + timedelta(minutes=40))
        for k in range(3):
            history.add_session(cid, begun + timedelta(seconds=5 * k), begun + timedelta(minutes=10 + 9 * k, seconds=k))
    return history


def test_a_backlog_of_usage_changes_is_folded_in_bounded_steps_with_the_right_totals(usage_conn):
    url, conn = usage_conn
    history = busy_november(conn, 300)
    backlog = counts(conn, "callflow_usage_dirty")
    assert backlog >= 300

    steps, left = 0, backlog
    while True:
        folded = store.fold(conn, max_batches=1, marks_per_batch=40)
        now_left = counts(conn, "callflow_usage_dirty")
        assert left - now_left == min(40, left)  # one bounded step: at most 40 marks folded
        steps, left = steps + 1, now_left
        assert folded.more == (left > 0)
        if not folded.more:
            break
    assert steps == -(-backlog // 40) and steps > 5
    assert_matches_model(conn, history)

    # The beat's check folds for a bounded time and keeps no figures of a half-folded rollup.
    conn.execute("""insert into public.call_participants (id, call_id, identity, participant_sid, joined_at, left_at)
                    select gen_random_uuid(), c.id, 'bulk', 'PA_bulk_' || g || '_' || c.id,
                           c.created_at + interval '1 minute', c.created_at + interval '2 minutes'
                      from generate_series(1, 60) g, (select id, created_at from public.calls limit 100) c""")
    assert counts(conn, "callflow_usage_dirty") > store.MARKS_PER_BATCH
    late_november = datetime(2026, 11, 28, tzinfo=UTC)
    usage, to_send = check_usage(url, PLANS["build"], None, late_november, fold_seconds=60, fold_batches=1)
    assert usage is None and to_send == []
    assert store.read_snapshot(conn, NOV) is None
    usage, _ = check_usage(url, PLANS["build"], None, late_november, fold_seconds=60)
    assert usage is not None and counts(conn, "callflow_usage_dirty") == 0
    assert usage.participant_minutes == store.participant_minutes_direct(conn, NOV, late_november) > 0
    assert store.read_snapshot(conn, NOV)["participant_minutes"] == usage.participant_minutes
