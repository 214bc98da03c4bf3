-- Issue 26: the month's count of calls no longer reads every call of the month (see
-- supabase/schemas/80_usage.sql, callflow_usage_call_hours).
-- The calls made in each settled UTC hour, and how many of them completed: counted once, when the
-- hour is over (10 minutes after its end) and none of its calls is ringing or active any more, so
-- the count can no longer change. The usage check asked for the month's count every minute, and
-- counting the month's calls read a growing month of rows (41-141 ms on a year of history,
-- issue 26); now it sums at most 744 kept hours and counts only the hours not yet settled.
-- A call made by callflow is inserted with `created_at = now()` (its transaction's start), so an
-- insert can land in a settled hour only from a transaction open for over 5 minutes after it, or
-- from a backdated insert (an import, a test): the triggers below forget a kept hour whenever a
-- write could change its count (a backdated insert, a change of a settled call's status or of any
-- call's `created_at`, a delete, a truncate); callflow's own writes never fire them.
create table public.callflow_usage_call_hours (
  hour             timestamptz primary key,
  calls            bigint not null,
  completed_calls  bigint not null
);
alter table public.callflow_usage_call_hours enable row level security;

create or replace function public.callflow_usage_call_hours_forget() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if tg_op = 'TRUNCATE' then
    delete from public.callflow_usage_call_hours where true;
  elsif tg_op = 'DELETE' then
    delete from public.callflow_usage_call_hours k
     where k.hour in (select date_trunc('hour', o.created_at, 'UTC') from old_calls o);
  else
    delete from public.callflow_usage_call_hours k where k.hour = date_trunc('hour', new.created_at, 'UTC');
    if tg_op = 'UPDATE' then
      delete from public.callflow_usage_call_hours k where k.hour = date_trunc('hour', old.created_at, 'UTC');
    end if;
  end if;
  return null;
end $$;

create trigger callflow_usage_call_hours_backdated after insert on public.calls
  for each row when (new.created_at < clock_timestamp() - interval '5 minutes')
  execute function public.callflow_usage_call_hours_forget();
create trigger callflow_usage_call_hours_rewritten after update of status, created_at on public.calls
  for each row when (old.created_at is distinct from new.created_at
                     or (old.status is distinct from new.status and old.status not in ('ringing', 'active')))
  execute function public.callflow_usage_call_hours_forget();
create trigger callflow_usage_call_hours_deleted after delete on public.calls
  referencing old table as old_calls for each statement execute function public.callflow_usage_call_hours_forget();
create trigger callflow_usage_call_hours_truncated after truncate on public.calls
  for each statement execute function public.callflow_usage_call_hours_forget();

-- The calls made in [month_start, month_end) and how many completed: the kept hours, each settled
-- hour not kept yet counted (and kept when none of its calls is live), the rest counted.
-- One caller at a time (an advisory lock), so that an hour is never both summed and counted.
create or replace function public.callflow_usage_calls(month_start timestamptz, month_end timestamptz,
                                                      out calls bigint, out completed_calls bigint)
language plpgsql volatile security definer set search_path = public, pg_temp set jit = off set timezone = 'UTC' as $$
declare
  settled_before timestamptz := greatest(month_start, least(month_end,
                                  date_trunc('hour', clock_timestamp() - interval '10 minutes')));
  hour_start timestamptz;
  counted bigint;
  completed bigint;
  total bigint := 0;
  total_completed bigint := 0;
begin
  perform pg_advisory_xact_lock(hashtext('callflow_usage_calls'));
  for hour_start in
    select h.hour from generate_series(month_start, settled_before - interval '1 hour', interval '1 hour') as h(hour)
     where not exists (select 1 from public.callflow_usage_call_hours k where k.hour = h.hour)
  loop
    select count(*), count(*) filter (where c.status = 'completed') into counted, completed
      from public.calls c where c.created_at >= hour_start and c.created_at < hour_start + interval '1 hour';
    if exists (select 1 from public.calls c
                where c.created_at >= hour_start and c.created_at < hour_start + interval '1 hour'
                  and c.status in ('ringing', 'active')) then
      total := total + counted;
      total_completed := total_completed + completed;
    else
      insert into public.callflow_usage_call_hours (hour, calls, completed_calls)
      values (hour_start, counted, completed);
    end if;
  end loop;
  select total + coalesce(sum(k.calls), 0), total_completed + coalesce(sum(k.completed_calls), 0)
    into total, total_completed
    from public.callflow_usage_call_hours k where k.hour >= month_start and k.hour < settled_before;
  select total + count(*), total_completed + count(*) filter (where c.status = 'completed')
    into total, total_completed
    from public.calls c where c.created_at >= settled_before and c.created_at < month_end;
  calls := total;
  completed_calls := total_completed;
end $$;

revoke all on public.callflow_usage_call_hours from public, anon, authenticated;
revoke all on function public.callflow_usage_call_hours_forget(), public.callflow_usage_calls(timestamptz, timestamptz)
  from public, anon, authenticated;
grant execute on function public.callflow_usage_calls(timestamptz, timestamptz) to service_role;
