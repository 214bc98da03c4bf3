"""The worker's consumer (`worker_consumer`), kept alive when the broker connection is lost.

Celery 5.7's consumer, on losing a broker connection it had made, first `collect()`s the
connection (which drops its transport's client) and then closes it. Closing the Redis channel
restores the unacknowledged messages, which needs that client: an AttributeError, which the
close's error filter lets through, and the worker stops for good ("Unrecoverable error") on any
Redis blip. Here that close may fail: the unacknowledged messages stay in Redis (its `unacked`
set) and come back after the visibility timeout, as after a crash, and the consumer reconnects.

The same dropped client breaks every later use of the old channel: a task that finishes after
the reconnect acknowledges its message there, and the AttributeError stopped the worker again.
So AttributeError counts among the connection errors: such an acknowledgement is logged as not
made (the message comes back after the visibility timeout and is decided again, idempotently),
and an AttributeError out of the consumer's loop reconnects instead of stopping the worker.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

from config.logging import get_logger

log = get_logger("callflow.worker")


# kombu's reconnect schedule as Celery calls it is 2, 4, 6 ... 30 s: after a 20 s outage the worker
# came back up to 10 s after Redis. Every 0.5 s at first, then every 2 s at most (it retries forever:
# `broker_connection_max_retries` is None).
RECONNECT_EVERY = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


class Consumer(CeleryConsumer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connection_errors = (*self.connection_errors, AttributeError)

    def ensure_connected(self, conn):
        ensure = conn.ensure_connection
        conn.ensure_connection = lambda *args, **kwargs: ensure(*args, **{**RECONNECT_EVERY, **kwargs})
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc):
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as close_error:
            log.warning("broker connection lost; closing it failed, reconnecting anyway",
                        error=f"{close_error!r}"[:200])
