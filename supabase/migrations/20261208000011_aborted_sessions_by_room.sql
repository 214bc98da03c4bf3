-- The grace sweep asks whether a left session aborted (LiveKit's participant_connection_aborted,
-- looked up by room: the sweep does not know the event's id). Migration 20261208000006 dropped the
-- only index by room, and that look became a sequential scan of every event ever recorded (20,000,000
-- rows at scale 1, seconds, inside the room's transaction). A partial index of those events alone:
-- a few rows a day, nothing for any other event to write.
-- Built concurrently: no write to call_events waits for it.
create index concurrently if not exists call_events_aborted_in_room
  on public.call_events (room_name) where type = 'participant_connection_aborted';
