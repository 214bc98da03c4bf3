"""/metrics: the push outbox's backlog, pending rows by kind (`callflow_pushes{kind,status="pending"}`),
for the `web` process.

Read from the outbox itself (every worker writes there) through its index of pending rows, at most
every CACHE_SECONDS; a database that does not answer leaves the family out of the scrape rather
than failing it. What was sent, failed or skipped is counted as it happens
(`callflow_deliveries_total`, orchestration/delivery/metrics.py): counting a year of rows by
status took 1.3 s a scrape.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from orchestration.db import connect

CACHE_SECONDS = 10.0


class PushCollector:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._counts: list[tuple[str, str, int]] | None = None

    def _read(self) -> list[tuple[str, str, int]] | None:
        try:
            with connect(self.database_url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("set statement_timeout = 2000")
                return [(r["kind"], r["status"], r["n"]) for r in conn.execute(
                    """select kind, status, count(*) as n from public.push_messages
                        where status = 'pending' group by kind, status""").fetchall()]
        except Exception:  # noqa: BLE001 - a scrape must not fail because of us
            return None

    def collect(self):
        with self._lock:
            if time.monotonic() - self._read_at > CACHE_SECONDS:
                self._counts, self._read_at = self._read(), time.monotonic()
            counts = self._counts
        if counts is None:
            return
        family = GaugeMetricFamily("callflow_pushes", "Push outbox rows waiting to go, by kind",
                                   labels=["kind", "status"])
        for kind, status, n in counts:
            family.add_metric([kind, status], n)
        yield family


_collector: PushCollector | None = None


def register(registry=REGISTRY) -> PushCollector | None:
    global _collector
    if _collector is None:
        from config.settings import ConfigurationError, get_settings

        try:
            _collector = PushCollector(get_settings().database_url)
        except ConfigurationError:
            return None
        registry.register(_collector)
    return _collector


register()
