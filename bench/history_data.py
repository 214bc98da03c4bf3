"""A year of a busy tenant, generated in SQL for `bench.history` (cached as a database of its own).

At scale 1: 100,000 users (auth.users, one Expo device each), 5,000,000 calls over the 12 months
before the build (time-ordered, as a real heap is), 7,500,000 invitations (every other call rang a
second callee), ~4,500,000 participants (the answered calls' two sessions), 20,000,000
`call_events` (4 a call), 10,000,000 `push_messages` (2 a call), ~3,000,000 `notifications` (three
in four missed invitations), `callflow_call_parties` (the history index) and the usage rollup
(`callflow_usage_sessions`, `_deltas`, `_minutes`, `_month_minutes`) exactly as
`callflow_usage_refresh()` would have left it, with nothing left dirty.

Skew: callers and first callees are drawn as floor(U * u^(5/3)) for u uniform in [0, 1): user 0
(the heavy user, `heavy_user_id()`) is a party of ~0.2 % of the calls (~10,000 at scale 1),
user 1 of ~0.1 %, and the bottom half of users of ~17 % together (Zipf-like). Everything is a
pure function of the call's number (hashint8extended), so a build is reproducible.

The load runs with `session_replication_role = replica` (no row triggers: the state machine's
guard, NOTIFY, the admission, the history-index and usage triggers would otherwise run per row
and NOTIFY 30 million times); what those triggers maintain (`callflow_call_parties`, the usage
rollup) is written here directly in bulk, and the data satisfies every check constraint and
foreign key (re-validated when the constraints are added back). The tables' indexes, unique and
primary keys and foreign keys are dropped before the load and built again after it, then
`vacuum analyze` (measured at scale 0.01 on the 2-core machine: 7.2 s dropped and rebuilt, 10.3 s
loaded with them kept; the gap grows with the tables, as random-UUID keys stop fitting in memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

# The tables the load writes, whose indexes and keys are dropped before it and rebuilt after.
TABLES = ("auth.users", "public.push_tokens", "public.calls", "public.call_invitations", "public.call_participants",
          "public.call_events", "public.push_messages", "public.notifications", "public.callflow_call_parties",
          "public.callflow_usage_sessions", "public.callflow_usage_deltas", "public.callflow_usage_minutes",
          "public.callflow_usage_month_minutes")
# Bump when the generated data changes (part of the cached database's name).
VERSION = 2


@dataclass(frozen=True)
class Sizes:
    users: int
    calls: int
    events_per_call: int = 4
    pushes_per_call: int = 2

    @classmethod
    def at(cls, scale: float) -> "Sizes":
        return cls(users=max(1000, round(100_000 * scale)), calls=max(1000, round(5_000_000 * scale)))


def heavy_user_id(conn: psycopg.Connection) -> str:
    return str(conn.execute("select md5('hu' || 0)::uuid").fetchone()[0])


HELPERS = """
create schema history_gen;
-- uniform in [0, 1), a pure function of (i, seed)
create function history_gen.u(i bigint, seed bigint) returns float8 language sql immutable parallel safe
as $$ select ((hashint8extended(i, seed) & 281474976710655)::float8 / 281474976710656.0) $$;
create function history_gen.uid(k bigint) returns uuid language sql immutable parallel safe
as $$ select md5('hu' || k)::uuid $$;
-- A version 7 id made at `at` (its first 48 bits the Unix milliseconds, the rest from md5(k)): the
-- rows of a year of callflow carry time-ordered ids (public.callflow_uuid_v7(), migration
-- 20261208000010), so a call's rows lie together in each index keyed by id, as in production.
create function history_gen.tid(k text, at timestamptz) returns uuid language sql immutable parallel safe
as $$ select encode(set_bit(set_bit(set_bit(set_bit(set_bit(set_bit(
           overlay(decode(md5(k), 'hex')
                   placing substring(int8send(floor(extract(epoch from at) * 1000)::bigint) from 3) from 1 for 6),
           55, 0), 54, 1), 53, 1), 52, 1), 71, 1), 70, 0), 'hex')::uuid $$;
