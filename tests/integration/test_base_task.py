"""`workers.base_task.CallflowTask` on a real worker: a transient error is retried with the one
backoff (`orchestration.backoff`) until the task succeeds or runs out of retries (then it is kept
in `callflow_failed_tasks`, `workers.task_outcomes`); any other error is not retried.

The worker is `celery -A tests.support.base_task_app worker` on a Redis database of its own. This
module does not import that one (its test tasks would land on the app this process checks in
`tests/unit/test_names.py`): the task names and Redis keys are written out here.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from celery import Celery

from devstack import services
from devstack.services import VENV_BIN, Process, wait_for
from tests.conftest import subprocess_env

FLAKY = "test.base_task.flaky"
BROKEN = "test.base_task.broken"
REDIS_DB = 10


def attempts(client: redis.Redis, key: str) -> list[float]:
    return [float(t) for t in client.lrange(f"test:base-task:attempts:{key}", 0, -1)]


@pytest.fixture(scope="module")
def base_worker(log_dir, redis_server):
    url = redis_server.url.rpartition("/")[0] + f"/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    name = f"base{uuid.uuid4().hex[:4]}"
    argv = [str(VENV_BIN / "celery"), "-A", "tests.support.base_task_app", "worker", "-l", "INFO",
            "-n", f"{name}@%h", "--concurrency", "2", "--without-gossip", "--without-mingle"]
    proc = Process(f"worker-{name}", argv, subprocess_env(REDIS_URL=url), log_dir).start()
    try:
        wait_for(lambda: "ready." in proc.log() or not proc.alive(), timeout=60, what="worker ready")
        assert proc.alive(), proc.log()[-4000:]
        yield proc, client, Celery(broker=url)
    finally:
        proc.stop()


def failed_rows(db, key: str) -> list[dict]:
    return db.execute("select * from public.callflow_failed_tasks where args->>0 = %s order by failed_at",
                      (key,)).fetchall()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_transient_error_is_retried_with_backoff_then_the_task_succeeds(base_worker, db, kind):
    proc, client, sender = base_worker
    key = f"flaky-{kind}-{uuid.uuid4().hex[:8]}"
    task_id = sender.send_task(FLAKY, args=[key, 2, kind], queue="events").id
    wait_for(lambda: client.get(f"test:base-task:done:{key}") is not None, timeout=30, what="the third run")
    assert client.get(f"test:base-task:done:{key}") == b"3"
    runs = attempts(client, key)
    assert len(runs) == 3
    # backoff_delay(n, 0.5, 30) with equal jitter: retry 1 after 0.25-0.5 s, retry 2 after 0.5-1 s
    # (plus the time the worker takes to pick the retry up).
    first_wait, second_wait = runs[1] - runs[0], runs[2] - runs[1]
    assert 0.2 <= first_wait < 5, first_wait
    assert 0.45 <= second_wait < 6, second_wait
    time.sleep(0.5)
    assert not failed_rows(db, key)  # retried, never failed
    # One line per retry, carrying the task's id and name (the base binds them).
    retry_lines = [line for line in proc.log().splitlines()
                   if "transient failure, retrying" in line and task_id in line and FLAKY in line]
    assert len(retry_lines) == 2, proc.log()[-3000:]


def test_a_transient_error_past_max_retries_fails_once_and_is_kept(base_worker, db):
    proc, client, sender = base_worker
    key = f"flaky-forever-{uuid.uuid4().hex[:8]}"
    task_id = sender.send_task(FLAKY, args=[key, 100, "redis"], queue="events").id
    wait_for(lambda: len(failed_rows(db, key)) == 1, timeout=60, what="the task given up and kept")
    kept = failed_rows(db, key)[0]
    assert kept["task_id"] == task_id and kept["task_name"] == FLAKY
    assert "ConnectionError" in kept["error"] and kept["attempts"] == 4  # max_retries=3: 1 run + 3 retries
    time.sleep(1.5)
    assert len(attempts(client, key)) == 4 and len(failed_rows(db, key)) == 1
    assert len([line for line in proc.log().splitlines() if "giving up" in line and task_id in line]) == 1


def test_a_non_transient_error_is_not_retried(base_worker, db):
    proc, client, sender = base_worker
    key = f"broken-{uuid.uuid4().hex[:8]}"
    task_id = sender.send_task(BROKEN, args=[key], queue="events").id
    wait_for(lambda: len(failed_rows(db, key)) == 1, timeout=30, what="the failure kept")
    kept = failed_rows(db, key)[0]
    assert kept["task_id"] == task_id and "RuntimeError" in kept["error"] and kept["attempts"] == 1
    time.sleep(2)
    assert len(attempts(client, key)) == 1
