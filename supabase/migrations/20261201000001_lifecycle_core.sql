-- The lifecycle core (round two):
-- * a LiveKit room sid is not unique over time: LiveKit keeps an empty room, and its sid, until
--   its empty timeout, so a redial in the same room name can be served the sid of an ended call.
--   At most one live call per sid.
-- * `glare` is an end reason: the later of two invitations between the same users, each the
--   other's callee, ends `cancelled` with it.

alter table public.calls drop constraint if exists calls_livekit_room_sid_key;
create index if not exists calls_livekit_room_sid on public.calls (livekit_room_sid);
create unique index if not exists calls_one_live_call_per_sid
  on public.calls (livekit_room_sid) where status in ('ringing', 'active') and livekit_room_sid is not null;

alter table public.call_invitations drop constraint call_invitations_end_reason_known;
alter table public.call_invitations add constraint call_invitations_end_reason_known check (
  end_reason is null or end_reason in ('answered', 'declined', 'caller_cancelled', 'timeout', 'callee_busy',
                                       'room_closed', 'connection_aborted', 'glare', 'error'));

alter table public.calls drop constraint calls_end_reason_known;
alter table public.calls add constraint calls_end_reason_known check (
  end_reason is null or end_reason in ('hangup', 'answered', 'declined', 'caller_cancelled', 'timeout',
                                       'callee_busy', 'room_closed', 'connection_aborted', 'glare', 'error'));

-- The sweep's look for client transitions whose change was never taken.
create index if not exists call_invitations_client_ended_updated
  on public.call_invitations (updated_at) where status in ('accepted', 'declined', 'cancelled');
-- Who left a live call and when (grace periods, silent calls).
create index if not exists call_participants_call_left on public.call_participants (call_id, left_at);
