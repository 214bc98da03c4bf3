"""Postgres connections: one pool per process (created lazily, after Celery forks).

Every pool checks a connection as it hands it out (`closed_by_server`): one the server closed
while it sat idle (a restart, a proxy's or the network's reset) is replaced, not handed to work
that would fail on it and spend a retry.
"""

from __future__ import annotations

import os
import select
import threading
import time
import weakref

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

# psycopg_pool tries a lost connection again after 1, 2, 4, 8 ... s, uncapped, for its
# `reconnect_timeout` (5 min by default): after a minute's outage its next try could be a minute
# away. Given up after this long instead, the next request that needs a connection starts a new
# series from its first step, so a pool is back within a few seconds of Postgres.
RECONNECT_SECONDS = 5.0
# A series given up leaves the requests already waiting to wait out their own timeout (only a new
# request starts a new series): a worker's wait is bounded by this (then the task retries, and
# its new request starts a series), not by psycopg_pool's 30 s.
WAIT_SECONDS = 10.0

_pools: dict[tuple[int, str, bool], ConnectionPool] = {}
_lock = threading.Lock()


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, row_factory=dict_row, **kwargs)


def get_pool(url: str, max_size: int = 8, generic_plans: bool = False) -> ConnectionPool:
    """`generic_plans`: the sessions keep one plan per prepared statement (plan_cache_mode
    force_generic_plan) instead of planning each execution again. For the lifecycle's own
    statements, which look rows up by key (`= any($1)`), Postgres's plan cache otherwise chose a
    custom plan every time: planning cost more Postgres CPU than running them. A session's plans
    are made again every `REPLAN_SECONDS` (`_replan_when_due`), so they follow the tables' growth."""
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
                    check=_check_and_replan if generic_plans else check_open,
                    reconnect_timeout=RECONNECT_SECONDS,
                    timeout=WAIT_SECONDS,
                    open=True,
                    name="callflow",
                )
                _pools[key] = pool
    return pool


def closed_by_server(conn: psycopg.Connection | psycopg.AsyncConnection) -> bool:
    """Whether an idle connection was closed from the other end: its socket has something to read
    (the server's "terminating connection", an EOF, a reset), where a healthy idle connection has
    nothing. A zero-timeout poll, no round trip (the pool asks at every checkout)."""
    if conn.closed or conn.broken:
        return True
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def check_open(conn: psycopg.Connection) -> None:
    """A pool's `check`: a connection closed by the server is closed here too and refused, and the
    pool makes a new one. (Refused but left open, the pool would put it back and hand it out again,
    for as long as the client waits: it only replaces a connection it sees broken.)"""
    if closed_by_server(conn):
        conn.close()
        raise psycopg.OperationalError("the server closed this idle connection")


async def check_open_async(conn: psycopg.AsyncConnection) -> None:
    """`check_open` for the `web` process's async pools."""
    if closed_by_server(conn):
        await conn.close()
        raise psycopg.OperationalError("the server closed this idle connection")


def _check_and_replan(conn: psycopg.Connection) -> None:
    check_open(conn)
    _replan_when_due(conn)


def _keep_generic_plans(conn: psycopg.Connection) -> None:
    conn.execute("set plan_cache_mode = force_generic_plan")
    conn.commit()


# A kept plan is made once and used until something invalidates it (an ANALYZE of its tables, at
# autovacuum's pace). Made while a table was small it scans the table, however large it grows: in
# a young database (a new deployment, the benchmark's) the lookups by key scanned thousands of rows
# each, which cost the benchmark 15-20 % of the machine. Made again, the planner scales the last
# ANALYZE's row density by the table's current size, so the plan follows its growth.
REPLAN_SECONDS = 20.0
_planned_at: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()


def _replan_when_due(conn: psycopg.Connection) -> None:
    """The pool's check, as a connection is handed out: `DISCARD PLANS` (the prepared statements
    stay; each is planned again at its next execution) when the session's plans are due."""
    now = time.monotonic()
    if now - _planned_at.setdefault(conn, now) >= REPLAN_SECONDS:
        conn.execute("discard plans")
        conn.commit()
        _planned_at[conn] = now


def close_pools() -> None:
    for key, pool in list(_pools.items()):
        if key[0] == os.getpid():
            pool.close()
            _pools.pop(key, None)
