"""Missed-call email delivery tasks (queue `notifications`) and the pending sweep (queue `sweeps`).

`callflow.send_notification [notification_id]` is sent by the lifecycle after the commit that
inserted the outbox row; the decision lives in `orchestration.notifications.service.deliver`.
Here: the ports, and retry/re-queue with the outcome's countdown. The task is acks_late with
reject_on_worker_lost, so a worker process that dies mid-send has its task delivered again; the
Idempotency-Key makes the repeat return Resend's first answer instead of a second email.
"""

from __future__ import annotations

import os
import uuid

import redis
import structlog

from config.logging import get_logger
from orchestration import names
from orchestration.notifications import bucket_from_settings, mailer_from_settings
from orchestration.notifications.service import (
    MAX_ATTEMPTS,
    SWEEP_MIN_AGE_SECONDS,
    backoff,
    deliver,
    mark_scheduled,
    resend_backoff,
    sweep_lost,
)
from workers.app import app, settings

log = get_logger("callflow.notifications")

_ports: dict[int, tuple] = {}


def ports():
    """(mailer, bucket, redis client) of this process, made after Celery forked it."""
    pid = os.getpid()
    if pid not in _ports:
        _ports.clear()
        _ports[pid] = (
            mailer_from_settings(settings),
            bucket_from_settings(settings),
            redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5),
        )
    return _ports[pid]


_loops: dict[int, object] = {}


def resend_loop():
    """Resend's retry loop, shared by every worker through Redis (one handle per process)."""
    pid = os.getpid()
    if pid not in _loops:
        _loops.clear()
        _loops[pid] = resend_backoff(ports()[2])
    return _loops[pid]


@app.task(name=names.SEND_NOTIFICATION, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, queue=names.Q_NOTIFICATIONS, ignore_result=True)
def send_notification(self, notification_id: str, failures: int = 0, slot: float | None = None) -> str:
    structlog.contextvars.bind_contextvars(notification_id=str(notification_id), task_id=self.request.id)
    try:
        try:
            notification_id = str(uuid.UUID(str(notification_id)))
        except ValueError:
            log.warning("send_notification: not a notification id", notification_id=str(notification_id)[:64])
            return "missing"
        mailer, bucket, redis_client = ports()
        try:
            outcome = deliver(
                notification_id,
                database_url=settings.database_url,
                mailer=mailer,
                bucket=bucket,
                sender=settings.callflow_email_from,
                app_url=settings.callflow_app_url,
                failures=failures,
                slot=slot,
                resend_loop=resend_loop(),
            )
        except Exception as exc:  # noqa: BLE001 - database or Redis trouble: try again later
            if failures + 1 >= MAX_ATTEMPTS:
                # The row stays pending: the sweep sends it again once things are back.
                log.error("send_notification gave up; the sweep will retry", error=repr(exc)[:300])
                return "error"
            countdown = backoff(failures)
            log.warning("send_notification error; retrying", error=repr(exc)[:300], countdown=round(countdown, 2))
            raise self.retry(countdown=countdown, kwargs={"failures": failures + 1}) from None
        if outcome.kind == "retry":
            mark_scheduled(redis_client, notification_id, outcome.countdown)
            raise self.retry(countdown=outcome.countdown, kwargs={"failures": failures + 1})
        if outcome.kind == "throttled":
            # Waiting for its send time is not a failure: the failure count is kept as it is. The
            # task comes back at the time it booked (never sleeping in a worker slot meanwhile).
            mark_scheduled(redis_client, notification_id, outcome.countdown)
            raise self.retry(countdown=outcome.countdown, kwargs={"failures": failures, "slot": outcome.slot})
        if outcome.kind in ("busy", "done", "missing"):
            log.info("send_notification: nothing to do", outcome=outcome.kind, detail=outcome.detail)
        return outcome.kind
    finally:
        structlog.contextvars.unbind_contextvars("notification_id", "task_id")


@app.task(name=names.SWEEP_NOTIFICATIONS, queue=names.Q_SWEEPS, ignore_result=True)
def sweep_notifications(min_age_seconds: float = SWEEP_MIN_AGE_SECONDS) -> int:
    """Beat: re-sends `pending` outbox rows whose task got lost."""
    _, _, redis_client = ports()
    result = sweep_lost(
        settings.database_url,
        redis_client,
        lambda notification_id: send_notification.apply_async(args=[notification_id]),
        min_age_seconds=min_age_seconds,
    )
    return len(result["resent"])
