"""The delivery task pair, the same for every channel (orchestration/channels):

- `callflow.deliver [channel, ids]` (the channel's queue): one run of the delivery loop over a batch
  of the channel's outbox rows (`orchestration.delivery.loop`). It never sleeps: a send time booked
  for later, a provider giving no answer, a share of the rate taken — each re-queues the task with a
  countdown, the rows staying `pending`. acks_late with reject_on_worker_lost: a worker process that
  dies mid-send has its task delivered again (same task id: it takes its rows' leases back), and the
  provider's idempotency makes the repeat harmless.
- `callflow.sweep_outbox [channel]` (beat, queue `sweeps`): the channel's pending rows whose task
  got lost go again (`orchestration.delivery.sweep`).
"""

from __future__ import annotations

import uuid

import structlog

from orchestration import names
from orchestration.delivery.loop import Attempt, report
from orchestration.delivery.sweep import sweep
from workers.app import app
from workers.base_task import CallflowTask
from workers.clients import clients

log = structlog.get_logger("callflow.delivery")


def send(channel: str, ids: list[str]) -> None:
    """Queues a run of `channel` for `ids` (on the channel's queue)."""
    clients().scheduler.queue_delivery(channel, ids)


def _ids(raw) -> list[str]:
    out = []
    for value in raw if isinstance(raw, (list, tuple)) else [raw]:
        try:
            out.append(str(uuid.UUID(str(value))))
        except ValueError:
            log.warning("deliver: not a row id", id=str(value)[:64])
    return out


# Postgres or Redis giving no answer is the task base's to retry (with backoff, the rows still
# `pending` meanwhile, and the sweep's besides); a provider giving no answer is the loop's.
@app.task(name=names.DELIVER, base=CallflowTask, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, ignore_result=True)
def deliver(self, channel: str, ids, slot: float | None = None, shared: bool = False, failures: int = 0,
            back: bool = False) -> str:
    structlog.contextvars.bind_contextvars(channel=channel)
    shared_clients = clients()
    deliverer = shared_clients.deliverers.get(channel)
    if deliverer is None:
        log.warning("deliver: no such channel")
        return "unknown channel"
    ids = _ids(ids)
    if not ids:
        return "nothing to do"
    out = deliverer.run(ids, Attempt(slot, shared, failures, back))
    report(channel, out)
    follow_ups = out.follow_ups(deliverer.channel.batch_size)
    for follow in follow_ups:
        if not follow.again:  # more than a batch, or rows waiting for their shares: tasks of their own
            shared_clients.scheduler.queue_delivery(channel, follow.ids, follow.countdown, follow.kwargs)
    for follow in follow_ups:
        if follow.again:  # this task's own rows: it comes back as itself
            raise self.retry(countdown=follow.countdown, queue=names.CHANNEL_QUEUES[channel], args=[channel, follow.ids],
                             kwargs=follow.kwargs)
    return out.summary


@app.task(name=names.SWEEP_OUTBOX, base=CallflowTask, retry_transient=False, queue=names.Q_SWEEPS,
          acks_late=False, ignore_result=True)
def sweep_outbox(channel: str, older_than: float | None = None) -> dict:
    """Beat: the channel's pending rows whose task was lost go again."""
    result = sweep(clients().deliverers[channel], lambda ids: send(channel, ids), older_than)
    return {"resent": len(result["resent"]), **{k: v for k, v in result.items() if k != "resent"}}
