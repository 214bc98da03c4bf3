"""The Celery queues, in the order a worker takes from them (it always empties the earlier ones
first: see `workers.app`). Kept apart from the app so `web` can read them without making one."""

QUEUES = ("timers", "events", "sweeps", "push", "notifications")
