"""`CallflowTask`: the one Celery task base of callflow's tasks (`@app.task(base=CallflowTask, ...)`).

Around every run of a task it
  - binds structlog's contextvars `task_id` and `task_name` (so every line the run logs carries
    them; a task binds more of its own, e.g. the call it is about) and clears them all afterwards;
  - retries a transient error (`workers.transient.TRANSIENT_ERRORS`: Postgres or Redis gave no
    answer) with `orchestration.backoff.backoff_delay(retries + 1, RETRY_BASE_SECONDS,
    RETRY_CAP_SECONDS)` (0.5 s doubling to 30 s, equal jitter), logging one line per retry, and
    one line when it gives up (after `max_retries`; the task then fails with the error and
    `workers.task_outcomes` keeps it for `callflow tasks retry`, beat's tasks aside). While the
    broker cannot take the retry either, the run holds on to its work and tries again with
    backoff, `BROKER_WAIT_SECONDS` at most (`retry_transient`).

A task that is not to be retried on a transient error (beat's, whose next run does the work) says
`retry_transient=False`; the error then fails the run as before. Anything else a task raises is a
bug or the task's own business (`Reject`, `Retry`, its own retries): it passes through untouched.
A task may also call `self.retry_after_transient(exc)` itself, where it catches a transient error
it cannot let propagate.

Nothing here imports the app: `workers.app` may set this class as its tasks' base without a cycle.
"""

from __future__ import annotations

import time

import structlog
from celery import Task
from celery.exceptions import Reject

from orchestration.backoff import backoff_delay
from workers.transient import BROKER_ERRORS, TRANSIENT_ERRORS

log = structlog.get_logger("callflow.tasks")

RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 30.0
# How long a task waits for Redis to take its retry before it gives up (and is kept as failed).
BROKER_WAIT_SECONDS = 600.0


class CallflowTask(Task):
    """See the module's docstring. Options (class attributes, or `@app.task(...)` keywords):
    `retry_transient` (default True) and Celery's own `max_retries`."""

    retry_transient: bool = True

    def __call__(self, *args, **kwargs):
        structlog.contextvars.bind_contextvars(task_id=self.request.id, task_name=self.name)
        try:
            return super().__call__(*args, **kwargs)
        except TRANSIENT_ERRORS as exc:
            if not self.retry_transient:
                raise
            self.retry_after_transient(exc)
        finally:
            structlog.contextvars.clear_contextvars()

    def retry_after_transient(self, exc: BaseException) -> None:
        """Retry this run with backoff after the transient error `exc` (always raises: `Retry` once
        the retry is published, else `exc` when out of retries or the broker never took it)."""
        retries = self.request.retries or 0
        if self.max_retries is not None and retries >= self.max_retries:
            log.error("transient failure, out of retries: giving up", error=f"{type(exc).__name__}: {exc}"[:300],
                      retries=retries)
            raise self.retry(exc=exc)  # out of retries: fails with `exc`, and is kept
        countdown = backoff_delay(retries + 1, RETRY_BASE_SECONDS, RETRY_CAP_SECONDS)
        log.warning("transient failure, retrying", error=str(exc)[:300], retries=retries,
                    countdown=round(countdown, 2))
        self._publish_retry(exc, countdown)

    def _publish_retry(self, exc: BaseException, countdown: float) -> None:
        """`self.retry`, which publishes the retry to Redis: while Redis is away too, the run holds
        on to its work and tries again (a worker process can fetch nothing else meanwhile anyway),
        rather than failing for want of a broker. Raises Retry once the retry is published."""
        waited, attempt = 0.0, 0
        while True:
            try:
                raise self.retry(exc=exc, countdown=countdown)
            except Reject as rejected:  # Celery's word for "the retry could not be published"
                if not isinstance(rejected.reason, BROKER_ERRORS):
                    raise
                attempt += 1
                if waited >= BROKER_WAIT_SECONDS:
                    log.error("the broker never took the retry: giving up", error=str(rejected.reason)[:200],
                              waited=round(waited, 1))
                    raise
                if attempt == 1:
                    log.warning("the broker cannot take the retry; holding the task until it can",
                                error=str(rejected.reason)[:200])
                pause = backoff_delay(attempt, 0.5, 5.0)
                time.sleep(pause)
                waited += pause
