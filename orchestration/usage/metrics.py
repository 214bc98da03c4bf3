"""/metrics: the month's usage against the plan, for the `web` process (importing this module
registers the collector on the default REGISTRY once, as `orchestration.ingest.metrics` does).

Month-to-date minutes and the month's peak come from the snapshot the beat's usage check writes
every minute (`callflow_usage_months`), so a scrape costs one row rather than a month of sessions;
the current concurrency is counted live (open sessions: a partial index). Read at most every
CACHE_SECONDS; a database that does not answer leaves the usage gauges out of the scrape rather
than failing it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from orchestration.db import connect
from orchestration.usage import store
from orchestration.usage.figures import month_of
from orchestration.usage.plans import Plan, plan_named

CACHE_SECONDS = 15.0


class UsageCollector:
    def __init__(self, database_url: str, plan: Plan) -> None:
        self.database_url = database_url
        self.plan = plan
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._figures: dict | None = None

    def _read(self) -> dict | None:
        now = datetime.now(timezone.utc)
        try:
            with connect(self.database_url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("set statement_timeout = 2000")
                snapshot = store.read_snapshot(conn, month_of(now))
                return {"snapshot": snapshot, "concurrent": store.concurrent_now(conn, now)}
        except Exception:  # noqa: BLE001 - a scrape must not fail for this; the gauges go missing
            return None

    def figures(self) -> dict | None:
        with self._lock:
            if time.monotonic() - self._read_at >= CACHE_SECONDS:
                self._figures, self._read_at = self._read(), time.monotonic()
            return self._figures

    def collect(self):
        plan = self.plan
        labels = ["plan"]
        if plan.included_minutes is not None:
            g = GaugeMetricFamily("callflow_usage_plan_included_minutes", "Connection minutes the LiveKit plan includes a month", labels=labels)
            g.add_metric([plan.name], plan.included_minutes)
            yield g
        if plan.concurrency_cap is not None:
            g = GaugeMetricFamily("callflow_usage_plan_concurrency_cap", "Concurrent participants the LiveKit plan allows", labels=labels)
            g.add_metric([plan.name], plan.concurrency_cap)
            yield g
        figures = self.figures()
        if figures is None:
            return
        g = GaugeMetricFamily("callflow_usage_concurrent_participants", "Participants connected now (open sessions)")
        g.add_metric([], figures["concurrent"])
        yield g
        snapshot = figures["snapshot"]
        if snapshot is None:
            return  # no usage check has run this month yet
        g = GaugeMetricFamily("callflow_usage_participant_minutes",
                              "Participant-minutes of the current UTC month, as of the last usage check", labels=labels)
        g.add_metric([plan.name], snapshot["participant_minutes"])
        yield g
        g = GaugeMetricFamily("callflow_usage_peak_concurrent_participants",
                              "Peak concurrent participants of the current UTC month, as of the last usage check",
                              labels=labels)
        g.add_metric([plan.name], snapshot["peak_concurrent_participants"])
        yield g
        g = GaugeMetricFamily("callflow_usage_computed_timestamp_seconds", "When the last usage check ran (Unix time)")
        g.add_metric([], snapshot["computed_at"].timestamp())
        yield g


_collector: UsageCollector | None = None


def register(registry=REGISTRY) -> UsageCollector:
    """Registers the collector once (importing `workers.web.health` does it for the web process)."""
    global _collector
    if _collector is None:
        from config.settings import get_settings

        settings = get_settings()
        _collector = UsageCollector(settings.database_url, plan_named(settings.callflow_livekit_plan))
        registry.register(_collector)
    return _collector


register()
