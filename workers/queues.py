"""The Celery queues, in the order a worker takes from them (it always empties the earlier ones
first: see `workers.app`). Kept apart from the app so `web` can read them without making one."""

from orchestration import names

QUEUES = (names.Q_TIMERS, names.Q_PUSH, names.Q_EVENTS, names.Q_SWEEPS, names.Q_NOTIFICATIONS)
