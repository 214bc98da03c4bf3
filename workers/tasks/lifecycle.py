"""Lifecycle tasks: parse plain arguments, call a use case with its ports, sort exceptions.

Database and broker hiccups are retried with backoff by the tasks' base (`workers.base_task`: every
use case is idempotent, a retry finds its event recorded or its state moved on); anything else is a
bug and fails loudly. The adapters are the worker process's shared clients (`workers.clients`). The ring
deadline, grace periods and lost invitations are also enforced by `sweep`, so no task here is the
only thing standing between an event and its effect.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import structlog
from celery.exceptions import Reject, Retry

from orchestration import names
from orchestration.adapters.celery_scheduler import RedisThrottle
from orchestration.ingest.livekit import parse_room_event
from orchestration.ingest.mapping import Change
from orchestration.lifecycle.context import Ports
from orchestration.lifecycle.grace_expired import handle_grace_expired
from orchestration.lifecycle.invitation_changed import handle_invitation_changed, handle_invitations_changed
from orchestration.lifecycle.livekit_event import handle_livekit_event, handle_livekit_events
from orchestration.lifecycle.ring_timeout import handle_ring_timeout, handle_ring_timeouts_due
from orchestration.lifecycle.sweep import run_sweep
from workers.app import app, settings
from workers.base_task import CallflowTask
from workers.clients import clients
from workers.leases import one_at_a_time
from workers.transient import TRANSIENT_ERRORS

log = structlog.get_logger("callflow.tasks")

# Enough retries to outlast a Postgres or Redis restart of a few minutes (at least ~4 min with
# jitter): an outage costs retries (the base's), not a failed task.
_TASK = dict(base=CallflowTask, bind=True, acks_late=True, max_retries=20)


def ports() -> Ports:
    """The lifecycle's adapters: the worker process's shared ones (`workers.clients`)."""
    return clients().ports


# Results of timer housekeeping that moved nothing: DEBUG, so the console shows calls, not clocks.
_QUIET_RESULTS = ("none due", "rescheduled")


def _call_of(outcome, context: dict) -> dict:
    """invitation_id, call_id, room_name of the step: from the task's arguments, else from what the
    use case reports (an outcome's own fields, or the effects it ran), else None."""
    found = {key: context.get(key) or getattr(outcome, key, None) for key in ("invitation_id", "call_id", "room_name")}
    for effect in getattr(outcome, "effects", None) or ():
        for key in found:
            found[key] = found[key] or getattr(effect, key, None)
    return found


def _log_step(step: str, outcome, context: dict) -> None:
    # One line per lifecycle step, always with the three keys a call is found by.
    quiet = isinstance(outcome.result, str) and outcome.result.startswith(_QUIET_RESULTS)
    (log.debug if quiet else log.info)(f"{step} done", result=outcome.result, **_call_of(outcome, context))


def _run(task, fn, *args, **context):
    # The base binds task_id and task_name (and clears every contextvar after the run); a transient
    # error goes up to it, to be retried with backoff.
    structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v and k not in ("each", "step")})
    try:
        outcome = fn(*args)
        step = task.name.removeprefix(names.TASK_PREFIX)
        if isinstance(outcome, list):  # a batch: one line per item, named by its step
            for one, ctx in zip(outcome, context.get("each") or ()):
                _log_step(context["step"], one, ctx)
            return [one.result for one in outcome]
        _log_step(step, outcome, context)
        return outcome.result
    except TRANSIENT_ERRORS:
        raise  # the base retries it
    except (ValueError, KeyError, TypeError) as exc:
        log.error("malformed task arguments, dropped", error=repr(exc))
        raise Reject(exc, requeue=False)


@app.task(name=names.INVITATION_CHANGED, **_TASK)
def invitation_changed(self, change: dict) -> str:
    """One change (`Change.to_wire()`): a failed batch's, or a sweep's, sent on alone."""
    typed = Change.from_wire(change)
    return _run(self, lambda: handle_invitation_changed(typed, ports()),
                invitation_id=typed.invitation_id, room_name=typed.room_name, event_id=typed.event_id)


@app.task(name=names.INVITATIONS_CHANGED, **_TASK)
def invitations_changed(self, changes: list | None = None) -> list:
    """A nudge: take the waiting invitation changes (`orchestration.ingest.sink`) and decide them
    together. With `changes`, those (a failed batch's, retried by hand)."""
    if changes is not None:
        return _run_changes(self, changes)
    return _take_and_run(self, clients().ingest_sink.backlog, _run_changes, names.INVITATION_CHANGED, lambda c: [c])


def _run_changes(task, changes: list) -> list:
    typed = [Change.from_wire(c) for c in changes]  # the backlog's items, as the sink listed them
    each = [{"invitation_id": c.invitation_id, "room_name": c.room_name, "event_id": c.event_id} for c in typed]
    return _run(task, lambda: handle_invitations_changed(typed, ports(), _parallel_map), step="invitation_changed",
                each=each)


