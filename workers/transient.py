"""What a task may fail with when a dependency gives no answer (Postgres or Redis restarting, a
dropped or reset connection, a lock conflict): not a bug, and never a failed task while trying
again can still help (the contract: Postgres and Redis outages cost retries, not events)."""

from __future__ import annotations

import kombu.exceptions
import psycopg
import redis

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # refused, reset, "terminating connection", the pool's timeout
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    redis.ConnectionError,
    redis.TimeoutError,
)

# Publishing to the broker (Redis) failed: Celery's own publish retries gave up.
BROKER_ERRORS: tuple[type[BaseException], ...] = (kombu.exceptions.OperationalError, redis.ConnectionError,
                                                  redis.TimeoutError)
