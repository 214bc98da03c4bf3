"""Postgres connections: one pool per process (created lazily, after Celery forks)."""

from __future__ import annotations

import os
import threading
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

_pools: dict[tuple[int, str, bool], ConnectionPool] = {}
_lock = threading.Lock()


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, row_factory=dict_row, **kwargs)


def get_pool(url: str, max_size: int = 8, generic_plans: bool = False) -> ConnectionPool:
    """`generic_plans`: the sessions keep one plan per prepared statement (plan_cache_mode
    force_generic_plan) instead of planning each execution again. For the lifecycle's own
    statements, which look rows up by key (`= any($1)`), Postgres's plan cache otherwise chose a
    custom plan every time: planning cost more Postgres CPU than running them."""
    key = (os.getpid(), url, generic_plans)
    pool = _pools.get(key)
    if pool is None:
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                pool = ConnectionPool(
                    url,
                    min_size=1,
                    max_size=max_size,
                    kwargs={"row_factory": dict_row, "autocommit": False},
                    configure=_keep_generic_plans if generic_plans else None,
                    open=True,
                    name="callflow",
                )
                _pools[key] = pool
    return pool


def _keep_generic_plans(conn: psycopg.Connection) -> None:
    conn.execute("set plan_cache_mode = force_generic_plan")
    conn.commit()


def close_pools() -> None:
    for key, pool in list(_pools.items()):
        if key[0] == os.getpid():
            pool.close()
            _pools.pop(key, None)
