-- Issue 26: the month's peak no longer sums every minute ever rolled up (see
-- supabase/schemas/80_usage.sql, callflow_usage_month_levels). Also: a TRUNCATE of the history
-- forgets the kept levels with the rest.
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
alter table public.callflow_usage_month_levels enable row level security;

create or replace function public.callflow_usage_levels_follow() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  -- A statement's changed minutes (transition tables): each moves the level of every later month.
  if tg_op = 'INSERT' then
    update public.callflow_usage_month_levels l set level = l.level + d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join new_rows c on c.minute < m.month group by m.month) d
     where l.month = d.month;
  elsif tg_op = 'UPDATE' then
    update public.callflow_usage_month_levels l set level = l.level + d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join (select minute, net from new_rows union all select minute, -net from old_rows) c
                on c.minute < m.month group by m.month) d
     where l.month = d.month;
  else
    update public.callflow_usage_month_levels l set level = l.level - d.change
      from (select m.month, sum(c.net) as change from public.callflow_usage_month_levels m
              join old_rows c on c.minute < m.month group by m.month) d
     where l.month = d.month;
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

revoke all on public.callflow_usage_month_levels from public, anon, authenticated;

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
  return null;
end $$;

-- The month's peak from the rollup: the level at the month's first instant (everything before,
-- callflow_usage_level_at), then each minute's level at its start plus its rise. Ties go to the
-- earliest instant. Volatile: the level may be made (and kept) on the way.
create or replace function public.callflow_usage_peak(month_start timestamptz, month_end timestamptz,
                                                     out peak integer, out peak_at timestamptz)
language sql volatile security definer set search_path = public, pg_temp set jit = off as $$
  with baseline as (
    select public.callflow_usage_level_at(month_start)::integer as level
  ), minutes as (
    select u.minute, u.rise, u.rise_at,
           b.level + coalesce(sum(u.net) over (order by u.minute rows between unbounded preceding and 1 preceding), 0)
             as level_at_start
      from public.callflow_usage_minutes u, baseline b
     where u.minute >= month_start and u.minute < month_end
  ), candidates as (
    select level as value, month_start as at from baseline
    union all
    select level_at_start + rise, rise_at from minutes where rise > 0
  )
  select value::integer, case when value > 0 then at end from candidates order by value desc, at limit 1
$$;

revoke all on function public.callflow_usage_level_at(timestamptz), public.callflow_usage_levels_follow()
  from public, anon, authenticated;
grant execute on function public.callflow_usage_level_at(timestamptz) to service_role;
