-- Who may enter a call (the contract's "parties of a room"), enforced where a client's insert
-- lands, so it holds for supabase-js, PostgREST and any other door:
--   anonymous:        an anonymous user may not invite unless CALLFLOW_ALLOW_ANONYMOUS
--   rate_limited:     at most CALLFLOW_INVITE_RATE_PER_MINUTE inserts by one caller in any 60 s
--   room_in_use:      a room with parties takes a new invitation only from one of them
--   already_invited:  at most one pending/ringing invitation per (room, callee)
-- All raise SQLSTATE P0001 with a message that starts with the code (PostgREST hands it to
-- supabase-js as `error.message`). Workers (the service role) are not limited.

-- Settings the database's own rules read; written by `callflow migrate`. A missing key means the
-- default, so `supabase db push` alone gives a working database.
create table if not exists public.callflow_settings (
  key   text primary key,
  value text not null
);
alter table public.callflow_settings enable row level security;
revoke all on public.callflow_settings from anon, authenticated;

create or replace function public.callflow_setting(setting_key text, fallback text) returns text
language sql stable security definer set search_path = public
as $$ select coalesce((select value from public.callflow_settings where key = setting_key), fallback) $$;

-- Supabase has auth.jwt(); the local shim gets the same (the claims PostgREST sets per request).
do $$
begin
  if not exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                  where n.nspname = 'auth' and p.proname = 'jwt') then
    execute $f$
      create function auth.jwt() returns jsonb language sql stable as $body$
        select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                        nullif(current_setting('request.jwt.claims', true), ''))::jsonb
      $body$
    $f$;
  end if;
end
$$;

-- The parties of a room, the contract's one definition: the caller and the callee of each
-- invitation of the room that is pending or ringing, or accepted while its call is live or not
-- made yet; and the caller of the room's live call. Security definer: under the asking user's
-- RLS the room would look empty.
create or replace function public.callflow_room_parties(room text) returns setof uuid
language sql stable security definer set search_path = public
as $$
  select unnest(array[i.caller_id, i.callee_id])
    from public.call_invitations i
    left join public.calls c on c.id = i.call_id
   where i.room_name = room
     and (i.status in ('pending', 'ringing')
          or (i.status = 'accepted' and (i.call_id is null or c.status in ('ringing', 'active'))))
  union
  select c.caller_id from public.calls c
   where c.room_name = room and c.status in ('ringing', 'active') and c.caller_id is not null
$$;
revoke all on function public.callflow_room_parties(text) from public, anon, authenticated;
grant execute on function public.callflow_room_parties(text) to service_role;

create index if not exists call_invitations_caller_created on public.call_invitations (caller_id, created_at);
create index if not exists call_invitations_room_callee_open
  on public.call_invitations (room_name, callee_id) where status in ('pending', 'ringing');

create or replace function public.call_invitations_admit() returns trigger
language plpgsql security definer set search_path = public
as $$
declare
  claims jsonb;
  rate integer;
  recent integer;
begin
  -- The role the request runs as (SET ROLE, as PostgREST does): current_user is this function's
  -- owner here, which is what lets the checks below see every row.
  if current_setting('role') not in ('authenticated', 'anon') then
    return new;  -- workers and operators are not limited
  end if;

  claims := coalesce(auth.jwt(), '{}'::jsonb);
  if coalesce((claims ->> 'is_anonymous')::boolean, false)
     and lower(public.callflow_setting('CALLFLOW_ALLOW_ANONYMOUS', 'false')) not in ('true', '1', 'yes', 'on') then
    raise exception 'anonymous: anonymous users may not start calls'
      using errcode = 'P0001', hint = 'sign in with an account (CALLFLOW_ALLOW_ANONYMOUS is off)';
  end if;

  -- One caller's inserts, and one room's, are decided one at a time: two at once cannot both pass.
  perform pg_advisory_xact_lock(hashtextextended('caller:' || new.caller_id::text, 13));
  perform pg_advisory_xact_lock(hashtextextended('room:' || new.room_name, 13));

  rate := public.callflow_setting('CALLFLOW_INVITE_RATE_PER_MINUTE', '30')::integer;
  select count(*) into recent from public.call_invitations
   where caller_id = new.caller_id and created_at > now() - interval '60 seconds';
  if recent >= rate then
    raise exception 'rate_limited: at most % invitations a minute', rate
      using errcode = 'P0001', hint = 'wait a minute before inviting more people';
  end if;

  if exists (select 1 from public.callflow_room_parties(new.room_name))
     and not exists (select 1 from public.callflow_room_parties(new.room_name) p where p = new.caller_id) then
    raise exception 'room_in_use: room % is in use by other people', new.room_name
      using errcode = 'P0001', hint = 'use a room name of your own (an unguessable one)';
  end if;

  if exists (select 1 from public.call_invitations
              where room_name = new.room_name and callee_id = new.callee_id and status in ('pending', 'ringing')) then
    raise exception 'already_invited: this callee is already being invited to room %', new.room_name
      using errcode = 'P0001';
  end if;
  return new;
end
$$;

-- Runs after the guard (trigger names fire in alphabetical order): the row is already checked.
drop trigger if exists call_invitations_zz_admit on public.call_invitations;
create trigger call_invitations_zz_admit
  before insert on public.call_invitations
  for each row execute function public.call_invitations_admit();

-- The repeat window of missed-call emails looks up a recipient's recent emails.
create index if not exists notifications_recipient_created on public.notifications (recipient_id, created_at);
