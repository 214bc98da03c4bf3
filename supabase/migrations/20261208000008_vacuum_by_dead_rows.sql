-- The tables of live calls are vacuumed by their count of dead rows, not by a fraction of their
-- size (issue 26). Every lifecycle leaves dead versions of its invitation, call and participants
-- behind; their entries stay in the small partial indexes of live rows (open invitations, ringing
-- deadlines, active calls, open participants) until a vacuum removes them, and the sweeps' probes
-- of those indexes walk them every second. Autovacuum's default (20 % of the table) waits for
-- 1,000,000 dead rows on 5,000,000 calls: a month of a busy tenant, during which "the oldest active
-- call" read 519 pages of dead entries (11 ms, with none active) and the ring-deadline sweep 1,719
-- (24 ms, none ringing); one vacuum of calls (4.5 s) brought the first to 1 page.
-- `vacuum_index_cleanup = on`: a vacuum of a few thousand dead rows in a big table would otherwise
-- skip its indexes (fewer than 2 % of its pages hold them), leaving exactly those entries behind.
alter table public.calls set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                              vacuum_index_cleanup = on);
alter table public.call_invitations set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                         vacuum_index_cleanup = on);
alter table public.call_participants set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                          vacuum_index_cleanup = on);
