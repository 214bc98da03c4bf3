-- Retention (issue 26, CALLFLOW_RETENTION_DAYS): the usage rollup's refresh folds a bounded number
-- of change marks per call, so a backlog is folded in short transactions over several runs.
-- The old events, finished outbox rows and usage deltas are pruned by the worker
-- (orchestration/retention) with no new index: call_events is walked along its primary key (ids
-- grow with time), push_messages and notifications by ranges of heap blocks, usage deltas by
-- minute. An index on a 20,000,000-row call_events built here would hold off every insert of the
-- lifecycle for the whole build (the migration runs in a transaction: no CONCURRENTLY).

drop function public.callflow_usage_refresh();

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

revoke all on function public.callflow_usage_refresh(integer) from public, anon, authenticated;
grant execute on function public.callflow_usage_refresh(integer) to service_role;
