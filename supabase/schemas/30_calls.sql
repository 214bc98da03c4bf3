-- calls: one row per call (a LiveKit room session); call_participants: one row per participant
-- session. Written by callflow's workers; clients read the calls they are a party of.

create table public.calls (
  id                uuid primary key default public.callflow_uuid_v7(),
  room_name         text not null,
  -- Not unique over time: LiveKit keeps an empty room, and its sid, until its empty timeout, so a
  -- redial in the same room name can be served the sid of an ended call. At most one live call per sid.
  livekit_room_sid  text,
  call_type         text not null default 'video',
  caller_id         uuid references auth.users (id) on delete set null,
  status            text not null default 'ringing',
  created_at        timestamptz not null default now(),
  started_at        timestamptz,
  ended_at          timestamptz,
  duration_seconds  integer not null default 0,
  end_reason        text,
  constraint calls_call_type_known check (call_type in ('audio', 'video')),
  constraint calls_status_known check (
    status in ('ringing', 'active', 'completed', 'missed', 'declined', 'cancelled', 'busy', 'failed')),
  constraint calls_end_reason_known check (
    end_reason is null or end_reason in ('hangup', 'answered', 'declined', 'caller_cancelled', 'timeout',
                                         'callee_busy', 'room_closed', 'connection_aborted', 'glare', 'error')),
  constraint calls_duration_not_negative check (duration_seconds >= 0)
);

-- A room name is reused over time, but at most one call per name is live at once. Also the one
-- index of live calls: the sweeps that look at every live call each second (silent answered calls,
-- grace periods, rooms to compare with LiveKit) walk it, so they cost the live calls, not the
-- history. A second index with the same predicate was a trap: the statistics of a big history see
-- no live call, and the planner scanned all of it to find one room's call.
create unique index calls_one_live_call_per_room
  on public.calls (room_name) where status in ('ringing', 'active');
create index calls_room_name_created on public.calls (room_name, created_at desc);
-- When the oldest active call began (its first entry): the callee-busy check reads the user's
-- calls made since then. `created_at is not null` (always true) keeps it out of every statement
-- that does not ask for it: the statistics of a big history see no active call, and the planner
-- would take it for a "free" full scan where a primary key probe is meant.
create index calls_active_created
  on public.calls (created_at) where status = 'active' and created_at is not null;
create index calls_created_at on public.calls (created_at desc);
create index calls_livekit_room_sid on public.calls (livekit_room_sid);
create unique index calls_one_live_call_per_sid
  on public.calls (livekit_room_sid) where status in ('ringing', 'active') and livekit_room_sid is not null;

-- The invitations of a call (set by the worker).
alter table public.call_invitations
  add constraint call_invitations_call_id_fkey foreign key (call_id) references public.calls (id) on delete set null;

create table public.call_participants (
  id                uuid primary key default public.callflow_uuid_v7(),
  call_id           uuid not null references public.calls (id) on delete cascade,
  identity          text not null,
  participant_sid   text not null unique,
  joined_at         timestamptz,
  left_at           timestamptz,
  duration_seconds  integer not null default 0,
  constraint call_participants_duration_not_negative check (duration_seconds >= 0)
);
create index call_participants_identity_open on public.call_participants (identity) where left_at is null;
-- Who left a live call and when (grace periods, silent calls); also every lookup by call (and the
-- cascade from calls): no index of its own on call_id (migration 20261208000006).
create index call_participants_call_left on public.call_participants (call_id, left_at);

-- The `web` process's event stream (GET /api/calls/events) tells a user when one of their calls
-- changes: one NOTIFY per new call and per change of its status or times, on its own channel
-- beside `callflow_invitations`. Only the id travels (NOTIFY's 8000-byte limit); the listener
-- reads the row and sends it only to the call's parties.
create or replace function public.calls_notify() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status or new.started_at is distinct from old.started_at
     or new.ended_at is distinct from old.ended_at or new.duration_seconds is distinct from old.duration_seconds then
    perform pg_notify('callflow_calls', json_build_object(
      'op', tg_op, 'id', new.id, 'status', new.status, 'room_name', new.room_name)::text);
  end if;
  return null;
end
$$;

create trigger calls_notify
  after insert or update on public.calls
  for each row execute function public.calls_notify();

-- A client reads a call, and its participants, when an invitation of the call names them (the
-- `(select auth.uid())` form: 20_invitations.sql).
alter table public.calls enable row level security;
alter table public.call_participants enable row level security;

create policy "participants read their calls" on public.calls
  for select to authenticated
  using (exists (select 1 from public.call_invitations i
                  where i.call_id = calls.id
                    and ((select auth.uid()) = i.caller_id or (select auth.uid()) = i.callee_id)));

create policy "participants read their call's participants" on public.call_participants
  for select to authenticated
  using (exists (select 1 from public.call_invitations i
                  where i.call_id = call_participants.call_id
                    and ((select auth.uid()) = i.caller_id or (select auth.uid()) = i.callee_id)));
