"""LiveKit usage tasks: the beat's check (queue `sweeps`) and the alert emails (queue `notifications`).

`callflow.check_usage` (beat, every USAGE_CHECK_SECONDS): refreshes the peak rollup, snapshots the
month so far for /metrics, and records the 80 %/100 % thresholds reached (`orchestration.usage`);
each new alert with CALLFLOW_OPS_EMAIL set becomes a `callflow.send_usage_alert [alert_id]`,
delivered like a missed-call email (same mailer, same rate limit, one Idempotency-Key per alert).
"""

from __future__ import annotations

import uuid

from config.logging import get_logger
from orchestration import names
from orchestration.notifications.service import MAX_ATTEMPTS, backoff
from orchestration.usage.alerts import deliver
from orchestration.usage.check import check_usage as run_check
from orchestration.usage.plans import plan_named
from workers.app import app, settings
from workers.tasks.notifications import ports, resend_loop

log = get_logger("callflow.usage")

USAGE_CHECK_SECONDS = 60


@app.task(name=names.CHECK_USAGE, queue=names.Q_SWEEPS, ignore_result=True)
def check_usage() -> dict:
    usage, to_send = run_check(settings.database_url, plan_named(settings.callflow_livekit_plan),
                               settings.callflow_ops_email)
    for alert_id in to_send:
        send_usage_alert.apply_async(args=[alert_id])
    return {"participant_minutes": usage.participant_minutes, "peak": usage.peak_concurrent_participants,
            "alerts_sent": len(to_send)}


@app.task(name=names.SEND_USAGE_ALERT, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, queue=names.Q_NOTIFICATIONS, ignore_result=True)
def send_usage_alert(self, alert_id: str, failures: int = 0) -> str:
    try:
        alert_id = str(uuid.UUID(str(alert_id)))
    except ValueError:
        log.warning("send_usage_alert: not an alert id", alert_id=str(alert_id)[:64])
        return "missing"
    mailer, bucket, _ = ports()
    try:
        outcome = deliver(alert_id, database_url=settings.database_url, mailer=mailer, bucket=bucket,
                          sender=settings.callflow_email_from, app_url=settings.callflow_app_url, failures=failures,
                          resend_loop=resend_loop())
    except Exception as exc:  # noqa: BLE001 - database or Redis trouble: the row stays pending
        if failures + 1 >= MAX_ATTEMPTS:
            log.error("send_usage_alert gave up; the usage check will retry", error=repr(exc)[:300])
            return "error"
        raise self.retry(countdown=backoff(failures), kwargs={"failures": failures + 1}) from None
    if outcome.kind == "retry":
        raise self.retry(countdown=outcome.countdown, kwargs={"failures": failures + 1})
    if outcome.kind == "throttled":
        raise self.retry(countdown=outcome.countdown, kwargs={"failures": failures})
    return outcome.kind
