"""Usage alerts: 80 % and 100 % of the plan's included minutes and of its concurrency cap.

`record_crossings` runs in the beat's usage check: each threshold a month's figures reached gets
one `callflow_usage_alerts` row (unique per month, measure, threshold: at most once each, whichever
beat replica or command sees it first), a warning log line, and, with CALLFLOW_OPS_EMAIL set, a
`pending` row of the usage alert channel (`orchestration/channels/usage_alert_email.py`), delivered
like every outbox (`orchestration/delivery`).
"""

from __future__ import annotations

import psycopg

from config.logging import get_logger
from orchestration.channels.usage_alert_email import LABELS
from orchestration.usage.figures import thresholds_crossed
from orchestration.usage.report import MonthUsage

log = get_logger("callflow.usage")


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
        log.warning(f"LiveKit usage: {LABELS[measure][0]} at {threshold}% of the {usage.plan.name} plan's "
                    f"{LABELS[measure][1]}", month=usage.month.strftime("%Y-%m"), measure=measure,
                    threshold_percent=threshold, value=value, limit=limit, plan=usage.plan.name,
                    alert_id=str(row["id"]), emailed=bool(ops_email))
        if ops_email:
            to_send.append(str(row["id"]))
    return to_send