create function history_gen.skewed(i bigint, seed bigint, n bigint) returns bigint language sql immutable parallel safe
as $$ select least(n - 1, floor(n * power(history_gen.u(i, seed), 5.0 / 3.0)))::bigint $$;
"""

# One row per call with everything the tables are made of (a temporary table: no WAL).
PLAN = """
create temporary table hist_calls as
select i, history_gen.tid('hc' || i, t) as id, 'call-hist-' || i as room,
       ca as caller_k, ce as callee_k,
       case when i %% 2 = 0 then c2 end as callee2_k,
       case when o < 0.45 then 'completed' when o < 0.85 then 'missed' when o < 0.92 then 'declined'
            when o < 0.97 then 'cancelled' when o < 0.99 then 'busy' else 'failed' end as outcome,
       t as created_at,
       t + make_interval(secs => 1 + 19 * history_gen.u(i, 5)) as answered_at,
       least(10800, floor(-ln(1 - history_gen.u(i, 6)) * 300))::int as duration,
       case when history_gen.u(i, 8) < 0.8 then 'video' else 'audio' end as call_type
  from generate_series(0, %(calls)s - 1) i
  cross join lateral (select history_gen.skewed(i, 1, %(users)s) as ca,
                             history_gen.u(i, 4) as o,
                             %(start)s::timestamptz + (i + history_gen.u(i, 7)) * %(span)s::interval / %(calls)s as t) a
  cross join lateral (select case when s = ca then (s + 1) %% %(users)s else s end as ce
                        from (select history_gen.skewed(i, 2, %(users)s) as s) x) b
  cross join lateral (select case when s2 = ca then (s2 + 1) %% %(users)s else s2 end as c2
                        from (select case when s = ce then (s + 1) %% %(users)s else s end as s2
                                from (select (ca + 1 + floor(history_gen.u(i, 3) * (%(users)s - 1)))::bigint %% %(users)s as s) y) z) c;
alter table hist_calls add primary key (i);
analyze hist_calls;

-- Every invitation: n = 1 the first callee, n = 2 the second (every other call).
create temporary table hist_invitations as
select c.i, n, history_gen.tid('hi' || c.i || '.' || n, c.created_at) as id, c.id as call_id, c.room, c.caller_k,
       case n when 1 then c.callee_k else c.callee2_k end as callee_k, c.call_type, c.created_at,
       case when n = 1 and c.outcome = 'completed' then 'accepted'
            when n = 1 then (case c.outcome when 'declined' then 'declined' when 'cancelled' then 'cancelled'
                                             when 'busy' then 'busy' when 'failed' then 'failed' else 'missed' end)
            when c.outcome in ('completed', 'missed') then 'missed'
            else (case c.outcome when 'declined' then 'declined' when 'cancelled' then 'cancelled'
                                 when 'busy' then 'busy' else 'failed' end) end as status,
       c.answered_at, c.outcome
  from hist_calls c cross join generate_series(1, 2) n
 where n = 1 or c.callee2_k is not null;
analyze hist_invitations;
"""

LOAD = [
    ("auth.users", """
insert into auth.users (id, email, raw_user_meta_data, created_at)
select history_gen.uid(k), 'user' || k || '@history.test', '{}'::jsonb,
       %(start)s::timestamptz - interval '30 days' + k * interval '1 second'
  from generate_series(0, %(users)s - 1) k"""),
    ("push_tokens", """
insert into public.push_tokens (id, user_id, token, platform, device_name, created_at, last_seen_at, provider)
select history_gen.tid('ht' || k, %(start)s::timestamptz), history_gen.uid(k), 'ExponentPushToken[history-' || k || ']',
       case when k %% 2 = 0 then 'ios' else 'android' end, 'phone ' || k,
       %(start)s::timestamptz, %(end)s::timestamptz - (k %% 1000) * interval '1 minute', 'expo'
  from generate_series(0, %(users)s - 1) k"""),
    ("calls", """
insert into public.calls (id, room_name, livekit_room_sid, call_type, caller_id, status, created_at, started_at,
                          ended_at, duration_seconds, end_reason)
select id, room, case when outcome <> 'failed' then 'RM_hist' || i end, call_type, history_gen.uid(caller_k),
       outcome, created_at,
       case when outcome = 'completed' then answered_at end,
       case outcome when 'completed' then answered_at + duration * interval '1 second'
                    when 'missed' then created_at + interval '30 seconds'
                    else created_at + make_interval(secs => 2 + (i %% 10)) end,
       case when outcome = 'completed' then duration else 0 end,
       case outcome when 'completed' then 'hangup' when 'missed' then 'timeout' when 'declined' then 'declined'
                    when 'cancelled' then 'caller_cancelled' when 'busy' then 'callee_busy' else 'error' end
  from hist_calls order by i"""),
    ("call_invitations", """
