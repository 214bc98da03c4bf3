"""The SQL side of usage: the rollup refresh, a month's figures, snapshots.

Minutes and peak come from the rollup kept by `supabase/migrations/20261201000004_usage.sql`
(refresh it first, as `report.month_usage` does, for figures exact as of the call); both follow
the definitions of `figures`. `participant_minutes_direct` computes the minutes straight from
calls/call_participants, the same way: the benchmark and the tests hold the rollup to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from orchestration.usage.figures import month_bounds

# Sessions overlapping [start, upto): begun in the month, or begun earlier and not over by its start.
_DIRECT_MINUTES = """
with sessions as (
  select p.joined_at, coalesce(p.left_at, c.ended_at) as ended_at
    from public.call_participants p join public.calls c on c.id = p.call_id
   where p.joined_at >= %(start)s and p.joined_at < %(upto)s
  union all
  select p.joined_at, coalesce(p.left_at, c.ended_at)
    from public.call_participants p join public.calls c on c.id = p.call_id
   where p.joined_at < %(start)s and p.left_at > %(start)s
  union all
  select p.joined_at, c.ended_at
    from public.call_participants p join public.calls c on c.id = p.call_id
   where p.joined_at < %(start)s and p.left_at is null
), clipped as (
  select greatest(joined_at, %(start)s) as began, least(coalesce(ended_at, %(now)s), %(upto)s) as ended from sessions
)
select coalesce(sum(ceil(extract(epoch from ended - began) / 60)), 0)::bigint as minutes
  from clipped where ended > began
"""


# Change marks one refresh transaction folds: a few hundred milliseconds of work, so a backlog of
# millions (the first refresh of a big history) never holds the refresh's lock or a snapshot for
# minutes, and the beat's check stays short.
MARKS_PER_BATCH = 5000


@dataclass(frozen=True)
class Folded:
    changed: int  # sessions whose counted interval changed
    batches: int
    more: bool  # marks are left for the next run


def fold(conn: psycopg.Connection, max_batches: int | None = None, max_seconds: float | None = None,
         marks_per_batch: int = MARKS_PER_BATCH) -> Folded:
    """Folds the committed changes of calls/call_participants into the peak rollup, the oldest first,
    `marks_per_batch` marks per transaction, until none are left or `max_batches` transactions
    have run or `max_seconds` have passed (None: no such bound)."""
    changed = batches = 0
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while (max_batches is None or batches < max_batches) and (deadline is None or time.monotonic() < deadline):
        row = conn.execute("select public.callflow_usage_refresh(%s) as changed", (marks_per_batch,)).fetchone()
        # (a statement of its own: one beside the refresh would not see the marks it took)
        more = conn.execute("select exists (select 1 from public.callflow_usage_dirty) as more").fetchone()["more"]
        conn.commit()
        changed, batches = changed + int(row["changed"]), batches + 1
        if not more:
            return Folded(changed, batches, False)
    return Folded(changed, batches, True)


def refresh(conn: psycopg.Connection) -> int:
    """Folds every committed change into the rollup (figures exact as of the call); returns how many
    sessions changed."""
    return fold(conn).changed


def participant_minutes(conn: psycopg.Connection, month: date, now: datetime) -> int:
    start, end = month_bounds(month)
    row = conn.execute("select public.callflow_usage_minutes(%s, %s, %s) as minutes", (start, end, now)).fetchone()
    return int(row["minutes"])


def participant_minutes_direct(conn: psycopg.Connection, month: date, now: datetime) -> int:
    start, end = month_bounds(month)
    upto = min(end, now)
    with conn.transaction():
        conn.execute("set local jit = off")  # JIT compiling costs more than it saves on one pass
        return int(conn.execute(_DIRECT_MINUTES, {"start": start, "upto": upto, "now": now}).fetchone()["minutes"])


def peak(conn: psycopg.Connection, month: date, now: datetime) -> tuple[int, datetime | None]:
    start, end = month_bounds(month)
    row = conn.execute("select peak, peak_at from public.callflow_usage_peak(%s, %s)",
                       (start, min(end, now))).fetchone()
    return int(row["peak"] or 0), row["peak_at"]


# Marks of the calls' counts one statement takes (about a microsecond each): a minute's at any rate
# in statements of about a millisecond.
CALL_MARKS_PER_BATCH = 1000


def calls(conn: psycopg.Connection, month: date) -> tuple[int, int]:
    """The calls made in the month and how many completed (hours kept, and followed by the marks of
    every write: taken `CALL_MARKS_PER_BATCH` a transaction, the rest with the count)."""
    start, end = month_bounds(month)
    while True:
        taken = conn.execute("select public.callflow_usage_fold_call_marks(%s) as taken",
                             (CALL_MARKS_PER_BATCH,)).fetchone()["taken"]
        conn.commit()
        if taken < CALL_MARKS_PER_BATCH:
            break
    row = conn.execute("select calls, completed_calls from public.callflow_usage_calls(%s, %s)", (start, end)).fetchone()
    return int(row["calls"]), int(row["completed_calls"])


def calls_direct(conn: psycopg.Connection, month: date) -> tuple[int, int]:
    """The same, counted from every call of the month (what the tests hold `calls` to)."""
    start, end = month_bounds(month)
    row = conn.execute(
        """select count(*) as calls, count(*) filter (where status = 'completed') as completed
             from public.calls where created_at >= %s and created_at < %s""", (start, end)).fetchone()
    return int(row["calls"]), int(row["completed"])


def concurrent_now(conn: psycopg.Connection, now: datetime) -> int:
    row = conn.execute(
        """select count(*) as n from public.call_participants p join public.calls c on c.id = p.call_id
            where p.left_at is null and c.ended_at is null and p.joined_at <= %s""", (now,)).fetchone()
    return int(row["n"])


def save_snapshot(conn: psycopg.Connection, usage) -> None:
    conn.execute(
        """insert into public.callflow_usage_months (month, plan, participant_minutes, peak_concurrent_participants,
                                                     peak_at, calls, completed_calls, computed_at)
           values (%(month)s, %(plan)s, %(minutes)s, %(peak)s, %(peak_at)s, %(calls)s, %(completed)s, %(at)s)
           on conflict (month) do update set plan = excluded.plan, participant_minutes = excluded.participant_minutes,
             peak_concurrent_participants = excluded.peak_concurrent_participants, peak_at = excluded.peak_at,
             calls = excluded.calls, completed_calls = excluded.completed_calls, computed_at = excluded.computed_at
           where callflow_usage_months.computed_at <= excluded.computed_at""",
        {"month": usage.month, "plan": usage.plan.name, "minutes": usage.participant_minutes,
         "peak": usage.peak_concurrent_participants, "peak_at": usage.peak_at, "calls": usage.calls,
         "completed": usage.completed_calls, "at": usage.computed_at})
    conn.commit()


def read_snapshot(conn: psycopg.Connection, month: date) -> dict | None:
    return conn.execute("select * from public.callflow_usage_months where month = %s", (month,)).fetchone()
