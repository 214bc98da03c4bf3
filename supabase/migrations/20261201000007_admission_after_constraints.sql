-- The admission rules of 20261201000002 run after the row's own checks, so an invitation the
-- database can judge by itself (an unknown user, caller = callee, an unknown call type, a forged
-- caller) is refused with that error, not with `room_in_use:`. An AFTER trigger fires after the
-- row passed its checks, RLS and its foreign keys (their triggers sort first); the row is already
-- in the table there, so the rules look past it.

drop trigger if exists call_invitations_zz_admit on public.call_invitations;
drop function if exists public.callflow_room_parties(text);

create or replace function public.callflow_room_parties(room text, except_invitation uuid default null)
returns setof uuid
language sql stable security definer set search_path = public
as $$
  select unnest(array[i.caller_id, i.callee_id])
    from public.call_invitations i
    left join public.calls c on c.id = i.call_id
   where i.room_name = room
     and i.id is distinct from except_invitation
     and (i.status in ('pending', 'ringing')
          or (i.status = 'accepted' and (i.call_id is null or c.status in ('ringing', 'active'))))
  union
  select c.caller_id from public.calls c
   where c.room_name = room and c.status in ('ringing', 'active') and c.caller_id is not null
$$;
revoke all on function public.callflow_room_parties(text, uuid) from public, anon, authenticated;
grant execute on function public.callflow_room_parties(text, uuid) to service_role;

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

  if exists (select 1 from public.callflow_room_parties(new.room_name, new.id))
     and not exists (select 1 from public.callflow_room_parties(new.room_name, new.id) p where p = new.caller_id) then
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
