"""The beat's usage check: refresh the rollup, compute the month so far, keep its snapshot for
/metrics, record the thresholds it reached. Returns the alert ids whose email is to be sent."""

from __future__ import annotations

from datetime import datetime, timezone

from orchestration.db import get_pool
from orchestration.usage import store
from orchestration.usage.alerts import record_crossings
from orchestration.usage.figures import month_of
from orchestration.usage.plans import Plan
from orchestration.usage.report import MonthUsage, month_usage


def check_usage(database_url: str, plan: Plan, ops_email: str | None,
                now: datetime | None = None) -> tuple[MonthUsage, list[str]]:
    now = now or datetime.now(timezone.utc)
    with get_pool(database_url).connection() as conn:
        usage = month_usage(conn, plan, month_of(now), now)
        store.save_snapshot(conn, usage)
        to_send = record_crossings(conn, usage, ops_email)  # a lost one: the outbox sweep's
    return usage, to_send
