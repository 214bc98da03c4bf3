"""The Celery app: `celery -A workers.app worker|beat|flower`.

Queues (every one consumed by the Procfile's worker, which takes no -Q and so consumes all of
`task_queues`), in the order a worker takes from them:
  timers         ring timeouts and grace periods (countdown tasks: fetched at once and held until
                 due, so they take no process before then; first, so that a busy `events` never
                 keeps a deadline unfetched: at saturation they were fetched seconds late)
  push           pushes to phones, Expo, APNs VoIP and FCM (an incoming call's push is part of
                 the ringing: behind `events` it waited for every burst of lifecycle work, +64–79
                 ms p99 at 50 calls/s, bench.voip; one account's flood cannot fill it: each callee's
                 share of the rate defers the rest to countdown tasks, bench.push_flood)
  events         lifecycle events: nudges to take the backlogs of LiveKit's webhook events (listed
                 by `web`) and of invitation changes (listed by the listener); see
                 orchestration/ingest/backlog.py
  sweeps         beat's sweeps and reconciliation
  notifications  missed-call emails (rate limited globally, so kept off the other queues)

Ringing never waits behind emails: the worker asks Redis for the queues in that fixed order (BRPOP
returns from the first non-empty list), holds no more messages than it has free processes, and a
task waiting for a rate-limit token re-queues itself with a countdown instead of sleeping in a slot.

Beat keeps its schedule and a lock in Redis (celery-redbeat): no file on disk, and of two or more
beats only the lock holder sends; another takes over within REDBEAT_LOCK_SECONDS + 1 s of its death.
"""

from __future__ import annotations

import sys
from datetime import timedelta

from celery import Celery, signals
from kombu import Queue

from config.logging import configure_logging, register_secret
from config.settings import load_settings_or_exit
from orchestration import channels, names
from orchestration.adapters.celery_messages import TASK_SENT_EVENTS
from workers import task_outcomes  # noqa: F401 - its signal handlers: task outcomes and failed tasks, for /metrics and `callflow tasks`
from workers.queues import QUEUES

settings = load_settings_or_exit()

# Flower needs credentials in production; refuse to start without them (one line, exit 2).
if "flower" in sys.argv[1:] and settings.is_production and settings.flower_basic_auth is None:
    print("callflow: configuration error: FLOWER_BASIC_AUTH is required for flower in production", file=sys.stderr)
    raise SystemExit(2)

for secret in (settings.livekit_api_secret, settings.supabase_service_role_key, settings.supabase_jwt_secret,
               settings.resend_api_key, settings.flower_basic_auth, settings.expo_access_token,
               settings.apns_private_key, settings.fcm_service_account_json):
    if secret is not None:
        register_secret(secret.get_secret_value())

# ETA/countdown tasks are held unacked by the worker that fetched them and come back only after
# the visibility timeout if it dies; the ring deadline lives in the database and the sweep enforces
# it, so this only bounds how long a killed worker's acks_late task waits to be redelivered.
VISIBILITY_TIMEOUT = int(max(300, settings.callflow_ring_timeout_seconds * 2 + 60))
# The beat lock's lifetime; the lock holder renews it at every tick (at most BEAT_MAX_INTERVAL apart).
REDBEAT_LOCK_SECONDS = 5

BEAT_MAX_INTERVAL = 1

