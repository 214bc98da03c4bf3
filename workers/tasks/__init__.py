"""Every Celery task of callflow; importing this package registers them on `workers.app`.

Entrypoints only: each task parses its plain arguments (ids, event dicts), calls a use case of
`orchestration.lifecycle` with its ports, and sorts exceptions into retry or fail.
"""

from workers.tasks import ingest, lifecycle, notifications  # noqa: F401
from workers.tasks import push, usage  # noqa: F401
