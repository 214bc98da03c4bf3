"""`callflow.catch_up_invitations` (beat, every few seconds, queue `sweeps`): the listener's safety net.

Reads the invitations changed since the shared watermark (minus the overlap) and enqueues, through
the same Redis dedupe as the listener, every transition not yet enqueued: an invitation reaches
the lifecycle even while no listener runs at all. Changes or webhook events left waiting without a
nudge (`orchestration.ingest.backlog`) get one.
"""

from __future__ import annotations

import functools

import structlog

from orchestration import names
from workers.app import app, settings

log = structlog.get_logger("callflow.ingest")

CATCH_UP_INTERVAL_SECONDS = 5.0


@functools.lru_cache(maxsize=1)
def sink():
    import redis

    from orchestration.ingest.sink import IngestSink

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10,
                                  socket_connect_timeout=5)
    return IngestSink(client)


@functools.lru_cache(maxsize=1)
def webhook_backlog():
    """The workers' side of the LiveKit events `web` lists (`orchestration.adapters.redis_enqueue`)."""
    import redis

    from orchestration.ingest.backlog import WEBHOOK_EVENTS, Backlog
    from orchestration.adapters.celery_messages import CeleryMessageBuilder

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    builder = CeleryMessageBuilder.for_task(names.LIVEKIT_EVENTS, names.Q_EVENTS)
    return Backlog(client, WEBHOOK_EVENTS, names.Q_EVENTS, builder.prebuilt)


@app.task(name=names.CATCH_UP_INVITATIONS, acks_late=False, ignore_result=True)
def catch_up_invitations() -> dict:
    from orchestration.db import get_pool
    from orchestration.ingest.sink import catch_up

    with get_pool(settings.database_url).connection() as conn:
        result = catch_up(conn, sink(), source="postgres",
                          on_malformed=lambda reason: log.warning("malformed invitation row skipped", reason=reason))
    if result.enqueued:
        log.info("catch-up enqueued missed invitation changes", enqueued=len(result.enqueued), scanned=result.scanned)
    if sink().nudge_if_waiting():
        log.info("changes were waiting without a nudge: nudged a worker")
    if webhook_backlog().nudge_if_waiting():
        log.info("webhook events were waiting without a nudge: nudged a worker")
    return {"scanned": result.scanned, "enqueued": len(result.enqueued), "duplicates": result.duplicates}