app = Celery("callflow", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue=names.Q_EVENTS,
    task_routes={
        names.INVITATION_CHANGED: {"queue": names.Q_EVENTS},
        names.INVITATIONS_CHANGED: {"queue": names.Q_EVENTS},
        names.LIVEKIT_EVENT: {"queue": names.Q_EVENTS},
        names.LIVEKIT_EVENTS: {"queue": names.Q_EVENTS},
        names.RING_TIMEOUT: {"queue": names.Q_TIMERS},
        names.RING_TIMEOUTS_DUE: {"queue": names.Q_TIMERS},
        names.GRACE_EXPIRED: {"queue": names.Q_TIMERS},
        names.SWEEP: {"queue": names.Q_SWEEPS},
        names.CATCH_UP_INVITATIONS: {"queue": names.Q_SWEEPS},
        # callflow.deliver goes on its channel's queue (push, notifications), named as it is sent.
        names.SWEEP_OUTBOX: {"queue": names.Q_SWEEPS},
        names.PING: {"queue": names.Q_EVENTS},
        names.CHECK_USAGE: {"queue": names.Q_SWEEPS},
        names.PRUNE: {"queue": names.Q_SWEEPS},
    },
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A worker holds only what its free processes can start now (countdown tasks aside, which
    # Celery holds outside the prefetch count): a backlog elsewhere never sits in front of an event.
    worker_prefetch_multiplier=1,
    worker_disable_prefetch=True,
    worker_eta_task_limit=20000,
    worker_hijack_root_logger=False,
    # A worker's task events cost three extra broker writes per task; Flower switches them on while
    # it runs (it broadcasts enable_events), so they are off by default.
    worker_send_task_events=False,
    # `task-sent`, so Flower lists a task from the moment it is queued: one switch with the messages
    # callflow pushes itself (the backlogs' nudges, the ring-timeout countdowns), which publish
    # theirs in the script that pushes them (orchestration/adapters/celery_messages.py, TASK_SENT_EVENTS).
    task_send_sent_event=TASK_SENT_EVENTS,
    broker_connection_retry_on_startup=True,
    # A lost Redis connection must not stop the worker (workers/consumer.py), however long Redis is away.
    worker_consumer="workers.consumer:Consumer",
    broker_connection_max_retries=None,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT,
                              # BRPOP the queues in QUEUES order every time (not round-robin).
                              "queue_order_strategy": "priority"},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    visibility_timeout=VISIBILITY_TIMEOUT,
    timezone="UTC",
    enable_utc=True,
    beat_scheduler="workers.beat_scheduler:Scheduler",  # redbeat's, surviving a Redis outage
    beat_max_loop_interval=BEAT_MAX_INTERVAL,
    redbeat_redis_url=settings.redis_url,
    redbeat_key_prefix=names.BEAT_PREFIX,
    redbeat_lock_timeout=REDBEAT_LOCK_SECONDS,
    beat_schedule={
        "sweep": {
            "task": names.SWEEP,
            "schedule": timedelta(seconds=settings.callflow_sweep_interval_seconds),
            "options": {"queue": names.Q_SWEEPS, "expires": max(settings.callflow_sweep_interval_seconds * 5, 5)},
        },
        # Each channel's outbox rows whose task got lost, again (orchestration/delivery/sweep.py);
        # for pushes also Expo's receipts of sent ones.
        **{f"sweep-outbox-{kind.name}": {
            "task": names.SWEEP_OUTBOX,
            "args": [kind.name],
            "schedule": timedelta(seconds=kind.sweep_every),
            "options": {"queue": names.Q_SWEEPS, "expires": kind.sweep_every * 2},
        } for kind in channels.TYPES},
        # Enqueues invitation changes the listener missed, and nudges for either backlog whose
        # nudge was lost (workers/tasks/ingest.py).
        "catch-up-invitations": {
            "task": names.CATCH_UP_INVITATIONS,
            "schedule": timedelta(seconds=5),
            "options": {"queue": names.Q_SWEEPS, "expires": 10},
        },
        # LiveKit usage: refresh the peak rollup, snapshot the month, alert at 80 %/100 % of the plan
        # (workers/tasks/usage.py).
        "check-usage": {
            "task": names.CHECK_USAGE,
            "schedule": timedelta(seconds=60),
            "options": {"queue": names.Q_SWEEPS, "expires": 50},
        },
        # Retention: a bounded share of the rows older than CALLFLOW_RETENTION_DAYS, in small
        # batches (workers/tasks/retention.py).
        "prune": {
            "task": names.PRUNE,
            "schedule": timedelta(seconds=60),
            "options": {"queue": names.Q_SWEEPS, "expires": 50},
        },
    },
)


@signals.setup_logging.connect
def _setup_logging(loglevel=None, **_kwargs) -> None:
    # `-l DEBUG` also shows Celery's per-task chatter, which INFO leaves out.
    import logging

    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    configure_logging(settings.is_production, level="DEBUG" if str(level).upper() == "DEBUG" else "INFO")


@signals.worker_process_shutdown.connect
def _close_pools(**_kwargs) -> None:
    from orchestration.db import close_pools

    close_pools()
