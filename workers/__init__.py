"""The processes: the Celery app and its tasks, the web app, the listener, the `callflow` command."""
