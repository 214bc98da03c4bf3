-- A user has at most 10 enabled push tokens (the contract): registering one more — a new token, a
-- turned-off one registered again, one moved here from another account, through
-- register_push_token or a client's own insert under RLS — turns off their least recently seen
-- (`last_seen_at`, then the oldest `created_at`). The one just registered always stays on.
--
-- Enforced by the table itself, so every way in is covered: AFTER triggers (an upsert's BEFORE
-- INSERT trigger fires even when the row ends up an update of an enabled token, which must turn
-- nothing off). Concurrency: the user's transaction-scoped advisory lock serialises the
-- registrations of one user, and the count is read after it is taken (each statement of a
-- plpgsql function sees what committed before it, at READ COMMITTED, as PostgREST runs), so two
-- registrations at once cannot both keep 10 others. Security definer: clients have no UPDATE on
-- push_tokens, and the trigger turns off rows of theirs that RLS would let them see anyway.
-- Issue 23: 50,000 tokens on one account made one invitation a million pushes.

create or replace function public.callflow_push_tokens_cap()
returns trigger
language plpgsql security definer set search_path = public
as $$
begin
  perform pg_advisory_xact_lock(hashtextextended('push_tokens:' || new.user_id::text, 23));
  -- One statement inserting many rows queues a trigger per row: a row an earlier one turned off
  -- is no longer one more.
  if not exists (select 1 from public.push_tokens t
                  where t.id = new.id and t.user_id = new.user_id and t.disabled_at is null) then
    return null;
  end if;
  update public.push_tokens
     set disabled_at = now()
   where id in (select t.id from public.push_tokens t
                 where t.user_id = new.user_id and t.disabled_at is null and t.id <> new.id
                 order by t.last_seen_at desc, t.created_at desc, t.id desc
                offset 9);  -- the 9 most recently seen others stay on, beside the new one
  return null;
end
$$;
revoke all on function public.callflow_push_tokens_cap() from public, anon, authenticated;

drop trigger if exists push_tokens_cap_insert on public.push_tokens;
create trigger push_tokens_cap_insert
  after insert on public.push_tokens
  for each row when (new.disabled_at is null)
  execute function public.callflow_push_tokens_cap();

-- Turned back on (register_push_token clears disabled_at) or moved to another user.
drop trigger if exists push_tokens_cap_update on public.push_tokens;
create trigger push_tokens_cap_update
  after update of disabled_at, user_id on public.push_tokens
  for each row when (new.disabled_at is null and (old.disabled_at is not null or old.user_id <> new.user_id))
  execute function public.callflow_push_tokens_cap();
