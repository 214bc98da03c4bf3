-- Row level security as Supabase runs it: clients act as `authenticated` with auth.uid() from
-- request.jwt.claims; callflow's workers connect with a role that bypasses RLS.

alter table public.call_invitations enable row level security;
alter table public.calls enable row level security;
alter table public.call_participants enable row level security;
alter table public.call_events enable row level security;
alter table public.notifications enable row level security;

revoke all on public.call_invitations, public.calls, public.call_participants,
              public.call_events, public.notifications from anon;
revoke all on public.call_events, public.notifications from authenticated;
revoke all on public.call_invitations, public.calls, public.call_participants from authenticated;
grant select, insert, update on public.call_invitations to authenticated;
grant select on public.calls, public.call_participants to authenticated;
grant all on public.call_invitations, public.calls, public.call_participants,
             public.call_events, public.notifications to service_role;

create policy "participants read their invitations" on public.call_invitations
  for select to authenticated
  using (auth.uid() = caller_id or auth.uid() = callee_id);

create policy "callers insert their own pending invitations" on public.call_invitations
  for insert to authenticated
  with check (auth.uid() = caller_id and status = 'pending');

create policy "callees answer or decline" on public.call_invitations
  for update to authenticated
  using (auth.uid() = callee_id and status in ('pending', 'ringing'))
  with check (auth.uid() = callee_id and status in ('accepted', 'declined'));

create policy "callers cancel" on public.call_invitations
  for update to authenticated
  using (auth.uid() = caller_id and status in ('pending', 'ringing'))
  with check (auth.uid() = caller_id and status = 'cancelled');

create policy "participants read their calls" on public.calls
  for select to authenticated
  using (exists (select 1 from public.call_invitations i
                  where i.call_id = calls.id and (auth.uid() = i.caller_id or auth.uid() = i.callee_id)));

create policy "participants read their call's participants" on public.call_participants
  for select to authenticated
  using (exists (select 1 from public.call_invitations i
                  where i.call_id = call_participants.call_id and (auth.uid() = i.caller_id or auth.uid() = i.callee_id)));
