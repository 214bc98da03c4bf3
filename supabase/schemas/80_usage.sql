-- LiveKit usage against the plan (issue 16): the rollup behind `callflow usage`'s peak
-- concurrency and minutes, the month snapshots behind /metrics, and the usage alerts' bookkeeping.
-- Internal state: clients get no grants on any of it (99_grants.sql).
--
-- Why this design: the peak over a month of 1,000,000 sessions is a sort of 2,000,000 join/leave
-- instants (~3-4 s on 2 vCPUs), and its minutes a join of both tables (~0.8 s): too slow to run
-- on demand, so both are kept as a rollup. `calls` and
-- `call_participants` may be written by anything (the lifecycle, a backfill, an operator), so the
-- database itself notices every change:
--   1. statement-level triggers (transition tables: one insert per statement, however many rows)
--      append the ids of changed sessions, and of calls whose `ended_at` moved, to
--      `callflow_usage_dirty`. Insert-only, no lookups, no locks: the writers' transactions pay
--      next to nothing and cannot deadlock with each other through it;
--   2. `callflow_usage_refresh()` (run by `callflow usage` before it reads and by the beat's usage
--      check every minute) takes the committed marks, re-reads those sessions as they are now,
--      and applies the difference to what it had counted for them (`callflow_usage_sessions`):
--      +1/-1 per instant in `callflow_usage_deltas`, summarised per UTC minute in
--      `callflow_usage_minutes` (net change, and the highest rise within the minute and when).
--      Re-reading the committed state (rather than trusting what a trigger saw mid-transaction)
--      keeps it exact whatever the isolation level or the order of concurrent writers; one refresh
--      runs at a time (an advisory lock).
-- The month's peak is then a running sum over <= 44,640 minute rows, and its minutes one row of
-- `callflow_usage_month_minutes` (ended sessions, each part rounded up as LiveKit bills) plus the
-- few sessions still open. A TRUNCATE of the history empties the rollup with it.

create table public.callflow_usage_dirty (
  id              bigint generated always as identity primary key,
  participant_id  uuid,
  call_id         uuid
);

-- What the rollup currently counts for each session: [started_at, ended_at), ended_at null = open.
create table public.callflow_usage_sessions (
  participant_id  uuid primary key,
  started_at      timestamptz not null,
  ended_at        timestamptz
);

create index callflow_usage_sessions_open on public.callflow_usage_sessions (started_at)
  where ended_at is null;

-- Participant-minutes of ended sessions per UTC month: each session's part inside the month,
-- rounded up to the whole minute.
create table public.callflow_usage_month_minutes (
  month    date primary key,
  minutes  bigint not null
);

-- Net change of the number of connected participants at each instant.
create table public.callflow_usage_deltas (
  at     timestamptz primary key,
  delta  integer not null
);

-- Per UTC minute: `net` change over the minute; `rise` = the highest running sum within it above
-- its starting level (>= 0), first reached at `rise_at` (null when 0).
create table public.callflow_usage_minutes (
  minute   timestamptz primary key,
  net      integer not null,
  rise     integer not null,
  rise_at  timestamptz
);

-- The latest figures of a month, as the beat's usage check (or `callflow usage`) computed them:
-- what /metrics reads, so a scrape costs one row instead of a month's sessions.
create table public.callflow_usage_months (
  month                         date primary key,
  plan                          text not null,
  participant_minutes           bigint not null,
  peak_concurrent_participants  integer not null,
  peak_at                       timestamptz,
  calls                         integer not null,
  completed_calls               integer not null,
  computed_at                   timestamptz not null default now()
);

-- One usage alert per month, measure and threshold (at most once each), and its email's state,
-- as for missed-call emails: pending -> sent | failed | skipped.
create table public.callflow_usage_alerts (
  id                   uuid primary key default public.callflow_uuid_v7(),
  month                date not null,
  measure              text not null,
  threshold_percent    integer not null,
  plan                 text not null,
  value                bigint not null,
  limit_value          bigint not null,
  recipient_email      text,
  status               text not null default 'pending',
  attempts             integer not null default 0,
  provider_message_id  text,
  last_error           text,
  created_at           timestamptz not null default now(),
  sent_at              timestamptz,
  constraint callflow_usage_alerts_once unique (month, measure, threshold_percent),
  constraint callflow_usage_alerts_measure_known check (measure in ('participant_minutes', 'concurrent_participants')),
  constraint callflow_usage_alerts_status_known check (status in ('pending', 'sent', 'failed', 'skipped'))
);
create index callflow_usage_alerts_pending on public.callflow_usage_alerts (created_at)
  where status = 'pending';

