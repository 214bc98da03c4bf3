-- Time-ordered ids for every row callflow's tables make (issue 26). gen_random_uuid() (version 4)
-- put each new invitation, call, participant, notification and push message on a random leaf of
-- its primary key, and of every index keyed by its id (an invitation's call_id, a participant's,
-- a party's): on a year of history those indexes outgrow memory, and each random leaf is a page
-- read from disk and, the first time it changes after a checkpoint, a whole page in the WAL
-- (in a bench run at scale 1, a third of the full-page images). A version 7 UUID (RFC 9562:
-- 48 bits of Unix milliseconds, then random bits) sorts after the ids made before it, so a new
-- row's entries share the few right-hand pages of each index with the other new rows'.
-- Postgres 15 has no uuidv7() (it comes in 18): a v4 UUID gets the millisecond clock in its first
-- six bytes and its version nibble turned from 4 (0100) into 7 (0111): bits 52 and 53 of set_bit's
-- numbering, which counts from the low bit of each byte. callflow mints the ids of calls the same
-- way (orchestration/ids.py). Old rows keep their ids; a default is only read on insert, so
-- each change below is a catalog update (a brief lock, no rewrite).
create or replace function public.callflow_uuid_v7() returns uuid
language sql volatile parallel safe
as $$
  select encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
              from 1 for 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;

alter table public.call_invitations alter column id set default public.callflow_uuid_v7();
alter table public.calls alter column id set default public.callflow_uuid_v7();
alter table public.call_participants alter column id set default public.callflow_uuid_v7();
alter table public.notifications alter column id set default public.callflow_uuid_v7();
alter table public.push_tokens alter column id set default public.callflow_uuid_v7();
alter table public.push_messages alter column id set default public.callflow_uuid_v7();
alter table public.callflow_usage_alerts alter column id set default public.callflow_uuid_v7();
alter table public.callflow_failed_tasks alter column id set default public.callflow_uuid_v7();

-- A default runs with the inserting role's rights: clients insert invitations, so `authenticated`
-- executes it (it reads nothing); nobody else but the owner and service_role (99_grants.sql).
revoke all on function public.callflow_uuid_v7() from public, anon, authenticated;
grant execute on function public.callflow_uuid_v7() to authenticated, service_role;
