"""Importing this module registers the listener-heartbeat collector on prometheus_client's default
REGISTRY (once), reading the heartbeats from `REDIS_URL`: the `web` process imports it for `/metrics`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

from config.settings import get_settings
from orchestration.ingest.heartbeat import ListenerCollector

_collector: ListenerCollector | None = None


def register(registry=REGISTRY) -> ListenerCollector:
    global _collector
    if _collector is None:
        _collector = ListenerCollector(get_settings().redis_url)
        registry.register(_collector)
    return _collector


register()
