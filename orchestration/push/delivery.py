"""Delivering the push outbox: once per device, in batches, under one global rate, never late.

`deliver(ids)` leases the rows among `ids` (a Redis lease per row keeps two tasks from sending the
same one) and only then reads which are still `pending`; it skips what must not go (an incoming call
that stopped ringing or whose deadline passed, a disabled device), books a send time for the rest
(`PushRate`): now, or later — then the task comes back at that time — and sends them in batches of
up to 100. A first try books each callee's share of the rate before that (`CalleeShare`): what the
share does not let go now waits for it in a task of its own (or is skipped if it could not go before
it is of no use), so one account's flood never books the global rate ahead of another user's ring.
Each ticket is stored: `sent` (with its ticket id) or `failed` (Expo refused the message);
`DeviceNotRegistered` turns the device off. A send cut off by a crash before its tickets
were stored is sent again by the task's redelivery (the app drops the duplicate by `kind` +
`invitation_id`).

No answer is never an answer. Expo unavailable (connection refused or reset, a timeout, 429, 5xx)
or a `MessageRateExceeded` ticket keeps the rows `pending`, and the task comes back for as long as it
takes, when Expo's retry loop says (`SharedBackoff`: one loop for all workers, so an outage costs a
request per step, not one per waiting batch, and a slow Expo holds one worker process, not all; any
answer starts it again from its first step); an `incoming_call` that could not go before its ring
deadline by then is `skipped` at once, never sent late. While a task waits to come back its
rows are marked `waiting`: a first try (the lifecycle's task, the sweep's) leaves them to it, and
only a first try tops its batch up with other pending rows, so a row has one task coming back for
it, not one more for every task that passes by (which is how a backlog used to be tried once per
new push during an outage, and `failed` after eight tries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

import redis
import structlog

from orchestration import names
from orchestration.backoff import backoff_delay
from orchestration.push.expo import MAX_BATCH, MAX_RECEIPTS, TIMEOUT_SECONDS, ExpoRejected, ExpoUnavailable
from orchestration.push.messages import CALL_ENDED_TTL, PushRow, expo_message
from orchestration.push.rate import BEYOND_HORIZON, TOO_LATE, CalleeShare, PushRate
from orchestration.push.store import PushStore
from orchestration.shared_backoff import SharedBackoff

log = structlog.get_logger("callflow.push")

LEASE_SECONDS = names.PUSH_LEASE_TTL_SECONDS
DEVICE_GONE = "DeviceNotRegistered"
RATE_EXCEEDED = "MessageRateExceeded"  # a ticket that is Expo's 429 for one message: not an answer
# Expo unavailable: the wait before the next try, from 0.5 s up to 10 s (Expo takes 600 messages a
# second, so a batch every 10 s is nothing to it, and a ring that can still go is not kept waiting
# long once Expo is back).
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
WAITING_SLACK_SECONDS = 30  # a waiting mark outlives its come-back by this much (a late worker)
# Rows waiting for their callee's share come back together, per step of this many seconds (so a
# flooded account's backlog is a few tasks a second, not one per message); a message with a limit
# is booked only if it can go a step before it.
SHARE_STEP_SECONDS = 0.5
# Within one callee's share, the kind that stops being of use soonest goes first.
KIND_ORDER = {"incoming_call": 0, "call_ended": 1, "missed_call": 2}


def waiting_key(message_id: str) -> str:
    return names.push_waiting_key(message_id)


def expo_backoff(client: redis.Redis) -> SharedBackoff:
    """Expo's retry loop, shared by every worker (a probe may take the client's whole timeout)."""
    return SharedBackoff(client, "expo", RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, probe_seconds=TIMEOUT_SECONDS + 2)


@dataclass(frozen=True)
class Deferral:
    """Rows that wait for their callee's share of the rate: a task of their own comes back for them."""

    seconds: float
    message_ids: list[str]
    shared: bool  # their share is booked: they come back to book the global rate only


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
    deferred: list[Deferral] = field(default_factory=list)  # waiting for their callee's share

    @property
    def summary(self) -> str:
        waiting = sum(len(d.message_ids) for d in self.deferred)
        return f"{self.sent} sent, {self.failed} failed, {self.skipped} skipped" + (
            f", {waiting} waiting for their callee's share" if waiting else "")


