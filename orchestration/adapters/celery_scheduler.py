"""The scheduler port on Celery: countdown tasks and queue hand-offs, sent after commit."""

from __future__ import annotations

from datetime import datetime

from celery import Celery


class CeleryScheduler:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def ring_timeout(self, invitation_id: str, at: datetime) -> None:
        # A countdown task at the deadline; the beat sweep enforces the same deadline without it.
        self.app.send_task("callflow.ring_timeout", args=[invitation_id, "timer"], eta=at, queue="timers")

    def grace_expiry(self, room_name: str, participant_sid: str, identity: str, aborted: bool | None, delay: float) -> None:
        self.app.send_task("callflow.grace_expired", args=[room_name, participant_sid, identity, aborted],
                           countdown=delay, queue="timers")

    def send_notification(self, notification_id: str) -> None:
        self.app.send_task("callflow.send_notification", args=[notification_id], queue="notifications")

    def invitation_changed(self, change: dict) -> None:
        self.app.send_task("callflow.invitation_changed", args=[change], queue="events")

    def ring_timeout_now(self, invitation_id: str, source: str) -> None:
        self.app.send_task("callflow.ring_timeout", args=[invitation_id, source], queue="timers")
