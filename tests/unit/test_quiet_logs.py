"""`make run`'s console: Celery's per-task chatter and beat's "Sending due task" stay out at INFO;
warnings and our own lines pass."""

from __future__ import annotations

import io
import logging

from celery.app.trace import LOG_RECEIVED, LOG_RETRY, LOG_SUCCESS

from config.logging import configure_logging, get_logger


def test_celery_chatter_is_quiet_and_failures_are_not():
    out = io.StringIO()
    configure_logging(production=False, stream=out)
    task = {"name": "callflow.sweep", "id": "t-1", "runtime": 0.01, "return_value": "{}", "exc": "later"}
    logging.getLogger("celery.worker.strategy").info(LOG_RECEIVED, task)
    logging.getLogger("celery.app.trace").info(LOG_SUCCESS, task)
    logging.getLogger("celery.app.trace").info(LOG_RETRY, task)
    logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)", "sweep", "callflow.sweep")
    logging.getLogger("celery.app.trace").error("Task %(name)s[%(id)s] %(description)s: %(exc)s",
                                               {**task, "description": "raised unexpected"})
    get_logger("callflow.tasks").info("invitation_changed done", invitation_id="i-1", call_id="c-1", room_name="r-1")
    text = out.getvalue()
    assert "received" not in text and "succeeded" not in text and "retry" not in text
    assert "Sending due task" not in text
    assert "raised unexpected" in text
    assert "invitation_changed done" in text and "call_id=c-1" in text and "room_name=r-1" in text
