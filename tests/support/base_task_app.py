"""A worker for `tests/integration/test_base_task.py`: callflow's app (`workers.app`, with its
`task_outcomes` handlers) plus two test tasks on `workers.base_task.CallflowTask`.

`celery -A tests.support.base_task_app worker`: every attempt is recorded in Redis (the list
`test:base-task:attempts:<key>`, one time stamp per run) so the test sees how often and when it ran.
"""

from __future__ import annotations

import time

import psycopg
import redis

from workers.app import app, settings
from workers.base_task import CallflowTask

FLAKY = "test.base_task.flaky"
BROKEN = "test.base_task.broken"


def attempts_key(key: str) -> str:
    return f"test:base-task:attempts:{key}"


def done_key(key: str) -> str:
    return f"test:base-task:done:{key}"


def _record(key: str) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    return client.rpush(attempts_key(key), repr(time.time()))


@app.task(name=FLAKY, base=CallflowTask, bind=True, max_retries=3, queue="events")
def flaky(self, key: str, fail_times: int, kind: str = "redis") -> str:
    """Fails with a transient error (Redis's or Postgres's) on its first `fail_times` runs."""
    attempt = _record(key)
    if attempt <= fail_times:
        if kind == "postgres":
            raise psycopg.OperationalError("simulated: the server closed the connection")
        raise redis.ConnectionError("simulated: Redis gave no answer")
    redis.Redis.from_url(settings.redis_url).set(done_key(key), str(attempt))
    return f"done after {attempt}"


@app.task(name=BROKEN, base=CallflowTask, bind=True, max_retries=3, queue="events")
def broken(self, key: str) -> str:
    """Fails with a bug (not transient) every time."""
    _record(key)
    raise RuntimeError("simulated bug")
