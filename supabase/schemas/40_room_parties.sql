-- Who may enter a call (the contract's "parties of a room"), enforced where a client's insert
-- lands, so it holds for supabase-js, PostgREST and any other door:
--   anonymous:        an anonymous user may not invite unless CALLFLOW_ALLOW_ANONYMOUS
--   rate_limited:     at most CALLFLOW_INVITE_RATE_PER_MINUTE inserts by one caller in any 60 s
--   room_in_use:      a room with parties takes a new invitation only from one of them
--   already_invited:  at most one pending/ringing invitation per (room, callee)
-- All raise SQLSTATE P0001 with a message that starts with the code (PostgREST hands it to
-- supabase-js as `error.message`). Workers (the service role) are not limited.
--
-- The admission runs after the row's own checks, so an invitation the database can judge by
-- itself (an unknown user, caller = callee, an unknown call type, a forged caller) is refused with
-- that error, not with `room_in_use:`: an AFTER trigger fires after the row passed its checks, RLS
-- and its foreign keys (their triggers sort first); the row is already in the table there, so the
-- rules look past it.
--
-- Both functions are plpgsql with a generic plan kept (plan_cache_mode): as LANGUAGE sql (which
-- cannot be inlined once it sets search_path) the parties' query was planned again at every call,
-- ~2-3 ms of planning for 0.06 ms of execution per client INSERT (bench/RESULTS.md).
--
-- auth.jwt() is Supabase's (the request's claims); on plain Postgres migration
-- 20261201000002_rooms_and_rights.sql adds it beside the local auth shim (supabase/local/).

-- The parties of a room, the contract's one definition: the caller and the callee of each
-- invitation of the room that is pending or ringing, or accepted while its call is live or not
-- made yet; and the caller of the room's live call. Security definer: under the asking user's
-- RLS the room would look empty. `except_invitation`: the invitation being admitted (already in
-- the table when the admission runs).
create or replace function public.callflow_room_parties(room text, except_invitation uuid default null)
returns setof uuid
language plpgsql stable security definer set search_path = public set plan_cache_mode = force_generic_plan
as $$
begin
  return query
  select unnest(array[i.caller_id, i.callee_id])
    from public.call_invitations i
    left join public.calls c on c.id = i.call_id
   where i.room_name = room
     and i.id is distinct from except_invitation
     and (i.status in ('pending', 'ringing')
          or (i.status = 'accepted' and (i.call_id is null or c.status in ('ringing', 'active'))))
  union
  select c.caller_id from public.calls c
   where c.room_name = room and c.status in ('ringing', 'active') and c.caller_id is not null;
end
$$;

create or replace function public.call_invitations_admit() returns trigger
language plpgsql security definer set search_path = public set plan_cache_mode = force_generic_plan
as $$
declare
  claims jsonb;
  rate integer;
  recent integer;
  parties uuid[];
begin
  -- The role the request runs as (SET ROLE, as PostgREST does): current_user is this function's
  -- owner here, which is what lets the checks below see every row.
  if current_setting('role') not in ('authenticated', 'anon') then
    return null;  -- workers and operators are not limited
  end if;

  claims := coalesce(auth.jwt(), '{}'::jsonb);
  if coalesce((claims ->> 'is_anonymous')::boolean, false)
     and lower(public.callflow_setting('CALLFLOW_ALLOW_ANONYMOUS', 'false')) not in ('true', '1', 'yes', 'on') then
    raise exception 'anonymous: anonymous users may not start calls'
      using errcode = 'P0001', hint = 'sign in with an account (CALLFLOW_ALLOW_ANONYMOUS is off)';
  end if;

  -- One caller's inserts, and one room's, are decided one at a time: two at once cannot both pass
  -- (after the lock each query here sees what the other committed).
  perform pg_advisory_xact_lock(hashtextextended('caller:' || new.caller_id::text, 13));
  perform pg_advisory_xact_lock(hashtextextended('room:' || new.room_name, 13));

  rate := public.callflow_setting('CALLFLOW_INVITE_RATE_PER_MINUTE', '30')::integer;
  select count(*) into recent from public.call_invitations
   where caller_id = new.caller_id and created_at > now() - interval '60 seconds' and id <> new.id;
  if recent >= rate then
    raise exception 'rate_limited: at most % invitations a minute', rate
      using errcode = 'P0001', hint = 'wait a minute before inviting more people';
  end if;

  select array_agg(p) into parties from public.callflow_room_parties(new.room_name, new.id) p;
  if parties is not null and not (new.caller_id = any(parties)) then
    raise exception 'room_in_use: room % is in use by other people', new.room_name
      using errcode = 'P0001', hint = 'use a room name of your own (an unguessable one)';
  end if;

  if exists (select 1 from public.call_invitations
              where room_name = new.room_name and callee_id = new.callee_id and status in ('pending', 'ringing')
                and id <> new.id) then
    raise exception 'already_invited: this callee is already being invited to room %', new.room_name
      using errcode = 'P0001';
  end if;
  return null;
end
$$;

create trigger call_invitations_admit
  after insert on public.call_invitations
  for each row execute function public.call_invitations_admit();

-- The rate (a caller's recent invitations) and already_invited (a room's open invitations of a callee).
create index call_invitations_caller_created on public.call_invitations (caller_id, created_at);
-- `room_name is not null` (always true) keeps it to statements with a condition on room_name: a
-- client's answer by id, whose policy adds the same status condition, read this whole index on a
-- big table rather than probe the primary key (migration 20261208000007).
create index call_invitations_open_in_room
  on public.call_invitations (room_name, callee_id) where status in ('pending', 'ringing') and room_name is not null;
