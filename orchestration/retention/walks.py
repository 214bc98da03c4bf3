"""Retention: what beat's `callflow.prune` deletes, in small batches, each its own short transaction.

Pruned (the contract's "Retention:"): `call_events` received before the horizon (now minus
CALLFLOW_RETENTION_DAYS), `push_messages` and `notifications` finished (`sent`, `failed`,
`skipped`) and created before it, and usage deltas before it once folded into their minute of the
rollup. `calls`, `call_participants` and `call_invitations` (the product's history) are never
touched, nor are pending outbox rows (the outbox sweep's).

No index is added for it (a build on a year of `call_events` would hold off the lifecycle's inserts
for its whole length); each table is walked by what it already has:

- `call_events`: along its primary key from its lowest id, `EVENTS_PER_BATCH` ids at a time (ids
  grow with `received_at`: both are the inserting transaction's). The walk stops at the first
  range still holding a young row, so a tick with nothing to do costs one batch (~1 ms).
- `push_messages`, `notifications` (uuid keys, no order): by ranges of heap blocks
  (`BLOCKS_PER_BATCH` blocks, a TID range scan: never the whole table; ~400 rows), a cursor kept
  in Redis going round the table; at most `BLOCKS_PER_TICK` blocks a tick.
- `callflow_usage_deltas`: minute by minute (`MINUTES_PER_BATCH`), from a watermark kept in Redis,
  under the refresh's own advisory lock (tried, never waited for). A minute's deltas are replaced
  by at most two that sum to the same `net` and reach the same `rise` at the same `rise_at`, so
  the rollup's minutes, months and peaks are those it had; only a change to a session older than
  the retention lands in a minute whose order of joins and leaves is gone (its minutes and net
  stay exact, its rise is approximated).

After each batch the walk rests nine times as long as the batch took (`REST_RATIO`): the database
is shared with the lifecycle, whose ringing latency heavier pruning moved (see REST_RATIO).

Every batch locks only the rows it deletes (`for update skip locked`: a row someone else holds is
left for a later pass), and the lifecycle never waits on an old row: the events it records are new,
the outbox rows it writes are new, and the refresh's lock is only tried.

Deduplication survives it (the lifecycle counts an event as new when its `event_id` is not in
`call_events`): LiveKit retries a webhook for ~15 s and signs each delivery for 5 minutes, `web`'s
Redis mark of an event lives an hour, the taken lists an hour, the sweeps look back 15 minutes,
all far inside the minimum retention, a day (`MIN_DAYS`, enforced by the settings too). What can
bring an event back later is `callflow tasks retry` of a failed task: the rows of the events that
open failed tasks carry are kept until they are retried. And the sweep looks for the grace events
of live calls however old: a live call's room keeps its events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import psycopg
import redis

from orchestration import names

MIN_DAYS = 1
EVENTS_PER_BATCH = 250
BLOCKS_PER_BATCH = 8
BLOCKS_PER_TICK = 4096
MINUTES_PER_BATCH = 240
TICK_SECONDS = 2.0  # per table, so a tick holds one of a worker's processes ~8 s a minute at most
# After each batch the walk rests this many times as long as the batch took, so pruning takes at
# most a tenth of a backend's time while a tick runs. Measured with a year of history at 50 calls/s
# on two cores (bench.history --pruning-only --pruning-alternate, bench/RESULTS.md, seventh
# session): batches of 2,000 events and 64 blocks resting 3× moved ringing p50 by +19 ms (pooled
# over five runs, p99 +364 ms); of 250 and 8 resting 3×, p50 +9 and p90 +29 ms; of 250 and 8 resting
# 9×, p50 +3, p90 +6, p99 −63 ms, as a pruner that does nothing (+1, +7, +21). The cost is pace: a
# tick of beat's prunes 14,000-19,000 events on a quiet machine (a busy tenant's day, 55,000, in
# about four minutes; a backlog of nine months in about a day); once caught up, a day's rows take
# a few batches a day. The rest counts in the tick's time: a tick does less, none lasts longer.
# Smaller batches also bound the WAL each of the lifecycle's commits may have to flush behind one
# of the pruner's.
REST_RATIO = 9.0

OUTBOXES = ("push_messages", "notifications")
TABLES = ("call_events", *OUTBOXES, "callflow_usage_deltas")

_REFRESH_LOCK = "callflow_usage_refresh"  # the refresh's advisory lock (supabase/schemas/80_usage.sql)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class Pruned:
    """One tick: rows deleted per table, the oldest row kept (None: none, or not known yet)."""
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    oldest: dict[str, datetime | None] = field(default_factory=dict)
    batches: int = 0


def rest(batch_started: float, ratio: float, deadline: float) -> None:
    """The pause after a batch that began at `batch_started` (monotonic), never past the deadline."""
    if ratio > 0:
        time.sleep(max(0.0, min((time.monotonic() - batch_started) * ratio, deadline - time.monotonic())))


def horizon(now: datetime, days: int) -> datetime:
    if days < MIN_DAYS:
        raise ValueError(f"retention must be at least {MIN_DAYS} day(s), not {days}")
    return now - timedelta(days=days)


# ---- call_events: along the primary key ---------------------------------------------------------
# A row is kept while a failed task that `callflow tasks retry` may run again carries its event (a
# LiveKit event, `[event, received_at]`, or an invitation change, `[change]`): so a retry, however
# late, finds its event recorded. The events of a room whose call is still live are kept too: the
# sweep hands on a left participant's grace period until its `grace:<sid>` event is recorded, however
# long the call lasts. The live rooms are read once a batch into a hash (`not in`): as a join the
# planner, believing one call live, compared every row of the batch with every live call (2,000 x
# 6,000 a batch while a saturation run's calls were live: ringing p99 went from 164 to 836 ms).
EVENTS_BATCH_SQL = """
with lo as materialized (select min(id) as id from public.call_events where id >= %(from)s),
doomed as (
  select e.id from public.call_events e
   where e.id >= (select id from lo) and e.id < (select id from lo) + %(n)s and e.received_at < %(before)s
     and not exists (select 1 from public.callflow_failed_tasks f
                      where f.retried_at is null and f.task_name = any(%(replayable)s)
                        and e.event_id in (f.args -> 0 ->> 'id', f.args -> 0 ->> 'event_id'))
     and (e.room_name is null
          or e.room_name not in (select c.room_name from public.calls c where c.status in ('ringing', 'active')))
   for update of e skip locked
), gone as (
  delete from public.call_events e where e.id in (select id from doomed) returning 1
)
select (select id from lo) as lo, (select count(*) from gone) as pruned,
       exists (select 1 from public.call_events e
                where e.id >= (select id from lo) and e.id < (select id from lo) + %(n)s
                  and e.received_at >= %(before)s) as young