-- ---- change capture ----------------------------------------------------------------------------

create or replace function public.callflow_usage_mark_participants() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if tg_op = 'INSERT' then
    insert into public.callflow_usage_dirty (participant_id) select id from new_rows;
  elsif tg_op = 'DELETE' then
    insert into public.callflow_usage_dirty (participant_id) select id from old_rows;
  else
    -- Only rows whose counted interval may have moved (the lifecycle upserts unchanged rows).
    insert into public.callflow_usage_dirty (participant_id)
    select n.id from new_rows n join old_rows o on o.id = n.id
     where (n.joined_at, n.left_at, n.call_id) is distinct from (o.joined_at, o.left_at, o.call_id)
    union
    select o.id from old_rows o where not exists (select 1 from new_rows n where n.id = o.id);
  end if;
  return null;
end $$;

create or replace function public.callflow_usage_mark_calls() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  -- A call's end is the end of its sessions that never recorded their own.
  insert into public.callflow_usage_dirty (call_id)
  select n.id from new_rows n join old_rows o on o.id = n.id where n.ended_at is distinct from o.ended_at;
  return null;
end $$;

create trigger callflow_usage_participants_insert after insert on public.call_participants
  referencing new table as new_rows for each statement execute function public.callflow_usage_mark_participants();
create trigger callflow_usage_participants_update after update on public.call_participants
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.callflow_usage_mark_participants();
create trigger callflow_usage_participants_delete after delete on public.call_participants
  referencing old table as old_rows for each statement execute function public.callflow_usage_mark_participants();
create or replace function public.callflow_usage_forget_all() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  -- The whole history is gone (TRUNCATE has no transition tables): so is everything counted.
  perform pg_advisory_xact_lock(hashtext('callflow_usage_refresh'));
  delete from public.callflow_usage_dirty where participant_id is not null or call_id is not null;
  delete from public.callflow_usage_sessions where true;
  delete from public.callflow_usage_month_minutes where true;
  delete from public.callflow_usage_deltas where true;
  delete from public.callflow_usage_minutes where true;
  delete from public.callflow_usage_month_levels where true;
  delete from public.callflow_usage_day_peaks where true;
  return null;
end $$;

create trigger callflow_usage_participants_truncate after truncate on public.call_participants
  for each statement execute function public.callflow_usage_forget_all();
create trigger callflow_usage_calls_update after update on public.calls
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.callflow_usage_mark_calls();

-- ---- the refresh -------------------------------------------------------------------------------

-- Folds the oldest `max_marks` committed change marks into the rollup; returns how many sessions
-- changed (null: every mark, as `callflow_usage_refresh()` always did). Bounded, so a backlog
-- (after an outage, or the first refresh of a big history) is folded in short transactions, one
-- after the other, rather than in one that runs for minutes: each session's count is set to what
-- its rows say now, so marks folded in any order and any number of rounds give the same rollup.
-- A refresh touches a few rows of big tables through CTEs and arrays whose sizes the planner
-- cannot know: left to itself it hashes the whole history to find a few hundred sessions. The
-- lookups are therefore written as LATERAL subqueries fenced with OFFSET 0 (never flattened into a
-- join), which makes them index lookups per changed session or minute. Those lookups are costed
-- high enough to trigger JIT compilation, which costs seconds for a refresh of milliseconds: off.
-- Months and minutes are UTC ones whatever the session's time zone.
create or replace function public.callflow_usage_refresh(max_marks integer default null) returns integer
language plpgsql security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
declare
  touched timestamptz[];
  zeroed timestamptz[];
  changed integer;
