"""Delivery of one outbox row: the whole decision, without Celery.

`deliver()` runs one attempt inside one database transaction that holds the row's lock
(`for update ... skip locked`) from the read to the recorded outcome:

- a second task for the same row meanwhile finds it locked and leaves it to the first (`busy`);
- a worker killed mid-send loses its connection and with it the lock: the row is `pending` and
  free again, and the redelivered task (acks_late + reject_on_worker_lost) or the pending sweep
  sends it again with the same Idempotency-Key, to which Resend answers with the first answer
  instead of a second email;
- `attempts` counts the requests made (an attempt cut short by a killed worker goes uncounted,
  as its transaction never commits).

The caller (the Celery task) turns `retry` and `throttled` outcomes into a re-queue with the
outcome's countdown.

No answer from Resend (connection refused or reset, a timeout, 5xx, 429) is never an answer: the row
stays `pending` and is tried again for as long as Resend's idempotency key lasts (EXPIRY); only
Resend's refusal (a 4xx other than 429) makes it `failed`. When to try again is Resend's retry loop's
to say (`resend_backoff`, one loop for all workers: an outage costs a request per step, not one per
waiting email, and a slow Resend holds one worker process, not all); any answer starts it again from
its first step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol

from config.logging import get_logger
from orchestration import names
from orchestration.backoff import backoff_delay
from orchestration.db import get_pool
from orchestration.domain import notices
from orchestration.domain.model import deserves_missed_call_email
from orchestration.notifications import store
from orchestration.notifications.mailers import (
    RESEND_TIMEOUT_SECONDS,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    idempotency_key,
)
from orchestration.notifications.rendering import MissedCall, display_name, recipient_zone, render_missed_call
from orchestration.shared_backoff import SharedBackoff

log = get_logger("callflow.notifications")

# Database or Redis trouble around a send: tries of one task before it leaves the row, still
# `pending`, to the sweep (Resend giving no answer is retried until EXPIRY instead).
MAX_ATTEMPTS = 6
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
# Resend's loop asks once per step whatever the backlog waiting: a probe every 10 s at worst is
# nothing to a 2-requests-a-second account, and the emails go at most that long after Resend is back.
RESEND_BACKOFF_MAX_SECONDS = 10.0
# A task books its send time however far ahead the queue of bookings reaches, and waits for it in
# hops of at most this long: a Celery countdown is held unacked by a worker, and one longer than the
# broker's visibility timeout (300 s) would be delivered twice. A hop before the booked time is one
# Redis call, with no database work.
BOOKING_HOP_SECONDS = 200.0
BOOKING_AHEAD_LIMIT_SECONDS = 23 * 3600.0  # never book past the row's expiry


def hop(wait: float) -> float:
    """The countdown towards a send time `wait` seconds away: the remainder first, then whole hops,
    so tasks come back spread like their send times. (A countdown that falls due goes straight to
    a worker process, past the queues' order: a thousand falling due together would stall events.)"""
    if wait <= BOOKING_HOP_SECONDS:
        return wait
    return (wait % BOOKING_HOP_SECONDS) or BOOKING_HOP_SECONDS
EARLY_TOLERANCE_SECONDS = 0.05  # a countdown firing this early still sends (the bucket's margin covers it)
EXPIRY = timedelta(hours=23)  # Resend keeps idempotency keys 24 hours


class Mailer(Protocol):
    rate_limited: bool

    def send(self, message: OutgoingEmail) -> str: ...


class Bucket(Protocol):
    def reserve(self, horizon: float, holder: str | None = None) -> tuple[float, float | None]: ...

    def until_slot(self, slot: float) -> float: ...

    def pass_gate(self) -> float: ...

    def hold_off(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class Outcome:
    kind: str  # sent | skipped | failed | retry | throttled | busy | done | missing
    detail: str = ""
    countdown: float | None = None
    message_id: str | None = None
    slot: float | None = None  # throttled: the send time booked for the re-queued task

    @property
    def requeue(self) -> bool:
        return self.kind in ("retry", "throttled")


def backoff(failures: int) -> float:
    """The wait before the next try after `failures` failures in a row (0 = the first failure
    happened just now): the shared backoff from 1 s, capped at a minute."""
    return backoff_delay(failures + 1, BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS)


def resend_backoff(client) -> SharedBackoff:
    """Resend's retry loop, shared by every worker (a probe may take the SDK's whole timeout)."""
    return SharedBackoff(client, "resend", BACKOFF_BASE_SECONDS, RESEND_BACKOFF_MAX_SECONDS,
                         probe_seconds=RESEND_TIMEOUT_SECONDS + 2)


def skip_reason(row: dict) -> str | None:
    """Why this row gets no email, or None when it gets one: asked again as it is sent (the
    recipient may have turned emails off since the row was born). The repeat window was the
    birth's to decide (`domain.notices`)."""
    if not deserves_missed_call_email(row["invitation_status"], row["ringing_at"], row["ended_at"]):
        return f"invitation {row['invitation_status']} does not call for a missed-call email"
    if notices.opted_out(row["callee_meta"]):
        return notices.OPTED_OUT["email"]
    if not notices.has_address(row["recipient_email"]):
        return notices.NO_ADDRESS
    return None


def compose(row: dict, sender: str, app_url: str) -> OutgoingEmail:
    """The email for an outbox row: a pure function of the row (same body on every attempt)."""
    callee_meta = row["callee_meta"] if isinstance(row["callee_meta"], dict) else {}
    call = MissedCall(
        caller_name=display_name(row["caller_meta"]),
        callee_name=display_name(callee_meta),
        call_type=row["call_type"],
        outcome=row["invitation_status"],
        at=row["ringing_at"] or row["invited_at"],
        zone=recipient_zone(callee_meta),
        app_url=app_url,
    )
    rendered = render_missed_call(call)
    return OutgoingEmail(
        notification_id=row["id"],
        idempotency_key=idempotency_key(row["id"]),
        sender=sender,
        to=row["recipient_email"],
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        tags=(("kind", row["kind"]), ("notification_id", row["id"])),
    )


def deliver(notification_id: str, *, database_url: str, mailer: Mailer, bucket: Bucket | None, sender: str,
            app_url: str, failures: int = 0, slot: float | None = None,
            resend_loop: SharedBackoff | None = None) -> Outcome:
    """One attempt at the row. `failures` = retryable failures so far in this delivery run; `slot`
    = the send time this task booked on an earlier run (it comes back at that time to use it);
    `resend_loop` = Resend's shared retry loop (without it, the row's own backoff)."""
    rate_limited = mailer.rate_limited and bucket is not None
    if rate_limited and slot is not None:
        wait = bucket.until_slot(slot)
        if wait > EARLY_TOLERANCE_SECONDS:  # not yet: another hop, no database work
            return Outcome("throttled", "waiting for its booked send time", countdown=hop(wait), slot=slot)
    turn = resend_loop.turn() if resend_loop is not None and mailer.rate_limited else None
    if turn and turn.wait > 0:  # Resend gave no answer lately: nobody asks before its loop says so
        return Outcome("throttled", "Resend gave no answer lately", countdown=turn.wait + random.uniform(0, 0.2),
                       slot=slot)
    with get_pool(database_url).connection() as conn:
        row = store.lock_for_delivery(conn, notification_id)
        if row is None:
            status = store.status_of(conn, notification_id)
            if status is None:
                return Outcome("missing", "no such notification")
            return Outcome("busy" if status == "pending" else "done", f"another task holds it (status {status})")
        if row["status"] != "pending":
            return Outcome("done", f"status is {row['status']}")

        if row["created_at"] < datetime.now(timezone.utc) - EXPIRY:
            store.mark_failed(conn, notification_id, "expired: not delivered within 23 hours")
            return Outcome("failed", "expired")

        why = skip_reason(row)
        if why:
            store.mark_skipped(conn, notification_id, why)
            log.info("notification skipped", notification_id=notification_id, why=why)
            return Outcome("skipped", why)

        message = compose(row, sender, app_url)

        attempts = store.count_attempt(conn, notification_id)
        # The token last, right before the request: the time between a grant and the request's
        # arrival at Resend is what the bucket's margin has to absorb.
        if rate_limited:
            if slot is None:
                wait, slot = bucket.reserve(BOOKING_AHEAD_LIMIT_SECONDS, holder=notification_id)
                if slot is None or wait > EARLY_TOLERANCE_SECONDS:
                    conn.rollback()  # nothing recorded (not even the attempt); the lock goes with it
                    return Outcome("throttled", "waiting for its booked send time", countdown=hop(wait), slot=slot)
            wait = bucket.pass_gate()
            if wait > 0:
                conn.rollback()
                return Outcome("throttled", "keeping the spacing of requests", countdown=wait, slot=slot)

        try:
            message_id = mailer.send(message)
        except PermanentSendError as exc:
            if turn is not None:
                resend_loop.succeeded()  # a refusal is an answer
            store.mark_failed(conn, notification_id, exc.describe())
            log.warning("notification failed", notification_id=notification_id, attempts=attempts,
                        error=exc.describe())
            return Outcome("failed", exc.describe())
        except RetryableSendError as exc:
            if exc.status == 429 and exc.retry_after and bucket is not None and mailer.rate_limited:
                bucket.hold_off(exc.retry_after)
            # No answer is not an answer: the row stays pending however long Resend is away (until
            # EXPIRY, which the sweep enforces).
            store.note_error(conn, notification_id, exc.describe())
            if turn is not None:
                countdown = resend_loop.failed(turn, exc.retry_after)
            else:
                countdown = exc.retry_after if exc.retry_after is not None else backoff(failures)
            countdown = max(countdown, 0.2) + random.uniform(0, 0.2)
            log.info("notification will be retried", notification_id=notification_id, attempts=attempts,
                     error=exc.describe(), countdown=round(countdown, 2))
            return Outcome("retry", exc.describe(), countdown=countdown)

        if turn is not None:
            resend_loop.succeeded()
        store.mark_sent(conn, notification_id, message_id)
        if mailer.rate_limited:
            log.info("notification sent", notification_id=notification_id, attempts=attempts,
                     provider_message_id=message_id)
        else:
            log.info("email written to outbox (development: no RESEND_API_KEY)", notification_id=notification_id,
                     to=message.to, subject=message.subject,
                     path=str(mailer.path_for(notification_id)) if hasattr(mailer, "path_for") else message_id)
        return Outcome("sent", message_id=message_id)


# ---- the pending sweep -------------------------------------------------------------------------

SWEEP_MIN_AGE_SECONDS = 10.0  # a row younger than this still has its first task on the way
SWEEP_RESEND_EVERY_SECONDS = 60  # at most one sweep re-send per row per this many seconds


def scheduled_key(notification_id: str) -> str:
    return names.notification_scheduled_key(notification_id)


def swept_key(notification_id: str) -> str:
    return names.notification_swept_key(notification_id)


def mark_scheduled(redis_client, notification_id: str, countdown: float) -> None:
    """A task re-queued itself for later: the sweep leaves the row alone until then (+ slack)."""
    redis_client.set(scheduled_key(notification_id), "1", ex=max(1, int(countdown + 30)))


def sweep_lost(database_url: str, redis_client, enqueue, min_age_seconds: float = SWEEP_MIN_AGE_SECONDS) -> dict:
    """Re-sends `pending` rows whose task got lost (a worker killed with its queue of countdowns,
    a broker hiccup after the lifecycle's commit): rows no sender holds, not waiting for a
    scheduled retry, at most once a minute each. Duplicates are harmless (the task re-reads the row
    and the Idempotency-Key covers the send), this only keeps them rare."""
    resent: list[str] = []

    def not_scheduled(ids: list[str]) -> list[str]:
        pipe = redis_client.pipeline(transaction=False)
        for notification_id in ids:
            pipe.exists(scheduled_key(notification_id))
        return [i for i, scheduled in zip(ids, pipe.execute()) if not scheduled]

    with get_pool(database_url).connection() as conn:
        expired = store.expire_stale(conn)
        conn.commit()
        candidates = store.lost_pending(conn, min_age_seconds, not_scheduled=not_scheduled)
        conn.commit()  # release the rows before their tasks look at them
    if candidates:
        pipe = redis_client.pipeline(transaction=False)
        for notification_id in candidates:
            pipe.set(swept_key(notification_id), "1", nx=True, ex=SWEEP_RESEND_EVERY_SECONDS)
        for notification_id, first in zip(candidates, pipe.execute()):
            if first:
                enqueue(notification_id)
                resent.append(notification_id)
    if resent or expired:
        log.info("notification sweep", resent=len(resent), expired=expired)
    return {"resent": resent, "expired": expired}
