-- Settings the database's own rules read (the invitation admission of 40_room_parties.sql:
-- CALLFLOW_INVITE_RATE_PER_MINUTE, CALLFLOW_ALLOW_ANONYMOUS), written by `callflow migrate`.
-- A missing key means the default, so `supabase db push` alone gives a working database.
-- Internal state: clients get nothing (99_grants.sql).

create table public.callflow_settings (
  key   text primary key,
  value text not null
);
alter table public.callflow_settings enable row level security;

-- Security invoker: only call_invitations_admit reads settings, and it runs as the owner. Were a
-- client ever allowed to execute this, it would read callflow_settings with its own rights (none).
create or replace function public.callflow_setting(setting_key text, fallback text) returns text
language sql stable set search_path = public
as $$ select coalesce((select value from public.callflow_settings where key = setting_key), fallback) $$;