begin
  perform pg_advisory_xact_lock(hashtext('callflow_usage_refresh'));

  with taken as (
    delete from public.callflow_usage_dirty
     where id in (select id from public.callflow_usage_dirty order by id limit max_marks)
    returning participant_id, call_id
  ), affected as (
    select participant_id as id from taken where participant_id is not null
    union
    select p.id from public.call_participants p
     where p.call_id in (select call_id from taken where call_id is not null)
  ), counted_now as (
    -- A session counts up to its left_at, else its call's ended_at, else it is open. (Lateral
    -- lookups: a few changed sessions must not cost a scan of the whole history.)
    select p.id, p.started_at,
           -- (an end before the start counts as no time; greatest() would drop a null end)
           case when p.ended_at is not null then greatest(p.ended_at, p.started_at) end as ended_at
      from affected a
      cross join lateral (
        select p.id, p.joined_at as started_at, coalesce(p.left_at, c.ended_at) as ended_at
          from public.call_participants p join public.calls c on c.id = p.call_id
         where p.id = a.id and p.joined_at is not null offset 0) p
  ), counted_before as (
    select s.* from affected a
      cross join lateral (select * from public.callflow_usage_sessions s where s.participant_id = a.id offset 0) s
  ), changes as (
    select coalesce(n.id, b.participant_id) as id, n.id is not null as present,
           b.started_at as old_from, b.ended_at as old_to, n.started_at as new_from, n.ended_at as new_to
      from counted_now n full join counted_before b on b.participant_id = n.id
     where (b.started_at, b.ended_at) is distinct from (n.started_at, n.ended_at)
  ), forgotten as (
    delete from public.callflow_usage_sessions s using changes ch where s.participant_id = ch.id and not ch.present
  ), remembered as (
    insert into public.callflow_usage_sessions (participant_id, started_at, ended_at)
    select id, new_from, new_to from changes where present
    on conflict (participant_id) do update set started_at = excluded.started_at, ended_at = excluded.ended_at
  ), month_parts as (
    -- Ended intervals, cut at month boundaries, each part rounded up to the minute.
    select iv.sign, m::date as month,
           ceil(extract(epoch from least(iv.t, m + interval '1 month') - greatest(iv.f, m)) / 60)::bigint as minutes
      from (select -1 as sign, old_from as f, old_to as t from changes where old_to is not null
            union all
            select 1, new_from, new_to from changes where new_to is not null) iv
      cross join lateral generate_series(date_trunc('month', iv.f), iv.t, interval '1 month') m
     where least(iv.t, m + interval '1 month') > greatest(iv.f, m)
  ), months_applied as (
    insert into public.callflow_usage_month_minutes (month, minutes)
    select month, sum(sign * minutes) from month_parts group by month having sum(sign * minutes) <> 0
    on conflict (month) do update set minutes = public.callflow_usage_month_minutes.minutes + excluded.minutes
  ), instants as (
    select old_from as at, -1 as d from changes where old_from is not null
    union all select old_to, 1 from changes where old_to is not null
    union all select new_from, 1 from changes where new_from is not null
    union all select new_to, -1 from changes where new_to is not null
  ), applied as (
    insert into public.callflow_usage_deltas (at, delta)
    select at, sum(d)::integer from instants group by at having sum(d) <> 0
    on conflict (at) do update set delta = public.callflow_usage_deltas.delta + excluded.delta
    returning at, delta
  )
  select array_agg(distinct date_trunc('minute', at, 'UTC')), array_agg(at) filter (where delta = 0),
         (select count(*) from changes)
    into touched, zeroed, changed
    from applied;

  if touched is null then
    return coalesce(changed, 0);
  end if;

  if zeroed is not null then
    delete from public.callflow_usage_deltas where at = any(zeroed) and delta = 0;
  end if;

  with running as (
    select m.minute, d.at, d.delta,
           sum(d.delta) over (partition by m.minute order by d.at) as level
      from unnest(touched) m(minute)
      cross join lateral (
        select at, delta from public.callflow_usage_deltas d
         where d.at >= m.minute and d.at < m.minute + interval '1 minute' offset 0) d
  ), summary as (
    select minute, sum(delta)::integer as net, max(level)::integer as top,
           (array_agg(at order by level desc, at))[1] as top_at
      from running group by minute
  )
  insert into public.callflow_usage_minutes (minute, net, rise, rise_at)
  select minute, net, greatest(top, 0), case when top > 0 then top_at end from summary
  on conflict (minute) do update set net = excluded.net, rise = excluded.rise, rise_at = excluded.rise_at;

  delete from public.callflow_usage_minutes u
   where u.minute = any(touched)
     and not exists (select 1 from public.callflow_usage_deltas d
                      where d.at >= u.minute and d.at < u.minute + interval '1 minute');
  return changed;
