"""The declarative schema (`supabase/schemas/*.sql`) is exactly what the migrations build.

`supabase/schemas/` holds the wanted state of every table, function, trigger, policy, index and
grant, each once, in the form in force; `supabase/migrations/` stays what `supabase db push` and
`callflow migrate` apply. `supabase db diff` (which would write the migration from a schema change)
needs Docker, so this test keeps the two equal instead: one fresh database is built from the
schema files (applied in lexical order, after the local auth shim), one from the migrations (as
`callflow migrate` does), and their catalogs are compared object by object.

Compared: tables, views, sequences (kind, RLS enabled/forced, comment), columns (position, type,
default, nullability, identity, comment), constraints, indexes, functions (pg_get_functiondef:
arguments, result, language, volatility, security definer/invoker, SET options, body; comment),
triggers (pg_get_triggerdef, enabled), policies (pg_policies), grants (tables, columns, sequences,
functions, schemas: every grantee, the owner as OWNER), default privileges, extensions,
publications, user-defined types. Owners are not compared.

Left out: the `auth` schema (Supabase's own; locally the shim of `supabase/local/` plus the
`auth.jwt()` that migration 20261201000002 adds beside it), extension members, and
`callflow_migrations` (the bookkeeping table of `callflow migrate`, not a migration's).
Both builds are also made under a Supabase project's default privileges, which grant every new
table, sequence and function to the API roles: a revoke missing from the schema files shows there.
"""

from __future__ import annotations

import difflib
import re
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from devstack import services
from orchestration.migrate import AUTH_SHIM, migrate

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "supabase" / "schemas"

# What a Supabase project has before anything is pushed (as in test_grants).
SUPABASE_DEFAULT_PRIVILEGES = [
    "alter default privileges in schema public grant all on tables to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on sequences to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on functions to anon, authenticated, service_role",
]

OURS = "n.nspname not in ('pg_catalog', 'information_schema', 'auth') and n.nspname !~ '^pg_'"
NOT_EXTENSION_MEMBER = """not exists (select 1 from pg_depend d where d.classid = '{catalog}'::regclass
                                      and d.objid = {oid} and d.deptype = 'e')"""
NOT_BOOKKEEPING = "c.relname <> 'callflow_migrations'"

