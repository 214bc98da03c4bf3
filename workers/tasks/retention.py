"""Retention: beat's prune (queue `sweeps`).

`callflow.prune` (beat, every PRUNE_EVERY_SECONDS): one bounded tick of `orchestration.retention`
(each table at most `TICK_SECONDS`, batches of its own size); what is left waits for the next tick.
"""

from __future__ import annotations

from config.logging import get_logger
from orchestration import names
from orchestration.db import get_pool
from orchestration.retention import prune as run_prune
from workers.app import app, settings
from workers.base_task import CallflowTask
from workers.clients import clients

PRUNE_EVERY_SECONDS = 60

log = get_logger(__name__)


@app.task(name=names.PRUNE, base=CallflowTask, retry_transient=False, queue=names.Q_SWEEPS,
          acks_late=False, ignore_result=True)
def prune() -> dict:
    with get_pool(settings.database_url).connection() as conn:
        out = run_prune(conn, clients().redis, settings.callflow_retention_days)
    if any(out.rows.values()):
        log.info("pruned", **out.rows, batches=out.batches)
    return {**out.rows, "batches": out.batches}
