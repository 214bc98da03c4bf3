"""`callflow.catch_up_invitations` (beat, every few seconds, queue `sweeps`): the listener's safety net.

Reads the invitations changed since the shared watermark (minus the overlap) and enqueues, through
the same Redis dedupe as the listener, every transition not yet enqueued: an invitation reaches
the lifecycle even while no listener runs at all. Changes or webhook events left waiting without a
nudge (`orchestration.ingest.backlog`) get one.
"""

from __future__ import annotations

import structlog

from orchestration import names
from orchestration.ingest.sink import catch_up
from workers.app import app
from workers.base_task import CallflowTask
from workers.clients import clients

log = structlog.get_logger("callflow.ingest")

CATCH_UP_INTERVAL_SECONDS = 5.0


def sink():
    """The invitation changes' sink (and its backlog): the worker process's (`workers.clients`)."""
    return clients().ingest_sink


def webhook_backlog():
    """The workers' side of the LiveKit events `web` lists (`orchestration.adapters.redis_enqueue`):
    the worker process's (`workers.clients`)."""
    return clients().webhook_backlog


# Beat's: a transient error fails this run (not kept: `workers.task_outcomes`), the next one does the work.
@app.task(name=names.CATCH_UP_INVITATIONS, base=CallflowTask, retry_transient=False, acks_late=False,
          ignore_result=True)
def catch_up_invitations() -> dict:
    with clients().db.connection() as conn:
        result = catch_up(conn, sink(), source="postgres",
                          on_malformed=lambda reason: log.warning("malformed invitation row skipped", reason=reason))
    if result.enqueued:
        log.info("catch-up enqueued missed invitation changes", enqueued=len(result.enqueued), scanned=result.scanned)
    if sink().nudge_if_waiting():
        log.info("changes were waiting without a nudge: nudged a worker")
    if webhook_backlog().nudge_if_waiting():
        log.info("webhook events were waiting without a nudge: nudged a worker")
    return {"scanned": result.scanned, "enqueued": len(result.enqueued), "duplicates": result.duplicates}
