-- An invitation's caller was indexed twice: (caller_id, status) and (caller_id, created_at). Every
-- write of an invitation (its insert and each change of status: never a HOT update) puts an entry
-- in both, and on a year of history each is a random leaf of an index larger than memory: a page
-- read and, after each checkpoint, a whole page in the WAL (after migration 20261208000010 the
-- indexes keyed by a user write most of the full-page images left; issue 26). The statements that
-- ask for a caller's invitations by status ask for open ones (a user's live invitations, glare's
-- counter invitations); every other look by caller reads call_invitations_caller_created. So the
-- status one keeps open invitations only: entries while an invitation is open, none after.
-- `caller_id is not null` (always true) as in call_invitations_open_in_room (migration
-- 20261208000007): a client's answer runs under a policy that adds `status in ('pending',
-- 'ringing')`, and an index whose predicate is that alone was read whole, filtering on id, in place
-- of the primary key; a condition on caller_id implies the predicate, one by id alone does not.
-- Built concurrently, the new one before the old one goes: no write waits, no moment without it.
create index concurrently if not exists call_invitations_caller_open
  on public.call_invitations (caller_id) where status in ('pending', 'ringing') and caller_id is not null;
drop index concurrently if exists public.call_invitations_caller;
