-- What callflow must still do in a LiveKit room: make it (a call rang while LiveKit gave no answer),
-- delete it (its call ended: everyone out), remove someone (no right to be there). Written in the
-- same transaction as the decision that calls for it and deleted once LiveKit has answered, so an
-- action survives a worker's death and a LiveKit outage: the sweep retries what is due, with backoff.
-- Internal state: clients get no grants (99_grants.sql).
create table public.callflow_room_actions (
  key             text primary key,      -- 'make:<call id>', 'release:<call id>', 'remove:<participant sid>'
  action          text not null check (action in ('make', 'release', 'remove')),
  room_name       text not null,
  call_id         uuid,
  identity        text,
  participant_sid text,
  attempts        integer not null default 0,
  next_attempt_at timestamptz not null,
  last_error      text,
  created_at      timestamptz not null default now()
);
create index callflow_room_actions_due on public.callflow_room_actions (next_attempt_at);
alter table public.callflow_room_actions enable row level security;
