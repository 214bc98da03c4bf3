-- The invitation state machine, enforced by the database whoever writes:
--   pending -> ringing | accepted | declined | cancelled | busy | failed
--   ringing -> accepted | declined | cancelled | missed
-- Terminal statuses (accepted, declined, cancelled, missed, busy, failed) never change again.
-- Clients (roles authenticated/anon) may change `status` only: the callee pending/ringing ->
-- accepted/declined, the caller pending/ringing -> cancelled. The database stamps updated_at,
-- answered_at, ended_at and end_reason on the transition (its clock), unless a worker sets them.

create or replace function public.callflow_is_terminal(status text) returns boolean
language sql immutable
as $$ select status in ('accepted', 'declined', 'cancelled', 'missed', 'busy', 'failed') $$;

create or replace function public.callflow_default_end_reason(status text) returns text
language sql immutable
as $$
  select case status
    when 'accepted' then 'answered'
    when 'declined' then 'declined'
    when 'cancelled' then 'caller_cancelled'
    when 'missed' then 'timeout'
    when 'busy' then 'callee_busy'
    when 'failed' then 'error'
  end
$$;

create or replace function public.callflow_transition_allowed(old_status text, new_status text) returns boolean
language sql immutable
as $$
  select case old_status
    when 'pending' then new_status in ('ringing', 'accepted', 'declined', 'cancelled', 'busy', 'failed')
    when 'ringing' then new_status in ('accepted', 'declined', 'cancelled', 'missed')
    else false
  end
$$;

create or replace function public.callflow_is_client() returns boolean
language sql stable
as $$ select current_user in ('authenticated', 'anon') $$;

create or replace function public.call_invitations_guard_insert() returns trigger
language plpgsql
as $$
begin
  if new.status is distinct from 'pending' then
    raise exception 'call_invitations: a new invitation must be pending, not %', new.status
      using errcode = 'check_violation', hint = 'insert without a status, or with status pending';
  end if;
  if public.callflow_is_client() then
    if new.call_id is not null or new.ringing_at is not null or new.ring_deadline is not null
       or new.answered_at is not null or new.ended_at is not null or new.end_reason is not null then
      raise exception 'call_invitations: call_id, ringing_at, ring_deadline, answered_at, ended_at and end_reason are set by callflow, not by clients'
        using errcode = 'insufficient_privilege';
    end if;
    new.created_at := now();
  end if;
  new.updated_at := now();
  return new;
end
$$;

create or replace function public.call_invitations_guard_update() returns trigger
language plpgsql
as $$
declare
  changed text[];
  uid uuid;
begin
  if public.callflow_is_client() then
    select coalesce(array_agg(n.key order by n.key), '{}') into changed
      from jsonb_each(to_jsonb(new)) n
      join jsonb_each(to_jsonb(old)) o using (key)
     where n.value is distinct from o.value and n.key not in ('status', 'updated_at');
    if array_length(changed, 1) > 0 then
      raise exception 'call_invitations: clients may change status only, not %', array_to_string(changed, ', ')
        using errcode = 'insufficient_privilege';
    end if;
  end if;

  if new.status is distinct from old.status then
    if public.callflow_is_terminal(old.status) then
      raise exception 'call_invitations: invitation % is already % and can no longer become %', old.id, old.status, new.status
        using errcode = 'check_violation', hint = 'terminal statuses never change';
    end if;
    if not public.callflow_transition_allowed(old.status, new.status) then
      raise exception 'call_invitations: illegal transition % -> % for invitation %', old.status, new.status, old.id
        using errcode = 'check_violation';
    end if;
    if public.callflow_is_client() then
      uid := auth.uid();
      if new.status in ('accepted', 'declined') and uid is distinct from old.callee_id then
        raise exception 'call_invitations: only the callee may move an invitation to %', new.status
          using errcode = 'insufficient_privilege';
      elsif new.status = 'cancelled' and uid is distinct from old.caller_id then
        raise exception 'call_invitations: only the caller may cancel an invitation'
          using errcode = 'insufficient_privilege';
      elsif new.status not in ('accepted', 'declined', 'cancelled') then
        raise exception 'call_invitations: clients may not move an invitation to %', new.status
          using errcode = 'insufficient_privilege';
      end if;
    end if;

    if new.status = 'accepted' and (new.answered_at is null or public.callflow_is_client()) then
      new.answered_at := now();
    end if;
    if public.callflow_is_terminal(new.status) then
      if new.ended_at is null or public.callflow_is_client() then
        new.ended_at := now();
      end if;
      if new.end_reason is null or public.callflow_is_client() then
        new.end_reason := public.callflow_default_end_reason(new.status);
      end if;
    end if;
  end if;
  new.updated_at := now();
  return new;
end
$$;

create trigger call_invitations_guard_insert
  before insert on public.call_invitations
  for each row execute function public.call_invitations_guard_insert();

create trigger call_invitations_guard_update
  before update on public.call_invitations
  for each row execute function public.call_invitations_guard_update();

-- ---------------------------------------------------------------------------------------------
-- The Postgres LISTEN source of the listener (local and self-hosted): one notification per
-- insert and per status change, small enough for NOTIFY's 8000-byte limit.
-- ---------------------------------------------------------------------------------------------
create or replace function public.call_invitations_notify() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    perform pg_notify('callflow_invitations', json_build_object(
      'op', tg_op, 'id', new.id, 'status', new.status, 'room_name', new.room_name,
      'updated_at', new.updated_at)::text);
  end if;
  return null;
end
$$;

create trigger call_invitations_notify
  after insert or update of status on public.call_invitations
  for each row execute function public.call_invitations_notify();

-- Supabase Realtime streams only tables in its publication.
do $$
begin
  if exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    alter publication supabase_realtime add table public.call_invitations;
  end if;
end
$$;
