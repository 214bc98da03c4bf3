-- notifications: the email outbox (missed-call emails). callflow's own, nothing for clients.

create table public.notifications (
  id                   uuid primary key default public.callflow_uuid_v7(),
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
-- The repeat window of missed-call emails looks up a recipient's recent emails.
create index notifications_recipient_created on public.notifications (recipient_id, created_at);

alter table public.notifications enable row level security;
