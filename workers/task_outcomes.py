"""Celery signal handlers: every task outcome is counted in Redis (`callflow_task_outcomes_total`
on any process's /metrics), every message carries its publish time (queue age), and a task that
ran out of retries or was refused is kept in `callflow_failed_tasks` for `callflow tasks retry`
(not one of beat's that failed for want of Postgres or Redis: its next run does the work).

Nothing here may break a task: Redis or Postgres trouble is logged and dropped.

`workers.app` imports this module (so every process that has the app has these handlers); this
module reads the settings from `config`, the same cached `Settings` the app was made with, and
never imports the app back.
"""

from __future__ import annotations

import functools
import time

import redis
from billiard.exceptions import WorkerLostError
from celery import signals

from config.logging import get_logger
from config.settings import get_settings
from orchestration.ops import failed_tasks
from orchestration.ops.queues import PUBLISHED_AT_HEADER, record_outcome
from workers.transient import TRANSIENT_ERRORS

log = get_logger("callflow.tasks")

_OUTCOME_BY_STATE = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "REJECTED": "rejected",
                     "IGNORED": "ignored"}


@functools.lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=2, socket_connect_timeout=2)


@signals.before_task_publish.connect
def _stamp_publish_time(headers=None, **_kwargs) -> None:
    if headers is not None:
        headers[PUBLISHED_AT_HEADER] = round(time.time(), 3)


@signals.task_postrun.connect
def _count_outcome(sender=None, task_id=None, args=None, kwargs=None, retval=None, state=None, **_kwargs) -> None:
    outcome = _OUTCOME_BY_STATE.get(state or "", (state or "unknown").lower())
    try:
        record_outcome(_redis(), sender.name, outcome)
    except redis.RedisError:
        pass  # a lost count is better than a failed task
    if outcome == "rejected":
        _keep(sender, task_id, args, kwargs, f"rejected: {retval!r}")


@signals.task_failure.connect
def _keep_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None, **_kwargs) -> None:
    if isinstance(exception, (*TRANSIENT_ERRORS, WorkerLostError)) and _runs_on_schedule(sender):
        # A dependency gave no answer, or its worker was stopped under it: beat sends it again
        # within seconds and that run does its work. Nothing for an operator to re-run.
        log.warning("scheduled task did not finish; its next run will do the work",
                    task=sender.name, task_id=task_id, error=f"{type(exception).__name__}: {exception}"[:300])
        return
    _keep(sender, task_id, args, kwargs, f"{type(exception).__name__}: {exception}")


def _runs_on_schedule(task) -> bool:
    return any(entry.get("task") == task.name for entry in (task.app.conf.beat_schedule or {}).values())


def _keep(task, task_id, args, kwargs, error: str) -> None:
    settings = get_settings()
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key") or None
    try:
        failed_tasks.record(settings.database_url, task_id=task_id, task_name=task.name, queue=queue,
                            args=args, kwargs=kwargs, error=error, attempts=(request.retries or 0) + 1)
        log.error("task failed and was kept for `callflow tasks retry`", task=task.name, task_id=task_id,
                  error=error[:300])
    except Exception as exc:  # noqa: BLE001 - Postgres may be why it failed
        log.error("task failed; could not keep it", task=task.name, task_id=task_id, error=error[:300],
                  keep_error=exc.__class__.__name__)
