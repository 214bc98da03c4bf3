"""Postgres connections: one pool per process (created lazily, after Celery forks)."""

from __future__ import annotations

import os
import threading
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

_pools: dict[tuple[int, str], ConnectionPool] = {}
_lock = threading.Lock()


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, row_factory=dict_row, **kwargs)


def get_pool(url: str, max_size: int = 8) -> ConnectionPool:
    key = (os.getpid(), url)
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
                    open=True,
                    name="callflow",
                )
                _pools[key] = pool
    return pool


def close_pools() -> None:
    for key, pool in list(_pools.items()):
        if key[0] == os.getpid():
            pool.close()
            _pools.pop(key, None)
