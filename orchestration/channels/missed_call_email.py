"""The missed-call email channel: `public.notifications` rows through Resend (or `.eml` files).

A row is born by the lifecycle when a callee missed a call (`domain.notices` decided the repeat
window); as it goes, it is asked again whether the invitation still calls for an email and whether
the recipient has turned emails off since. One email per request, one Idempotency-Key per row
(Resend answers a repeat with its first answer, for 24 hours: a row pending 23 hours fails).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from orchestration import names
from orchestration.delivery.channel import Channel, Provider, Record
from orchestration.domain import notices
from orchestration.domain.model import deserves_missed_call_email
from orchestration.notifications import mailer_from_settings
from orchestration.notifications.mailers import OutgoingEmail, idempotency_key, resend_provider, send_email
from orchestration.notifications.rendering import MissedCall, display_name, recipient_zone, render_missed_call

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
 where n.id = any(%s::uuid[])
 order by n.created_at
"""


def skip_reason(row: dict) -> str | None:
    """Why this row gets no email, or None when it gets one: asked again as it is sent (the
    recipient may have turned emails off since the row was born). The repeat window was the
    birth's to decide (`domain.notices`)."""
    if not deserves_missed_call_email(row["invitation_status"], row["ringing_at"], row["ended_at"]):
        return f"invitation {row['invitation_status']} does not call for a missed-call email"
    if notices.opted_out(row["callee_meta"]):
        return notices.OPTED_OUT["email"]
    if not notices.has_address(row["recipient_email"]):
        return notices.NO_ADDRESS
    return None


def compose(row: dict, sender: str, app_url: str) -> OutgoingEmail:
    """The email for an outbox row: a pure function of the row (same body on every attempt)."""
    callee_meta = row["callee_meta"] if isinstance(row["callee_meta"], dict) else {}
    call = MissedCall(
        caller_name=display_name(row["caller_meta"]),
        callee_name=display_name(callee_meta),
        call_type=row["call_type"],
        outcome=row["invitation_status"],
        at=row["ringing_at"] or row["invited_at"],
        zone=recipient_zone(callee_meta),
        app_url=app_url,
    )
    rendered = render_missed_call(call)
    return OutgoingEmail(
        notification_id=row["id"],
        idempotency_key=idempotency_key(row["id"]),
        sender=sender,
        to=row["recipient_email"],
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        tags=(("kind", row["kind"]), ("notification_id", row["id"])),
    )


class MissedCallEmailChannel(Channel):
    name = names.CHANNEL_EMAIL
    queue = names.CHANNEL_QUEUES[name]
    table = "notifications"
    provider_id_column = "provider_message_id"
    rows_sql, rows_alias = _LOAD, "n"
    expiry = timedelta(hours=23)  # Resend keeps idempotency keys 24 hours
    stale_after = 10.0
    resend_every = 60

    def __init__(self, mailer, provider: Provider, sender: str, app_url: str) -> None:
        self.mailer, self.provider, self.sender, self.app_url = mailer, provider, sender, app_url
        self.limited = mailer.rate_limited  # the development outbox has no rate and no retry loop

    @classmethod
    def from_settings(cls, settings) -> "MissedCallEmailChannel":
        return cls(mailer_from_settings(settings), resend_provider(settings), settings.callflow_email_from,
                   settings.callflow_app_url)

    def skip_reason(self, row: Record, now: datetime, at: datetime) -> str | None:
        return skip_reason(row)

    def compose(self, row: Record, now: datetime) -> OutgoingEmail:
        return compose(row, self.sender, self.app_url)

    def send(self, messages: list[OutgoingEmail]):
        return send_email(self.mailer, messages[0])

    def describe_sent(self, row, message: OutgoingEmail, result) -> dict:
        if self.limited:
            return {}
        # Development: say where the email went (the `.eml` file) and what it says.
        path = self.mailer.path_for(row.id) if hasattr(self.mailer, "path_for") else result.provider_id
        return {"to": message.to, "subject": message.subject, "path": str(path)}
