"""The SQL every outbox shares (`id`, `status`, `attempts`, `last_error`, `created_at`, `sent_at`, and
the channel's provider id column). Every status change is guarded by `status = 'pending'`, so the
first outcome recorded for a row is the one that stays, whichever task records it."""

from __future__ import annotations

from typing import Sequence

from orchestration.delivery.channel import Channel

MAX_ERROR = 1000


def expired_reason(channel: Channel) -> str:
    hours = int(channel.expiry.total_seconds() // 3600) if channel.expiry else 0
    return f"expired: not delivered within {hours} hours"


def attempted(conn, channel: Channel, ids: Sequence[str]) -> None:
    conn.execute(f"update public.{channel.table} set attempts = attempts + 1"
                 " where id = any(%s::uuid[]) and status = 'pending'", (list(ids),))


def note_error(conn, channel: Channel, ids: Sequence[str], error: str) -> None:
    """No answer: the rows stay pending, the error is kept for whoever looks."""
    conn.execute(f"update public.{channel.table} set last_error = %s"
                 " where id = any(%s::uuid[]) and status = 'pending'", (error[:MAX_ERROR], list(ids)))


def finish(conn, channel: Channel, results: list[tuple[str, str, str | None, str | None]]) -> None:
    """(id, status, provider id, error) of pending rows; `sent` stamps sent_at."""
    if not results:
        return
    conn.cursor().executemany(
        f"""update public.{channel.table}
               set status = %s, {channel.provider_id_column} = %s, last_error = %s,
                   sent_at = case when %s = 'sent' then now() else sent_at end
             where id = %s and status = 'pending'""",
        [(status, provider_id, error[:MAX_ERROR] if error else None, status, row_id)
         for row_id, status, provider_id, error in results])


def expire(conn, channel: Channel) -> int:
    """Pending past the channel's expiry: `failed`, for an operator to look at (and maybe retry)."""
    if channel.expiry is None:
        return 0
    cur = conn.execute(
        f"""update public.{channel.table}
               set status = 'failed', last_error = coalesce(last_error || '; ', '') || %s
             where id in (select id from public.{channel.table}
                           where status = 'pending' and created_at < now() - %s
                           for update skip locked)""",
        (expired_reason(channel), channel.expiry))
    return cur.rowcount
