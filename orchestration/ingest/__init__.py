"""Ingest of invitation changes (Realtime / Postgres LISTEN / catch-up) into lifecycle tasks.

- `mapping`: pure mapping of a change to the task payload and its dedupe key;
- `sink`: Redis dedupe + enqueue (one atomic script), watermark, catch-up query;
- `heartbeat`: the listener heartbeat in Redis, its doctor check and Prometheus collector.
"""

from orchestration.ingest.heartbeat import ListenerCollector, listener_check, listener_heartbeat
from orchestration.ingest.mapping import Change, MalformedChange, dedupe_key, event_id, from_notify, from_realtime, from_row
from orchestration.ingest.sink import IngestSink, catch_up

__all__ = [
    "Change", "MalformedChange", "IngestSink", "ListenerCollector", "catch_up", "dedupe_key",
    "event_id", "from_notify", "from_realtime", "from_row", "listener_check", "listener_heartbeat",
]
