"""The push outbox's queries (Postgres)."""

from __future__ import annotations

from datetime import datetime

from orchestration.db import get_pool
from orchestration.push.messages import PushRow

PER_USER = 10         # a top-up takes at most this many rows to one user's devices (one ring of 10)...
LOOK_FACTOR = 5       # ...from the oldest `limit` x this many pending rows
STALE_PER_USER = 100  # the sweep's pick: at most this many rows to one user's devices

_ROWS = """
select m.id, m.kind, m.status, m.attempts, m.created_at, t.token, t.user_id,
       t.disabled_at is not null as token_disabled,
       i.id as invitation_id, i.room_name, i.call_type, i.caller_id, i.status as invitation_status, i.end_reason,
       i.ring_deadline,
       coalesce(nullif(btrim(u.raw_user_meta_data->>'full_name'), ''), nullif(btrim(u.raw_user_meta_data->>'name'), ''),
                split_part(u.email, '@', 1), 'Someone') as caller_name
  from public.push_messages m
  join public.push_tokens t on t.id = m.push_token_id
  join public.call_invitations i on i.id = m.invitation_id
  left join auth.users u on u.id = i.caller_id
 where m.id = any(%s::uuid[])
 order by m.created_at, m.id
"""


class PushStore:
    def __init__(self, database_url: str) -> None:
        self.url = database_url

    def _conn(self):
        return get_pool(self.url).connection()

    def now(self) -> datetime:
        with self._conn() as conn:
            return conn.execute("select now() as now").fetchone()["now"]

    def rows(self, ids: list[str]) -> list[PushRow]:
        with self._conn() as conn:
            return [PushRow(id=str(r["id"]), kind=r["kind"], status=r["status"], attempts=r["attempts"],
                            token=r["token"], token_disabled=r["token_disabled"], user_id=str(r["user_id"]),
                            created_at=r["created_at"],
                            invitation_id=str(r["invitation_id"]), room_name=r["room_name"],
                            call_type=r["call_type"], caller_id=str(r["caller_id"]), caller_name=r["caller_name"],
                            invitation_status=r["invitation_status"], end_reason=r["end_reason"],
                            ring_deadline=r["ring_deadline"])
                    for r in conn.execute(_ROWS, (ids,)).fetchall()]

    def finish(self, results: list[tuple[str, str, str | None, str | None]]) -> None:
        """(id, status, ticket_id, last_error) of pending rows; `sent` stamps sent_at."""
        if not results:
            return
        with self._conn() as conn:
            conn.cursor().executemany(
                """update public.push_messages
                      set status = %s, ticket_id = %s, last_error = %s,
                          sent_at = case when %s = 'sent' then now() else sent_at end,
                          attempts = attempts + case when %s in ('sent', 'failed') then 1 else 0 end
                    where id = %s and status = 'pending'""",
                [(status, ticket, error, status, status, mid) for mid, status, ticket, error in results])

    def attempted(self, ids: list[str], error: str) -> None:
        with self._conn() as conn:
            conn.execute("update public.push_messages set attempts = attempts + 1, last_error = %s"
                         " where id = any(%s::uuid[]) and status = 'pending'", (error[:500], ids))

    def disable_tokens(self, tokens: list[str]) -> None:
        if tokens:
            with self._conn() as conn:
                conn.execute("update public.push_tokens set disabled_at = now() where token = any(%s)"
                             " and disabled_at is null", (tokens,))

    def more_pending(self, limit: int, exclude: list[str], per_user: int = PER_USER) -> list[str]:
        """Other pending rows, oldest first (recent ones only: older ones are the sweep's), at most
        `per_user` to one user's devices, from a bounded look at the oldest: one account's backlog
        (waiting for its share of the rate) never fills a batch, and costs the look no more."""
        with self._conn() as conn:
            return [str(r["id"]) for r in conn.execute(
                """select id from (
                     select m.id, m.created_at,
                            row_number() over (partition by t.user_id order by m.created_at, m.id) as nth
                       from (select id, push_token_id, created_at from public.push_messages
                              where status = 'pending' and created_at > now() - interval '5 minutes'
                                and id <> all(%(exclude)s::uuid[])
                              order by created_at limit %(look)s) m
                       join public.push_tokens t on t.id = m.push_token_id) r
                    where nth <= %(per_user)s order by created_at, id limit %(limit)s""",
                {"exclude": exclude, "look": limit * LOOK_FACTOR, "per_user": per_user, "limit": limit}).fetchall()]

    def stale_pending(self, older_than: float, limit: int, per_user: int = STALE_PER_USER) -> list[str]:
        """Pending rows older than `older_than` s, oldest first, at most `per_user` to one user's
        devices: a flooded account's rows waiting for its share never crowd out another user's lost
        row."""
        with self._conn() as conn:
            return [str(r["id"]) for r in conn.execute(
                """select id from (
                     select m.id, m.created_at,
                            row_number() over (partition by t.user_id order by m.created_at, m.id) as nth
                       from public.push_messages m join public.push_tokens t on t.id = m.push_token_id
                      where m.status = 'pending' and m.created_at < now() - make_interval(secs => %s)) r
                    where nth <= %s order by created_at, id limit %s""",
                (older_than, per_user, limit)).fetchall()]

    def unreceipted(self, older_than: float, limit: int) -> list[tuple[str, str, str]]:
        """(id, ticket_id, token) of sent messages whose receipt is not known yet."""
        with self._conn() as conn:
            return [(str(r["id"]), r["ticket_id"], r["token"]) for r in conn.execute(
                """select m.id, m.ticket_id, t.token from public.push_messages m
                     join public.push_tokens t on t.id = m.push_token_id
                    where m.status = 'sent' and m.receipt_status is null and m.ticket_id is not null
                      and m.sent_at < now() - make_interval(secs => %s)
                      and m.sent_at > now() - interval '1 day'
                    order by m.sent_at limit %s""", (older_than, limit)).fetchall()]

    def record_receipts(self, receipts: list[tuple[str, str, str | None]]) -> None:
        """(id, ok|error, error text)."""
        if receipts:
            with self._conn() as conn:
                conn.cursor().executemany(
                    """update public.push_messages set receipt_status = %s,
                              last_error = coalesce(%s, last_error) where id = %s""",
                    [(status, error, mid) for mid, status, error in receipts])
