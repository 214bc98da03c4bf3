-- call_events is vacuumed every 100,000 inserted rows, not every 20 % of the table (issue 26). It is
-- append-only: a vacuum has nothing to remove, but it marks the new pages all-visible, and only
-- then are the lookups by event_id (the dedupe of every batch of events, the lost-transition look)
-- answered from the index alone. With the default a year of history (20,000,000 events) waits for
-- 4,000,000 inserts, and each lookup read the table too: the lost-transition look's 16,424 lookups
-- fetched 16,424 rows (82,643 buffers, 542 ms).
alter table public.call_events set (autovacuum_vacuum_insert_scale_factor = 0,
                                    autovacuum_vacuum_insert_threshold = 100000);