def _skip_reason(row: PushRow, now, send_at) -> str | None:
    if row.token_disabled:
        return "the device was unregistered"
    if row.kind == "incoming_call":
        if row.invitation_status != "ringing":
            return f"the call stopped ringing ({row.invitation_status}) before the push could go"
        if row.ring_deadline is not None and send_at >= row.ring_deadline:
            return "the ring deadline passed before the push could go"
    return None


def _share_limit(row: PushRow, now) -> float | None:
    """Seconds within which a row's share must let it go (a step early), or None: no limit."""
    if row.kind == "incoming_call" and row.ring_deadline is not None:
        limit = row.ring_deadline
    elif row.kind == "call_ended" and row.created_at is not None:
        limit = row.created_at + timedelta(seconds=CALL_ENDED_TTL)
    else:
        return None
    return (limit - now).total_seconds() - SHARE_STEP_SECONDS


def _share_skip_reason(row: PushRow, share: CalleeShare) -> str:
    what = ("until after the ring deadline" if row.kind == "incoming_call"
            else f"for longer than a {row.kind} lives ({CALL_ENDED_TTL} s)")
    return (f"its callee's share of the push rate ({share.rate_per_second:g}/s after a burst of "
            f"{share.burst:g}) was taken {what}: more pushes to this user's devices than their share")


