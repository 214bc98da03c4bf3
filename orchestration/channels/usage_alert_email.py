"""The usage alert channel: `callflow_usage_alerts` rows emailed to CALLFLOW_OPS_EMAIL.

The beat's usage check records each threshold a month reached once (`orchestration.usage.alerts`);
a row with a recipient is `pending` and goes out through the same Resend account as missed-call
emails: the same rate and retry loop, one Idempotency-Key per row.
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta

from orchestration import names
from orchestration.delivery.channel import Channel, Provider, Record
from orchestration.notifications import mailer_from_settings
from orchestration.notifications.mailers import OutgoingEmail, resend_provider, send_email

LABELS = {"participant_minutes": ("participant-minutes", "included minutes"),
          "concurrent_participants": ("peak concurrent participants", "concurrency cap")}


def idempotency_key(alert_id: str) -> str:
    return f"callflow-usage-alert-{alert_id}"


def compose(row: dict, sender: str, app_url: str) -> OutgoingEmail:
    """The alert email: a pure function of the row, so every attempt sends the same body."""
    what, of_what = LABELS[row["measure"]]
    month = row["month"].strftime("%Y-%m")
    subject = (f"LiveKit usage: {what} at {row['threshold_percent']}% of the {row['plan']} plan ({month})")
    lines = [
        f"callflow's LiveKit usage for {month} (UTC) reached {row['threshold_percent']}% of the "
        f"{row['plan']} plan's {of_what}: {row['value']:,} of {row['limit_value']:,}.",
        "",
        ("Past the concurrency cap LiveKit refuses new participants: calls start failing."
         if row["measure"] == "concurrent_participants" else
         "Past the included minutes LiveKit bills overage, or on a free plan stops serving the project."),
        "Run `callflow usage` for the month's figures and estimated bill, and change the plan "
        "(CALLFLOW_LIVEKIT_PLAN follows it) before the wall.",
        "",
        app_url,
    ]
    text = "\n".join(lines) + "\n"
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines if line)
    return OutgoingEmail(notification_id=str(row["id"]), idempotency_key=idempotency_key(str(row["id"])),
                         sender=sender, to=row["recipient_email"], subject=subject,
                         html=f"<!doctype html><html><body>{body}</body></html>", text=text,
                         tags=(("kind", "usage_alert"), ("alert_id", str(row["id"]))))


class UsageAlertEmailChannel(Channel):
    name = names.CHANNEL_USAGE_ALERT
    queue = names.CHANNEL_QUEUES[name]
    table = "callflow_usage_alerts"
    provider_id_column = "provider_message_id"
    rows_sql = "select a.*, a.id::text as id from public.callflow_usage_alerts a where a.id = any(%s::uuid[])"
    rows_alias = "a"
    expiry = timedelta(hours=23)
    stale_after = 60.0  # a handful a month: a minute without an answer means its task was lost
    resend_every = 60
    sweep_every = 60.0

    def __init__(self, mailer, provider: Provider, sender: str, app_url: str) -> None:
        self.mailer, self.provider, self.sender, self.app_url = mailer, provider, sender, app_url
        self.limited = mailer.rate_limited

    @classmethod
    def from_settings(cls, settings) -> "UsageAlertEmailChannel":
        return cls(mailer_from_settings(settings), resend_provider(settings), settings.callflow_email_from,
                   settings.callflow_app_url)

    def compose(self, row: Record, now: datetime) -> OutgoingEmail:
        return compose(row, self.sender, self.app_url)

    def send(self, messages: list[OutgoingEmail]):
        return send_email(self.mailer, messages[0])
