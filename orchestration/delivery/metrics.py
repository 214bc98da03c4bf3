"""/metrics: what the delivery loop did, every channel, all workers: `callflow_deliveries_total
{channel,status}` (rows `sent`, `failed`, `skipped`), counted in Redis by the run that recorded
them, read at each scrape, as `orchestration.ops.queues` counts task outcomes.

Counted, not read from the outboxes: a count of a year of `push_messages` by status was a
1.3-second scan of 10,000,000 rows every scrape (issue 26). The outboxes' backlog (pending rows)
is cheap to read and stays a gauge (`callflow_pushes{kind,status="pending"}`, push/metrics.py).
"""

from __future__ import annotations

from collections import Counter

import redis
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily

from orchestration import names


def add_counts(pipe, channel: str, statuses: list[str]) -> None:
    """Queues on `pipe` (run after the outcome's commit, with the run's other marks) one increment per
    (channel, status). A Redis that does not answer loses these counts, never the run."""
    for status, n in Counter(statuses).items():
        pipe.hincrby(names.DELIVERY_OUTCOMES, f"{channel}:{status}", n)


class DeliveryCollector:
    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def collect(self):
        try:
            counts = self.client.hgetall(names.DELIVERY_OUTCOMES)
        except redis.RedisError:
            return  # Redis down: no figures rather than a failed scrape
        family = CounterMetricFamily("callflow_deliveries", "Outbox rows delivered, by channel and outcome "
                                     "(sent, failed, skipped), all workers", labels=["channel", "status"])
        for key, n in sorted(counts.items()):
            channel, _, status = (key.decode() if isinstance(key, bytes) else key).rpartition(":")
            family.add_metric([channel, status], int(n))
        yield family


_collector: DeliveryCollector | None = None


def register(registry=REGISTRY) -> DeliveryCollector:
    """Registers the collector once (importing `workers.web.health` does it for the web process)."""
    global _collector
    if _collector is None:
        from config.settings import get_settings

        _collector = DeliveryCollector(get_settings().redis_url)
        registry.register(_collector)
    return _collector
