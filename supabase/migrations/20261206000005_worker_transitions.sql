-- Who moved an invitation's status last: callflow's lifecycle worker, or anyone else (issue 24).
--
-- The listener hands every status change to the workers; a change the worker made itself
-- (ringing, missed, busy, failed) comes back to it as an echo that only records itself. The
-- worker used to write the listener's Redis dedupe mark for its own transitions before committing
-- them (one process writing another's key, and a mark left behind by a transaction that rolled
-- back). Now the transaction that makes a transition says who made it, in the row itself: the
-- worker's store declares `set_config('callflow.actor', 'worker', true)` in the transaction that
-- applies its decisions, and a BEFORE trigger writes `status_by` whenever `status` changes:
-- 'worker' when the transaction declared itself the worker (and is not a client role), else
-- 'client' (a client app, or anything else writing as the service). Clients can never forge it:
-- the guard refuses a client touching any column but status, the setting is ignored for client
-- roles, and the trigger overwrites whatever was written to it. Realtime's record and the LISTEN
-- notification carry it, so the listener drops the echo where it arrives.

alter table public.call_invitations
  add column status_by text not null default 'client',
  add constraint call_invitations_status_by_known check (status_by in ('client', 'worker'));

comment on column public.call_invitations.status_by is
  'Who made the last status change: worker (callflow''s lifecycle, in a transaction that set callflow.actor) or client (anyone else). Written by the database only.';

-- Named after call_invitations_guard_*: BEFORE triggers fire in name order, so the guard has
-- refused a client's write to this column before it is overwritten here.
create or replace function public.call_invitations_status_by() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    new.status_by := case
      when not public.callflow_is_client() and current_setting('callflow.actor', true) = 'worker' then 'worker'
      else 'client'
    end;
  else
    new.status_by := old.status_by;
  end if;
  return new;
end
$$;

create trigger call_invitations_status_by
  before insert or update on public.call_invitations
  for each row execute function public.call_invitations_status_by();

-- The LISTEN source's notification carries it too.
create or replace function public.call_invitations_notify() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status then
    perform pg_notify('callflow_invitations', json_build_object(
      'op', tg_op, 'id', new.id, 'status', new.status, 'room_name', new.room_name,
      'updated_at', new.updated_at, 'status_by', new.status_by)::text);
  end if;
  return null;
end
$$;

revoke all on function public.call_invitations_status_by() from public, anon, authenticated;
grant execute on function public.call_invitations_status_by() to service_role;
