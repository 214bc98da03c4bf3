"""What every push channel shares (Expo, APNs VoIP, FCM): the `push_messages` outbox rows of one
provider's devices (`push_tokens.provider`), and the rules of a push.

- an `incoming_call` goes only while its call rings and before its ring deadline: a push that would
  arrive later is `skipped`, never sent late; a disabled device gets nothing;
- each callee gets a share of its provider's rate (`Shares`: one account's flood never books the
  line ahead of another user's ring), the kind that stops being of use soonest first;
- a device the provider says is gone is turned off (`forget`);
- a first try tops its batch up with other pending rows of the same provider, at most PER_USER to
  one user's devices; the sweep takes at most STALE_PER_USER of one user's.

A provider's channel (orchestration/channels/) adds how it composes and sends.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from orchestration.delivery.channel import Channel, Record
from orchestration.delivery.rate import Shares
from orchestration.push.messages import CALL_ENDED_TTL

SHARE_STEP_SECONDS = 0.5
KIND_ORDER = {"incoming_call": 0, "call_ended": 1, "missed_call": 2}
PER_USER = 10          # a top-up takes at most this many rows to one user's devices (one ring of 10)...
LOOK_FACTOR = 5        # ...from the oldest `limit` x this many pending rows
STALE_PER_USER = 100   # the sweep's pick: at most this many rows to one user's devices

_ROWS = """
select m.id::text as id, m.kind, m.status, m.attempts, m.created_at, t.token, t.provider,
       t.user_id::text as user_id, t.disabled_at is not null as token_disabled,
       i.id::text as invitation_id, i.room_name, i.call_type, i.caller_id::text as caller_id,
       i.status as invitation_status, i.end_reason, i.ring_deadline,
       coalesce(nullif(btrim(u.raw_user_meta_data->>'full_name'), ''), nullif(btrim(u.raw_user_meta_data->>'name'), ''),
                split_part(u.email, '@', 1), 'Someone') as caller_name
  from public.push_messages m
  join public.push_tokens t on t.id = m.push_token_id
  join public.call_invitations i on i.id = m.invitation_id
  left join auth.users u on u.id = i.caller_id
 where m.id = any(%s::uuid[]) and t.provider = '{provider}'
 order by m.created_at, m.id
"""


def skip_reason(row, at: datetime) -> str | None:
    if row.token_disabled:
        return "the device was unregistered"
    if row.kind == "incoming_call":
        if row.invitation_status != "ringing":
            return f"the call stopped ringing ({row.invitation_status}) before the push could go"
        if row.ring_deadline is not None and at >= row.ring_deadline:
            return "the ring deadline passed before the push could go"
    return None


class PushChannel(Channel):
    """The `push_messages` rows of one provider's devices."""

    provider_name: str           # push_tokens.provider
    table = "push_messages"
    provider_id_column = "ticket_id"
    rows_alias = "m"
    booking_horizon = None       # a batch books however far the line reaches
    stale_after = 10.0
    resend_every = 30
    shares = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "provider_name", None):
            cls.rows_sql = _ROWS.replace("{provider}", cls.provider_name)

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

    def forget(self, conn, gone: list[str]) -> None:
        if gone:
            conn.execute("update public.push_tokens set disabled_at = now() where provider = %s"
                         " and token = any(%s) and disabled_at is null", (self.provider_name, gone))

    def more_pending(self, conn, limit: int, exclude: list[str]) -> list[str]:
        """Other pending rows of this provider, oldest first (recent ones only: older ones are the
        sweep's), at most PER_USER to one user's devices, from a bounded look at the oldest: one
        account's backlog (waiting for its share of the rate) never fills a batch."""
        return [str(r["id"]) for r in conn.execute(
            """select id from (
                 select m.id, m.created_at,
                        row_number() over (partition by t.user_id order by m.created_at, m.id) as nth
                   from (select id, push_token_id, created_at from public.push_messages
                          where status = 'pending' and created_at > now() - interval '5 minutes'
                            and id <> all(%(exclude)s::uuid[])
                          order by created_at limit %(look)s) m
                   join public.push_tokens t on t.id = m.push_token_id and t.provider = %(provider)s) r
                where nth <= %(per_user)s order by created_at, id limit %(limit)s""",
            {"exclude": exclude, "look": limit * LOOK_FACTOR, "per_user": PER_USER, "limit": limit,
             "provider": self.provider_name}).fetchall()]

    def stale_pending(self, conn, older_than: float, limit: int) -> list[str]:
        """At most STALE_PER_USER to one user's devices: a flooded account's rows waiting for its
        share never crowd out another user's lost row."""
        return [str(r["id"]) for r in conn.execute(
            """select id from (
                 select m.id, m.created_at,
                        row_number() over (partition by t.user_id order by m.created_at, m.id) as nth
                   from public.push_messages m
                   join public.push_tokens t on t.id = m.push_token_id and t.provider = %s
                  where m.status = 'pending' and m.created_at < now() - make_interval(secs => %s)) r
                where nth <= %s order by created_at, id limit %s""",
            (self.provider_name, older_than, STALE_PER_USER, limit)).fetchall()]