"""

EVENTS_OLDEST_SQL = "select received_at from public.call_events order by id limit 1"
REPLAYABLE_TASKS = [names.LIVEKIT_EVENT, names.INVITATION_CHANGED]


def prune_events(conn: psycopg.Connection, before: datetime, deadline: float, out: Pruned,
                 per_batch: int = EVENTS_PER_BATCH, rest_ratio: float = REST_RATIO) -> None:
    """From the lowest id every tick (gaps are skipped by one index probe, so the few rows kept for
    failed tasks cost a batch each), range after range, until a range holds a young row."""
    start = 0
    while time.monotonic() < deadline:
        began = time.monotonic()
        row = conn.execute(EVENTS_BATCH_SQL, {"from": start, "n": per_batch, "before": before,
                                              "replayable": REPLAYABLE_TASKS}).fetchone()
        conn.commit()
        out.rows["call_events"] += row["pruned"]
        out.batches += 1
        if row["lo"] is None or row["young"]:
            break  # the walk reached the end, or rows to keep: next tick
        start = row["lo"] + per_batch
        rest(began, rest_ratio, deadline)
    first = conn.execute(EVENTS_OLDEST_SQL).fetchone()
    conn.commit()
    out.oldest["call_events"] = first["received_at"] if first else None


# ---- push_messages, notifications: by ranges of heap blocks --------------------------------------
def outbox_batch_sql(table: str) -> str:
    assert table in OUTBOXES
    return f"""
