-- When the oldest active call began (issue 26): the callee-busy check reads the user's calls made
-- since then (callflow_call_parties), not every live call nor the user's whole history. The first
-- entry of this index is that time. `created_at is not null` (always true) keeps it out of every
-- statement that does not ask for it: on a big history the statistics see no active call, and
-- the planner took another index of live calls for a "free" full scan where a primary key probe
-- was meant. Built concurrently: no write to calls waits for it.
create index concurrently if not exists calls_active_created
  on public.calls (created_at) where status = 'active' and created_at is not null;