class PushDelivery:
    def __init__(self, store: PushStore, client, redis_client: redis.Redis, rate: PushRate,
                 backoff: SharedBackoff | None = None, share: CalleeShare | None = None) -> None:
        self.store, self.client, self.redis, self.rate = store, client, redis_client, rate
        self.backoff = backoff or expo_backoff(redis_client)
        self.share = share or CalleeShare.of(rate)

    def _lease(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)  # one round trip for a batch, not one per row
        for i in ids:
            pipe.set(names.push_lease_key(i), 1, nx=True, ex=LEASE_SECONDS)
        return [i for i, taken in zip(ids, pipe.execute()) if taken]

    def _release(self, ids: list[str]) -> None:
        if ids:
            self.redis.delete(*[names.push_lease_key(i) for i in ids])

    def _not_waiting(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.exists(waiting_key(i))
        return [i for i, waiting in zip(ids, pipe.execute()) if not waiting]

    def _mark_waiting(self, ids: list[str], seconds: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.set(waiting_key(i), 1, ex=max(1, int(seconds + WAITING_SLACK_SECONDS)))
        pipe.execute()

    def claim_for_resend(self, ids: list[str], seconds: int) -> list[str]:
        """The sweep's pick among stale pending rows: those no task waits to come back for, and not
        re-sent by an earlier sweep within `seconds`."""
        return [i for i in self._not_waiting(ids)
                if self.redis.set(names.push_resend_key(i), 1, nx=True, ex=seconds)]

    def deliver(self, ids: list[str], booked: bool = False, failures: int = 0, shared: bool = False) -> Delivery:
        """`booked`: the rows' global send time is booked; `shared`: their callee's share is;
        `failures`: Expo gave no answer to them that many times. None of these: a first try."""
        ids = list(dict.fromkeys(ids))
        first_try = not booked and not shared and failures == 0
        if first_try:
            # A first try leaves alone the rows a retry loop waits to come back for (one loop per
            # row, each at its own step of the backoff); under load it takes what else is pending,
            # so a burst goes out in full batches.
            ids = self._not_waiting(ids)
            if len(ids) < MAX_BATCH:
                ids += self._not_waiting(self.store.more_pending(MAX_BATCH - len(ids), exclude=ids))
        # The lease first, the status after: read before it, a row another task sent meanwhile
        # would still look pending here and go twice.
        leased = self._lease(ids)
        out = Delivery()
        try:
            rows = [r for r in self.store.rows(leased) if r.status == "pending"] if leased else []
            return self._deliver(rows, booked, failures, out, first_try)
        finally:
            self._release(leased)

    def _come_back_later(self, rows: list[PushRow], wait: float, results: list, out: Delivery, cause: str) -> None:
        """Rows that got no answer: they go again in `wait` seconds, but an incoming call that would
        then be too late is skipped now (with the cause)."""
        now = self.store.now()
        at = now + timedelta(seconds=wait)
        for row in rows:
            why = _skip_reason(row, now, at)
            if why:
                results.append((row.id, "skipped", None, f"{why} ({cause})"[:500]))
            else:
                out.message_ids.append(row.id)
        if out.message_ids:
            out.come_back_in = wait

    def _within_shares(self, rows: list[PushRow], now, results: list, out: Delivery) -> list[PushRow]:
        """The rows their callees' shares let go now; the others wait for theirs (a task comes back
        for them), or are skipped when they could not go within their share before they are of no
        use (an incoming call past its ring deadline, a call_ended past its time to live)."""
        ordered = sorted(rows, key=lambda r: KIND_ORDER.get(r.kind, len(KIND_ORDER)))
        waits = self.share.book([(r.user_id, _share_limit(r, now)) for r in ordered])
        go: set[str] = set()
        later: dict[float, list[str]] = {}
        beyond: list[str] = []
        for row, wait in zip(ordered, waits):
            if wait == TOO_LATE:
                results.append((row.id, "skipped", None, _share_skip_reason(row, self.share)[:500]))
            elif wait == BEYOND_HORIZON:
                beyond.append(row.id)
            elif wait <= 0:
                go.add(row.id)
            else:
                step = math.ceil(wait / SHARE_STEP_SECONDS) * SHARE_STEP_SECONDS
                later.setdefault(step, []).append(row.id)
        out.deferred += [Deferral(seconds, ids, shared=True) for seconds, ids in sorted(later.items())]
        if beyond:  # nothing booked: they try again once the horizon has moved on
            out.deferred.append(Deferral(self.share.horizon, beyond, shared=False))
        return [r for r in rows if r.id in go]

    def _deliver(self, rows: list[PushRow], booked: bool, failures: int, out: Delivery,
                 first_try: bool = False) -> Delivery:
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
        if sendable and first_try:
            # Each callee's share first (issue 23): only what it lets go now books the global rate,
            # so one account's flood cannot book the global line ahead of everyone else's pushes.
            sendable = self._within_shares(sendable, now, results, out)
        turn = self.backoff.turn() if sendable else None
        if turn and turn.wait > 0:  # Expo gave no answer lately: nobody asks before its loop says so
            self._come_back_later(sendable, turn.wait, results, out, "Expo gave no answer lately")
            sendable = []
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
                self.store.attempted([r.id for r in sendable], str(exc))
                wait = self.backoff.failed(turn, exc.retry_after)
                self._come_back_later(sendable, wait, results, out, f"Expo gave no answer: {exc}")
                log.warning("push: Expo unavailable", error=str(exc), messages=len(sendable),
                            expo_failures=self.backoff.failures, come_back_in=round(wait, 2))
            except ExpoRejected as exc:
                self.backoff.succeeded()  # a refusal is an answer
                results += [(r.id, "failed", None, str(exc)[:500]) for r in sendable]
            else:
                self.backoff.succeeded()
        rate_exceeded: list[PushRow] = []
        for row, ticket in zip(sendable, tickets):
            if ticket.ok:
                results.append((row.id, "sent", ticket.id, None))
            elif ticket.error == RATE_EXCEEDED:
                rate_exceeded.append(row)
            else:
                results.append((row.id, "failed", None, (ticket.error or "error") + ": " + (ticket.message or "")))
                if ticket.error == DEVICE_GONE:
                    tokens_gone.append(row.token)
        if rate_exceeded:
            # Expo's 429 for single messages: no answer for them, though the request was answered.
            self.store.attempted([r.id for r in rate_exceeded], f"{RATE_EXCEEDED}: Expo asked to slow down")
            self._come_back_later(rate_exceeded, backoff_delay(failures + 1, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS),
                                  results, out, RATE_EXCEEDED)
        if out.come_back_in is not None:
            self._mark_waiting(out.message_ids, out.come_back_in)
        for deferral in out.deferred:
            self._mark_waiting(deferral.message_ids, deferral.seconds)
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
        turn = self.backoff.turn()
        if turn.wait > 0:  # Expo gave no answer lately: asked at a later sweep
            return 0
        try:
            receipts = self.client.receipts([ticket for _, ticket, _ in pending])
        except ExpoUnavailable as exc:
            self.backoff.failed(turn, exc.retry_after)
            log.info("push: receipts not read, Expo unavailable", error=str(exc))
            return 0
        self.backoff.succeeded()
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