# section -> query of (key, value) rows; a section's keys are unique.
CATALOG = {
    "relations": f"""
        select n.nspname || '.' || c.relname,
               concat_ws(' ', 'kind=' || c.relkind::text, 'rls=' || c.relrowsecurity, 'force_rls=' || c.relforcerowsecurity,
                         'persistence=' || c.relpersistence::text, 'options=' || c.reloptions::text,
                         'comment=' || obj_description(c.oid, 'pg_class'))
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S') and {NOT_BOOKKEEPING}
           and {NOT_EXTENSION_MEMBER.format(catalog='pg_class', oid='c.oid')}""",
    "columns": f"""
        select n.nspname || '.' || c.relname || '.' || a.attname,
               concat_ws(' ', '#' || row_number() over (partition by c.oid order by a.attnum),
                         format_type(a.atttypid, a.atttypmod),
                         case when a.attnotnull then 'not null' else 'null' end,
                         'default=' || pg_get_expr(ad.adbin, ad.adrelid),
                         'identity=' || nullif(a.attidentity::text, ''), 'generated=' || nullif(a.attgenerated::text, ''),
                         'collation=' || co.collname, 'comment=' || col_description(c.oid, a.attnum))
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
          left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
          left join pg_collation co on co.oid = a.attcollation and a.attcollation <> 0
                                    and co.collname <> 'default'
         where {OURS} and c.relkind in ('r', 'p', 'v', 'm', 'f') and {NOT_BOOKKEEPING}
           and a.attnum > 0 and not a.attisdropped""",
    "constraints": f"""
        select n.nspname || '.' || c.relname || ' ' || k.conname,
               concat_ws(' ', k.contype::text, pg_get_constraintdef(k.oid), 'deferrable=' || k.condeferrable,
                         'deferred=' || k.condeferred, 'validated=' || k.convalidated)
          from pg_constraint k join pg_class c on c.oid = k.conrelid join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and {NOT_BOOKKEEPING}""",
    "indexes": f"""
        select n.nspname || '.' || i.relname, pg_get_indexdef(x.indexrelid)
          from pg_index x join pg_class i on i.oid = x.indexrelid join pg_class c on c.oid = x.indrelid
          join pg_namespace n on n.oid = i.relnamespace
         where {OURS} and {NOT_BOOKKEEPING}""",
    "functions": f"""
        select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               concat_ws(E'\\n', 'kind=' || p.prokind::text || ' security_definer=' || p.prosecdef
                                 || ' volatility=' || p.provolatile::text || ' strict=' || p.proisstrict
                                 || ' leakproof=' || p.proleakproof || ' parallel=' || p.proparallel::text
                                 || ' config=' || coalesce(p.proconfig::text, '{{}}'),
                         'comment=' || obj_description(p.oid, 'pg_proc'),
                         case when p.prokind <> 'a' then pg_get_functiondef(p.oid) end)
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where {OURS} and {NOT_EXTENSION_MEMBER.format(catalog='pg_proc', oid='p.oid')}""",
    "triggers": f"""
        select n.nspname || '.' || c.relname || ' ' || t.tgname, pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
          from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and not t.tgisinternal""",
    "policies": """
        select schemaname || '.' || tablename || ' ' || policyname,
               concat_ws(' ', permissive, cmd, 'to=' || roles::text, 'using=' || qual, 'check=' || with_check)
          from pg_policies where schemaname <> 'auth'""",
    "views": f"""
        select n.nspname || '.' || c.relname, pg_get_viewdef(c.oid)
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and c.relkind in ('v', 'm')""",
    "sequences": f"""
        select n.nspname || '.' || c.relname,
               concat_ws(' ', format_type(s.seqtypid, null), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                         s.seqcache, s.seqcycle, 'owned_by=' || (select r.relname || '.' || a.attname
                           from pg_depend d join pg_class r on r.oid = d.refobjid
                           join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                          where d.classid = 'pg_class'::regclass and d.objid = c.oid
                            and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')))
          from pg_sequence s join pg_class c on c.oid = s.seqrelid join pg_namespace n on n.oid = c.relnamespace
         where {OURS}""",
    "extensions": """
        select e.extname, n.nspname || ' ' || e.extversion
          from pg_extension e join pg_namespace n on n.oid = e.extnamespace where e.extname <> 'plpgsql'""",
    "publications": """
        select pubname || ' ' || schemaname || '.' || tablename, '' from pg_publication_tables
         where schemaname <> 'auth'""",
    "types": f"""
        select n.nspname || '.' || t.typname,
               concat_ws(' ', t.typtype::text, format_type(t.typbasetype, t.typtypmod),
                         (select string_agg(e.enumlabel, ',' order by e.enumsortorder) from pg_enum e
                           where e.enumtypid = t.oid))
          from pg_type t join pg_namespace n on n.oid = t.typnamespace
         where {OURS} and t.typtype in ('e', 'd', 'r', 'm')
            or ({OURS} and t.typtype = 'c'
                and (select relkind from pg_class where oid = t.typrelid) = 'c')""",
    # Grants: every grantee (PUBLIC as such, the object's owner as OWNER), with a NULL ACL read as
    # the default it stands for.
    "grants": f"""
        with acl as (
          select case when c.relkind = 'S' then 'sequence ' else 'table ' end || n.nspname || '.' || c.relname
                   as object, c.relowner as owner,
                 aclexplode(coalesce(c.relacl, acldefault((case when c.relkind = 'S' then 's' else 'r' end)::"char",
                                                          c.relowner))) as a
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where {OURS} and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S') and {NOT_BOOKKEEPING}
             and {NOT_EXTENSION_MEMBER.format(catalog='pg_class', oid='c.oid')}
          union all
          select 'column ' || n.nspname || '.' || c.relname || '.' || att.attname, c.relowner, aclexplode(att.attacl)
            from pg_attribute att join pg_class c on c.oid = att.attrelid
            join pg_namespace n on n.oid = c.relnamespace
           where {OURS} and att.attacl is not null and {NOT_BOOKKEEPING}
          union all
          select 'function ' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
                 || ')', p.proowner, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner)))
            from pg_proc p join pg_namespace n on n.oid = p.pronamespace
           where {OURS} and {NOT_EXTENSION_MEMBER.format(catalog='pg_proc', oid='p.oid')}
          union all
          select 'schema ' || n.nspname, n.nspowner, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner)))
            from pg_namespace n where {OURS}
        )
        select object, string_agg(grantee || ':' || privilege || grantable, ' ' order by grantee, privilege)
          from (select object,
                       case when (a).grantee = 0 then 'PUBLIC' when (a).grantee = owner then 'OWNER'
                            else pg_get_userbyid((a).grantee) end as grantee,
                       (a).privilege_type as privilege,
                       case when (a).is_grantable then '*' else '' end as grantable
                  from acl) g
         group by object""",
    "default_privileges": """
        select coalesce(n.nspname, '*') || ' ' || d.defaclobjtype::text || ' ' || pg_get_userbyid(d.defaclrole),
               d.defaclacl::text
          from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace""",
}


