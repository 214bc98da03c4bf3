-- 20261201000009 made `callflow_room_parties` plpgsql so that its query would be planned once per
-- session; measured (pg_stat_statements, bench/RESULTS.md), the plan cache still chose a fresh
-- custom plan at every call (2.9 ms of planning for 0.06 ms of execution): the room name changes
-- nothing a plan could use. A generic plan is kept and reused. The admission trigger's own queries
-- likewise.
alter function public.callflow_room_parties(text, uuid) set plan_cache_mode = force_generic_plan;
alter function public.call_invitations_admit() set plan_cache_mode = force_generic_plan;
