"""Missed-call emails: the outbox row's delivery through Resend (or the development outbox).

- `rendering`: subject, HTML and text from `orchestration/templates/missed_call.*`;
- `mailers`: `ResendMailer` (the `resend` SDK) and `OutboxMailer` (`.eml` files in development);
- `ratelimit`: the Redis token bucket shared by all workers;
- `store`: the SQL of `public.notifications`;
- `service`: `deliver()` (one attempt at one row) and `sweep_lost()` (pending rows whose task got
  lost).
"""

from __future__ import annotations

from config.settings import Settings
from orchestration.notifications.mailers import OutboxMailer, ResendMailer
from orchestration.notifications.ratelimit import TokenBucket


def mailer_from_settings(settings: Settings) -> ResendMailer | OutboxMailer:
    """Resend when RESEND_API_KEY is set; else (development only: production requires the key)
    the `.eml` outbox in CALLFLOW_OUTBOX_DIR."""
    if settings.resend_api_key is not None and settings.resend_api_key.get_secret_value().strip():
        return ResendMailer(settings.resend_api_key.get_secret_value().strip(), settings.resend_api_url,
                            configured_rate=settings.callflow_email_rate_per_second)
    return OutboxMailer(settings.callflow_outbox_dir)


def bucket_from_settings(settings: Settings) -> TokenBucket:
    return TokenBucket.from_url(settings.redis_url, settings.callflow_email_rate_per_second)
