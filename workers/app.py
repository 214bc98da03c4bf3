"""The Celery app: `celery -A workers.app worker|beat|flower`.

Queues (every one consumed by the Procfile's worker, which takes no -Q and so consumes all of
`task_queues`):
  events         lifecycle events from the webhook consumer and the listener
  timers         ring timeouts and grace periods (countdown tasks)
  sweeps         beat's sweeps and reconciliation
  notifications  missed-call emails (rate limited globally, so kept off the other queues)
"""

from __future__ import annotations

import sys
from datetime import timedelta

from celery import Celery, signals
from kombu import Queue

from config.logging import configure_logging, register_secret
from config.settings import load_settings_or_exit

QUEUES = ("events", "timers", "sweeps", "notifications")

settings = load_settings_or_exit()

# Flower needs credentials in production; refuse to start without them (one line, exit 2).
if "flower" in sys.argv[1:] and settings.is_production and settings.flower_basic_auth is None:
    print("callflow: configuration error: FLOWER_BASIC_AUTH is required for flower in production", file=sys.stderr)
    raise SystemExit(2)

for secret in (settings.livekit_api_secret, settings.supabase_service_role_key, settings.supabase_jwt_secret,
               settings.resend_api_key, settings.flower_basic_auth):
    if secret is not None:
        register_secret(secret.get_secret_value())

# ETA/countdown tasks are held unacked by the worker that fetched them and come back only after
# the visibility timeout if it dies; the ring deadline lives in the database and the sweep enforces
# it, so this only bounds how long a killed worker's acks_late task waits to be redelivered.
VISIBILITY_TIMEOUT = int(max(300, settings.callflow_ring_timeout_seconds * 2 + 60))

app = Celery("callflow", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="events",
    task_routes={
        "callflow.invitation_changed": {"queue": "events"},
        "callflow.livekit_event": {"queue": "events"},
        "callflow.ring_timeout": {"queue": "timers"},
        "callflow.ring_timeouts_due": {"queue": "timers"},
        "callflow.grace_expired": {"queue": "timers"},
        "callflow.sweep": {"queue": "sweeps"},
        "callflow.catch_up_invitations": {"queue": "sweeps"},
        "callflow.send_notification": {"queue": "notifications"},
        "callflow.ping": {"queue": "events"},
    },
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=8,
    worker_eta_task_limit=20000,
    worker_hijack_root_logger=False,
    # Task events cost three extra broker writes per task; Flower switches them on while it runs
    # (it broadcasts enable_events), so they are off by default.
    worker_send_task_events=False,
    task_send_sent_event=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    visibility_timeout=VISIBILITY_TIMEOUT,
    timezone="UTC",
    enable_utc=True,
    beat_schedule={
        "sweep": {
            "task": "callflow.sweep",
            "schedule": timedelta(seconds=settings.callflow_sweep_interval_seconds),
            "options": {"queue": "sweeps", "expires": max(settings.callflow_sweep_interval_seconds * 5, 5)},
        },
        # Re-sends `pending` email outbox rows whose task got lost (orchestration.notifications).
        "sweep-notifications": {
            "task": "callflow.sweep_notifications",
            "schedule": timedelta(seconds=max(5.0, settings.callflow_sweep_interval_seconds)),
            "options": {"queue": "sweeps", "expires": 30},
        },
        # Enqueues invitation changes the listener missed (workers/tasks/ingest.py).
        "catch-up-invitations": {
            "task": "callflow.catch_up_invitations",
            "schedule": timedelta(seconds=5),
            "options": {"queue": "sweeps", "expires": 10},
        },
    },
)


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    configure_logging(settings.is_production)


@signals.worker_process_shutdown.connect
def _close_pools(**_kwargs) -> None:
    from orchestration.db import close_pools

    close_pools()