insert into public.call_invitations (id, room_name, caller_id, callee_id, call_type, status, call_id, created_at,
                                     updated_at, ringing_at, ring_deadline, answered_at, ended_at, end_reason, status_by)
select id, room, history_gen.uid(caller_k), history_gen.uid(callee_k), call_type, status, call_id, created_at,
       e.ended_at,
       case when status not in ('busy', 'failed') then created_at + interval '300 milliseconds' end,
       case when status not in ('busy', 'failed') then created_at + interval '30.3 seconds' end,
       case when status = 'accepted' then answered_at end,
       e.ended_at,
       case status when 'accepted' then 'answered' when 'missed' then 'timeout' when 'declined' then 'declined'
                   when 'cancelled' then 'caller_cancelled' when 'busy' then 'callee_busy' else 'error' end,
       case when status in ('missed', 'busy', 'failed') then 'worker' else 'client' end
  from hist_invitations
  cross join lateral (select case status when 'accepted' then answered_at
                                         when 'missed' then created_at + interval '30.3 seconds'
                                         else created_at + make_interval(secs => 2 + (i %% 10)) end as ended_at) e
 order by i, n"""),
    ("call_participants", """
insert into public.call_participants (id, call_id, identity, participant_sid, joined_at, left_at, duration_seconds)
select history_gen.tid('hp' || i || '.' || n, answered_at), id, history_gen.uid(case n when 1 then caller_k else callee_k end)::text,
       'PA_hist' || i || '_' || n,
       answered_at - (2 - n) * interval '1 second',
       answered_at + duration * interval '1 second',
       duration + (2 - n)
  from hist_calls cross join generate_series(1, 2) n
 where outcome = 'completed'
 order by i, n"""),
    ("call_events", """
insert into public.call_events (event_id, source, type, room_name, invitation_id, occurred_at, received_at, payload)
select case k when 0 then 'realtime:' || v.inv || ':pending'
             when 1 then case when c.outcome in ('missed', 'busy', 'failed') then 'timer:' || v.inv || ':' || c.outcome
                              else 'realtime:' || v.inv || ':' || v.st end
             else 'EV_hist' || c.i || '_' || k end,
       case k when 0 then 'realtime' when 1 then case when c.outcome in ('missed', 'busy', 'failed') then 'timer'
                                                      else 'realtime' end
              else 'livekit' end,
       case k when 0 then 'invitation_pending' when 1 then 'invitation_' || v.st
              when 2 then case when c.outcome = 'completed' then 'participant_joined' else 'room_started' end
              else 'room_finished' end,
       c.room, case when k < 2 then v.inv end, v.at, v.at + interval '40 milliseconds',
       case when k < 2 then jsonb_build_object('status', v.st, 'room_name', c.room)
            else jsonb_build_object('id', 'EV_hist' || c.i || '_' || k,
                                    'event', case k when 2 then 'participant_joined' else 'room_finished' end,
                                    'createdAt', extract(epoch from v.at)::bigint::text,
                                    'room', jsonb_build_object('sid', 'RM_hist' || c.i, 'name', c.room,
                                                               'emptyTimeout', 300, 'departureTimeout', 20,
                                                               'creationTime', extract(epoch from c.created_at)::bigint::text,
                                                               'numParticipants', 2 - k / 3),
                                    'participant', case when k = 2 then jsonb_build_object(
                                        'sid', 'PA_hist' || c.i || '_1', 'identity', history_gen.uid(c.caller_k)::text,
                                        'state', 'ACTIVE', 'joinedAt', extract(epoch from v.at)::bigint::text) end)
       end
  from hist_calls c
  cross join generate_series(0, %(events_per_call)s - 1) k
  cross join lateral (select history_gen.tid('hi' || c.i || '.1', c.created_at) as inv,
                             case when c.outcome = 'completed' then 'accepted' else c.outcome end as st,
                             c.created_at + k * interval '7 seconds' as at) v
 order by c.i, k"""),
    ("push_messages", """
insert into public.push_messages (id, kind, invitation_id, push_token_id, status, attempts, ticket_id, receipt_status,
                                  last_error, created_at, sent_at)
