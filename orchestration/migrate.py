"""`callflow migrate`: apply pending `supabase/migrations/*.sql` files in order, once each.

On plain Postgres (no `auth` schema) it first applies `supabase/local/auth_shim.sql`, the minimal
part of Supabase's auth that the migrations reference, so the same SQL runs unchanged. Applied
files are recorded in `callflow_migrations` (name + checksum); an edited, already-applied file is
refused rather than silently skipped. A lock makes concurrent runs safe.

On a big history a migration must not stop the lifecycle's writes (issue 26):
- A file whose statements all build or drop an index `concurrently` (or `reindex ...
  concurrently`) runs statement by statement outside a transaction, as Supabase's CLI runs such
  statements (since 2.109: outside the migration's batch). A new index on a hot table goes in a
  file of its own, so: `create index concurrently if not exists ...`. A build that fails leaves an
  invalid index; it is dropped before the next try.
- Every other file runs in one transaction that waits at most `LOCK_TIMEOUT_MS` for each lock it
  takes: a migration queued behind a long transaction would otherwise hold every writer of that
  table queued behind itself. Refused a lock, it is rolled back and tried again (`LOCK_TRIES`).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "supabase" / "migrations"
AUTH_SHIM = REPO_ROOT / "supabase" / "local" / "auth_shim.sql"
_LOCK_KEY = 0x63616C6C666C6F77  # "callflow"
LOCK_TIMEOUT_MS = 500
LOCK_TRIES = 10
_OUTSIDE_A_TRANSACTION = re.compile(
    r"(create\s+(unique\s+)?index|drop\s+index|reindex\s+\w+)\s+concurrently\b", re.IGNORECASE)
_BUILT_INDEX = re.compile(r"index\s+concurrently\s+(if\s+not\s+exists\s+)?([\w.\"]+)", re.IGNORECASE)


class MigrationError(Exception):
    pass


@dataclass
class MigrationResult:
    applied: list[str]
    already: list[str]
    auth_shim: bool


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if p.name[:14].isdigit())


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def standalone_statements(sql: str) -> list[str] | None:
    """The statements of a file made only of statements PostgreSQL runs outside a transaction
    block; None for any other file (a function body's `;` never makes a fragment that matches)."""
    text = re.sub(r"/\*.*?\*/", " ", re.sub(r"--[^\n]*", " ", sql), flags=re.DOTALL)
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if parts and all(_OUTSIDE_A_TRANSACTION.match(p) for p in parts):
        return parts
    return None


def _run_standalone(conn, statements: list[str]) -> None:
    for statement in statements:
        try:
            conn.execute(statement)
        except psycopg.Error:
            built = _BUILT_INDEX.search(statement)
            if built and statement.lstrip().lower().startswith("create"):
                # A concurrent build that failed leaves its index behind, invalid: gone before the next try.
                name = built.group(2).split(".")[-1].strip('"')
                for (index,) in conn.execute(
                        """select i.indexrelid::regclass::text from pg_index i join pg_class c on c.oid = i.indexrelid
                            where c.relname = %s and not i.indisvalid""", (name,)).fetchall():
                    conn.execute(f"drop index concurrently if exists {index}")
            raise


def _run_in_a_transaction(conn, sql: str, record) -> None:
    """The file in one transaction, each lock waited for at most LOCK_TIMEOUT_MS; refused, again."""
    for attempt in range(1, LOCK_TRIES + 1):
        try:
            with conn.transaction():
                conn.execute(f"set local lock_timeout = {LOCK_TIMEOUT_MS}")
                conn.execute(sql)
                record()
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == LOCK_TRIES:
                raise
            time.sleep(min(5.0, 0.25 * 2 ** attempt))


def database_settings(settings) -> dict[str, str]:
    """The variables the database's own rules read (`callflow_settings`)."""
    return {
        "CALLFLOW_INVITE_RATE_PER_MINUTE": str(settings.callflow_invite_rate_per_minute),
        "CALLFLOW_ALLOW_ANONYMOUS": "true" if settings.callflow_allow_anonymous else "false",
        "CALLFLOW_RING_TIMEOUT_SECONDS": str(settings.callflow_ring_timeout_seconds),
    }


def migrate(database_url: str, directory: Path = MIGRATIONS_DIR, settings: dict[str, str] | None = None) -> MigrationResult:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            shim = False
            has_auth = conn.execute("select 1 from pg_namespace where nspname = 'auth'").fetchone()
            if not has_auth:
                with conn.transaction():
                    conn.execute(AUTH_SHIM.read_text())
                shim = True
            conn.execute(
                """create table if not exists public.callflow_migrations (
                     name text primary key, checksum text not null,
                     applied_at timestamptz not null default now())"""
            )
            done = dict(conn.execute("select name, checksum from public.callflow_migrations").fetchall())
            applied, already = [], []
            for path in migration_files(directory):
                checksum = _checksum(path)
                if path.name in done:
                    if done[path.name] != checksum:
                        raise MigrationError(f"{path.name} was changed after it was applied; add a new migration instead")
                    already.append(path.name)
                    continue
                def record(path=path, checksum=checksum) -> None:
                    conn.execute("insert into public.callflow_migrations (name, checksum) values (%s, %s)",
                                 (path.name, checksum))

                sql = path.read_text()
                try:
                    standalone = standalone_statements(sql)
                    if standalone is not None:
                        _run_standalone(conn, standalone)
                        record()
                    else:
                        _run_in_a_transaction(conn, sql, record)
                except psycopg.Error as exc:
                    raise MigrationError(f"{path.name}: {exc.diag.message_primary or exc}") from exc
                applied.append(path.name)
            if settings:
                with conn.transaction():
                    for key, value in settings.items():
                        conn.execute(
                            """insert into public.callflow_settings (key, value) values (%s, %s)
                               on conflict (key) do update set value = excluded.value""", (key, value))
            return MigrationResult(applied, already, shim)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
