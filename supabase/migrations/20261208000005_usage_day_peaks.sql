-- Issue 26: the month's peak no longer walks every minute of the month (see
-- supabase/schemas/80_usage.sql, callflow_usage_day_peaks).
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
alter table public.callflow_usage_day_peaks enable row level security;

-- The minutes' change moves the kept levels of later months (as before) and forgets its days.
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

revoke all on public.callflow_usage_day_peaks from public, anon, authenticated;
revoke all on function public.callflow_usage_day_peak(timestamptz) from public, anon, authenticated;
grant execute on function public.callflow_usage_day_peak(timestamptz) to service_role;
