-- callflow: invitations, calls, participants, the event log and the email outbox.
-- Runs unchanged on a Supabase project (`supabase db push`) and on local Postgres
-- (`callflow migrate`, which first adds a minimal `auth` schema where there is none).

create extension if not exists pgcrypto;

-- ---------------------------------------------------------------------------------------------
-- call_invitations: inserted by the caller's client, moved by clients and workers
-- ---------------------------------------------------------------------------------------------
create table public.call_invitations (
  id             uuid primary key default gen_random_uuid(),
  room_name      text not null,
  caller_id      uuid not null references auth.users (id) on delete cascade,
  callee_id      uuid not null references auth.users (id) on delete cascade,
  call_type      text not null default 'video',
  status         text not null default 'pending',
  call_id        uuid,
  created_at     timestamptz not null default now(),
  updated_at     timestamptz not null default now(),
  ringing_at     timestamptz,
  ring_deadline  timestamptz,
  answered_at    timestamptz,
  ended_at       timestamptz,
  end_reason     text,
  metadata       jsonb not null default '{}'::jsonb,
  constraint call_invitations_caller_is_not_callee check (caller_id <> callee_id),
  constraint call_invitations_room_name_not_blank check (length(btrim(room_name)) between 1 and 256),
  constraint call_invitations_call_type_known check (call_type in ('audio', 'video')),
  constraint call_invitations_status_known check (
    status in ('pending', 'ringing', 'accepted', 'declined', 'cancelled', 'missed', 'busy', 'failed')),
  constraint call_invitations_end_reason_known check (
    end_reason is null or end_reason in ('answered', 'declined', 'caller_cancelled', 'timeout',
                                         'callee_busy', 'room_closed', 'connection_aborted', 'error'))
);

comment on table public.call_invitations is
  'One ringing of one callee. Inserted by the caller (pending); status moved by clients and callflow workers.';

-- ---------------------------------------------------------------------------------------------
-- calls: one row per LiveKit room session
-- ---------------------------------------------------------------------------------------------
create table public.calls (
  id                uuid primary key default gen_random_uuid(),
  room_name         text not null,
  livekit_room_sid  text unique,
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
                                         'callee_busy', 'room_closed', 'connection_aborted', 'error')),
  constraint calls_duration_not_negative check (duration_seconds >= 0)
);

-- A room name is reused over time, but at most one call per name is live at once.
create unique index calls_one_live_call_per_room
  on public.calls (room_name) where status in ('ringing', 'active');
create index calls_room_name_created on public.calls (room_name, created_at desc);
create index calls_created_at on public.calls (created_at desc);

alter table public.call_invitations
  add constraint call_invitations_call_id_fkey foreign key (call_id) references public.calls (id) on delete set null;

-- ---------------------------------------------------------------------------------------------
-- call_participants: one row per participant session
-- ---------------------------------------------------------------------------------------------
create table public.call_participants (
  id                uuid primary key default gen_random_uuid(),
  call_id           uuid not null references public.calls (id) on delete cascade,
  identity          text not null,
  participant_sid   text not null unique,
  joined_at         timestamptz,
  left_at           timestamptz,
  duration_seconds  integer not null default 0,
  constraint call_participants_duration_not_negative check (duration_seconds >= 0)
);
create index call_participants_call on public.call_participants (call_id);
create index call_participants_identity_open on public.call_participants (identity) where left_at is null;

-- ---------------------------------------------------------------------------------------------
-- call_events: every event taken from any source, once (event_id is the deduplication key)
-- ---------------------------------------------------------------------------------------------
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
create index call_events_room on public.call_events (room_name, received_at);
create index call_events_invitation on public.call_events (invitation_id) where invitation_id is not null;

-- ---------------------------------------------------------------------------------------------
-- notifications: the email outbox
-- ---------------------------------------------------------------------------------------------
create table public.notifications (
  id                   uuid primary key default gen_random_uuid(),
  kind                 text not null default 'missed_call',
  invitation_id        uuid not null references public.call_invitations (id) on delete cascade,
  recipient_id         uuid not null references auth.users (id) on delete cascade,
  recipient_email      text,
  status               text not null default 'pending',
  attempts             integer not null default 0,
  provider_message_id  text,
  last_error           text,
  created_at           timestamptz not null default now(),
  sent_at              timestamptz,
  constraint notifications_kind_known check (kind in ('missed_call')),
  constraint notifications_status_known check (status in ('pending', 'sent', 'failed', 'skipped')),
  constraint notifications_once unique (kind, invitation_id, recipient_id)
);
create index notifications_pending on public.notifications (created_at) where status = 'pending';

-- ---------------------------------------------------------------------------------------------
-- Hot paths of the workers
-- ---------------------------------------------------------------------------------------------
create index call_invitations_ringing_deadline
  on public.call_invitations (ring_deadline) where status = 'ringing';
create index call_invitations_pending_created
  on public.call_invitations (created_at) where status = 'pending';
create index call_invitations_room_live
  on public.call_invitations (room_name) where status in ('pending', 'ringing', 'accepted');
create index call_invitations_call on public.call_invitations (call_id);
create index call_invitations_updated on public.call_invitations (updated_at, id);
create index call_invitations_callee on public.call_invitations (callee_id, status);
create index call_invitations_caller on public.call_invitations (caller_id, status);
