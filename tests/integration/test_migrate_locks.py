"""`callflow migrate` on a database in use (issue 26): a migration never holds the lifecycle's
writes behind it for long. Real PostgreSQL, a database of this module's own, the project's
migrations copied into a folder with one more file each test.
"""

from __future__ import annotations

import shutil
import threading
import time

import psycopg
import pytest

from devstack import services
from orchestration import migrate as migrations
from orchestration.migrate import LOCK_TIMEOUT_MS, MIGRATIONS_DIR, migrate


@pytest.fixture(scope="module")
def url():
    with services.scratch_database("callflow_migrate_locks") as database_url:
        yield database_url


@pytest.fixture
def folder(tmp_path):
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def insert_call(conn, room: str) -> None:
    conn.execute("insert into public.calls (room_name, status) values (%s, 'completed')", (room,))


def timed_insert(url: str, room: str) -> float:
    """How long one insert into calls waited, in its own connection (committed)."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        insert_call(conn, room)
        return time.monotonic() - started


def in_background(fn):
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_file_of_concurrent_index_builds_runs_outside_a_transaction_and_blocks_no_insert(url, folder):
    (folder / "29990101000001_probe_index.sql").write_text(
        "-- a new index on a hot table, in a file of its own\n"
        "create index concurrently if not exists calls_probe_ended on public.calls (ended_at);\n")
    with psycopg.connect(url) as old:  # a transaction under way: the build waits for it to end
        insert_call(old, "migrate-old-writer")
        thread, out = in_background(lambda: migrate(url, folder))
        time.sleep(1.0)
        assert thread.is_alive()  # waiting for the old transaction, as a concurrent build does
        assert timed_insert(url, "migrate-new-writer") < 0.5  # and nobody's insert waits for it
        old.commit()
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert out["result"].applied == ["29990101000001_probe_index.sql"]
    with psycopg.connect(url) as conn:
        valid = conn.execute("""select i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid
                                 where c.relname = 'calls_probe_ended'""").fetchone()
        assert valid == (True,)
        conn.execute("drop index public.calls_probe_ended")
        conn.execute("delete from public.callflow_migrations where name = '29990101000001_probe_index.sql'")
        conn.commit()


def test_a_failed_concurrent_build_leaves_no_invalid_index_behind(url, folder):
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table public.migrate_probe (v int)")
        conn.execute("insert into public.migrate_probe values (1), (1)")
    (folder / "29990101000002_probe_unique.sql").write_text(
        "create unique index concurrently if not exists migrate_probe_v on public.migrate_probe (v);\n")
    try:
        with pytest.raises(migrations.MigrationError, match="29990101000002_probe_unique.sql"):
            migrate(url, folder)
        with psycopg.connect(url) as conn:
            assert conn.execute("select count(*) from pg_class where relname = 'migrate_probe_v'").fetchone() == (0,)
            assert conn.execute("""select count(*) from public.callflow_migrations
                                    where name = '29990101000002_probe_unique.sql'""").fetchone() == (0,)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("drop table public.migrate_probe")


def test_a_migration_waiting_for_a_lock_gives_way_to_the_writers_and_tries_again(url, folder):
    (folder / "29990101000003_probe_column.sql").write_text(
        "alter table public.calls add column migrate_probe text;\n")
    try:
        with psycopg.connect(url) as reader:  # a long transaction holds calls: the alter must wait
            reader.execute("select count(*) from public.calls")
            thread, out = in_background(lambda: migrate(url, folder))
            time.sleep(0.2)
            # A writer arriving behind the waiting migration waits at most its lock timeout, not
            # the whole of the reader's transaction.
            waits = [timed_insert(url, f"migrate-writer-{i}") for i in range(3)]
            time.sleep(1.5)
            assert thread.is_alive()  # still trying
            reader.commit()
        thread.join(30)
        assert "error" not in out, out.get("error")
        assert out["result"].applied == ["29990101000003_probe_column.sql"]
        assert max(waits) < LOCK_TIMEOUT_MS / 1000 + 0.3, waits
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("alter table public.calls drop column if exists migrate_probe")
            conn.execute("delete from public.callflow_migrations where name = '29990101000003_probe_column.sql'")


def test_only_files_made_wholly_of_concurrent_statements_run_outside_a_transaction():
    standalone = migrations.standalone_statements
    assert standalone("-- why\ncreate index concurrently a on public.calls (x);\n"
                      "/* and; */ drop index concurrently if exists public.b;\n") == [
        "create index concurrently a on public.calls (x)", "drop index concurrently if exists public.b"]
    assert standalone("reindex index concurrently public.a;") == ["reindex index concurrently public.a"]
    assert standalone("create index a on b (c); create index concurrently x on y (z);") is None
    assert standalone("create function f() returns int language sql as $$ select 1; $$;") is None
    assert standalone("-- nothing\n") is None
