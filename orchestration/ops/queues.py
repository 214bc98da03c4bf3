"""Prometheus figures kept in Redis, so any process's `/metrics` shows the whole deployment.

- Queue depth and the age of each queue's oldest message are read from the broker's lists at
  scrape time (kombu's Redis transport LPUSHes and BRPOPs: the right end is the oldest).
- Task outcomes are counted by every worker into one Redis hash (`record_outcome`).

A message's age comes from its `published_at` header (set by `workers.app` on every message Celery
publishes); messages without one (the pre-built messages of the webhook consumer and the listener)
are aged from the first scrape that saw them at the head of the queue.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orchestration import names
from orchestration.ingest.backlog import CHANGES, WEBHOOK_EVENTS

BACKLOGS = {"invitation_changes": CHANGES, "webhook_events": WEBHOOK_EVENTS}

OUTCOMES_KEY = names.OPS_TASK_OUTCOMES
FIRST_SEEN_KEY = names.OPS_OLDEST_SEEN
UNACKED_KEY = "unacked"  # kombu's hash of messages delivered to a worker and not acked yet
PUBLISHED_AT_HEADER = "published_at"


def record_outcome(client: redis.Redis, task_name: str, outcome: str) -> None:
    """One task outcome (`succeeded`, `retried`, `failed`, `rejected`), counted for everybody."""
    client.hincrby(OUTCOMES_KEY, f"{task_name}|{outcome}", 1)


def _published_at(raw: bytes | str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)["headers"].get(PUBLISHED_AT_HEADER)
        return float(value) if value is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _tag(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw)["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return str(hash(raw))


def queue_stats(client: redis.Redis, queues: Iterable[str], now: float | None = None) -> dict[str, tuple[int, float]]:
    """{queue: (depth, age in seconds of its oldest message)}."""
    now = time.time() if now is None else now
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
        pipe.lindex(name, -1)
    pipe.hgetall(FIRST_SEEN_KEY)
    *replies, first_seen = pipe.execute()
    first_seen = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in first_seen.items()}
    stats: dict[str, tuple[int, float]] = {}
    updates: dict[str, str] = {}
    for i, name in enumerate(names):
        depth, oldest = int(replies[2 * i]), replies[2 * i + 1]
        if oldest is None:
            stats[name] = (depth, 0.0)
            continue
        published = _published_at(oldest)
        if published is not None:
            stats[name] = (depth, max(0.0, now - published))
            continue
        tag = _tag(oldest)
        seen_tag, _, seen_at = first_seen.get(name, "").partition(" ")
        if seen_tag == tag:
            stats[name] = (depth, max(0.0, now - float(seen_at)))
        else:
            updates[name] = f"{tag} {now:.3f}"
            stats[name] = (depth, 0.0)
    if updates:
        client.hset(FIRST_SEEN_KEY, mapping=updates)
    return stats


def task_outcomes(client: redis.Redis) -> dict[tuple[str, str], int]:
    out = {}
    for field, value in client.hgetall(OUTCOMES_KEY).items():
        field = field.decode() if isinstance(field, bytes) else field
        task, _, outcome = field.partition("|")
        out[(task, outcome)] = int(value)
    return out


class OperationsCollector:
    """prometheus_client collector: `callflow_queue_depth`, `callflow_queue_oldest_age_seconds`,
    `callflow_backlog_depth`, `callflow_tasks_reserved` and `callflow_task_outcomes_total`, read
    from Redis at each scrape."""

    def __init__(self, redis_url: str, queues: Iterable[str]) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.queues = tuple(queues)

    def collect(self):
        depth = GaugeMetricFamily("callflow_queue_depth", "Messages waiting in each Celery queue (all workers)",
                                  labels=["queue"])
        age = GaugeMetricFamily("callflow_queue_oldest_age_seconds",
                                "Age of the oldest waiting message of each queue", labels=["queue"])
        # Items waiting in the backlogs the workers take in batches (orchestration/ingest/backlog.py):
        # a queue holds one nudge for any number of them.
        backlog = GaugeMetricFamily("callflow_backlog_depth", "Items waiting in each backlog workers take in batches",
                                    labels=["backlog"])
        reserved = GaugeMetricFamily("callflow_tasks_reserved",
                                     "Messages delivered to workers and not acked yet (running, prefetched, countdowns)")
        outcomes = CounterMetricFamily("callflow_task_outcomes", "Task runs by outcome, all workers",
                                       labels=["task", "outcome"])
        try:
            stats = queue_stats(self.client, self.queues)
            held = int(self.client.hlen(UNACKED_KEY))
            backlogs = {name: int(self.client.llen(keys.items)) for name, keys in BACKLOGS.items()}
            counts = task_outcomes(self.client)
        except redis.RedisError:
            return  # Redis down: no figures rather than a failed scrape (readyz says why)
        for name, (n, oldest) in stats.items():
            depth.add_metric([name], n)
            age.add_metric([name], oldest)
        for name, n in backlogs.items():
            backlog.add_metric([name], n)
        reserved.add_metric([], held)
        for (task, outcome), n in sorted(counts.items()):
            outcomes.add_metric([task, outcome], n)
        yield depth
        yield age
        yield backlog
        yield reserved
        yield outcomes


_registered: OperationsCollector | None = None


def register(queues: Iterable[str], registry=None) -> OperationsCollector:
    """Registers the collector once, for these Celery queues (the `web` process, for `/metrics`,
    with `workers.queues.QUEUES`: the queue names are the process layer's to say)."""
    global _registered
    if _registered is None:
        from prometheus_client import REGISTRY

        from config.settings import get_settings

        _registered = OperationsCollector(get_settings().redis_url, queues)
        (registry or REGISTRY).register(_registered)
    return _registered
