"""What the client roles can reach in the database, listed whole and compared with an allowlist.

The contract: callflow's internal tables (`callflow_…`) give clients nothing; `anon` may execute
none of callflow's functions; `authenticated` only those the contract gives clients
(`register_push_token`) and those the database's own row rules run as the client (the invoker-rights
helpers of the state-machine guard, which reveal nothing: pure functions of their arguments and of
the current role). Everything reachable is listed from the catalogue (`has_function_privilege`,
`has_table_privilege`, ...) over every non-system schema, so a function or table a later migration
forgets to close shows up here, whatever it is called.

Extension members (pgcrypto, which locally lands in `public`) are the extension's, not callflow's,
and are left out. `auth.uid()`, `auth.role()`, `auth.jwt()` are Supabase's (here the local shim's):
RLS policies call them as the client.
"""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

from devstack import services

CLIENT_ROLES = ("anon", "authenticated")

SUPABASE_AUTH_FUNCTIONS = {"auth.uid()", "auth.role()", "auth.jwt()"}

# role -> functions it may execute ("schema.name(argument types)").
FUNCTIONS = {
    "anon": SUPABASE_AUTH_FUNCTIONS,
    "authenticated": SUPABASE_AUTH_FUNCTIONS | {
        # the contract's client function
        "public.register_push_token(text, text, text, text)",
        # called by call_invitations_guard_insert/_update, which run as the client
        "public.callflow_is_client()",
        "public.callflow_is_terminal(text)",
        "public.callflow_transition_allowed(text, text)",
        "public.callflow_default_end_reason(text)",
        # the default of call_invitations.id, which runs as the inserting client
        "public.callflow_uuid_v7()",
    },
}

# role -> {table, view or sequence: privileges}. Nothing named callflow_… ever.
RELATIONS = {
    "anon": {},
    "authenticated": {
        "public.call_invitations": {"SELECT", "INSERT", "UPDATE"},
        "public.calls": {"SELECT"},
        "public.call_participants": {"SELECT"},
        "public.push_tokens": {"SELECT", "INSERT", "DELETE"},
    },
}

NOT_SYSTEM = """n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_'"""
NOT_EXTENSION_MEMBER = """not exists (select 1 from pg_depend d
                                      where d.classid = %(catalog)s::regclass and d.objid = {oid}
                                        and d.deptype = 'e')"""

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")  # may also be granted per column
SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")


def executable_functions(conn: psycopg.Connection, role: str) -> set[str]:
    rows = conn.execute(
        f"""select n.nspname || '.' || p.proname || '(' || oidvectortypes(p.proargtypes) || ')' as f
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where {NOT_SYSTEM}
               and {NOT_EXTENSION_MEMBER.format(oid='p.oid')}
               and has_function_privilege(%(role)s, p.oid, 'EXECUTE')""",
        {"role": role, "catalog": "pg_proc"},
    ).fetchall()
    return {r["f"] for r in rows}


def reachable_relations(conn: psycopg.Connection, role: str) -> dict[str, set[str]]:
    rows = conn.execute(
        f"""select n.nspname || '.' || c.relname as rel, c.relkind, c.oid
              from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where {NOT_SYSTEM} and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
               and {NOT_EXTENSION_MEMBER.format(oid='c.oid')}""",
        {"catalog": "pg_class"},
    ).fetchall()
    found: dict[str, set[str]] = {}
    for r in rows:
        if r["relkind"] == "S":
            privileges = {p for p in SEQUENCE_PRIVILEGES
                          if conn.execute("select has_sequence_privilege(%s, %s, %s) as x",
                                          (role, r["oid"], p)).fetchone()["x"]}
        else:
            privileges = {p for p in TABLE_PRIVILEGES
                          if conn.execute("select has_table_privilege(%s, %s, %s) as x",
                                          (role, r["oid"], p)).fetchone()["x"]}
            privileges |= {p for p in COLUMN_PRIVILEGES
                           if conn.execute("select has_any_column_privilege(%s, %s, %s) as x",
                                           (role, r["oid"], p)).fetchone()["x"]}
        if privileges:
            found[r["rel"]] = privileges
    return found


def assert_only_the_allowlist(conn: psycopg.Connection) -> None:
    for role in CLIENT_ROLES:
        functions = executable_functions(conn, role)
        assert functions == FUNCTIONS[role], (
            f"{role} can execute: unexpected {sorted(functions - FUNCTIONS[role])}, "
            f"missing {sorted(FUNCTIONS[role] - functions)}")
        relations = reachable_relations(conn, role)
        assert relations == RELATIONS[role], f"{role} reaches {relations}, expected {RELATIONS[role]}"
        assert not [r for r in relations if r.split(".", 1)[1].startswith("callflow_")]


@contextmanager
def _admin(url: str):
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


# ---- the run's database, migrated as `callflow migrate` does -----------------------------------


def test_clients_reach_only_the_allowlist(database_url):
    with _admin(database_url) as conn:
        assert_only_the_allowlist(conn)


# ---- as on a Supabase project ------------------------------------------------------------------

# What a Supabase project has before `supabase db push`: default privileges of the role that runs
# the migrations (`postgres`), in schema public, granting everything it creates to the API roles;
# and the schema extensions are enabled in.
SUPABASE_DEFAULT_PRIVILEGES = [
    "create schema if not exists extensions",
    "alter default privileges in schema public grant all on tables to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on sequences to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on functions to anon, authenticated, service_role",
]


@pytest.fixture(scope="module")
def supabase_like_url():
    """A database of its own with Supabase's default privileges set before the migrations ran."""
    services.ensure_postgres()
    name = f"callflow_test_grants_{uuid.uuid4().hex[:10]}"
    with _admin(services.ADMIN_URL) as conn:
        conn.execute(f'create database "{name}"')
    url = f"{services.ADMIN_URL.rpartition('/')[0]}/{name}"
    try:
        with _admin(url) as conn:
            for statement in SUPABASE_DEFAULT_PRIVILEGES:
                conn.execute(statement)
        from orchestration.migrate import migrate

        migrate(url)
        yield url
    finally:
        services.drop_database(url)


def test_clients_reach_only_the_allowlist_on_supabase(supabase_like_url):
    with _admin(supabase_like_url) as conn:
        assert_only_the_allowlist(conn)


# ---- callflow_settings through the API roles ----------------------------------------------------


@contextmanager
def acting_as(database_url: str, role: str, uid: str | None = None):
    """One transaction as PostgREST runs a request (rolled back)."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute(f"set local role {role}")
        claims = {"role": role, **({"sub": uid} if uid else {})}
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn
        conn.rollback()


def test_anon_cannot_call_callflow_setting(database_url):
    with pytest.raises(errors.InsufficientPrivilege, match="callflow_setting"):
        with acting_as(database_url, "anon") as conn:
            conn.execute("select public.callflow_setting('CALLFLOW_INVITE_RATE_PER_MINUTE', 'none')")


@pytest.mark.parametrize("how", [
    "select public.callflow_setting('CALLFLOW_INVITE_RATE_PER_MINUTE', 'none')",
    "select * from public.callflow_settings",
])
def test_a_signed_in_user_cannot_read_callflow_settings(database_url, make_user, how):
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(database_url, "authenticated", make_user("Reader")) as conn:
            conn.execute(how).fetchall()


def test_callflow_setting_gives_no_one_the_owners_rights(db):
    """Even if a client were granted EXECUTE by mistake, it would read with its own rights."""
    row = db.execute("select prosecdef from pg_proc where oid = 'public.callflow_setting(text, text)'::regprocedure"
                     ).fetchone()
    assert row["prosecdef"] is False