end $$;

-- The month's participant-minutes from the rollup: its ended sessions' minutes, plus the open
-- sessions' time in the month up to `upto` (now, or the month's end).
create or replace function public.callflow_usage_minutes(month_start timestamptz, month_end timestamptz,
                                                        upto timestamptz)
returns bigint
language sql stable security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
  select coalesce((select minutes from public.callflow_usage_month_minutes where month = month_start::date), 0)
       + coalesce((select sum(ceil(extract(epoch from least(upto, month_end) - greatest(started_at, month_start)) / 60))
                     from public.callflow_usage_sessions
                    where ended_at is null and started_at < least(upto, month_end)
                      and least(upto, month_end) > greatest(started_at, month_start)), 0)::bigint
$$;

-- The level (participants connected) at the first instant of each month the usage figures were
-- asked for: the sum of `net` of every earlier minute. The month's peak starts from it; summed
-- on demand it read every minute ever rolled up (525,600 rows a year: 315 ms every usage check
-- on a year of history, issue 26). A level is made once, from the nearest earlier one, and every
-- change of an earlier minute moves it by that change (a trigger on the minutes), so it stays
-- exactly the sum.
create table public.callflow_usage_month_levels (
  month  timestamptz primary key,
  level  bigint not null
);

create or replace function public.callflow_usage_levels_follow() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  -- A statement's changed minutes (transition tables): each moves the level of every later month.
  if tg_op = 'INSERT' then
    update public.callflow_usage_month_levels l set level = l.level + d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join new_rows c on c.minute < m.month group by m.month) d
     where l.month = d.month;
    delete from public.callflow_usage_day_peaks k
     where k.day in (select date_trunc('day', c.minute, 'UTC') from new_rows c);
  elsif tg_op = 'UPDATE' then
    update public.callflow_usage_month_levels l set level = l.level + d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join (select minute, net from new_rows union all select minute, -net from old_rows) c
                on c.minute < m.month group by m.month) d
     where l.month = d.month;
    delete from public.callflow_usage_day_peaks k
     where k.day in (select date_trunc('day', c.minute, 'UTC') from new_rows c
                     union select date_trunc('day', c.minute, 'UTC') from old_rows c);
  else
    update public.callflow_usage_month_levels l set level = l.level - d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join old_rows c on c.minute < m.month group by m.month) d
     where l.month = d.month;
    delete from public.callflow_usage_day_peaks k
     where k.day in (select date_trunc('day', c.minute, 'UTC') from old_rows c);
  end if;
  return null;
end $$;

create trigger callflow_usage_minutes_insert_levels after insert on public.callflow_usage_minutes
  referencing new table as new_rows for each statement execute function public.callflow_usage_levels_follow();
create trigger callflow_usage_minutes_update_levels after update on public.callflow_usage_minutes
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.callflow_usage_levels_follow();
create trigger callflow_usage_minutes_delete_levels after delete on public.callflow_usage_minutes
  referencing old table as old_rows for each statement execute function public.callflow_usage_levels_follow();

