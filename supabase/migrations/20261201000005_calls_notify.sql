-- The `web` process's event stream (GET /api/calls/events) tells a user when one of their calls
-- changes: one NOTIFY per new call and per change of its status or times, on its own channel
-- beside `callflow_invitations`. Only the id travels (NOTIFY's 8000-byte limit); the listener
-- reads the row and sends it only to the call's parties.
create or replace function public.calls_notify() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or new.status is distinct from old.status or new.started_at is distinct from old.started_at
     or new.ended_at is distinct from old.ended_at or new.duration_seconds is distinct from old.duration_seconds then
    perform pg_notify('callflow_calls', json_build_object(
      'op', tg_op, 'id', new.id, 'status', new.status, 'room_name', new.room_name)::text);
  end if;
  return null;
end
$$;

drop trigger if exists calls_notify on public.calls;
create trigger calls_notify
  after insert or update on public.calls
  for each row execute function public.calls_notify();
