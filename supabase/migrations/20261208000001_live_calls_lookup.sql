-- Live calls are found through calls_one_live_call_per_room only (issue 26). On a year of history
-- ANALYZE's sample holds no live call, so the planner believed calls_live_created empty and chose
-- a full scan of it, filtering every live call, where the lookup of a room's live call needs one
-- probe of calls_one_live_call_per_room (the same rows, keyed by room). The sweeps that walk every
-- live call walk that index instead. Dropped concurrently: no write to calls waits for it.
drop index concurrently if exists public.calls_live_created;