-- The level at `month_start`: kept, or made now from the nearest earlier kept level plus the
-- minutes between (a month's minutes, not the whole history), under the refresh's lock so that
-- no minute changes between the sum and the row.
create or replace function public.callflow_usage_level_at(month_start timestamptz) returns bigint
language plpgsql volatile security definer set search_path = public, pg_temp set jit = off as $$
declare
  kept record;
  made bigint;
begin
  select level into made from public.callflow_usage_month_levels where month = month_start;
  if found then
    return made;
  end if;
  perform pg_advisory_xact_lock(hashtext('callflow_usage_refresh'));
  select level into made from public.callflow_usage_month_levels where month = month_start;
  if found then
    return made;
  end if;
  select month, level into kept from public.callflow_usage_month_levels
   where month < month_start order by month desc limit 1;
  made := coalesce(kept.level, 0) + coalesce((select sum(net) from public.callflow_usage_minutes
                                               where minute >= coalesce(kept.month, '-infinity'::timestamptz)
                                                 and minute < month_start), 0);
  insert into public.callflow_usage_month_levels (month, level) values (month_start, made);
  return made;
end $$;

-- Per UTC day, from its minutes (callflow_usage_minutes): `net`, the change over the day, and
-- `rise`, the highest level reached within it above its starting level (null when it never rose),
-- first reached at `rise_at`. The month's peak walked up to 44,640 minutes every usage check
-- (10-39 ms on a year of history, issue 26); now it walks at most 31 days and the minutes of the
-- day in progress. A day is summed the first time it is asked for and forgotten by any change of
-- one of its minutes (the minutes' statement triggers), so it always stands for its minutes.
create table public.callflow_usage_day_peaks (
  day      timestamptz primary key,
  net      bigint not null,
  rise     bigint,
  rise_at  timestamptz
);

-- A day's summary: kept, or summed now from its minutes under the refresh's lock (no minute
-- changes between the sum and the row).
create or replace function public.callflow_usage_day_peak(day_start timestamptz,
                                                         out day_net bigint, out day_rise bigint, out day_rise_at timestamptz)
language plpgsql volatile security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
begin
  select k.net, k.rise, k.rise_at into day_net, day_rise, day_rise_at
    from public.callflow_usage_day_peaks k where k.day = day_start;
  if found then
    return;
  end if;
  perform pg_advisory_xact_lock(hashtext('callflow_usage_refresh'));
  select k.net, k.rise, k.rise_at into day_net, day_rise, day_rise_at
    from public.callflow_usage_day_peaks k where k.day = day_start;
  if found then
    return;
  end if;
  select coalesce(sum(u.net), 0) into day_net
    from public.callflow_usage_minutes u where u.minute >= day_start and u.minute < day_start + interval '1 day';
  -- (no row: no minute rose, and both stay null)
  select v.value, v.at into day_rise, day_rise_at
    from (select coalesce(sum(u.net) over (order by u.minute rows between unbounded preceding and 1 preceding), 0)
                   + u.rise as value, u.rise_at as at, u.rise
            from public.callflow_usage_minutes u
           where u.minute >= day_start and u.minute < day_start + interval '1 day') v
   where v.rise > 0
   order by v.value desc, v.at limit 1;
  insert into public.callflow_usage_day_peaks (day, net, rise, rise_at) values (day_start, day_net, day_rise, day_rise_at);
end $$;

-- The month's peak from the rollup: the level at the month's first instant (everything before,
-- callflow_usage_level_at); then each whole day's highest level (its starting level plus its
-- rise, callflow_usage_day_peak); then, in the day `month_end` cuts, each minute's level at its
-- start plus its rise. Ties go to the earliest instant. Volatile: levels and days may be kept on
-- the way.
create or replace function public.callflow_usage_peak(month_start timestamptz, month_end timestamptz,
                                                     out peak integer, out peak_at timestamptz)
language sql volatile security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
  with baseline as (
    select public.callflow_usage_level_at(month_start) as level
  ), bounds as (
    select month_start + greatest(0, floor(extract(epoch from month_end - month_start) / 86400))::integer
                         * interval '1 day' as cut_day
  ), days as (
    select d.day, s.day_net, s.day_rise, s.day_rise_at
      from bounds, generate_series(month_start, bounds.cut_day - interval '1 day', interval '1 day') as d(day),
           lateral public.callflow_usage_day_peak(d.day) s
  ), day_levels as (
    select b.level + coalesce(sum(d.day_net) over (order by d.day rows between unbounded preceding and 1 preceding), 0)
             as level_at_start, d.day_rise, d.day_rise_at
      from days d, baseline b
  ), cut_day_minutes as (
    select u.rise, u.rise_at,
           b.level + (select coalesce(sum(d.day_net), 0) from days d)
             + coalesce(sum(u.net) over (order by u.minute rows between unbounded preceding and 1 preceding), 0)
             as level_at_start
      from public.callflow_usage_minutes u, baseline b, bounds
     where u.minute >= bounds.cut_day and u.minute < month_end
  ), candidates as (
    select level as value, month_start as at from baseline
    union all
    select level_at_start + day_rise, day_rise_at from day_levels where day_rise is not null
    union all
    select level_at_start + rise, rise_at from cut_day_minutes where rise > 0
  )
  select value::integer, case when value > 0 then at end from candidates order by value desc, at limit 1
$$;

-- ---- the month's calls ------------------------------------------------------------------------

-- The calls made in each UTC hour, and how many of them completed. The usage check asks for the
-- month's count every minute: counting the month's calls read a growing month of rows (41-141 ms
-- on a year of history, issue 26), and counting only the hours not settled yet still read the last
-- 70 minutes' calls and every hour with a live call (23-34 ms; its cost grew with the call rate).
-- So the counts follow the writes: statement triggers on `calls` append each statement's change of
-- an hour's counts to `callflow_usage_call_marks` (insert-only: a writer pays one small insert and
-- takes no lock another writer waits for), and `callflow_usage_calls` adds the committed marks to
-- the kept hours. An hour is kept from the first time its month is asked for (counted from its
-- rows then: the hour in progress is counted once, young, and then only followed).
create table public.callflow_usage_call_hours (
  hour             timestamptz primary key,
  calls            bigint not null,
  completed_calls  bigint not null
);

