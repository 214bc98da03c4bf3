"""Lifecycle tasks: parse plain arguments, call a handler with its ports, sort exceptions.

Database and broker hiccups are retried with backoff (every handler is idempotent: a retry finds
its event recorded or its state moved on); anything else is a bug and fails loudly. The ring
deadline, grace periods and lost invitations are also enforced by `sweep`, so no task here is the
only thing standing between an event and its effect.
"""

from __future__ import annotations

import functools

import psycopg
import redis
import structlog
from celery.exceptions import Reject

from orchestration import handlers
from orchestration.adapters.celery_scheduler import CeleryScheduler
from orchestration.adapters.livekit_rooms import LiveKitRooms
from orchestration.adapters.postgres_store import PostgresStore
from workers.app import app, settings

log = structlog.get_logger("callflow.tasks")

RETRYABLE = (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
             redis.ConnectionError, redis.TimeoutError)
_TASK = dict(bind=True, acks_late=True, max_retries=8, retry_backoff=True, retry_backoff_max=30)


@functools.lru_cache(maxsize=1)
def ports() -> handlers.Ports:
    """One set of adapters per worker process (created after the fork, on first use)."""
    return handlers.Ports(
        store=PostgresStore(settings.database_url, pool_size=10),
        rooms=LiveKitRooms(settings.livekit_http_url, settings.livekit_api_key,
                           settings.livekit_api_secret.get_secret_value()),
        scheduler=CeleryScheduler(app),
        config=handlers.LifecycleConfig(ring_timeout=settings.callflow_ring_timeout_seconds,
                                        grace=settings.callflow_grace_seconds),
    )


@functools.lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def _run(task, fn, *args, **context):
    structlog.contextvars.bind_contextvars(task_id=task.request.id, **{k: v for k, v in context.items() if v})
    try:
        outcome = fn(*args)
        log.info(f"{task.name.removeprefix('callflow.')} done", result=outcome.result)
        return outcome.result
    except RETRYABLE as exc:
        log.warning("transient failure, retrying", error=str(exc), retries=task.request.retries)
        raise task.retry(exc=exc, countdown=min(30, 0.5 * 2 ** task.request.retries))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("malformed task arguments, dropped", error=repr(exc))
        raise Reject(exc, requeue=False)
    finally:
        structlog.contextvars.clear_contextvars()


@app.task(name="callflow.invitation_changed", **_TASK)
def invitation_changed(self, change: dict) -> str:
    return _run(self, lambda: handlers.handle_invitation_changed(change, ports()),
                invitation_id=change.get("invitation_id"), room_name=change.get("room_name"),
                event_id=change.get("event_id"))


@app.task(name="callflow.livekit_event", **_TASK)
def livekit_event(self, event: dict, received_at: str | None = None) -> str:
    return _run(self, lambda: handlers.handle_livekit_event(event, received_at, ports()),
                room_name=(event.get("room") or {}).get("name"), event_id=event.get("id"))


@app.task(name="callflow.ring_timeout", **_TASK)
def ring_timeout(self, invitation_id: str, source: str = "timer") -> str:
    return _run(self, lambda: handlers.handle_ring_timeout(invitation_id, source, ports()),
                invitation_id=invitation_id, event_id=f"timeout:{invitation_id}")


_timeouts_pool = None


def _parallel_map(fn, items):
    """Deadlines of one bucket are looked at side by side (each waits on LiveKit and Postgres)."""
    global _timeouts_pool
    items = list(items)
    if len(items) <= 1:
        return map(fn, items)
    if _timeouts_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _timeouts_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="timeouts")
    return _timeouts_pool.map(fn, items)


@app.task(name="callflow.ring_timeouts_due", **_TASK)
def ring_timeouts_due(self, bucket_end: float) -> str:
    return _run(self, lambda: handlers.handle_ring_timeouts_due(float(bucket_end), ports(), _parallel_map))


@app.task(name="callflow.grace_expired", **_TASK)
def grace_expired(self, room_name: str, participant_sid: str, identity: str, aborted: bool | None = None,
                  source: str = "timer") -> str:
    return _run(self, lambda: handlers.handle_grace_expired(room_name, participant_sid, identity, aborted, ports(), source),
                room_name=room_name, event_id=f"grace:{participant_sid}")


@app.task(name="callflow.sweep", bind=True, acks_late=False, ignore_result=True)
def sweep(self) -> dict:
    """Beat, every CALLFLOW_SWEEP_INTERVAL_SECONDS: make every overdue piece of work happen.

    Overdue ring deadlines, grace periods whose countdown never ran, and invitations still
    `pending` long after insert. Each is handed on at most once per few seconds (a Redis mark), so
    a backlog is not multiplied; the handlers' own idempotency makes a repeat harmless anyway.
    """
    p = ports()
    # Deadlines overdue by half an interval are the sweep's: their bucket's countdown is lost or late.
    work = handlers.find_sweep_work(p, overdue_by=min(0.5, settings.callflow_sweep_interval_seconds / 2))
    r = _redis()
    throttle = max(2, int(settings.callflow_sweep_interval_seconds * 4))
    sent = {"timeouts": 0, "graces": 0, "pending": 0}
    # Overdue deadlines are ended right here, side by side: handing each to its own task would
    # add a queue hop per invitation just when a worker has died and the others are busiest.
    overdue = [i for i in work.due_timeouts if r.set(f"callflow:sweep:timeout:{i}", 1, nx=True, ex=throttle)]
    results = list(_parallel_map(lambda i: handlers.handle_ring_timeout(i, "sweep", p).result, overdue))
    sent["timeouts"] = sum(1 for result in results if result in ("missed", "answered"))
    for room_name, sid, identity in work.due_graces:
        if r.set(f"callflow:sweep:grace:{sid}", 1, nx=True, ex=throttle):
            app.send_task("callflow.grace_expired", args=[room_name, sid, identity, None, "sweep"], queue="timers")
            sent["graces"] += 1
    for row in work.stale_pending:
        invitation_id = str(row["id"])
        if r.set(f"callflow:sweep:pending:{invitation_id}", 1, nx=True, ex=30):
            p.scheduler.invitation_changed({
                "event_id": f"realtime:{invitation_id}:pending", "source": "sweep", "type": "invitation_pending",
                "invitation_id": invitation_id, "status": "pending", "room_name": row["room_name"],
                "occurred_at": row["updated_at"].isoformat(), "payload": {"reason": "stale pending"},
            })
            sent["pending"] += 1
    # Every half minute (one sweep of all, whichever worker), calls whose room is gone are ended.
    if r.set("callflow:sweep:reconcile", 1, nx=True, ex=30):
        sent["reconciled"] = handlers.reconcile_live_calls(p)
    if any(sent.values()):
        log.info("sweep handed on overdue work", **sent)
    return sent


@app.task(name="callflow.ping")
def ping(token: str) -> str:
    """Proves a queue is consumed: marks `token` in Redis."""
    _redis().set(f"callflow:ping:{token}", "1", ex=300)
    return token
