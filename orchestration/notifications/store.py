"""SQL of the email outbox (`public.notifications`), over a psycopg connection (dict rows).

Every status change is guarded by `status = 'pending'`, so the first outcome recorded for a row
is the one that stays, whichever task records it.
"""

from __future__ import annotations

import psycopg

_LOAD = """
select n.id::text as id, n.kind, n.status, n.attempts, n.provider_message_id,
       n.invitation_id::text as invitation_id, n.recipient_id::text as recipient_id,
       coalesce(nullif(btrim(n.recipient_email), ''), nullif(btrim(callee.email), '')) as recipient_email,
       n.created_at,
       i.call_type, i.status as invitation_status, i.caller_id::text as caller_id,
       i.created_at as invited_at, i.ringing_at, i.ended_at,
       callee.id is not null as callee_exists,
       coalesce(callee.raw_user_meta_data, '{}'::jsonb) as callee_meta,
       coalesce(caller.raw_user_meta_data, '{}'::jsonb) as caller_meta
  from public.notifications n
  join public.call_invitations i on i.id = n.invitation_id
  left join auth.users callee on callee.id = n.recipient_id
  left join auth.users caller on caller.id = i.caller_id
 where n.id = %s
"""


def lock_for_delivery(conn: psycopg.Connection, notification_id: str) -> dict | None:
    """The row with everything the email needs, locked for this transaction; None when another
    transaction holds it (a sender at work) or it does not exist."""
    return conn.execute(_LOAD + " for update of n skip locked", (notification_id,)).fetchone()


def status_of(conn: psycopg.Connection, notification_id: str) -> str | None:
    row = conn.execute("select status from public.notifications where id = %s", (notification_id,)).fetchone()
    return row["status"] if row else None


def count_attempt(conn: psycopg.Connection, notification_id: str) -> int:
    row = conn.execute(
        "update public.notifications set attempts = attempts + 1 where id = %s returning attempts",
        (notification_id,),
    ).fetchone()
    return row["attempts"]


def mark_sent(conn: psycopg.Connection, notification_id: str, provider_message_id: str) -> bool:
    cur = conn.execute(
        """update public.notifications
              set status = 'sent', provider_message_id = %s, sent_at = now(), last_error = null
            where id = %s and status = 'pending'""",
        (provider_message_id, notification_id),
    )
    return cur.rowcount == 1


def mark_failed(conn: psycopg.Connection, notification_id: str, error: str) -> bool:
    cur = conn.execute(
        "update public.notifications set status = 'failed', last_error = %s where id = %s and status = 'pending'",
        (error[:1000], notification_id),
    )
    return cur.rowcount == 1


def mark_skipped(conn: psycopg.Connection, notification_id: str, why: str) -> bool:
    cur = conn.execute(
        "update public.notifications set status = 'skipped', last_error = %s where id = %s and status = 'pending'",
        (why[:1000], notification_id),
    )
    return cur.rowcount == 1


def note_error(conn: psycopg.Connection, notification_id: str, error: str) -> None:
    """A retryable error: the row stays pending, the error is kept for whoever looks."""
    conn.execute("update public.notifications set last_error = %s where id = %s and status = 'pending'",
                 (error[:1000], notification_id))


def lost_pending(conn: psycopg.Connection, min_age_seconds: float, limit: int = 500,
                 not_scheduled=lambda ids: ids) -> list[str]:
    """Pending rows older than `min_age_seconds` that no sender holds right now (row locks of
    senders are skipped: a sender whose process died has lost its lock with its connection).
    `not_scheduled(ids)` first drops the rows whose task is known to be waiting (a Redis look), so
    a long backlog of booked emails costs one read here, not a row lock per email."""
    ids = [r["id"] for r in conn.execute(
        """select id::text as id from public.notifications
            where status = 'pending'
              and created_at < now() - make_interval(secs => %s)
              and created_at >= now() - interval '23 hours'
            order by created_at
            limit %s""",
        (min_age_seconds, limit),
    ).fetchall()]
    ids = not_scheduled(ids)
    if not ids:
        return []
    rows = conn.execute(
        """select id::text as id from public.notifications
            where id = any(%s::uuid[]) and status = 'pending'
            order by created_at
            for update skip locked""",
        (ids,),
    ).fetchall()
    return [r["id"] for r in rows]


def expire_stale(conn: psycopg.Connection) -> int:
    """Pending for 23 hours: Resend forgets idempotency keys after 24, and a missed-call email a
    day late helps nobody. They become `failed`, for an operator to look at (and maybe retry)."""
    cur = conn.execute(
        """update public.notifications
              set status = 'failed',
                  last_error = coalesce(last_error || '; ', '') || 'expired: not delivered within 23 hours'
            where id in (select id from public.notifications
                          where status = 'pending' and created_at < now() - interval '23 hours'
                          for update skip locked)"""
    )
    return cur.rowcount


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
