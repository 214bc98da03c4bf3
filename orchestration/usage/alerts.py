"""Usage alerts: 80 % and 100 % of the plan's included minutes and of its concurrency cap.

`record_crossings` runs in the beat's usage check: each threshold a month's figures reached gets
one `callflow_usage_alerts` row (unique per month, measure, threshold: at most once each, whichever
beat replica or command sees it first), a warning log line, and, with CALLFLOW_OPS_EMAIL set, an
email. The email goes out as missed-call emails do (`orchestration.notifications`): the same
mailers (Resend, or `.eml` files in development), the same Redis token bucket (one Resend account,
one rate), one Idempotency-Key per row, the row locked from read to recorded outcome.
"""

from __future__ import annotations

import html
import random
from datetime import datetime, timezone
from typing import Protocol

import psycopg

from config.logging import get_logger
from orchestration.db import get_pool
from orchestration.notifications.mailers import OutgoingEmail, PermanentSendError, RetryableSendError
from orchestration.notifications.service import EXPIRY, Mailer, Outcome, backoff
from orchestration.shared_backoff import SharedBackoff
from orchestration.usage.figures import thresholds_crossed
from orchestration.usage.report import MonthUsage

log = get_logger("callflow.usage")

LOST_AFTER_SECONDS = 60  # a pending alert this old without an answer had its task lost: send again


class Bucket(Protocol):
    """The Resend token bucket shared with missed-call emails (`TokenBucket`)."""

    def try_acquire(self) -> float: ...

    def hold_off(self, seconds: float) -> None: ...


_LABELS = {"participant_minutes": ("participant-minutes", "included minutes"),
           "concurrent_participants": ("peak concurrent participants", "concurrency cap")}


def record_crossings(conn: psycopg.Connection, usage: MonthUsage, ops_email: str | None) -> list[str]:
    """Records the thresholds newly reached; returns the ids of the alerts to email."""
    to_send = []
    for measure, threshold, value, limit in thresholds_crossed(usage.plan, usage.participant_minutes,
                                                               usage.peak_concurrent_participants):
        row = conn.execute(
            """insert into public.callflow_usage_alerts
                 (month, measure, threshold_percent, plan, value, limit_value, recipient_email, status, last_error)
               values (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               on conflict (month, measure, threshold_percent) do nothing returning id""",
            (usage.month, measure, threshold, usage.plan.name, value, limit, ops_email,
             "pending" if ops_email else "skipped", None if ops_email else "CALLFLOW_OPS_EMAIL is not set"),
        ).fetchone()
        conn.commit()
        if row is None:
            continue  # already alerted this month
        log.warning(f"LiveKit usage: {_LABELS[measure][0]} at {threshold}% of the {usage.plan.name} plan's "
                    f"{_LABELS[measure][1]}", month=usage.month.strftime("%Y-%m"), measure=measure,
                    threshold_percent=threshold, value=value, limit=limit, plan=usage.plan.name,
                    alert_id=str(row["id"]), emailed=bool(ops_email))
        if ops_email:
            to_send.append(str(row["id"]))
    return to_send


def lost_pending(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        """select id from public.callflow_usage_alerts
            where status = 'pending' and created_at < now() - make_interval(secs => %s)""",
        (LOST_AFTER_SECONDS,)).fetchall()
    conn.commit()
    return [str(r["id"]) for r in rows]


def idempotency_key(alert_id: str) -> str:
    return f"callflow-usage-alert-{alert_id}"


def compose(row: dict, sender: str, app_url: str) -> OutgoingEmail:
    """The alert email: a pure function of the row, so every attempt sends the same body."""
    what, of_what = _LABELS[row["measure"]]
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


def deliver(alert_id: str, *, database_url: str, mailer: Mailer, bucket: Bucket | None, sender: str,
            app_url: str, failures: int = 0, resend_loop: SharedBackoff | None = None) -> Outcome:
    """One attempt at one alert email (see `orchestration.notifications.service.deliver`; it waits
    on the same Resend loop)."""
    turn = resend_loop.turn() if resend_loop is not None and mailer.rate_limited else None
    if turn and turn.wait > 0:  # Resend gave no answer lately: nobody asks before its loop says so
        return Outcome("throttled", "Resend gave no answer lately", countdown=turn.wait + random.uniform(0, 0.2))
    with get_pool(database_url).connection() as conn:
        row = conn.execute("select * from public.callflow_usage_alerts where id = %s for update skip locked",
                           (alert_id,)).fetchone()
        if row is None:
            status = conn.execute("select status from public.callflow_usage_alerts where id = %s",
                                  (alert_id,)).fetchone()
            if status is None:
                return Outcome("missing", "no such alert")
            return Outcome("busy" if status["status"] == "pending" else "done", f"status {status['status']}")
        if row["status"] != "pending":
            return Outcome("done", f"status is {row['status']}")
        if row["created_at"] < datetime.now(timezone.utc) - EXPIRY:
            _finish(conn, alert_id, "failed", error="expired: not delivered within 23 hours")
            return Outcome("failed", "expired")
        message = compose(row, sender, app_url)
        conn.execute("update public.callflow_usage_alerts set attempts = attempts + 1 where id = %s", (alert_id,))
        if mailer.rate_limited and bucket is not None:
            # A handful of alerts a month: no booking, just the shared rate (never sleeping on it).
            wait = bucket.try_acquire()
            if wait > 0:
                conn.rollback()
                return Outcome("throttled", "no rate-limit token yet", countdown=wait + random.uniform(0, 0.5))
        try:
            message_id = mailer.send(message)
        except PermanentSendError as exc:
            if turn is not None:
                resend_loop.succeeded()  # a refusal is an answer
            _finish(conn, alert_id, "failed", error=exc.describe())
            log.warning("usage alert email failed", alert_id=alert_id, error=exc.describe())
            return Outcome("failed", exc.describe())
        except RetryableSendError as exc:
            if exc.status == 429 and exc.retry_after and bucket is not None and mailer.rate_limited:
                bucket.hold_off(exc.retry_after)
            # No answer is not an answer: pending until EXPIRY, like a missed-call email.
            conn.execute("update public.callflow_usage_alerts set last_error = %s where id = %s",
                         (exc.describe()[:1000], alert_id))
            conn.commit()
            if turn is not None:
                countdown = resend_loop.failed(turn, exc.retry_after)
            else:
                countdown = exc.retry_after if exc.retry_after is not None else backoff(failures)
            return Outcome("retry", exc.describe(), countdown=max(countdown, 0.2) + random.uniform(0, 0.2))
        if turn is not None:
            resend_loop.succeeded()
        _finish(conn, alert_id, "sent", message_id=message_id)
        log.info("usage alert emailed", alert_id=alert_id, provider_message_id=message_id)
        return Outcome("sent", message_id=message_id)


def _finish(conn: psycopg.Connection, alert_id: str, status: str, *, error: str | None = None,
            message_id: str | None = None) -> None:
    conn.execute(
        """update public.callflow_usage_alerts
              set status = %s, last_error = coalesce(%s, last_error), provider_message_id = %s,
                  sent_at = case when %s = 'sent' then now() end
            where id = %s""",
        (status, error[:1000] if error else None, message_id, status, alert_id))
    conn.commit()
