-- Nothing internal open to clients (issue 23). Postgres lets PUBLIC execute every new function,
-- and a Supabase project's default privileges (of `postgres`, which runs the migrations, in schema
-- public) grant every new table, sequence and function to anon, authenticated and service_role:
-- so `callflow_setting` (security definer) let anyone read `callflow_settings` through /rpc.
--
-- The contract's rule, made whole here and kept by tests/integration/test_grants.py:
--   * `callflow_…` tables (and every sequence of callflow's tables): nothing for PUBLIC, anon,
--     authenticated;
--   * callflow's functions: EXECUTE for nobody but the owner and service_role, except
--       authenticated: register_push_token (the contract's), and the four helpers the invitation
--       guard calls with the client's own rights (callflow_is_client, callflow_is_terminal,
--       callflow_transition_allowed, callflow_default_end_reason: pure, they read nothing).
--     Trigger functions need no EXECUTE (it is checked when the trigger is made, not when it fires);
--     security definer helpers called from security definer triggers run as the owner.
--   * a later migration that adds a function or table closes it the same way (revoke from public,
--     anon, authenticated; grant back what the contract gives): the test fails until it does.
--     The project's default privileges are left as they are: they are the product's too, and
--     changing them would close the product's own later functions.
-- The workers connect as the owner (DATABASE_URL: `postgres`), whose rights none of this touches.

-- callflow's functions: named callflow_…, or one of these (the triggers' and the client's).
do $$
declare
  f record;
begin
  for f in
    select p.oid::regprocedure as sig, p.proname
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = 'public'
       and (p.proname like 'callflow\_%'
            or p.proname in ('call_invitations_guard_insert', 'call_invitations_guard_update',
                             'call_invitations_notify', 'call_invitations_admit', 'calls_notify',
                             'register_push_token'))
       and not exists (select 1 from pg_depend d
                        where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
  loop
    execute format('revoke all on function %s from public, anon, authenticated', f.sig);
    execute format('grant execute on function %s to service_role', f.sig);
    if f.proname = 'register_push_token' then
      execute format('grant execute on function %s to authenticated', f.sig);
    end if;
  end loop;
end
$$;
grant execute on function public.callflow_is_client(), public.callflow_is_terminal(text),
                          public.callflow_transition_allowed(text, text),
                          public.callflow_default_end_reason(text)
  to authenticated;

-- Only call_invitations_admit reads settings, and it runs as the owner: callflow_setting needs no
-- owner's rights of its own. Were it ever executable by a client again, it would read
-- callflow_settings with that client's rights (none).
alter function public.callflow_setting(text, text) security invoker;

-- callflow_… tables, and the sequences of all of callflow's tables (identity columns).
do $$
declare
  rel regclass;
begin
  for rel in
    select c.oid::regclass from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f') and c.relname like 'callflow\_%'
  loop
    execute format('revoke all on table %s from public, anon, authenticated', rel);
  end loop;
  for rel in
    select s.oid::regclass
      from pg_class s
      join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = s.oid
                      and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')
      join pg_class t on t.oid = d.refobjid
      join pg_namespace n on n.oid = t.relnamespace
     where s.relkind = 'S' and n.nspname = 'public'
       and (t.relname like 'callflow\_%'
            or t.relname in ('call_invitations', 'calls', 'call_participants', 'call_events',
                             'notifications', 'push_tokens', 'push_messages'))
  loop
    execute format('revoke all on sequence %s from public, anon, authenticated', rel);
  end loop;
end
$$;
