"""The one outbox sweep (beat): a channel's `pending` rows whose task got lost go again.

A task can be lost with a worker killed with its queue of countdowns, or a broker hiccup after the
commit that wrote the row. The sweep takes the rows pending for longer than the channel's
`stale_after` that no task waits to come back for, at most once per `resend_every` each, and queues
them in batches; it fails what expired (`channel.expiry`) and runs the channel's own extra
(`after_sweep`: Expo's receipts). Duplicates are harmless (the task leases and re-reads the rows,
and the provider's idempotency covers the send), this only keeps them rare.
"""

from __future__ import annotations

from typing import Callable

import structlog

from orchestration.db import get_pool
from orchestration.delivery import outbox
from orchestration.delivery.loop import Deliverer

log = structlog.get_logger("callflow.delivery")

SWEEP_LIMIT = 1000


def sweep(deliverer: Deliverer, enqueue: Callable[[list[str]], None], older_than: float | None = None) -> dict:
    channel = deliverer.channel
    with get_pool(deliverer.database_url).connection() as conn:
        expired = outbox.expire(conn, channel)
        conn.commit()
        stale = channel.stale_pending(conn, channel.stale_after if older_than is None else older_than, SWEEP_LIMIT)
        conn.commit()
    resent = deliverer.claim_for_resend(stale)
    for start in range(0, len(resent), channel.batch_size):
        enqueue(resent[start:start + channel.batch_size])
    extra = channel.after_sweep(deliverer.loop)
    if resent or expired or any(extra.values()):
        log.info("outbox sweep", channel=channel.name, resent=len(resent), expired=expired, **extra)
    return {"resent": resent, "expired": expired, **extra}
