"""SQL of `callflow notifications retry` over the email outbox (`public.notifications`); the
delivery's own SQL is every outbox's (orchestration/delivery/outbox.py) and the channel's
(orchestration/channels/missed_call_email.py)."""

from __future__ import annotations

import psycopg

RETRYABLE = "status = 'failed' and provider_message_id is null and created_at >= now() - interval '23 hours'"


def reopen_failed(conn: psycopg.Connection, notification_id: str | None = None) -> list[str]:
    """`failed` rows that Resend never accepted (no provider message id) back to `pending`.

    Rows older than 23 hours stay failed: Resend forgets an idempotency key after 24 hours, so a
    repeat could no longer be told apart from a new email."""
    if notification_id is None:
        rows = conn.execute(
            f"update public.notifications set status = 'pending' where {RETRYABLE} returning id::text as id"
        ).fetchall()
    else:
        rows = conn.execute(
            f"update public.notifications set status = 'pending' where id = %s and {RETRYABLE} returning id::text as id",
            (notification_id,),
        ).fetchall()
    return [r["id"] for r in rows]


def count_too_old_to_retry(conn: psycopg.Connection) -> int:
    row = conn.execute(
        """select count(*) as n from public.notifications
            where status = 'failed' and provider_message_id is null and created_at < now() - interval '23 hours'"""
    ).fetchone()
    return row["n"]


def describe(conn: psycopg.Connection, notification_id: str) -> dict | None:
    return conn.execute(
        """select id::text as id, status, provider_message_id, last_error,
                  created_at < now() - interval '23 hours' as too_old
             from public.notifications where id = %s""",
        (notification_id,),
    ).fetchone()