-- Changes of an hour's counts not added to `callflow_usage_call_hours` yet (one row per statement
-- and hour; taken whole by `callflow_usage_calls`).
create table public.callflow_usage_call_marks (
  hour             timestamptz not null,
  calls            integer not null,
  completed_calls  integer not null
);

create or replace function public.callflow_usage_mark_call_counts() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if tg_op = 'INSERT' then
    insert into public.callflow_usage_call_marks (hour, calls, completed_calls)
    select date_trunc('hour', n.created_at, 'UTC'), count(*), count(*) filter (where n.status = 'completed')
      from new_rows n group by 1;
  elsif tg_op = 'DELETE' then
    insert into public.callflow_usage_call_marks (hour, calls, completed_calls)
    select date_trunc('hour', o.created_at, 'UTC'), -count(*), -count(*) filter (where o.status = 'completed')
      from old_rows o group by 1;
  else
    -- Only rows that moved to another hour or into or out of `completed` (most updates move neither).
    insert into public.callflow_usage_call_marks (hour, calls, completed_calls)
    select ch.hour, sum(ch.calls), sum(ch.completed_calls)
      from new_rows n join old_rows o on o.id = n.id
     cross join lateral (values
       (date_trunc('hour', o.created_at, 'UTC'), -1, -(o.status = 'completed')::integer),
       (date_trunc('hour', n.created_at, 'UTC'), 1, (n.status = 'completed')::integer)) ch(hour, calls, completed_calls)
     where date_trunc('hour', n.created_at, 'UTC') <> date_trunc('hour', o.created_at, 'UTC')
        or (n.status = 'completed') <> (o.status = 'completed')
     group by ch.hour
    having sum(ch.calls) <> 0 or sum(ch.completed_calls) <> 0;
  end if;
  return null;
end $$;

create or replace function public.callflow_usage_forget_call_counts() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  -- Every call is gone (TRUNCATE has no transition tables): so are the counts.
  perform pg_advisory_xact_lock(hashtext('callflow_usage_calls'));
  delete from public.callflow_usage_call_marks where true;
  delete from public.callflow_usage_call_hours where true;
  return null;
end $$;

create trigger callflow_usage_call_counts_insert after insert on public.calls
  referencing new table as new_rows for each statement execute function public.callflow_usage_mark_call_counts();
create trigger callflow_usage_call_counts_update after update on public.calls
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.callflow_usage_mark_call_counts();
create trigger callflow_usage_call_counts_delete after delete on public.calls
  referencing old table as old_rows for each statement execute function public.callflow_usage_mark_call_counts();
create trigger callflow_usage_call_counts_truncate after truncate on public.calls
  for each statement execute function public.callflow_usage_forget_call_counts();

