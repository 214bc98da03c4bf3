"""Email through Resend, for the email channels (orchestration/channels):

- `rendering`: subject, HTML and text of a missed-call email (`orchestration/templates/missed_call.*`);
- `mailers`: `ResendMailer` (the `resend` SDK) and `OutboxMailer` (`.eml` files in development), and
  Resend as a delivery provider (its rate and retry loop);
- `retry` and `store`: `callflow notifications retry`.
"""

from __future__ import annotations

from config.settings import Settings
from orchestration.notifications.mailers import OutboxMailer, ResendMailer


def mailer_from_settings(settings: Settings) -> ResendMailer | OutboxMailer:
    """Resend when RESEND_API_KEY is set; else (development only: production requires the key)
    the `.eml` outbox in CALLFLOW_OUTBOX_DIR."""
    if settings.resend_api_key is not None and settings.resend_api_key.get_secret_value().strip():
        return ResendMailer(settings.resend_api_key.get_secret_value().strip(), settings.resend_api_url,
                            configured_rate=settings.callflow_email_rate_per_second)
    return OutboxMailer(settings.callflow_outbox_dir)
