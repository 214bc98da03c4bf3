-- Issue 26: the month's count of calls follows every write of `calls` instead of counting the
-- hours not settled yet (see supabase/schemas/80_usage.sql, callflow_usage_call_marks).
-- Migration 20261208000004 kept an hour's count once the hour was over and none of its calls was
-- live, and counted the rest from the rows at every usage check: the last 70 minutes' calls at
-- least, and every hour that still had a live call (23-34 ms a check at the bench's rates, ~250 ms
-- at a sustained 50 calls/s: its cost grew with the call rate). Now statement triggers append each
-- statement's change of an hour's counts to `callflow_usage_call_marks` (insert-only: a writer
-- pays one small insert, takes no lock another writer waits for), and the usage check adds the
-- committed marks to the kept hours. An hour is kept from the first time its month is asked for
-- (counted from its rows then), so the hour in progress is counted once, young, and then only
-- followed.
-- The kept hours of migration 20261208000004 were exact when its triggers go (any write that could
-- change one forgot it, in the writer's own transaction), so they stay and are followed from here.
-- No backfill and no scan: the triggers are made under a short lock of `calls`.

create table public.callflow_usage_call_marks (
  hour             timestamptz not null,
  calls            integer not null,
  completed_calls  integer not null
);
alter table public.callflow_usage_call_marks enable row level security;

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

drop trigger callflow_usage_call_hours_backdated on public.calls;
drop trigger callflow_usage_call_hours_rewritten on public.calls;
drop trigger callflow_usage_call_hours_deleted on public.calls;
drop trigger callflow_usage_call_hours_truncated on public.calls;
drop function public.callflow_usage_call_hours_forget();

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

revoke all on public.callflow_usage_call_marks from public, anon, authenticated;
revoke all on function public.callflow_usage_mark_call_counts(), public.callflow_usage_forget_call_counts(),
                        public.callflow_usage_fold_call_marks(integer)
  from public, anon, authenticated;
grant execute on function public.callflow_usage_fold_call_marks(integer) to service_role;
