-- GET /api/calls (a user's recent calls, newest first) read through an index on the user's
-- participation (issue 23, finding 4).
--
-- Under the calls policy ("participants read their calls": an invitation of the call names the
-- user), `select * from calls order by created_at desc limit 20` walked calls_created_at and
-- checked the policy on every row until it had 20 of the user's: on 1,000,000 calls a user with
-- no calls, or only old ones, read all of them (110-130 ms each; a user hammering the route held
-- the web's pool). Nothing indexed "the calls of user U by time": invitations know the user but
-- not the call's time, and a call's invitations are not all made when it is (a party invites
-- others into a live call).
--
-- callflow_call_parties is that index: one row per (call, caller or callee of one of its
-- invitations), with the call's created_at (never changed once written), kept by the triggers
-- below however invitations get their call_id. web reads the ids of a user's newest calls from it
-- (callflow_call_parties_recent), then the calls themselves AS THE USER, by id, under RLS: the
-- policy still decides what a user sees, a row here only says where to look (a stale one, e.g. of
-- an invitation moved to another call, is filtered out by RLS, never shown).
-- Internal (callflow_…): nothing for clients (99_grants.sql).

create table public.callflow_call_parties (
  call_id          uuid not null,
  user_id          uuid not null references auth.users (id) on delete cascade,
  call_created_at  timestamptz not null,
  constraint callflow_call_parties_pkey primary key (call_id, user_id)
);
-- The user's newest first, ties as GET /api/calls orders them (created_at desc, id).
create index callflow_call_parties_recent
  on public.callflow_call_parties (user_id, call_created_at desc, call_id);

comment on table public.callflow_call_parties is
  'Who is a party (caller or callee of an invitation) of which call, with the call''s time: the index of GET /api/calls. Kept by triggers on call_invitations and calls.';

alter table public.callflow_call_parties enable row level security;

-- An invitation that gets (or is inserted with) a call: its caller and callee are parties of it.
-- Clients never set call_id (the guard refuses it), so this runs for callflow's own writes.
create or replace function public.callflow_call_parties_add() returns trigger
language plpgsql
as $$
begin
  insert into public.callflow_call_parties (call_id, user_id, call_created_at)
  select c.id, u.id, c.created_at
    from public.calls c
    cross join (values (new.caller_id), (new.callee_id)) as u (id)
   where c.id = new.call_id
  on conflict do nothing;
  return null;
end
$$;

-- A call deleted (or the table truncated): its rows go too (no foreign key, so that `truncate
-- calls` keeps working without CASCADE, as tests and operators run it).
create or replace function public.callflow_call_parties_forget() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'TRUNCATE' then
    truncate public.callflow_call_parties;
  else
    delete from public.callflow_call_parties p using old_rows o where p.call_id = o.id;
  end if;
  return null;
end
$$;

-- Every call's parties from the invitations as they are: the migration runs it once; an operator
-- runs it again after loading invitations with triggers off (a restore with
-- session_replication_role = replica). Idempotent. (The migration that made the table ran it.)
create or replace function public.callflow_call_parties_backfill() returns bigint
language plpgsql
as $$
declare
  added bigint;
begin
  insert into public.callflow_call_parties (call_id, user_id, call_created_at)
  select c.id, u.id, c.created_at
    from public.call_invitations i
    join public.calls c on c.id = i.call_id
    cross join lateral (values (i.caller_id), (i.callee_id)) as u (id)
  on conflict do nothing;
  get diagnostics added = row_count;
  return added;
end
$$;

create trigger callflow_call_parties_insert
  after insert on public.call_invitations
  for each row when (new.call_id is not null)
  execute function public.callflow_call_parties_add();

-- `update of call_id` fires whenever the column is in the SET list (the lifecycle writes it on
-- every update): only a real change does any work.
create trigger callflow_call_parties_update
  after update of call_id on public.call_invitations
  for each row when (new.call_id is not null and new.call_id is distinct from old.call_id)
  execute function public.callflow_call_parties_add();

create trigger callflow_call_parties_delete
  after delete on public.calls
  referencing old table as old_rows
  for each statement execute function public.callflow_call_parties_forget();

create trigger callflow_call_parties_truncate
  after truncate on public.calls
  for each statement execute function public.callflow_call_parties_forget();
