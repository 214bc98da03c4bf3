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

-- The default id of every table's rows: a time-ordered UUID (RFC 9562 version 7: 48 bits of Unix
-- milliseconds, then random bits), so a new row's entries share the right-hand pages of each index
-- keyed by its id instead of landing on a random leaf of an index a year of history has made larger
-- than memory (a page read, and a whole page in the WAL after each checkpoint; migration
-- 20261208000010). Postgres 15 has no uuidv7(): a v4 UUID gets the millisecond clock in its first
-- six bytes and its version nibble turned from 4 (0100) into 7 (0111) by bits 52 and 53 (set_bit
-- counts from the low bit of each byte). callflow mints call ids the same way
-- (orchestration/ids.py).
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
