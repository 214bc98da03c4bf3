"""LiveKit usage: the beat's check (queue `sweeps`).

`callflow.check_usage` (beat, every USAGE_CHECK_SECONDS): refreshes the peak rollup, snapshots the
month so far for /metrics, and records the 80 %/100 % thresholds reached (`orchestration.usage`);
each new alert with CALLFLOW_OPS_EMAIL set is a row of the usage alert channel, delivered like any
outbox row (`callflow.deliver ["usage_alert", [alert_id]]`, workers/tasks/delivery.py).
"""

from __future__ import annotations

from orchestration import names
from orchestration.channels.usage_alert_email import UsageAlertEmailChannel
from orchestration.usage.check import check_usage as run_check
from orchestration.usage.plans import plan_named
from workers.app import app, settings
from workers.tasks.delivery import send

USAGE_CHECK_SECONDS = 60


@app.task(name=names.CHECK_USAGE, queue=names.Q_SWEEPS, ignore_result=True)
def check_usage() -> dict:
    usage, to_send = run_check(settings.database_url, plan_named(settings.callflow_livekit_plan),
                               settings.callflow_ops_email)
    if usage is None:
        return {"folding": True}  # a backlog of changes: folded over the next checks
    for alert_id in to_send:
        send(UsageAlertEmailChannel.name, [alert_id])
    return {"participant_minutes": usage.participant_minutes, "peak": usage.peak_concurrent_participants,
            "alerts_sent": len(to_send)}