select history_gen.tid('hm' || c.i || '.' || k, c.created_at + k * interval '30 seconds'),
       case when k = 0 then 'incoming_call' when c.outcome = 'missed' then 'missed_call' else 'call_ended' end,
       history_gen.tid('hi' || c.i || '.1', c.created_at), history_gen.tid('ht' || c.callee_k, %(start)s::timestamptz),
       case when c.i %% 97 = 0 then 'skipped' when c.i %% 211 = 0 then 'failed' else 'sent' end, 1,
       case when c.i %% 97 <> 0 and c.i %% 211 <> 0 then 'TK_hist' || c.i || '_' || k end,
       case when c.i %% 97 <> 0 and c.i %% 211 <> 0 then 'ok' end,
       case when c.i %% 97 = 0 then 'ring deadline passed' when c.i %% 211 = 0 then 'DeviceNotRegistered' end,
       c.created_at + k * interval '30 seconds',
       case when c.i %% 97 <> 0 and c.i %% 211 <> 0 then c.created_at + k * interval '30 seconds' + interval '80 milliseconds' end
  from hist_calls c cross join generate_series(0, %(pushes_per_call)s - 1) k
 order by c.i, k"""),
    ("notifications", """
insert into public.notifications (id, kind, invitation_id, recipient_id, recipient_email, status, attempts,
                                  provider_message_id, created_at, sent_at)
select history_gen.tid('hn' || i || '.' || n, created_at + interval '31 seconds'), 'missed_call', id, history_gen.uid(callee_k),
       'user' || callee_k || '@history.test',
       case when history_gen.u(i * 2 + n, 10) < 0.9 then 'sent' else 'skipped' end, 1,
       case when history_gen.u(i * 2 + n, 10) < 0.9 then 'RS_hist' || i || '_' || n end,
       created_at + interval '31 seconds',
       case when history_gen.u(i * 2 + n, 10) < 0.9 then created_at + interval '32 seconds' end
  from hist_invitations
 where status = 'missed' and history_gen.u(i * 2 + n, 9) < 0.75
 order by i, n"""),
    ("callflow_call_parties", """
insert into public.callflow_call_parties (call_id, user_id, call_created_at)
select distinct on (call_id, u) call_id, history_gen.uid(u), created_at
  from hist_invitations cross join lateral (values (caller_k), (callee_k)) p (u)"""),
    ("callflow_usage_sessions", """
insert into public.callflow_usage_sessions (participant_id, started_at, ended_at)
select p.id, p.joined_at, greatest(coalesce(p.left_at, c.ended_at), p.joined_at)
  from public.call_participants p join public.calls c on c.id = p.call_id
 where p.joined_at is not null"""),
    ("callflow_usage_deltas", """
insert into public.callflow_usage_deltas (at, delta)
select at, sum(d)::integer from (select started_at as at, 1 as d from public.callflow_usage_sessions
                                 union all
                                 select ended_at, -1 from public.callflow_usage_sessions where ended_at is not null) x
 group by at having sum(d) <> 0"""),
    ("callflow_usage_minutes", """
insert into public.callflow_usage_minutes (minute, net, rise, rise_at)
select minute, net, greatest(top, 0), case when top > 0 then top_at end
  from (select minute, sum(delta)::integer as net, max(level)::integer as top,
               (array_agg(at order by level desc, at))[1] as top_at
          from (select date_trunc('minute', at, 'UTC') as minute, at, delta,
                       sum(delta) over (partition by date_trunc('minute', at, 'UTC') order by at) as level
                  from public.callflow_usage_deltas) r
         group by minute) s"""),
    ("callflow_usage_month_minutes", """
