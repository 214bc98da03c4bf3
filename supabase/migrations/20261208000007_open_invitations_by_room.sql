-- A client's answer, decline or cancel (`update call_invitations set status = ... where id = $1`)
-- runs under a policy that adds `status in ('pending', 'ringing')`, which matched the predicate of
-- the partial index of open invitations by room and callee. On a year of history (7,700,000
-- invitations) the planner priced a read of that whole index, filtering on id, below a probe of
-- the four-level primary key, and took it for every answer: every open invitation's entries, dead
-- ones too (236 buffers an answer at saturation, against 32 on an empty database; issue 26).
-- The same index again with `room_name is not null` (always true) in its predicate: a statement
-- with a condition on room_name implies it (the admission's look for a callee's open invitation,
-- a room's parties), one by id alone does not, and probes the primary key.
-- Built concurrently, the new one before the old one goes: no write waits, no moment without it.
create index concurrently if not exists call_invitations_open_in_room
  on public.call_invitations (room_name, callee_id) where status in ('pending', 'ringing') and room_name is not null;
drop index concurrently if exists public.call_invitations_room_callee_open;
