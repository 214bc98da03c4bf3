"""Every Celery task of callflow; importing this package registers them on `workers.app`.

Entrypoints only: each task parses its plain arguments (ids, event dicts), calls a use case of
`orchestration` with its ports, and sorts exceptions into retry or fail.
"""

from workers.tasks import delivery, ingest, lifecycle, retention, usage  # noqa: F401
