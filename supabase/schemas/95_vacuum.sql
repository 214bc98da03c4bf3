-- The tables of live calls are vacuumed by their count of dead rows, not by a fraction of their
-- size (migration 20261208000008, issue 26): each lifecycle leaves dead versions whose entries stay
-- in the small partial indexes of live rows (open invitations, ringing deadlines, active calls,
-- open participants) until a vacuum removes them, and the sweeps probe those indexes every second.
-- The default (20 % of the table) waits for 1,000,000 dead rows on 5,000,000 calls. Index cleanup
-- on: a vacuum of a few thousand dead rows in a big table would otherwise skip the indexes.
alter table public.calls set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                              vacuum_index_cleanup = on);
alter table public.call_invitations set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                         vacuum_index_cleanup = on);
alter table public.call_participants set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                          vacuum_index_cleanup = on);
-- call_events (append-only) every 100,000 inserted rows (migration 20261208000009): a vacuum marks
-- its new pages all-visible, and only then are the lookups by event_id answered from the index alone.
alter table public.call_events set (autovacuum_vacuum_insert_scale_factor = 0,
                                    autovacuum_vacuum_insert_threshold = 100000);