@app.task(name=names.LIVEKIT_EVENT, **_TASK)
def livekit_event(self, event: dict, received_at: str | None = None) -> str:
    """One LiveKit event: a failed batch's, sent on alone (and kept for `callflow tasks retry`)."""
    parsed = parse_room_event(event)
    return _run(self, lambda: handle_livekit_event(parsed, received_at, ports()),
                room_name=parsed.room_name, event_id=parsed.event_id)


@app.task(name=names.LIVEKIT_EVENTS, **_TASK)
def livekit_events(self, events: list | None = None) -> list:
    """A nudge: take the waiting LiveKit events (the webhook backlog `web` lists them on) and decide
    them together. With `events` ([event, received_at] pairs), those."""
    if events is not None:
        return _run_events(self, events)
    return _take_and_run(self, clients().webhook_backlog, _run_events, names.LIVEKIT_EVENT, list)


def _run_events(task, events: list) -> list:
    parsed = [parse_room_event(event) for event, _received_at in events]
    each = [{"room_name": ev.room_name, "event_id": ev.event_id} for ev in parsed]
    return _run(task, lambda: handle_livekit_events(parsed, ports(), _parallel_map), step="livekit_event", each=each)


def _take_and_run(task, backlog, run, alone_task: str, alone_args) -> list:
    """Take what waits on `backlog` (or what this task took before: a retry or a redelivery), `run`
    it as one batch, then let it go. A batch that fails for a reason other than a transient one
    goes on item by item (`alone_task`, with `alone_args(item)`; each failing again is kept for
    `callflow tasks retry`) so that one item this code cannot handle does not hold up the others.
    Redis giving no answer while taking is transient too: the base retries, and the retry takes them."""
    taken = backlog.take(task.request.id, first=True)
    if not taken:
        return []
    try:
        results = run(task, taken)
    except (Retry, *TRANSIENT_ERRORS):
        raise  # transient: the retry takes the same items again (they stay taken by this task id)
    except Exception as exc:  # noqa: BLE001
        log.error("a batch failed; each item goes on alone", error=repr(exc)[:300], items=len(taken),
                  task=alone_task)
        for item in taken:
            app.send_task(alone_task, args=alone_args(item), queue=names.Q_EVENTS)
        results = []
    try:
        backlog.done(task.request.id)
    except TRANSIENT_ERRORS as exc:  # decided already: what stays taken expires (and is idempotent)
        log.warning("decided, but could not let the taken items go", error=str(exc)[:200])
    return results


@app.task(name=names.RING_TIMEOUT, **_TASK)
def ring_timeout(self, invitation_id: str, source: str = "timer") -> str:
    return _run(self, lambda: handle_ring_timeout(invitation_id, source, ports()),
                invitation_id=invitation_id, event_id=f"timeout:{invitation_id}")


_pool: ThreadPoolExecutor | None = None


def _parallel_map(fn, items):
    """Many deadlines (or sweep items) are looked at side by side: each waits on LiveKit and Postgres."""
    global _pool
    items = list(items)
    if len(items) <= 1:
        return map(fn, items)
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lifecycle")
    return _pool.map(fn, items)


@app.task(name=names.RING_TIMEOUTS_DUE, **_TASK)
def ring_timeouts_due(self, bucket_end: float) -> str:
    return _run(self, lambda: handle_ring_timeouts_due(float(bucket_end), ports(), _parallel_map))


@app.task(name=names.GRACE_EXPIRED, **_TASK)
def grace_expired(self, room_name: str, participant_sid: str, identity: str, aborted: bool | None = None,
                  source: str = "timer") -> str:
    return _run(self, lambda: handle_grace_expired(room_name, participant_sid, identity, aborted, ports(), source),
                room_name=room_name, event_id=f"grace:{participant_sid}")


@app.task(name=names.SWEEP, base=CallflowTask, retry_transient=False, bind=True, acks_late=False,
          ignore_result=True)
def sweep(self) -> dict:
    """Beat, every CALLFLOW_SWEEP_INTERVAL_SECONDS: see `orchestration.lifecycle.sweep`.

    One at a time: while LiveKit's API hangs, a sweep takes a request timeout or more, and sweeps
    piling up behind it would take every worker process from ringing calls (the next one after it
    does the work; a worker that died holding the lease frees it within SWEEP_LEASE_SECONDS)."""
    shared = clients()
    with one_at_a_time(shared.redis, SWEEP_RUNNING_KEY, SWEEP_LEASE_SECONDS) as mine:
        if not mine:
            return {"skipped": "another sweep is running"}
        report = run_sweep(shared.ports, RedisThrottle(shared.redis), interval=settings.callflow_sweep_interval_seconds,
                           parallel_map=_parallel_map)
    if report.did_something:
        log.info("sweep handed on overdue work", **report.as_dict())
    return report.as_dict()


SWEEP_RUNNING_KEY = names.SWEEP_RUNNING
SWEEP_LEASE_SECONDS = 5.0


@app.task(name=names.PING, base=CallflowTask, retry_transient=False)
def ping(token: str) -> str:
    """Proves a queue is consumed: marks `token` in Redis."""
    clients().redis.set(names.ping_key(token), "1", ex=names.PING_TTL_SECONDS)
    return token
