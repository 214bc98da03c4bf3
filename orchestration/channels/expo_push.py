"""The Expo push channel: `push_messages` rows (one per device of the callee) through Expo's push API
(or JSON files in development), in batches of up to 100.

What is its own: an `incoming_call` goes only while its call rings and before its ring deadline (a
push that would arrive later is `skipped`, never sent late); a disabled device gets nothing; each
callee gets a share of the push rate (`Shares`: one account's flood never books the line ahead of
another user's ring), the kind that stops being of use soonest first; Expo's `DeviceNotRegistered`
turns the device off (in the ticket, or later in the receipt the sweep reads); a
`MessageRateExceeded` ticket is no answer for that message. A send cut off by a crash before its
tickets were stored is sent again; the app drops the duplicate by `kind` + `invitation_id`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from orchestration import names
from orchestration.db import get_pool
from orchestration.delivery.channel import Channel, NoAnswer, Provider, Record, Refused, Rejected, Sent, Unavailable
from orchestration.delivery.rate import Shares
from orchestration.push.expo import MAX_BATCH, client_for, MAX_RECEIPTS, TIMEOUT_SECONDS, ExpoRejected, ExpoUnavailable
from orchestration.push.messages import CALL_ENDED_TTL, PushRow, expo_message
from orchestration.shared_backoff import SharedBackoff

log = structlog.get_logger("callflow.push")

DEVICE_GONE = "DeviceNotRegistered"
RATE_EXCEEDED = "MessageRateExceeded"  # a ticket that is Expo's 429 for one message: not an answer
# Expo unavailable: the wait before the next try, from 0.5 s up to 10 s (Expo takes 600 messages a
# second, so a batch every 10 s is nothing to it, and a ring that can still go is not kept waiting
# long once Expo is back).
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
SHARE_STEP_SECONDS = 0.5
KIND_ORDER = {"incoming_call": 0, "call_ended": 1, "missed_call": 2}
RECEIPTS_AFTER = 15.0  # Expo's receipts are usually ready within seconds
PER_USER = 10          # a top-up takes at most this many rows to one user's devices (one ring of 10)...
LOOK_FACTOR = 5        # ...from the oldest `limit` x this many pending rows
STALE_PER_USER = 100   # the sweep's pick: at most this many rows to one user's devices

_ROWS = """
select m.id::text as id, m.kind, m.status, m.attempts, m.created_at, t.token, t.user_id::text as user_id,
       t.disabled_at is not null as token_disabled,
       i.id::text as invitation_id, i.room_name, i.call_type, i.caller_id::text as caller_id,
       i.status as invitation_status, i.end_reason, i.ring_deadline,
       coalesce(nullif(btrim(u.raw_user_meta_data->>'full_name'), ''), nullif(btrim(u.raw_user_meta_data->>'name'), ''),
                split_part(u.email, '@', 1), 'Someone') as caller_name
  from public.push_messages m
  join public.push_tokens t on t.id = m.push_token_id
  join public.call_invitations i on i.id = m.invitation_id
  left join auth.users u on u.id = i.caller_id
 where m.id = any(%s::uuid[])
 order by m.created_at, m.id
