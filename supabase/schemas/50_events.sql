-- call_events: every event taken from any source, once (event_id is the deduplication key).
-- Append-only; written by callflow's workers, nothing for clients.

create table public.call_events (
  id             bigint generated always as identity primary key,
  event_id       text not null unique,
  source         text not null,
  type           text not null,
  room_name      text,
  invitation_id  uuid,
  occurred_at    timestamptz,
  received_at    timestamptz not null default now(),
  payload        jsonb not null default '{}'::jsonb,
  constraint call_events_source_known check (source in ('livekit', 'realtime', 'postgres', 'timer', 'sweep'))
);
-- The operators' lookup (docs/OPERATIONS.md). No index of every event by room: on a year of history
-- it cost every lifecycle a random leaf page (migration 20261208000006).
create index call_events_invitation on public.call_events (invitation_id) where invitation_id is not null;
-- The grace sweep's look for a left session's abort (it does not know the event's id): those events
-- alone, by room (migration 20261208000011).
create index call_events_aborted_in_room on public.call_events (room_name) where type = 'participant_connection_aborted';

alter table public.call_events enable row level security;