-- Takes up to `max_marks` committed marks (null: all), adds those of kept hours to them, and
-- returns how many it took; a mark of an hour not kept is dropped (whenever the hour is kept, the
-- count of its rows holds the mark's change). The usage check runs it until fewer are left, then
-- `callflow_usage_calls` takes the rest: a minute's marks at any call rate (~6,000 at 50 calls/s,
-- about a microsecond each) are taken in short statements, not in one that grows with the rate.
create or replace function public.callflow_usage_fold_call_marks(max_marks integer) returns integer
language plpgsql volatile security definer set search_path = public, pg_temp set jit = off as $$
declare
  taken_marks integer;
begin
  perform pg_advisory_xact_lock(hashtext('callflow_usage_calls'));
  with taken as (
    delete from public.callflow_usage_call_marks m
     where m.ctid = any(array(select l.ctid from public.callflow_usage_call_marks l limit max_marks))
    returning m.hour, m.calls as added, m.completed_calls as completed_added
  ), applied as (
    update public.callflow_usage_call_hours k
       set calls = k.calls + t.added, completed_calls = k.completed_calls + t.completed_added
      from (select taken.hour, sum(taken.added) as added, sum(taken.completed_added) as completed_added
              from taken group by taken.hour) t
     where k.hour = t.hour
  )
  select count(*) into taken_marks from taken;
  return taken_marks;
end $$;

-- The calls made in [month_start, month_end) (whole UTC hours) and how many completed.
-- One caller at a time (an advisory lock). Each hour of the month up to the one in progress that is
-- not kept yet is counted from its rows and kept, and its committed marks dropped, in one
-- statement (one snapshot: the count holds exactly the marks dropped); then the other committed
-- marks are added (callflow_usage_fold_call_marks). A mark not committed yet is taken by a later
-- call. Hours after the one in progress hold no call unless one was dated ahead: counted from the
-- rows (an empty range of the index).
create or replace function public.callflow_usage_calls(month_start timestamptz, month_end timestamptz,
                                                      out calls bigint, out completed_calls bigint)
language plpgsql volatile security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
declare
  kept_before timestamptz := greatest(month_start, least(month_end, date_trunc('hour', clock_timestamp()) + interval '1 hour'));
begin
  if month_start <> date_trunc('hour', month_start) or month_end <> date_trunc('hour', month_end) then
    raise exception 'callflow_usage_calls counts whole UTC hours, not % to %', month_start, month_end;
  end if;
  perform pg_advisory_xact_lock(hashtext('callflow_usage_calls'));
  with new_hours as (
    select h.hour from generate_series(month_start, kept_before - interval '1 hour', interval '1 hour') as h(hour)
     where not exists (select 1 from public.callflow_usage_call_hours k where k.hour = h.hour)
  ), counted as (
    insert into public.callflow_usage_call_hours (hour, calls, completed_calls)
    select n.hour, c.calls, c.completed_calls
      from new_hours n
      cross join lateral (
        select count(*) as calls, count(*) filter (where c.status = 'completed') as completed_calls
          from public.calls c where c.created_at >= n.hour and c.created_at < n.hour + interval '1 hour' offset 0) c
  )
  delete from public.callflow_usage_call_marks m where m.hour in (select n.hour from new_hours n);
  perform public.callflow_usage_fold_call_marks(null);

  select coalesce(sum(k.calls), 0), coalesce(sum(k.completed_calls), 0) into calls, completed_calls
    from public.callflow_usage_call_hours k where k.hour >= month_start and k.hour < kept_before;
  select calls + count(*), completed_calls + count(*) filter (where c.status = 'completed')
    into calls, completed_calls
    from public.calls c where c.created_at >= kept_before and c.created_at < month_end;
end $$;


alter table public.callflow_usage_dirty enable row level security;
alter table public.callflow_usage_sessions enable row level security;
alter table public.callflow_usage_deltas enable row level security;
alter table public.callflow_usage_minutes enable row level security;
alter table public.callflow_usage_month_minutes enable row level security;
alter table public.callflow_usage_months enable row level security;
alter table public.callflow_usage_month_levels enable row level security;
alter table public.callflow_usage_day_peaks enable row level security;
alter table public.callflow_usage_call_hours enable row level security;
alter table public.callflow_usage_call_marks enable row level security;
alter table public.callflow_usage_alerts enable row level security;
