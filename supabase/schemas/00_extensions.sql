-- supabase/schemas/: the database as it is meant to be (Supabase's declarative schemas), one file
-- per idea, applied in lexical order; every table, function, trigger, policy, index and grant
-- written once, in the form in force. Read and change the rules here; every change also goes into
-- a NEW migration (supabase/migrations/, what `supabase db push` and `callflow migrate` apply),
-- and tests/integration/test_declarative_schema.py keeps the two equal (docs/INTERNALS.md).
-- Not here: Supabase's own `auth` schema (locally supabase/local/auth_shim.sql), and data moves
-- (backfills) that only a migration does once.

-- Extensions callflow's schema uses (gen_random_uuid() is core since Postgres 13; pgcrypto has
-- been enabled since the first migration and stays).
create extension if not exists pgcrypto;
