"""`callflow notifications retry [--id ID]`: failed emails that Resend never accepted go again.

A `failed` row without a `provider_message_id` was never accepted by Resend (a 4xx, or retries
that ran out); it goes back to `pending` and a `callflow.deliver` task of the email channel is queued for
it. Its Idempotency-Key is the row's, as before: if Resend did accept an earlier request after all
(a timeout that hid the answer), it answers with that first message instead of a second email.
Anything else (sent, skipped, pending, failed with a message id, older than 23 hours) is left alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from config.settings import Settings
from orchestration import names
from orchestration.db import connect
from orchestration.notifications import store


class RetryRefused(Exception):
    pass


@dataclass
class RetryResult:
    reopened: list[str] = field(default_factory=list)
    queued: int = 0
    queue_error: str | None = None
    too_old: int = 0

    def lines(self) -> list[str]:
        out = [f"re-sending {len(self.reopened)} failed email(s) that Resend never accepted"]
        out += [f"  {nid}" for nid in self.reopened]
        if self.queue_error:
            out.append(f"could not queue {len(self.reopened) - self.queued} task(s) ({self.queue_error}); "
                       "they are pending again and the beat sweep will send them")
        if self.too_old:
            out.append(f"{self.too_old} failed email(s) older than 23 hours left alone "
                       "(Resend no longer knows their idempotency keys)")
        return out


def _refusal(row: dict | None, notification_id: str) -> str:
    if row is None:
        return f"no notification {notification_id}"
    if row["provider_message_id"]:
        return (f"notification {notification_id} is {row['status']} and Resend accepted it "
                f"({row['provider_message_id']}): not re-sent")
    if row["status"] == "failed" and row["too_old"]:
        return f"notification {notification_id} failed more than 23 hours ago: not re-sent"
    detail = f" ({row['last_error']})" if row["status"] == "skipped" and row["last_error"] else ""
    return f"notification {notification_id} is {row['status']}{detail}: only failed emails are re-sent"


def retry_failed(settings: Settings, notification_id: str | None = None, enqueue=None) -> RetryResult:
    if notification_id is not None:
        try:
            notification_id = str(uuid.UUID(notification_id))
        except ValueError:
            raise RetryRefused(f"not a notification id: {notification_id[:64]!r}") from None
    result = RetryResult()
    with connect(settings.database_url) as conn:
        result.reopened = store.reopen_failed(conn, notification_id)
        if notification_id is not None and not result.reopened:
            raise RetryRefused(_refusal(store.describe(conn, notification_id), notification_id))
        if notification_id is None:
            result.too_old = store.count_too_old_to_retry(conn)
    # Committed: the rows are pending. Queue their tasks now (if this fails, the sweep does it).
    if result.reopened:
        enqueue = enqueue or _celery_enqueue(settings)
        try:
            for nid in result.reopened:
                enqueue(nid)
                result.queued += 1
        except Exception as exc:  # noqa: BLE001 - broker down: the sweep covers pending rows
            result.queue_error = exc.__class__.__name__
    return result


def _celery_enqueue(settings: Settings):
    from celery import Celery

    producer = Celery("callflow-cli", broker=settings.redis_url)
    producer.conf.update(broker_connection_retry_on_startup=False, broker_connection_max_retries=1,
                         task_serializer="json")

    def enqueue(notification_id: str) -> None:
        producer.send_task(names.DELIVER, args=[names.CHANNEL_EMAIL, [notification_id]],
                           queue=names.CHANNEL_QUEUES[names.CHANNEL_EMAIL])

    return enqueue