insert into public.callflow_usage_month_minutes (month, minutes)
select m::date, sum(ceil(extract(epoch from least(s.ended_at, m + interval '1 month') - greatest(s.started_at, m)) / 60))::bigint
  from public.callflow_usage_sessions s
  cross join lateral generate_series(date_trunc('month', s.started_at, 'UTC'), s.ended_at, interval '1 month') m
 where s.ended_at is not null and least(s.ended_at, m + interval '1 month') > greatest(s.started_at, m)
 group by m::date"""),
]


def _keys_and_indexes(conn: psycopg.Connection) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]], list[str]]:
    """(foreign keys touching TABLES, their primary/unique keys, their other indexes' definitions)."""
    tables = [t for t in TABLES]
    fks = conn.execute(
        """select conrelid::regclass::text, conname, pg_get_constraintdef(oid) from pg_constraint
            where contype = 'f' and (conrelid = any(%(t)s::regclass[]) or confrelid = any(%(t)s::regclass[]))
            order by 1, 2""", {"t": tables}).fetchall()
    keys = conn.execute(
        """select conrelid::regclass::text, conname, pg_get_constraintdef(oid) from pg_constraint
            where contype in ('p', 'u') and conrelid = any(%(t)s::regclass[]) order by 1, 2""", {"t": tables}).fetchall()
    indexes = [r[0] for r in conn.execute(
        """select pg_get_indexdef(i.indexrelid) from pg_index i
            where i.indrelid = any(%(t)s::regclass[])
              and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid and c.contype in ('p', 'u', 'x'))
            order by 1""", {"t": tables}).fetchall()]
    return fks, keys, indexes


def build(url: str, scale: float, log=print, keep_indexes: bool = False) -> dict[str, float]:
    """Loads a year into the migrated, empty database at `url`. Returns seconds per step.
    `keep_indexes`: load into the tables with their indexes and keys in place (to compare)."""
    sizes = Sizes.at(scale)
    timings: dict[str, float] = {}

    def step(name: str, sql: str, params: dict | None = None) -> None:
        t = time.perf_counter()
        cur = conn.execute(sql, params) if params is not None else conn.execute(sql)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        rows = f", {cur.rowcount:,} rows" if cur.rowcount and cur.rowcount > 0 else ""
        log(f"  {name}: {time.perf_counter() - t:.1f} s{rows}")

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set maintenance_work_mem = '1GB'")
        conn.execute("set work_mem = '256MB'")
        conn.execute("set max_parallel_maintenance_workers = 1")
        conn.execute("set synchronous_commit = off")
        end = conn.execute("select date_trunc('minute', now()) - interval '1 hour'").fetchone()[0]
        params = {"users": sizes.users, "calls": sizes.calls, "start": end.replace(year=end.year - 1),
                  "end": end, "span": "365 days", "events_per_call": sizes.events_per_call,
                  "pushes_per_call": sizes.pushes_per_call}
        fks, keys, indexes = _keys_and_indexes(conn) if not keep_indexes else ([], [], [])
        conn.execute("drop schema if exists history_gen cascade")
        conn.execute(HELPERS)
        conn.execute("set timezone = 'UTC'")
        for sql in (s for s in PLAN.split(";\n") if s.strip()):
            step("plan (temporary tables)", sql, params if "%(" in sql else None)
        t = time.perf_counter()
        for table, name, _ in fks:
            conn.execute(f'alter table {table} drop constraint "{name}"')
        for table, name, _ in keys:
            conn.execute(f'alter table {table} drop constraint "{name}"')
        for definition in indexes:
            name = definition.split(" INDEX ", 1)[1].split(" ON ", 1)[0]
            schema = definition.split(" ON ", 1)[1].split(".", 1)[0].replace("ONLY ", "")
            conn.execute(f"drop index {schema}.{name}")
        timings["drop keys and indexes"] = time.perf_counter() - t
        conn.execute("set session_replication_role = replica")
        for name, sql in LOAD:
            step(name, sql, params)
        conn.execute("set session_replication_role = origin")
        t = time.perf_counter()
        for table, name, definition in keys:
            conn.execute(f'alter table {table} add constraint "{name}" {definition}')
        log(f"  primary and unique keys: {time.perf_counter() - t:.1f} s")
        t2 = time.perf_counter()
        for definition in indexes:
            conn.execute(definition)
        log(f"  indexes: {time.perf_counter() - t2:.1f} s")
        t2 = time.perf_counter()
        for table, name, definition in fks:
            conn.execute(f'alter table {table} add constraint "{name}" {definition}')
        log(f"  foreign keys (validated): {time.perf_counter() - t2:.1f} s")
        timings["keys, indexes, foreign keys"] = time.perf_counter() - t
        conn.execute("drop schema history_gen cascade")
        conn.execute("drop table hist_invitations, hist_calls")
        # Identity sequences and the dirty marks: as if the rows had been written one by one.
        step("vacuum analyze", "vacuum analyze")
    return timings
