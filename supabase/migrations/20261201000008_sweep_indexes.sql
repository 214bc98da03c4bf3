-- The sweep looks at live calls every second (silent answered calls, grace periods, rooms to
-- compare with LiveKit): an index of live calls only, so that costs the live calls, not the history.
create index if not exists calls_live_created on public.calls (created_at) where status in ('ringing', 'active');