with doomed as (
  select ctid from public.{table}
   where ctid >= format('(%%s,0)', %(lo)s::bigint)::tid and ctid < format('(%%s,0)', %(hi)s::bigint)::tid
     and status in ('sent', 'failed', 'skipped') and created_at < %(before)s
   for update skip locked
), gone as (
  delete from public.{table} where ctid = any (array(select ctid from doomed)) returning 1
)
select (select count(*) from gone) as pruned,
       (select min(created_at) from public.{table}
         where ctid >= format('(%%s,0)', %(lo)s::bigint)::tid and ctid < format('(%%s,0)', %(hi)s::bigint)::tid
           and status in ('sent', 'failed', 'skipped') and created_at >= %(before)s) as oldest_kept,
       pg_relation_size('public.{table}') / current_setting('block_size')::bigint as blocks
"""


def prune_outbox(conn: psycopg.Connection, client: redis.Redis, table: str, before: datetime, deadline: float,
                 out: Pruned, blocks_per_batch: int = BLOCKS_PER_BATCH,
                 blocks_per_tick: int = BLOCKS_PER_TICK, rest_ratio: float = REST_RATIO) -> None:
    """One tick's share of the walk round `table`: from the cursor, at most `blocks_per_tick`
    blocks. The oldest finished row kept is known once a pass is over (a pass sees every block)."""
    sql = outbox_batch_sql(table)
    pass_key = f"{table}:pass_oldest"
    cursor, pass_oldest = client.hmget(names.RETENTION_CURSOR, table, pass_key)
    lo = int(cursor or 0)
    pass_oldest = float(pass_oldest) if pass_oldest else None
    walked = 0
    while walked < blocks_per_tick and time.monotonic() < deadline:
        if walked:
            rest(began, rest_ratio, deadline)
        began = time.monotonic()
        row = conn.execute(sql, {"lo": lo, "hi": lo + blocks_per_batch, "before": before}).fetchone()
        conn.commit()
        out.rows[table] += row["pruned"]
        out.batches += 1
        walked += blocks_per_batch
        if row["oldest_kept"] is not None:
            kept = row["oldest_kept"].timestamp()
            pass_oldest = kept if pass_oldest is None else min(pass_oldest, kept)
        lo += blocks_per_batch
        if lo >= row["blocks"]:  # round the table: the pass is over, its oldest is the table's
            out.oldest[table] = None if pass_oldest is None else datetime.fromtimestamp(pass_oldest, timezone.utc)
            _publish_oldest(client, table, pass_oldest)
            lo, pass_oldest = 0, None
            if walked >= row["blocks"]:
                break  # a small table: one pass a tick is enough
    client.hset(names.RETENTION_CURSOR, table, lo)
    if pass_oldest is None:
        client.hdel(names.RETENTION_CURSOR, pass_key)
    else:
        client.hset(names.RETENTION_CURSOR, pass_key, repr(pass_oldest))


# ---- usage deltas: each minute's folded into at most two ------------------------------------------
# Minutes of the rollup from the watermark on, with how many deltas each holds; only those with more
# than two are worth rewriting.
DELTA_MINUTES_SQL = """
select m.minute, m.net, m.rise, m.rise_at,
       (select count(*) from public.callflow_usage_deltas d
         where d.at >= m.minute and d.at < m.minute + interval '1 minute') as deltas
  from public.callflow_usage_minutes m
 where m.minute >= %(from)s and m.minute < %(before)s
 order by m.minute limit %(n)s
"""

DELTA_DELETE_SQL = """
delete from public.callflow_usage_deltas d using unnest(%(minutes)s::timestamptz[]) m(minute)
 where d.at >= m.minute and d.at < m.minute + interval '1 minute'
