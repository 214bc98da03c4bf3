"""Delivering the push outbox: once per device, in batches, under one global rate, never late.

`deliver(ids)` takes the `pending` rows among `ids` (a Redis lease per row keeps two tasks from
sending the same one), skips what must not go (an incoming call that stopped ringing or whose
deadline passed, a disabled device), books a send time for the rest (`PushRate`): now, or later —
then the task comes back at that time — and sends them in batches of up to 100. Each ticket is
stored: `sent` (with its ticket id) or `failed`; `DeviceNotRegistered` turns the device off.
Expo unavailable (connection, 429, 5xx): the batch is tried again with backoff, and a row is
`failed` after MAX_ATTEMPTS. A send cut off by a crash before its tickets were stored is sent
again by the task's redelivery (the app drops the duplicate by `kind` + `invitation_id`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import redis
import structlog

from orchestration.push.expo import MAX_BATCH, MAX_RECEIPTS, ExpoRejected, ExpoUnavailable
from orchestration.push.messages import PushRow, expo_message
from orchestration.push.rate import PushRate
from orchestration.push.store import PushStore

log = structlog.get_logger("callflow.push")

MAX_ATTEMPTS = 8
LEASE_SECONDS = 60
DEVICE_GONE = "DeviceNotRegistered"


@dataclass
class Delivery:
    """What one run did, and whether (and when) the task must come back."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    come_back_in: float | None = None
    booked: bool = False          # the come-back is a booked send time (not a failure)
    message_ids: list[str] = field(default_factory=list)  # what to come back with
    others: list[str] = field(default_factory=list)       # more than a batch: for another task, now

    @property
    def summary(self) -> str:
        return f"{self.sent} sent, {self.failed} failed, {self.skipped} skipped"


def _skip_reason(row: PushRow, now, send_at) -> str | None:
    if row.token_disabled:
        return "the device was unregistered"
    if row.kind == "incoming_call":
        if row.invitation_status != "ringing":
            return f"the call stopped ringing ({row.invitation_status}) before the push could go"
        if row.ring_deadline is not None and send_at >= row.ring_deadline:
            return "the ring deadline passed before the push could go"
    return None


class PushDelivery:
    def __init__(self, store: PushStore, client, redis_client: redis.Redis, rate: PushRate) -> None:
        self.store, self.client, self.redis, self.rate = store, client, redis_client, rate

    def _lease(self, ids: list[str]) -> list[str]:
        return [i for i in ids if self.redis.set(f"callflow:push:lease:{i}", 1, nx=True, ex=LEASE_SECONDS)]

    def _release(self, ids: list[str]) -> None:
        if ids:
            self.redis.delete(*[f"callflow:push:lease:{i}" for i in ids])

    def deliver(self, ids: list[str], booked: bool = False, failures: int = 0) -> Delivery:
        ids = list(ids)
        if not booked and len(ids) < MAX_BATCH:
            # Under load, one task takes what else is waiting: a burst goes out in full batches.
            ids += self.store.more_pending(MAX_BATCH - len(ids), exclude=ids)
        rows = [r for r in self.store.rows(ids) if r.status == "pending"]
        leased = set(self._lease([r.id for r in rows]))
        rows = [r for r in rows if r.id in leased]
        out = Delivery()
        try:
            return self._deliver(rows, booked, failures, out)
        finally:
            self._release([r.id for r in rows])

    def _deliver(self, rows: list[PushRow], booked: bool, failures: int, out: Delivery) -> Delivery:
        now = self.store.now()
        results: list[tuple[str, str, str | None, str | None]] = []
        sendable = []
        for row in rows:
            why = _skip_reason(row, now, now)
            if why:
                results.append((row.id, "skipped", None, why))
            else:
                sendable.append(row)
        # One batch a run, with a send time booked for it alone: the rest goes to another task.
        out.others = [r.id for r in sendable[MAX_BATCH:]]
        sendable = sendable[:MAX_BATCH]
        if sendable and not booked:
            wait = self.rate.book(len(sendable))
            if wait > 0:
                # Not before the booked time: whatever would then be too late is skipped now.
                at = now + timedelta(seconds=wait)
                late = [r for r in sendable if _skip_reason(r, now, at)]
                results += [(r.id, "skipped", None, _skip_reason(r, now, at)) for r in late]
                sendable = [r for r in sendable if r not in late]
                if sendable:
                    out.come_back_in, out.booked = wait, True
                    out.message_ids = [r.id for r in sendable]
                    sendable = []
        tokens_gone: list[str] = []
        tickets = []
        if sendable:
            try:
                tickets = self.client.send([expo_message(r, now) for r in sendable])
            except ExpoUnavailable as exc:
                if failures + 1 >= MAX_ATTEMPTS:
                    results += [(r.id, "failed", None, f"Expo unavailable after {MAX_ATTEMPTS} attempts: {exc}")
                                for r in sendable]
                else:
                    self.store.attempted([r.id for r in sendable], str(exc))
                    out.come_back_in = exc.retry_after or min(30.0, 0.5 * 2 ** failures)
                    out.message_ids = [r.id for r in sendable]
                log.warning("push: Expo unavailable", error=str(exc), messages=len(sendable), failures=failures + 1)
            except ExpoRejected as exc:
                results += [(r.id, "failed", None, str(exc)[:500]) for r in sendable]
        if tickets:
            for row, ticket in zip(sendable, tickets):
                if ticket.ok:
                    results.append((row.id, "sent", ticket.id, None))
                else:
                    results.append((row.id, "failed", None, (ticket.error or "error") + ": " + (ticket.message or "")))
                    if ticket.error == DEVICE_GONE:
                        tokens_gone.append(row.token)
        self.store.disable_tokens(tokens_gone)
        self.store.finish(results)
        for _, status, _, _ in results:
            setattr(out, status, getattr(out, status) + 1)
        return out

    def check_receipts(self, older_than: float = 15.0, limit: int = MAX_RECEIPTS) -> int:
        """Receipts of sent messages, in batches: ok or error; DeviceNotRegistered turns the device off."""
        pending = self.store.unreceipted(older_than, limit)
        if not pending:
            return 0
        receipts = self.client.receipts([ticket for _, ticket, _ in pending])
        recorded, gone = [], []
        for mid, ticket, token in pending:
            receipt = receipts.get(ticket)
            if receipt is None:
                continue  # not ready yet: asked again next time
            if receipt.ok:
                recorded.append((mid, "ok", None))
            else:
                recorded.append((mid, "error", f"receipt: {receipt.error or receipt.message}"))
                if receipt.error == DEVICE_GONE:
                    gone.append(token)
        self.store.disable_tokens(gone)
        self.store.record_receipts(recorded)
        return len(recorded)
