"""Push tasks: deliver push outbox rows, re-send lost ones, read Expo's receipts.

`send_pushes` never sleeps for the rate: a batch booked for later re-queues itself with a
countdown to its slot; rows waiting for their callee's share of the rate go to tasks of their own,
with a countdown to when the share lets them go; Expo unavailable re-queues with backoff. All keep
the rows `pending`, so the beat's `sweep_pushes` finds them again if a task is lost.
"""

from __future__ import annotations

import functools

import redis
import structlog

from orchestration import names
from orchestration.push.delivery import PushDelivery
from orchestration.push.expo import client_for
from orchestration.push.rate import PushRate
from orchestration.push.store import PushStore
from workers.app import app, settings

log = structlog.get_logger("callflow.push")

STALE_AFTER = 10.0     # a pending row older than this lost its task (or waits for its slot)
RECEIPTS_AFTER = 15.0  # Expo's receipts are usually ready within seconds
RESEND_EVERY = 30      # at most one sweep re-send per row per this many seconds


@functools.lru_cache(maxsize=1)
def delivery() -> PushDelivery:
    client = redis.Redis.from_url(settings.redis_url)
    return PushDelivery(PushStore(settings.database_url), client_for(settings), client,
                        PushRate(client, settings.callflow_push_rate_per_second))


@app.task(name=names.SEND_PUSHES, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None,
          queue=names.Q_PUSH, ignore_result=True)
def send_pushes(self, message_ids: list[str], booked: bool = False, failures: int = 0, shared: bool = False) -> str:
    structlog.contextvars.bind_contextvars(task_id=self.request.id, messages=len(message_ids))
    try:
        out = delivery().deliver([str(i) for i in message_ids], booked=booked, failures=failures, shared=shared)
        for start in range(0, len(out.others), 100):  # more than one batch: the rest in tasks of their own
            send_pushes.apply_async(args=[out.others[start:start + 100]], queue=names.Q_PUSH)
        for deferral in out.deferred:  # waiting for their callee's share: back when it lets them go
            send_pushes.apply_async(kwargs={"message_ids": deferral.message_ids, "shared": deferral.shared},
                                    countdown=deferral.seconds, queue=names.Q_PUSH)
        if out.come_back_in is not None and out.message_ids:
            # Its booked send time, or a backoff while Expo is unavailable: the rows stay pending
            # (their callee's share was taken: only a first try books it).
            raise self.retry(countdown=out.come_back_in, max_retries=None,
                             kwargs={"message_ids": out.message_ids, "booked": out.booked, "shared": True,
                                     "failures": failures if out.booked else failures + 1})
        if out.sent or out.failed or out.skipped:
            log.info("pushes delivered", sent=out.sent, failed=out.failed, skipped=out.skipped)
        if out.deferred:
            log.info("pushes wait for their callee's share of the rate",
                     waiting=sum(len(d.message_ids) for d in out.deferred),
                     come_back_in=round(max(d.seconds for d in out.deferred), 2))
        return out.summary
    finally:
        structlog.contextvars.clear_contextvars()


@app.task(name=names.SWEEP_PUSHES, acks_late=False, ignore_result=True)
def sweep_pushes() -> dict:
    """Beat: pending rows whose task was lost go again (in batches); receipts of sent ones are read."""
    d = delivery()
    stale = d.store.stale_pending(STALE_AFTER, 1000)
    fresh = d.claim_for_resend(stale, RESEND_EVERY)
    for start in range(0, len(fresh), 100):
        send_pushes.apply_async(args=[fresh[start:start + 100]], queue=names.Q_PUSH)
    receipts = d.check_receipts(RECEIPTS_AFTER)
    if fresh or receipts:
        log.info("push sweep", resent=len(fresh), receipts=receipts)
    return {"resent": len(fresh), "receipts": receipts}