def catalog(url: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(url) as conn:
        found = {}
        for section, query in CATALOG.items():
            rows = conn.execute(query).fetchall()
            found[section] = {key: value for key, value in rows}
            assert len(found[section]) == len(rows), f"{section}: keys are not unique"
        return found


def differences(from_schemas: dict, from_migrations: dict) -> list[str]:
    out = []
    for section in CATALOG:
        ours, theirs = from_schemas[section], from_migrations[section]
        for key in sorted(ours.keys() - theirs.keys()):
            out.append(f"{section}: {key} is in the schema files only")
        for key in sorted(theirs.keys() - ours.keys()):
            out.append(f"{section}: {key} is made by the migrations only")
        for key in sorted(ours.keys() & theirs.keys()):
            if ours[key] != theirs[key]:
                diff = difflib.unified_diff((theirs[key] or "").splitlines(), (ours[key] or "").splitlines(),
                                            "migrations", "schema files", lineterm="", n=1)
                out.append(f"{section}: {key} differs\n" + "\n".join(diff))
    return out


# ---- the two builds -------------------------------------------------------------------------------


def schema_files() -> list[Path]:
    return sorted(SCHEMAS_DIR.glob("*.sql"))


def build_from_schemas(url: str) -> None:
    """As the migrate tool would on plain Postgres: the auth shim, then each file in order."""
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(AUTH_SHIM.read_text())
        for path in schema_files():
            try:
                with conn.transaction():
                    conn.execute(path.read_text())
            except psycopg.Error as exc:
                raise AssertionError(f"{path.name}: {exc}") from exc


def build_from_migrations(url: str) -> None:
    migrate(url)


def empty_database(defaults: list[str]) -> str:
    name = f"callflow_test_declarative_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = f"{services.ADMIN_URL.rpartition('/')[0]}/{name}"
    if defaults:
        with psycopg.connect(url, autocommit=True) as conn:
            # (The roles are the cluster's: the run's database, migrated first, made them.)
            for statement in defaults:
                conn.execute(statement)
    return url


@pytest.mark.parametrize("project", ["plain_postgres", "supabase_default_privileges"])
def test_schema_files_build_what_the_migrations_build(project):
    services.ensure_postgres()
    defaults = SUPABASE_DEFAULT_PRIVILEGES if project == "supabase_default_privileges" else []
    urls = []
    try:
        started = time.monotonic()
        urls.append(schemas_url := empty_database(defaults))
        build_from_schemas(schemas_url)
        urls.append(migrations_url := empty_database(defaults))
        build_from_migrations(migrations_url)
        from_schemas, from_migrations = catalog(schemas_url), catalog(migrations_url)
        print(f"{project}: built and compared in {time.monotonic() - started:.2f} s")
    finally:
        for url in urls:
            services.drop_database(url)
    assert from_schemas["functions"] and from_schemas["policies"] and from_schemas["grants"]
    drift = differences(from_schemas, from_migrations)
    assert not drift, (
        "supabase/schemas/ and supabase/migrations/ disagree (change both: the schema file, and a new "
        "migration doing the same):\n\n" + "\n\n".join(drift))


# ---- each rule once --------------------------------------------------------------------------------

DEFINITIONS = {
    "function": re.compile(r"^\s*create\s+(?:or\s+replace\s+)?function\s+([\w.]+)", re.I | re.M),
    "trigger": re.compile(r"^\s*create\s+(?:or\s+replace\s+)?(?:constraint\s+)?trigger\s+(\w+)\s.*?\son\s+([\w.]+)",
                          re.I | re.M | re.S),
    "policy": re.compile(r'^\s*create\s+policy\s+("[^"]+"|\w+)\s+on\s+([\w.]+)', re.I | re.M),
    "table": re.compile(r"^\s*create\s+table\s+(?:if\s+not\s+exists\s+)?([\w.]+)", re.I | re.M),
    "index": re.compile(r"^\s*create\s+(?:unique\s+)?index\s+(?:if\s+not\s+exists\s+)?(\w+)", re.I | re.M),
}


def test_each_function_policy_and_trigger_is_written_once():
    """A second `create or replace` of a function in a later file would leave the catalog equal
    while the first text misleads its reader: every definition appears in one place only."""
    seen: dict[tuple, list[str]] = {}
    for path in schema_files():
        text = re.sub(r"--[^\n]*", "", path.read_text())
        for kind, pattern in DEFINITIONS.items():
            for match in pattern.finditer(text):
                key = (kind, *(g.lower() for g in match.groups()))
                seen.setdefault(key, []).append(path.name)
    twice = {key: files for key, files in seen.items() if len(files) > 1}
    assert not twice, f"defined more than once: {twice}"
    assert sum(1 for key in seen if key[0] == "function") >= 20
