"""The listener's heartbeat in Redis, and what reads it: `callflow doctor` and `/metrics`.

Each listener process writes `callflow:listener:<listener id>` (a JSON object, expiring after
`HEARTBEAT_TTL_SECONDS`) every couple of seconds and on every state change, and keeps its id in
the sorted set `callflow:listeners` (score = last write, unix seconds). `listener_heartbeat()`
returns the live ones. The `web` process's `/readyz` does not depend on any of this.

Fields: `id`, `host`, `pid`, `source` (`realtime`/`postgres`), `state` (`starting`, `connecting`,
`subscribing`, `live`, `backoff`, `stopped`), `connected` (bool: changes are flowing),
`since` (when the state was entered), `last_event_at` (last change received), `lag_seconds`
(commit to enqueue of the last change), `last_catch_up_at`, counters `received`, `enqueued`,
`duplicates`, `echoes` (the echoes of the lifecycle worker's own transitions, dropped),
`malformed`, `reconnects`, `catch_up_enqueued`, and `updated_at` (unix seconds).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from orchestration import names

HEARTBEAT_TTL_SECONDS = names.LISTENER_HEARTBEAT_TTL_SECONDS
INDEX_KEY = names.LISTENERS_INDEX
STATES = ("starting", "connecting", "subscribing", "live", "backoff", "stopped")


def heartbeat_key(listener_id: str) -> str:
    return names.listener_key(listener_id)


def publish(redis: Any, state: dict[str, Any], ttl: int = HEARTBEAT_TTL_SECONDS) -> None:
    now = time.time()
    body = dict(state, updated_at=now)
    pipe = redis.pipeline(transaction=False)
    pipe.set(heartbeat_key(state["id"]), json.dumps(body, default=str), ex=ttl)
    pipe.zadd(INDEX_KEY, {state["id"]: now})
    pipe.zremrangebyscore(INDEX_KEY, "-inf", now - 24 * 3600)
    pipe.execute()


def remove(redis: Any, listener_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.delete(heartbeat_key(listener_id))
    pipe.zrem(INDEX_KEY, listener_id)
    pipe.execute()


def listener_heartbeat(redis: Any) -> list[dict[str, Any]]:
    """Every live listener's heartbeat (newest first), each with `age_seconds` added."""
    now = time.time()
    ids = redis.zrevrangebyscore(INDEX_KEY, "+inf", now - HEARTBEAT_TTL_SECONDS)
    if not ids:
        return []
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    out = []
    for raw in redis.mget([heartbeat_key(i) for i in ids]):
        if raw is None:
            continue
        try:
            beat = json.loads(raw)
        except ValueError:
            continue
        beat["age_seconds"] = max(0.0, now - float(beat.get("updated_at", now)))
        out.append(beat)
    return out


def _ago(ts: Any, now: float) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, now - float(ts)):.0f} s ago"


def describe(beats: Iterable[dict[str, Any]]) -> tuple[bool, str]:
    beats = list(beats)
    if not beats:
        return False, "no listener heartbeat in Redis: is the `listener` process running?"
    now = time.time()
    live = [b for b in beats if b.get("connected")]
    parts = []
    for b in beats[:3]:
        lag = b.get("lag_seconds")
        parts.append(
            f"{b.get('host')}/{b.get('pid')} {b.get('source')} {b.get('state')} since {_ago(b.get('since'), now)}, "
            f"last event {_ago(b.get('last_event_at'), now)}"
            + (f", lag {lag * 1000:.0f} ms" if isinstance(lag, (int, float)) else "")
        )
    more = f" (+{len(beats) - 3} more)" if len(beats) > 3 else ""
    return bool(live), f"{len(live)}/{len(beats)} connected: " + "; ".join(parts) + more


def listener_check(settings: Any) -> tuple[str, bool, str]:
    """For `orchestration.doctor.EXTRA_CHECKS`: one line, never raises, never prints a secret."""
    try:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3,
                                      decode_responses=True)
        try:
            ok, detail = describe(listener_heartbeat(client))
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return "listener", False, f"{exc.__class__.__name__}: {message}"[:200]
    return "listener", ok, detail


class ListenerCollector:
    """Prometheus collector of the listeners' heartbeats (register it in the `web` process).

        from prometheus_client import REGISTRY
        from orchestration.ingest import ListenerCollector
        REGISTRY.register(ListenerCollector(settings.redis_url))

    Reads Redis at scrape time; if Redis cannot be read, `callflow_listener_heartbeat_ok` is 0.
    """

    def __init__(self, redis_or_url: Any) -> None:
        self._redis = redis_or_url
        self._client = None

    def _client_get(self) -> Any:
        if self._client is None:
            if isinstance(self._redis, str):
                import redis

                # short timeouts: a scrape runs on the web process's event loop
                self._client = redis.Redis.from_url(self._redis, socket_timeout=0.5, socket_connect_timeout=0.5,
                                                    decode_responses=True)
            else:
                self._client = self._redis
        return self._client

    def describe(self):  # noqa: D401 - prometheus_client protocol: no samples at registration
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ok = GaugeMetricFamily("callflow_listener_heartbeat_ok", "1 if listener heartbeats could be read from Redis")
        count = GaugeMetricFamily("callflow_listener_count", "Listeners with a live heartbeat")
        connected = GaugeMetricFamily("callflow_listener_connected", "1 while the listener's subscription is live",
                                      labels=["listener", "source", "state"])
        age = GaugeMetricFamily("callflow_listener_heartbeat_age_seconds", "Seconds since the listener's heartbeat",
                                labels=["listener", "source"])
        last_event = GaugeMetricFamily("callflow_listener_last_event_age_seconds",
                                       "Seconds since the listener received its last change", labels=["listener", "source"])
        lag = GaugeMetricFamily("callflow_listener_lag_seconds", "Commit-to-enqueue lag of the last change",
                                labels=["listener", "source"])
        counters = {
            name: CounterMetricFamily(f"callflow_listener_{name}", help_, labels=["listener", "source"])
            for name, help_ in (("received", "Changes received from the source"),
                                ("enqueued", "Changes enqueued as lifecycle tasks"),
                                ("duplicates", "Changes dropped as already enqueued"),
                                ("echoes", "Changes dropped as the echo of a transition the worker made itself"),
                                ("malformed", "Frames or notifications that could not be understood"),
                                ("reconnects", "Reconnections of the source"),
                                ("catch_up_enqueued", "Changes enqueued by catch-up"))
        }
        try:
            beats = listener_heartbeat(self._client_get())
            ok.add_metric([], 1)
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is away
            beats = []
            ok.add_metric([], 0)
        now = time.time()
        count.add_metric([], len(beats))
        for b in beats:
            labels = [str(b.get("id")), str(b.get("source"))]
            connected.add_metric(labels + [str(b.get("state"))], 1 if b.get("connected") else 0)
            age.add_metric(labels, float(b.get("age_seconds", 0)))
            if b.get("last_event_at"):
                last_event.add_metric(labels, max(0.0, now - float(b["last_event_at"])))
            if isinstance(b.get("lag_seconds"), (int, float)):
                lag.add_metric(labels, float(b["lag_seconds"]))
            for name, family in counters.items():
                family.add_metric(labels, float(b.get(name, 0) or 0))
        yield from (ok, count, connected, age, last_event, lag, *counters.values())
