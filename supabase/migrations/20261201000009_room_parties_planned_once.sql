-- A client's INSERT of an invitation cost ~5 ms of Postgres CPU, nearly all of it planning: a
-- LANGUAGE sql function that cannot be inlined (it sets search_path) is planned again at every
-- call, and `callflow_room_parties`' query (an OR over statuses, on a table with a dozen indexes)
-- takes ~2 ms to plan and 0.2 ms to run; the admission trigger called it twice. As plpgsql the
-- same query is prepared once per session (its plan kept), and the trigger asks once.
-- (Measured: 4.9 ms of backend CPU per client INSERT before, see bench/RESULTS.md.)

create or replace function public.callflow_room_parties(room text, except_invitation uuid default null)
returns setof uuid
language plpgsql stable security definer set search_path = public
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
revoke all on function public.callflow_room_parties(text, uuid) from public, anon, authenticated;
grant execute on function public.callflow_room_parties(text, uuid) to service_role;

create or replace function public.call_invitations_admit() returns trigger
language plpgsql security definer set search_path = public
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