"""

DELTA_INSERT_SQL = """
insert into public.callflow_usage_deltas (at, delta)
select * from unnest(%(ats)s::timestamptz[], %(deltas)s::integer[])
"""

LAST_INSTANT = timedelta(minutes=1) - timedelta(microseconds=1)


def residue(minute: datetime, net: int, rise: int, rise_at: datetime | None) -> list[tuple[datetime, int]]:
    """At most two deltas giving the minute the same summary: its running sum reaches `rise` first at
    `rise_at` (nothing above it) and ends at `net` (<= rise) on its last instant."""
    rows: list[tuple[datetime, int]] = []
    if rise > 0:
        rows.append((rise_at, rise))
    if net - rise != 0:
        rows.append((minute + LAST_INSTANT, net - rise))
    return rows


def compact_deltas(conn: psycopg.Connection, client: redis.Redis, before: datetime, deadline: float,
                   out: Pruned, per_batch: int = MINUTES_PER_BATCH, rest_ratio: float = REST_RATIO) -> None:
    table = "callflow_usage_deltas"
    before = before.replace(second=0, microsecond=0)
    mark = client.hget(names.RETENTION_CURSOR, table)
    start = datetime.fromtimestamp(float(mark), timezone.utc) if mark else _EPOCH
    first = True
    while time.monotonic() < deadline:
        if not first:
            rest(began, rest_ratio, deadline)
        first, began = False, time.monotonic()
        with conn.transaction():
            if not conn.execute("select pg_try_advisory_xact_lock(hashtext(%s)) as got",
                                (_REFRESH_LOCK,)).fetchone()["got"]:
                break  # a refresh is folding: the minutes are the next tick's
            # The per-minute lookups are costed as if a minute held the whole table: JIT compiling
            # then took 70 ms of a 100 ms batch.
            conn.execute("set local jit = off")
            minutes = conn.execute(DELTA_MINUTES_SQL, {"from": start, "before": before, "n": per_batch}).fetchall()
            crowded = [m for m in minutes if m["deltas"] > 2]
            if crowded:
                conn.execute(DELTA_DELETE_SQL, {"minutes": [m["minute"] for m in crowded]})
                kept = [r for m in crowded for r in residue(m["minute"], m["net"], m["rise"], m["rise_at"])]
                conn.execute(DELTA_INSERT_SQL, {"ats": [at for at, _ in kept], "deltas": [d for _, d in kept]})
                out.rows[table] += sum(m["deltas"] for m in crowded) - len(kept)
        conn.commit()
        out.batches += 1
        if len(minutes) < per_batch:
            start = before  # every minute up to the horizon is folded
            break
        start = minutes[-1]["minute"] + timedelta(minutes=1)
    client.hset(names.RETENTION_CURSOR, table, repr(start.timestamp()))
    # Every delta before the watermark is folded: the oldest kept as it was written is at it.
    out.oldest[table] = start if start > _EPOCH else None


# ---- one tick ------------------------------------------------------------------------------------
def _publish_oldest(client: redis.Redis, table: str, at: float | None) -> None:
    if at is None:
        client.hdel(names.RETENTION_OLDEST, table)
    else:
        client.hset(names.RETENTION_OLDEST, table, repr(at))


@dataclass(frozen=True)
class Budget:
    """How much one tick may do: each table's batch size, and at most `tick_seconds` per table."""
    events_per_batch: int = EVENTS_PER_BATCH
    blocks_per_batch: int = BLOCKS_PER_BATCH
    blocks_per_tick: int = BLOCKS_PER_TICK
    minutes_per_batch: int = MINUTES_PER_BATCH
    tick_seconds: float = TICK_SECONDS
    rest_ratio: float = REST_RATIO


def prune(conn: psycopg.Connection, client: redis.Redis, days: int, now: datetime | None = None,
          budget: Budget = Budget()) -> Pruned:
    """One tick of retention over every table, counted in Redis for /metrics."""
    before = horizon(now or datetime.now(timezone.utc), days)
    out = Pruned()
    prune_events(conn, before, time.monotonic() + budget.tick_seconds, out, budget.events_per_batch, budget.rest_ratio)
    for table in OUTBOXES:
        prune_outbox(conn, client, table, before, time.monotonic() + budget.tick_seconds, out,
                     budget.blocks_per_batch, budget.blocks_per_tick, budget.rest_ratio)
    compact_deltas(conn, client, before, time.monotonic() + budget.tick_seconds, out, budget.minutes_per_batch,
                   budget.rest_ratio)
    pipe = client.pipeline()
    for table, n in out.rows.items():
        if n:
            pipe.hincrby(names.RETENTION_PRUNED, table, n)
    for table in ("call_events", "callflow_usage_deltas"):
        at = out.oldest.get(table)
        if at is None:
            pipe.hdel(names.RETENTION_OLDEST, table)
        else:
            pipe.hset(names.RETENTION_OLDEST, table, repr(at.timestamp()))
    pipe.execute()
    return out
