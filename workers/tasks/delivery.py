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
from dataclasses import asdict

import structlog

from orchestration import names
from orchestration.channels import build
from orchestration.delivery.loop import Attempt, Deliverer
from orchestration.delivery.sweep import sweep
from workers.app import app, settings
from workers.base_task import CallflowTask
from workers.clients import clients

log = structlog.get_logger("callflow.delivery")

_deliverers: dict[int, dict[str, Deliverer]] = {}


def deliverers() -> dict[str, Deliverer]:
    """This process's channels with their deliverers, on the process's shared clients."""
    shared = clients()
    if shared.pid not in _deliverers:
        _deliverers.clear()
        _deliverers[shared.pid] = {name: Deliverer(channel, settings.database_url, shared.redis)
                                   for name, channel in build(settings).items()}
    return _deliverers[shared.pid]


def send(channel: str, ids: list[str], countdown: float | None = None, **attempt) -> None:
    """Queues a run of `channel` for `ids` (on the channel's queue)."""
    deliver.apply_async(args=[channel, ids], kwargs=attempt or None, countdown=countdown,
                        queue=deliverers()[channel].channel.queue)


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
    deliverer = deliverers().get(channel)
    if deliverer is None:
        log.warning("deliver: no such channel")
        return "unknown channel"
    ids = _ids(ids)
    if not ids:
        return "nothing to do"
    queue = deliverer.channel.queue
    out = deliverer.run(ids, Attempt(slot, shared, failures, back))
    batch = deliverer.channel.batch_size
    for start in range(0, len(out.others), batch):  # more than one batch: the rest in tasks of their own
        send(channel, out.others[start:start + batch])
    for deferral in out.deferred:  # waiting for their recipients' shares: back when they let them go
        send(channel, deferral.ids, countdown=deferral.seconds, shared=deferral.shared, back=True)
    if out.deferred:
        log.info("deliver: rows wait for their share of the rate",
                 waiting=sum(len(d.ids) for d in out.deferred),
                 come_back_in=round(max(d.seconds for d in out.deferred), 2))
    if out.come_back_in is not None and out.ids:
        raise self.retry(countdown=out.come_back_in, queue=queue, args=[channel, out.ids],
                         kwargs=asdict(out.again))
    if out.sent or out.failed or out.skipped:
        log.info("delivered", sent=out.sent, failed=out.failed, skipped=out.skipped)
    return out.summary


@app.task(name=names.SWEEP_OUTBOX, base=CallflowTask, retry_transient=False, queue=names.Q_SWEEPS,
          acks_late=False, ignore_result=True)
def sweep_outbox(channel: str, older_than: float | None = None) -> dict:
    """Beat: the channel's pending rows whose task was lost go again."""
    result = sweep(deliverers()[channel], lambda ids: send(channel, ids), older_than)
    return {"resent": len(result["resent"]), **{k: v for k, v in result.items() if k != "resent"}}
