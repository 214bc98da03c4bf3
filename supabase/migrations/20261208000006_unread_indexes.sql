-- Two indexes no statement reads (issue 26), each written on every lifecycle: on a year of history
-- every index keyed by something random (a room name, a call id) costs the lifecycle a leaf page
-- of its own, read into shared buffers and written whole into the WAL after each checkpoint (15.6
-- full-page images a lifecycle at scale 1, none on an empty database).
-- - call_events_room (room_name, received_at): nothing in callflow looks events up by room (the
--   operators' lookup is by invitation: call_events_invitation, docs/OPERATIONS.md); 990 MB at
--   20,000,000 events.
-- - call_participants_call (call_id): call_participants_call_left (call_id, left_at) begins with
--   the same column and serves every lookup by call (and the foreign key's cascade from calls).
-- Dropped concurrently: no write to these tables waits for it.
drop index concurrently if exists public.call_events_room;
drop index concurrently if exists public.call_participants_call;
