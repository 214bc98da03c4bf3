"""`callflow usage` on a big history: a month of 1,000,000 participant sessions.

Generates the history with SQL (generate_series) in a scratch database of its own (dropped at
the end), through the usage triggers, then times: the first refresh of the rollup (the one-off
catch-up a migration on an existing history costs), `callflow usage`'s work for the month
(`month_usage`: refresh with nothing pending + minutes + peak + calls), an incremental refresh
after a day's worth of new sessions, and the trigger's cost on inserts. Beside them, the ceiling
it replaces: the peak and the minutes computed directly from call_participants (the peak is a
sort of every join/leave).

    .venv/bin/python -m bench.usage [--sessions 1000000] [--calls 400000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date, datetime, timezone


from bench.stack import machine, table
from devstack import services
from orchestration.db import connect
from orchestration.usage import store
from orchestration.usage.plans import PLANS
from orchestration.usage.report import month_usage

MONTH = date(2026, 11, 1)
NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)

DIRECT_PEAK = """
with s as (
  select p.joined_at as b, coalesce(p.left_at, c.ended_at, %(now)s) as e
    from public.call_participants p join public.calls c on c.id = p.call_id
   where p.joined_at < %(end)s and coalesce(p.left_at, c.ended_at, 'infinity') > %(start)s
), instants as (
  select greatest(b, %(start)s) as at, 1 as d from s
  union all select e, -1 from s where e < %(end)s
), levels as (
  select at, sum(d) over (order by at range between unbounded preceding and current row) as level from instants
)
select level, at from levels order by level desc, at limit 1
"""


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def generate(conn, sessions: int, calls: int, month_start: str, days: int, tag: str) -> None:
    conn.execute(f"""
        create temp table bench_calls_{tag} as
        select gen_random_uuid() as id, row_number() over () as n, t as created_at, t + d as ended_at
          from (select timestamptz '{month_start}' + random() * interval '{days} days' as t,
                       (1 + random() * 59) * interval '1 minute' as d
                  from generate_series(1, {calls})) s""")
    conn.execute(f"""
        insert into public.calls (id, room_name, status, created_at, started_at, ended_at, duration_seconds)
        select id, 'bench-{tag}-' || n, 'completed', created_at, created_at, ended_at,
               extract(epoch from ended_at - created_at)::int from bench_calls_{tag}""")
    # ~2.5 sessions a call, joining within 30 s of its start, leaving before its end; 2 % never
    # record their own leave (they end with the call).
    conn.execute(f"""
        insert into public.call_participants (call_id, identity, participant_sid, joined_at, left_at)
        select id, 'user-' || (g % 5000), 'PA_{tag}_' || g, j,
               case when random() < 0.02 then null else j + random() * (ended_at - j) end
          from (select c.id, c.ended_at, g, c.created_at + random() * interval '30 seconds' as j
                  from generate_series(1, {sessions}) g join bench_calls_{tag} c on c.n = g % {calls} + 1) s""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    url = services.create_database("callflow_bench_usage")
    rows = []
    try:
        with connect(url, autocommit=True) as conn:
            gen, _ = timed(generate, conn, args.sessions, args.calls, "2026-11-01", 30, "m")
            rows.append([f"generate {args.sessions:,} sessions / {args.calls:,} calls (SQL, through the triggers)", f"{gen:.1f} s"])
            conn.execute("vacuum analyze")
            first, changed = timed(store.refresh, conn)
            rows.append([f"first refresh: fold {changed:,} sessions into the rollup (one-off)", f"{first:.1f} s"])
            conn.execute("vacuum analyze")

            plan = PLANS["ship"]
            runs = [timed(month_usage, conn, plan, MONTH, NOW) for _ in range(args.repeat)]
            usage = runs[-1][1]
            times = [t for t, _ in runs]
            rows.append([f"`callflow usage` for the month (month_usage), median of {args.repeat}",
                         f"{statistics.median(times) * 1000:.0f} ms (max {max(times) * 1000:.0f} ms)"])
            parts = {
                "  minutes (from the rollup)": lambda: store.participant_minutes(conn, MONTH, NOW),
                "  peak (from the rollup)": lambda: store.peak(conn, MONTH, NOW),
                "  calls": lambda: store.calls(conn, MONTH),
                "  refresh with nothing pending": lambda: store.refresh(conn),
            }
            for label, fn in parts.items():
                rows.append([label, f"{statistics.median(timed(fn)[0] for _ in range(args.repeat)) * 1000:.0f} ms"])

            start, end = datetime(2026, 11, 1, tzinfo=timezone.utc), datetime(2026, 12, 1, tzinfo=timezone.utc)
            direct, peak_row = timed(lambda: conn.execute(DIRECT_PEAK, {"start": start, "end": end, "now": NOW}).fetchone())
            rows.append(["what it replaces: the peak straight from call_participants", f"{direct * 1000:.0f} ms"])
            direct_minutes_time, direct_minutes = timed(store.participant_minutes_direct, conn, MONTH, NOW)
            rows.append(["what it replaces: the minutes straight from call_participants", f"{direct_minutes_time * 1000:.0f} ms"])
            assert direct_minutes == usage.participant_minutes, (direct_minutes, usage.participant_minutes)
            assert (peak_row["level"], peak_row["at"]) == (usage.peak_concurrent_participants, usage.peak_at), \
                (peak_row, usage.peak_concurrent_participants, usage.peak_at)

            # A day of new sessions (1/30 of the month) arriving, then the beat's refresh.
            day_sessions, day_calls = args.sessions // 30, args.calls // 30
            ins, _ = timed(generate, conn, day_sessions, day_calls, "2026-11-29", 1, "d")
            fold, changed = timed(store.refresh, conn)
            rows.append([f"a day's {day_sessions:,} new sessions: insert (with triggers)", f"{ins:.2f} s"])
            rows.append([f"  then the refresh folding them ({changed:,} sessions)", f"{fold * 1000:.0f} ms"])

            # The triggers' cost on writes: the same insert with the usage triggers switched off.
            conn.execute("alter table public.call_participants disable trigger callflow_usage_participants_insert")
            bare, _ = timed(generate, conn, day_sessions, day_calls, "2026-11-28", 1, "b")
            conn.execute("alter table public.call_participants enable trigger callflow_usage_participants_insert")
            rows.append([f"  the same insert without the usage triggers", f"{bare:.2f} s"])

        print(f"\nLiveKit usage, {args.sessions:,} sessions in {MONTH:%Y-%m} — {machine()}\n")
        print(table(rows, ["step", "time"]))
        print(f"\nmonth: {usage.participant_minutes:,} participant-minutes, peak {usage.peak_concurrent_participants} "
              f"at {usage.peak_at:%Y-%m-%d %H:%M:%S}, {usage.calls:,} calls (rollup = direct SQL: checked)")
    finally:
        from orchestration.db import close_pools

        close_pools()
        services.drop_database(url)


if __name__ == "__main__":
    main()
