"""`callflow migrate`: apply pending `supabase/migrations/*.sql` files in order, once each.

On plain Postgres (no `auth` schema) it first applies `supabase/local/auth_shim.sql`, the minimal
part of Supabase's auth that the migrations reference, so the same SQL runs unchanged. Applied
files are recorded in `callflow_migrations` (name + checksum); an edited, already-applied file is
refused rather than silently skipped. A lock makes concurrent runs safe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "supabase" / "migrations"
AUTH_SHIM = REPO_ROOT / "supabase" / "local" / "auth_shim.sql"
_LOCK_KEY = 0x63616C6C666C6F77  # "callflow"


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
                try:
                    with conn.transaction():
                        conn.execute(path.read_text())
                        conn.execute(
                            "insert into public.callflow_migrations (name, checksum) values (%s, %s)",
                            (path.name, checksum),
                        )
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
