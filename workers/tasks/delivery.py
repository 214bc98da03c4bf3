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

import os
import uuid
from dataclasses import asdict

import redis
import structlog

from orchestration import names
from orchestration.backoff import backoff_delay
from orchestration.channels import build
from orchestration.delivery.loop import Attempt, Deliverer
from orchestration.delivery.sweep import sweep
from workers.app import app, settings
from workers.transient import TRANSIENT_ERRORS

log = structlog.get_logger("callflow.delivery")

# Database or Redis trouble around a run: tries of one task before it leaves its rows, still
# `pending`, to the sweep (a provider giving no answer is retried for as long as it takes instead).
MAX_ATTEMPTS = 6

_deliverers: dict[int, dict[str, Deliverer]] = {}


def deliverers() -> dict[str, Deliverer]:
    """This process's channels with their deliverers, made after Celery forked it."""
    pid = os.getpid()
    if pid not in _deliverers:
        _deliverers.clear()
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        _deliverers[pid] = {name: Deliverer(channel, settings.database_url, client)
                            for name, channel in build(settings).items()}
    return _deliverers[pid]


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


@app.task(name=names.DELIVER, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None,
          ignore_result=True)
def deliver(self, channel: str, ids, slot: float | None = None, shared: bool = False, failures: int = 0,
            back: bool = False, errors: int = 0) -> str:
    structlog.contextvars.bind_contextvars(task_id=self.request.id, channel=channel)
    try:
        deliverer = deliverers().get(channel)
        if deliverer is None:
            log.warning("deliver: no such channel")
            return "unknown channel"
        ids = _ids(ids)
        if not ids:
            return "nothing to do"
        queue = deliverer.channel.queue
        try:
            out = deliverer.run(ids, Attempt(slot, shared, failures, back))
        except TRANSIENT_ERRORS as exc:
            if errors + 1 >= MAX_ATTEMPTS:
                # The rows stay pending: the sweep sends them again once things are back.
                log.error("deliver gave up; the sweep will retry", error=repr(exc)[:300])
                return "error"
            countdown = backoff_delay(errors + 1, 1.0, 60.0)
            log.warning("deliver: database or Redis trouble; retrying", error=repr(exc)[:300],
                        countdown=round(countdown, 2))
            raise self.retry(countdown=countdown, queue=queue, kwargs={
                "slot": slot, "shared": shared, "failures": failures, "back": back, "errors": errors + 1}) from None
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
                             kwargs={**asdict(out.again), "errors": 0})
        if out.sent or out.failed or out.skipped:
            log.info("delivered", sent=out.sent, failed=out.failed, skipped=out.skipped)
        return out.summary
    finally:
        structlog.contextvars.unbind_contextvars("task_id", "channel")


@app.task(name=names.SWEEP_OUTBOX, queue=names.Q_SWEEPS, acks_late=False, ignore_result=True)
def sweep_outbox(channel: str, older_than: float | None = None) -> dict:
    """Beat: the channel's pending rows whose task was lost go again."""
    result = sweep(deliverers()[channel], lambda ids: send(channel, ids), older_than)
    return {"resent": len(result["resent"]), **{k: v for k, v in result.items() if k != "resent"}}