"""


def expo_provider(settings) -> Provider:
    return Provider(name="expo", rate_key=names.RATELIMIT_EXPO, rate_per_second=settings.callflow_push_rate_per_second,
                    retry_base_seconds=RETRY_BASE_SECONDS, retry_max_seconds=RETRY_MAX_SECONDS,
                    probe_seconds=TIMEOUT_SECONDS + 2)


def skip_reason(row: PushRow, at: datetime) -> str | None:
    if row.token_disabled:
        return "the device was unregistered"
    if row.kind == "incoming_call":
        if row.invitation_status != "ringing":
            return f"the call stopped ringing ({row.invitation_status}) before the push could go"
        if row.ring_deadline is not None and at >= row.ring_deadline:
            return "the ring deadline passed before the push could go"
    return None


class ExpoPushChannel(Channel):
    name = names.CHANNEL_EXPO
    queue = names.CHANNEL_QUEUES[name]
    table = "push_messages"
    provider_id_column = "ticket_id"
    rows_sql, rows_alias = _ROWS, "m"
    batch_size = MAX_BATCH
    booking_horizon = None  # a batch books however far the line reaches (600/s: never far)
    stale_after = 10.0
    resend_every = 30
    shares = True

    def __init__(self, client, provider: Provider, database_url: str) -> None:
        self.client, self.provider, self.database_url = client, provider, database_url

    @classmethod
    def from_settings(cls, settings) -> "ExpoPushChannel":
        return cls(client_for(settings), expo_provider(settings), settings.database_url)

    def skip_reason(self, row: Record, now: datetime, at: datetime) -> str | None:
        return skip_reason(row, at)

    def share_of(self, row: Record, now: datetime) -> tuple[str, float | None]:
        """The callee's share; an incoming call must go before its ring deadline, a call_ended
        within its time to live (a step early)."""
        if row.kind == "incoming_call" and row.ring_deadline is not None:
            limit = row.ring_deadline
        elif row.kind == "call_ended" and row.created_at is not None:
            limit = row.created_at + timedelta(seconds=CALL_ENDED_TTL)
        else:
            return row.user_id, None
        return row.user_id, (limit - now).total_seconds() - SHARE_STEP_SECONDS

    def share_skip_reason(self, row: Record) -> str:
        what = ("until after the ring deadline" if row.kind == "incoming_call"
                else f"for longer than a {row.kind} lives ({CALL_ENDED_TTL} s)")
        rate = self.provider.rate_per_second
        share = max(Shares.MIN_PER_SECOND, rate / Shares.SHARE_OF_RATE)
        burst = max(Shares.BURST, Shares.BURST_SECONDS * share)
        return (f"its callee's share of the push rate ({share:g}/s after a burst of {burst:g}) was taken "
                f"{what}: more pushes to this user's devices than their share")

    def order(self, row: Record):
        return KIND_ORDER.get(row.kind, len(KIND_ORDER))

    def compose(self, row: Record, now: datetime) -> dict:
        return expo_message(row, now)

    def send(self, messages: list[dict]):
        try:
            tickets = self.client.send(messages)
        except ExpoUnavailable as exc:
            raise Unavailable(str(exc), exc.retry_after) from None
        except ExpoRejected as exc:
            raise Rejected(str(exc)) from None
        out = []
        for message, ticket in zip(messages, tickets):
            if ticket.ok:
                out.append(Sent(ticket.id))
            elif ticket.error == RATE_EXCEEDED:
                out.append(NoAnswer(f"{RATE_EXCEEDED}: Expo asked to slow down"))
            else:
                out.append(Refused((ticket.error or "error") + ": " + (ticket.message or ""),
                                   gone=message["to"] if ticket.error == DEVICE_GONE else None))
        return out

    def forget(self, conn, gone: list[str]) -> None:
        if gone:
            conn.execute("update public.push_tokens set disabled_at = now() where token = any(%s)"
                         " and disabled_at is null", (gone,))

    def more_pending(self, conn, limit: int, exclude: list[str]) -> list[str]:
        """Other pending rows, oldest first (recent ones only: older ones are the sweep's), at most
        PER_USER to one user's devices, from a bounded look at the oldest: one account's backlog
        (waiting for its share of the rate) never fills a batch, and costs the look no more."""
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
            {"exclude": exclude, "look": limit * LOOK_FACTOR, "per_user": PER_USER, "limit": limit}).fetchall()]

    def stale_pending(self, conn, older_than: float, limit: int) -> list[str]:
        """At most STALE_PER_USER to one user's devices: a flooded account's rows waiting for its
        share never crowd out another user's lost row."""
        return [str(r["id"]) for r in conn.execute(
            """select id from (
                 select m.id, m.created_at,
                        row_number() over (partition by t.user_id order by m.created_at, m.id) as nth
                   from public.push_messages m join public.push_tokens t on t.id = m.push_token_id
                  where m.status = 'pending' and m.created_at < now() - make_interval(secs => %s)) r
                where nth <= %s order by created_at, id limit %s""",
            (older_than, STALE_PER_USER, limit)).fetchall()]

    def after_sweep(self, loop: SharedBackoff) -> dict:
        return {"receipts": self.check_receipts(loop)}

    def check_receipts(self, loop: SharedBackoff | None, older_than: float = RECEIPTS_AFTER,
                       limit: int = MAX_RECEIPTS) -> int:
        """Receipts of sent messages, in batches: ok or error; DeviceNotRegistered turns the device off."""
        with get_pool(self.database_url).connection() as conn:
            pending = [(str(r["id"]), r["ticket_id"], r["token"]) for r in conn.execute(
                """select m.id, m.ticket_id, t.token from public.push_messages m
                     join public.push_tokens t on t.id = m.push_token_id
                    where m.status = 'sent' and m.receipt_status is null and m.ticket_id is not null
                      and m.sent_at < now() - make_interval(secs => %s)
                      and m.sent_at > now() - interval '1 day'
                    order by m.sent_at limit %s""", (older_than, limit)).fetchall()]
            conn.commit()
            if not pending:
                return 0
            turn = loop.turn() if loop is not None else None
            if turn is not None and turn.wait > 0:  # Expo gave no answer lately: asked at a later sweep
                return 0
            try:
                receipts = self.client.receipts([ticket for _, ticket, _ in pending])
            except ExpoUnavailable as exc:
                if turn is not None:
                    loop.failed(turn, exc.retry_after)
                log.info("push: receipts not read, Expo unavailable", error=str(exc))
                return 0
            if turn is not None:
                loop.succeeded()
            recorded, gone = [], []
            for mid, ticket, token in pending:
                receipt = receipts.get(ticket)
                if receipt is None:
                    continue  # not ready yet: asked again next time
                if receipt.ok:
                    recorded.append((mid, "ok", None))
                else:
                    recorded.append((mid, "error", f"receipt: {receipt.error or receipt.message}"))
                    if receipt.error == DEVICE_GONE:
                        gone.append(token)
            self.forget(conn, gone)
            if recorded:
                conn.cursor().executemany(
                    """update public.push_messages set receipt_status = %s,
                              last_error = coalesce(%s, last_error) where id = %s""",
                    [(status, error, mid) for mid, status, error in recorded])
            conn.commit()
            return len(recorded)
