"""/metrics: what retention pruned and the oldest row each table keeps, read from Redis (the prune
task writes both), so any process's scrape shows the deployment's, as `orchestration.ops.queues`.

- `callflow_retention_pruned_rows_total{table}`: rows deleted since the counters began.
- `callflow_retention_oldest_row_age_seconds{table}`: age of the oldest row kept of those retention
  applies to (for the outboxes, finished rows, as of the last full pass; for usage deltas, the
  oldest not folded yet). Near CALLFLOW_RETENTION_DAYS when pruning keeps up; absent while not
  known (no pass over the table yet, or no such row).
"""

from __future__ import annotations

import time

import redis
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orchestration import names
from orchestration.retention.walks import TABLES


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RetentionCollector:
    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def collect(self):
        try:
            pipe = self.client.pipeline()
            pipe.hgetall(names.RETENTION_PRUNED)
            pipe.hgetall(names.RETENTION_OLDEST)
            pruned, oldest = pipe.execute()
        except redis.RedisError:
            return  # Redis down: no figures rather than a failed scrape
        pruned = {_text(k): int(v) for k, v in pruned.items()}
        oldest = {_text(k): float(v) for k, v in oldest.items()}
        now = time.time()
        rows = CounterMetricFamily("callflow_retention_pruned_rows", "Rows deleted by retention, per table",
                                   labels=["table"])
        for table in TABLES:
            rows.add_metric([table], pruned.get(table, 0))
        yield rows
        age = GaugeMetricFamily("callflow_retention_oldest_row_age_seconds",
                                "Age of the oldest row retention applies to that is kept, per table",
                                labels=["table"])
        for table in TABLES:
            if table in oldest:
                age.add_metric([table], max(0.0, now - oldest[table]))
        yield age


_collector: RetentionCollector | None = None


def register(registry=REGISTRY) -> RetentionCollector:
    """Registers the collector once (importing `workers.web.health` does it for the web process)."""
    global _collector
    if _collector is None:
        from config.settings import get_settings

        _collector = RetentionCollector(get_settings().redis_url)
        registry.register(_collector)
    return _collector
