"""The store's sessions keep generic plans (orchestration/db.py), and make them again as tables grow.

Against the real Postgres: a plan kept since its table was small scans the table however large it
grows; the pool's check (`_replan_when_due`) discards the session's plans when due, and the next
execution, planned again, uses the index.
"""

from __future__ import annotations

import psycopg
import pytest

from orchestration import db


def plan(conn: psycopg.Connection) -> str:
    return "\n".join(r[0] for r in conn.execute("explain execute lookup(array['k1', 'k2'])").fetchall())


@pytest.fixture
def session(database_url):
    with psycopg.connect(database_url) as conn:
        conn.execute("set plan_cache_mode = force_generic_plan")
        conn.execute("create temp table keyed (id text primary key, v int)")  # autovacuum never analyzes it
        conn.execute("insert into keyed select 'k' || g, g from generate_series(1, 200) g")
        conn.execute("analyze keyed")
        conn.execute("prepare lookup(text[]) as select id from keyed where id = any($1)")
        conn.commit()
        yield conn


def test_a_kept_plan_follows_its_table_growth_once_due(session, monkeypatch):
    assert "Seq Scan on keyed" in plan(session), "a small table is scanned"
    db._replan_when_due(session)  # the session's plans are new: nothing to do
    session.execute("insert into keyed select 'x' || g, g from generate_series(1, 20000) g")
    session.commit()
    assert "Seq Scan on keyed" in plan(session), "the kept plan still scans 20,200 rows"
    db._replan_when_due(session)
    assert "Seq Scan on keyed" in plan(session), "not due yet: the plan is kept"

    monkeypatch.setattr(db, "REPLAN_SECONDS", 0.0)
    db._replan_when_due(session)
    assert "Index" in plan(session) and "Seq Scan" not in plan(session), "planned again: the index, with no ANALYZE"


def test_the_store_pool_checks_its_connections(database_url):
    pool = db.get_pool(database_url, generic_plans=True)
    with pool.connection() as conn:
        assert conn.execute("show plan_cache_mode").fetchone()["plan_cache_mode"] == "force_generic_plan"
        assert conn in db._planned_at, "handed out through _replan_when_due"
