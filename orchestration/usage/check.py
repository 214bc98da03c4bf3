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


# How long one check may spend folding a backlog of changes into the rollup: the rest waits for the
# next check (beat runs it every minute, and it expires after 50 s).
FOLD_SECONDS = 5.0


def check_usage(database_url: str, plan: Plan, ops_email: str | None,
                now: datetime | None = None, fold_seconds: float = FOLD_SECONDS,
                fold_batches: int | None = None) -> tuple[MonthUsage | None, list[str]]:
    """None while a backlog is still being folded: figures of a half-folded rollup are neither kept
    for /metrics nor alerted on (its `computed_at` shows how old the last figures are)."""
    now = now or datetime.now(timezone.utc)
    with get_pool(database_url).connection() as conn:
        if store.fold(conn, max_batches=fold_batches, max_seconds=fold_seconds).more:
            return None, []
        usage = month_usage(conn, plan, month_of(now), now)
        store.save_snapshot(conn, usage)
        to_send = record_crossings(conn, usage, ops_email)  # a lost one: the outbox sweep's
    return usage, to_send
