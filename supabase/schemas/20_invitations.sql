-- call_invitations: one ringing of one callee. Inserted by the caller's client (pending); its
-- status moved by clients and callflow's workers, as the state machine below allows.
-- Who may insert into which room (the parties of a room, rate, anonymous users): 40_room_parties.sql.

create table public.call_invitations (
  id             uuid primary key default public.callflow_uuid_v7(),
  room_name      text not null,
  caller_id      uuid not null references auth.users (id) on delete cascade,
  callee_id      uuid not null references auth.users (id) on delete cascade,
  call_type      text not null default 'video',
  status         text not null default 'pending',
  call_id        uuid,  -- references public.calls (id): 30_calls.sql
  created_at     timestamptz not null default now(),
  updated_at     timestamptz not null default now(),
  ringing_at     timestamptz,
  ring_deadline  timestamptz,
  answered_at    timestamptz,
  ended_at       timestamptz,
  end_reason     text,
  metadata       jsonb not null default '{}'::jsonb,
  -- Who made the last status change: 'worker' (callflow's lifecycle) or 'client' (anyone else).
  -- Written by the database only (call_invitations_status_by below).
  status_by      text not null default 'client',
  constraint call_invitations_caller_is_not_callee check (caller_id <> callee_id),
  constraint call_invitations_room_name_not_blank check (length(btrim(room_name)) between 1 and 256),
  constraint call_invitations_call_type_known check (call_type in ('audio', 'video')),
  constraint call_invitations_status_known check (
    status in ('pending', 'ringing', 'accepted', 'declined', 'cancelled', 'missed', 'busy', 'failed')),
  -- `glare`: the later of two invitations between the same users, each the other's callee.
  constraint call_invitations_end_reason_known check (
    end_reason is null or end_reason in ('answered', 'declined', 'caller_cancelled', 'timeout', 'callee_busy',
                                         'room_closed', 'connection_aborted', 'glare', 'error')),
  constraint call_invitations_status_by_known check (status_by in ('client', 'worker'))
);

comment on table public.call_invitations is
  'One ringing of one callee. Inserted by the caller (pending); status moved by clients and callflow workers.';
comment on column public.call_invitations.status_by is
  'Who made the last status change: worker (callflow''s lifecycle, in a transaction that set callflow.actor) or client (anyone else). Written by the database only.';

-- Hot paths of the workers.
create index call_invitations_ringing_deadline
  on public.call_invitations (ring_deadline) where status = 'ringing';
create index call_invitations_pending_created
  on public.call_invitations (created_at) where status = 'pending';
create index call_invitations_room_live
  on public.call_invitations (room_name) where status in ('pending', 'ringing', 'accepted');
create index call_invitations_call on public.call_invitations (call_id);
create index call_invitations_updated on public.call_invitations (updated_at, id);
create index call_invitations_callee on public.call_invitations (callee_id, status);
-- A caller's open invitations (a user's live invitations, glare's counter invitations); every other
-- look by caller reads call_invitations_caller_created (migration 20261208000012). `caller_id is not
-- null` (always true) keeps a client's answer, whose policy adds the same status condition, on the
-- primary key (as call_invitations_open_in_room, 40_room_parties.sql).
create index call_invitations_caller_open
  on public.call_invitations (caller_id) where status in ('pending', 'ringing') and caller_id is not null;
-- The sweep's look for client transitions whose change was never taken.
create index call_invitations_client_ended_updated
  on public.call_invitations (updated_at) where status in ('accepted', 'declined', 'cancelled');

-- ---------------------------------------------------------------------------------------------
-- The invitation state machine, enforced by the database whoever writes:
--   pending -> ringing | accepted | declined | cancelled | busy | failed
--   ringing -> accepted | declined | cancelled | missed
-- Terminal statuses (accepted, declined, cancelled, missed, busy, failed) never change again.
-- Clients (roles authenticated/anon) may change `status` only: the callee pending/ringing ->
-- accepted/declined, the caller pending/ringing -> cancelled. The database stamps updated_at,
-- answered_at, ended_at and end_reason on the transition (its clock), unless a worker sets them.
-- The guard runs with the client's own rights: the four helpers are executable by
-- `authenticated` (99_grants.sql); they are pure and read nothing.
-- ---------------------------------------------------------------------------------------------

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
-- Who made the last status change (`status_by`): 'worker' when the transaction declared itself
-- callflow's lifecycle worker (`set_config('callflow.actor', 'worker', true)`, in the store's
-- transaction that applies a decision) and is not a client role, else 'client'. So the listener
-- drops the Realtime/LISTEN echo of the worker's own transitions where it arrives, and a client
-- can never forge it: the guard (which fires first: BEFORE triggers fire in name order) refuses a
-- client touching the column, the setting is ignored for client roles, and whatever was written
-- to it is overwritten here.
-- ---------------------------------------------------------------------------------------------
create or replace function public.call_invitations_status_by() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    new.status_by := case
      when not public.callflow_is_client() and current_setting('callflow.actor', true) = 'worker' then 'worker'
      else 'client'
    end;
  else
    new.status_by := old.status_by;
  end if;
  return new;
end
$$;

create trigger call_invitations_status_by
  before insert or update on public.call_invitations
  for each row execute function public.call_invitations_status_by();

-- ---------------------------------------------------------------------------------------------
-- The Postgres LISTEN source of the listener (local and self-hosted): one notification per
-- insert and per status change (with who made it), small enough for NOTIFY's 8000-byte limit.
-- ---------------------------------------------------------------------------------------------
create or replace function public.call_invitations_notify() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    perform pg_notify('callflow_invitations', json_build_object(
      'op', tg_op, 'id', new.id, 'status', new.status, 'room_name', new.room_name,
      'updated_at', new.updated_at, 'status_by', new.status_by)::text);
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

-- ---------------------------------------------------------------------------------------------
-- Row level security as Supabase runs it: clients act as `authenticated` with auth.uid() from
-- request.jwt.claims; callflow's workers connect with a role that bypasses RLS. The policies use
-- `(select auth.uid())` (Supabase's "auth_rls_initplan"): an InitPlan, worked out once per
-- statement, where a bare auth.uid() is called again for every row it is compared with.
-- ---------------------------------------------------------------------------------------------
alter table public.call_invitations enable row level security;

create policy "participants read their invitations" on public.call_invitations
  for select to authenticated
  using ((select auth.uid()) = caller_id or (select auth.uid()) = callee_id);

create policy "callers insert their own pending invitations" on public.call_invitations
  for insert to authenticated
  with check ((select auth.uid()) = caller_id and status = 'pending');

create policy "callees answer or decline" on public.call_invitations
  for update to authenticated
  using ((select auth.uid()) = callee_id and status in ('pending', 'ringing'))
  with check ((select auth.uid()) = callee_id and status in ('accepted', 'declined'));

create policy "callers cancel" on public.call_invitations
  for update to authenticated
  using ((select auth.uid()) = caller_id and status in ('pending', 'ringing'))
  with check ((select auth.uid()) = caller_id and status = 'cancelled');
