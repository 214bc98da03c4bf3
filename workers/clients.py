"""The clients a worker process shares, built once per process and handed to every task.

arq's model: the clients (Redis, Postgres, LiveKit, the scheduler) are made once when the process
starts and every job takes them from there, instead of each task module making its own on first
use. A Celery worker forks its processes after importing the tasks, and a socket or a pool made
before a fork must not be shared across it: so `clients()` builds the set on its first call in a
process and keys it by the process id (a forked child builds its own). Nothing here connects when
it is built (Redis connects on its first command, the Postgres pools on first use), so building
never fails for want of Redis or Postgres.

`clients()` returns a frozen `Clients`; its attributes are a stable interface (tasks of any queue
may take any of them):

  pid             the process id the set was built in
  settings        `config.settings.Settings`, the app's (`workers.app.settings`)
  app             the Celery app (`workers.app.app`)
  redis           `redis.Redis` on `REDIS_URL`, bytes replies; socket timeout `REDIS_SOCKET_TIMEOUT`
                  (10 s), connect timeout `REDIS_CONNECT_TIMEOUT` (5 s); one connection pool per process
  redis_text      the same with `decode_responses=True` (str replies): for code written on str
                  replies (the ingest sink's scripts); its own connection pool
  db              `psycopg_pool.ConnectionPool` on `DATABASE_URL` (`orchestration.db.get_pool`: 8
                  connections, dict rows, autocommit off); a property: the pool is opened on first use
  store           the lifecycle's `PostgresStore` (its own pool of 10, generic plans, opened on first use)
  rooms           `LiveKitRooms` (LiveKit's RoomService over Twirp; a kept-alive connection per thread)
  scheduler       `CeleryScheduler` on `app`, its Redis calls through `redis`; the push channels' first
                  tries run in this process (`first_try_here`), right after the decision's commit
  deliverers      each registered channel (`orchestration.channels`) with its `Deliverer` on `redis`
  ports           the lifecycle's `Ports` (store, rooms, scheduler and the lifecycle's settings)
  ingest_sink     `IngestSink` on `redis_text`: the invitation changes' backlog (`.backlog`)
  webhook_backlog `Backlog` of LiveKit's webhook events on `redis`

Short-lived scripts and the signal handlers of `workers.task_outcomes` (which must never hold a
task up: 2 s timeouts, and imported by `workers.app`, so they cannot import this module) keep their
own clients.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from orchestration import names
from orchestration.adapters.celery_messages import CeleryMessageBuilder
from orchestration.adapters.celery_scheduler import CeleryScheduler
from orchestration.adapters.livekit_rooms import LiveKitRooms
from orchestration.adapters.postgres_store import PostgresStore
from orchestration.channels import build as build_channels
from orchestration.db import get_pool
from orchestration.delivery.loop import Deliverer
from orchestration.ingest.backlog import WEBHOOK_EVENTS, Backlog
from orchestration.ingest.sink import IngestSink
from orchestration.lifecycle.context import LifecycleConfig, Ports
from workers.app import app as _app
from workers.app import settings as _settings

if TYPE_CHECKING:
    from celery import Celery
    from psycopg_pool import ConnectionPool

    from config.settings import Settings

REDIS_SOCKET_TIMEOUT = 10.0
REDIS_CONNECT_TIMEOUT = 5.0
LIFECYCLE_POOL_SIZE = 10


@dataclass(frozen=True)
class Clients:
    """One worker process's shared clients (see the module's docstring for each attribute)."""

    pid: int
    settings: "Settings" = field(repr=False)
    app: "Celery" = field(repr=False)
    redis: redis.Redis = field(repr=False)
    redis_text: redis.Redis = field(repr=False)
    store: PostgresStore = field(repr=False)
    rooms: LiveKitRooms = field(repr=False)
    scheduler: CeleryScheduler = field(repr=False)
    ports: Ports = field(repr=False)
    deliverers: dict[str, Deliverer] = field(repr=False)
    ingest_sink: IngestSink = field(repr=False)
    webhook_backlog: Backlog = field(repr=False)

    @property
    def db(self) -> "ConnectionPool":
        """The process's Postgres pool on `DATABASE_URL` (`orchestration.db.get_pool`, per pid)."""
        return get_pool(self.settings.database_url)

    @classmethod
    def build(cls, settings: Any = None, app: Any = None) -> "Clients":
        """A new set (no I/O). `settings` and `app` default to `workers.app`'s."""
        settings = settings if settings is not None else _settings
        app = app if app is not None else _app
        timeouts = dict(socket_timeout=REDIS_SOCKET_TIMEOUT, socket_connect_timeout=REDIS_CONNECT_TIMEOUT)
        redis_bytes = redis.Redis.from_url(settings.redis_url, **timeouts)
        redis_text = redis.Redis.from_url(settings.redis_url, decode_responses=True, **timeouts)
        store = PostgresStore(settings.database_url, pool_size=LIFECYCLE_POOL_SIZE,
                              email_repeat_window=settings.callflow_email_repeat_window_seconds)
        rooms = LiveKitRooms(settings.livekit_http_url, settings.livekit_api_key,
                             settings.livekit_api_secret.get_secret_value())
        deliverers = {name: Deliverer(channel, settings.database_url, redis_bytes)
                      for name, channel in build_channels(settings).items()}
        # Pushes make their first try in the process that decided them (a ring's, right after its
        # commit); every other channel's first try is a task.
        scheduler = CeleryScheduler(app, redis_client=redis_bytes,
                                    first_try_here={name: deliverers[name] for name in names.PUSH_CHANNELS.values()
                                                    if name in deliverers})
        ports = Ports(store=store, rooms=rooms, scheduler=scheduler,
                      config=LifecycleConfig(ring_timeout=settings.callflow_ring_timeout_seconds,
                                             grace=settings.callflow_grace_seconds))
        nudge = CeleryMessageBuilder.for_task(names.LIVEKIT_EVENTS, names.Q_EVENTS)
        return cls(
            pid=os.getpid(), settings=settings, app=app, redis=redis_bytes, redis_text=redis_text,
            store=store, rooms=rooms, scheduler=scheduler, ports=ports, deliverers=deliverers,
            ingest_sink=IngestSink(redis_text),
            webhook_backlog=Backlog(redis_bytes, WEBHOOK_EVENTS, names.Q_EVENTS, nudge.prebuilt),
        )


_current: Clients | None = None
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by another thread of the parent at the fork stays held


os.register_at_fork(after_in_child=_after_fork_in_child)


def clients() -> Clients:
    """This process's `Clients`: built on the first call in each process (after Celery's fork)."""
    current = _current
    if current is not None and current.pid == os.getpid():
        return current
    return _build_for_this_process()


def _build_for_this_process() -> Clients:
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = Clients.build()
        return _current
