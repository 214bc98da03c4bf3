-- A client's answer, decline or cancel (`update call_invitations set status = ... where id = $1`)
-- runs under a policy that adds `status in ('pending', 'ringing')`, which matches the partial index
-- of open invitations by room (call_invitations_room_callee_open). On a year of history (7,700,000
-- invitations) the planner priced a read of that whole index, filtering on id, below a probe of the
-- four-level primary key, and took it for every answer: every open invitation's entries, dead ones
-- too (236 buffers an answer at saturation, against 32 on an empty database; issue 26). Open
-- invitations by id: the probe the statement means, in an index as small as the open invitations.
-- Built concurrently: no write to call_invitations waits for it.
create index concurrently if not exists call_invitations_open_id
  on public.call_invitations (id) where status in ('pending', 'ringing');
