"""The one delivery loop: a run of a batch of outbox rows of one channel, without Celery.

`Deliverer.run(ids, attempt)`:
1. A run that comes back for a booked send time that is not there yet goes again (no database work).
2. A first try leaves alone the rows a retry waits to come back for (one task per row, each at its
   own step of the backoff) and, for a channel with batches, tops the batch up with other pending
   rows, so a burst goes out in full batches (not a first try made where the rows were decided:
   the scheduler's, which sends just its rows).
3. It locks the rows (`for update skip locked`) from the read to their recorded outcome: a second
   task for them meanwhile leaves them alone; a worker killed mid-send loses its connection and
   the locks with it, and the redelivered task (or the sweep's) sends again.
4. `failed` what expired, `skipped` what must not go (`channel.skip_reason`).
5. A first try of a channel with shares books each recipient's share first: what it does not let
   go now waits in a task of its own (`Deferral`), or is skipped if it could not go in time.
6. Nobody asks a provider its retry loop says is away; a send time is booked on the rate (the task
   comes back then: never a sleeping worker slot), and whatever would then be too late is skipped.
   A run let through as the loop's probe that then waits for its send time hands the probe on.
7. One request for the batch. No answer is never an answer: the rows stay `pending` and the task
   comes back when the provider's retry loop says; a refusal is `failed`; a sent row keeps its
   provider id. The provider's idempotency (Resend's key; the app's `kind` + `invitation_id`)
   covers the send repeated after a crash before its outcome was stored.

What the run did and when to come back is its `Delivery`; its `follow_ups` are the tasks to come.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta

import redis
import structlog

from orchestration import names
from orchestration.backoff import backoff_delay
from orchestration.db import get_pool
from orchestration.delivery import metrics as delivery_metrics
from orchestration.delivery import outbox
from orchestration.delivery.channel import (Channel, NoAnswer, Record, Refused, Rejected, Sent, Unavailable,
                                            none_answered)
from orchestration.delivery.rate import BEYOND_HORIZON, TOO_LATE, Rate, Shares
from orchestration.shared_backoff import SharedBackoff

log = structlog.get_logger("callflow.delivery")

# A booked send time is waited for in hops of at most this long: a Celery countdown is held unacked
# by a worker, and one longer than the broker's visibility timeout (300 s) would be delivered twice.
HOP_SECONDS = 200.0
EARLY_TOLERANCE_SECONDS = 0.05  # a countdown firing this early still sends (the rate's margin covers it)
WAITING_SLACK_SECONDS = 30      # a waiting mark outlives its come-back by this much (a late worker)
# Rows waiting for their recipient's share come back together, per step of this many seconds (a
# flooded account's backlog is a few tasks a second, not one per message).
SHARE_STEP_SECONDS = 0.5


def hop(wait: float) -> float:
    """The countdown towards a send time `wait` seconds away: the remainder first, then whole hops,
    so tasks come back spread like their send times."""
    if wait <= HOP_SECONDS:
        return wait
    return (wait % HOP_SECONDS) or HOP_SECONDS


@dataclass(frozen=True)
class Attempt:
    """What a task carries from one run to the next: its booked send time, whether its rows' shares
    are booked, and how many times in a row the provider gave no answer."""

    slot: float | None = None
    shared: bool = False   # the rows' shares of the rate are booked (only a first look books them)
    failures: int = 0
    back: bool = False     # a task coming back for its own rows (not a first try)

    def again(self, **changes) -> "Attempt":
        return replace(self, back=True, **changes)


@dataclass(frozen=True)
class Deferral:
    """Rows that wait for their recipients' shares of the rate: a task of their own comes back."""

    seconds: float
    ids: list[str]
    shared: bool  # their share is booked: they come back to book the rate only


@dataclass(frozen=True)
class FollowUp:
    """A run to come: its rows, in how many seconds (None: now), with what attempt; `again`: the
    rows of the run that left it (a task comes back as itself)."""

    ids: list[str]
    countdown: float | None = None
    attempt: Attempt | None = None
    again: bool = False

    @property
    def kwargs(self) -> dict:
        """The attempt as the task's keyword arguments (none for a first try)."""
        return asdict(self.attempt) if self.attempt is not None else {}


@dataclass
class Delivery:
    """What one run did, and whether (and when) the task must come back."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    come_back_in: float | None = None
    again: Attempt | None = None                       # the attempt the task comes back with
    ids: list[str] = field(default_factory=list)       # the rows it comes back for
    others: list[str] = field(default_factory=list)    # more than a batch: for other tasks, now
    deferred: list[Deferral] = field(default_factory=list)
    cause: str = ""

    def follow_ups(self, batch_size: int) -> list["FollowUp"]:
        """The runs this one leaves to come: more than a batch in tasks of their own now, rows
        waiting for their shares when those let them go, and (last) this run's own rows again."""
        out = [FollowUp(self.others[start:start + batch_size]) for start in range(0, len(self.others), batch_size)]
        out += [FollowUp(d.ids, d.seconds, Attempt(shared=d.shared, back=True)) for d in self.deferred]
        if self.come_back_in is not None and self.ids:
            out.append(FollowUp(self.ids, self.come_back_in, self.again, again=True))
        return out

    @property
    def summary(self) -> str:
        waiting = sum(len(d.ids) for d in self.deferred)
        return f"{self.sent} sent, {self.failed} failed, {self.skipped} skipped" + (
            f", {waiting} waiting for their share" if waiting else "") + (
            f", back in {self.come_back_in:.1f} s ({self.cause})" if self.come_back_in is not None else "")


def report(channel: str, out: Delivery) -> None:
    """A run's lines: what it sent, failed and skipped; how many wait for their shares."""
    if out.deferred:
        log.info("deliver: rows wait for their share of the rate", channel=channel,
                 waiting=sum(len(d.ids) for d in out.deferred),
                 come_back_in=round(max(d.seconds for d in out.deferred), 2))
    if out.sent or out.failed or out.skipped:
        log.info("delivered", channel=channel, sent=out.sent, failed=out.failed, skipped=out.skipped)


class Deliverer:
    """A channel's delivery: its rows, its rate and its provider's retry loop, over shared clients."""

    def __init__(self, channel: Channel, database_url: str, redis_client: redis.Redis,
                 rate: Rate | None = None, loop: SharedBackoff | None = None) -> None:
        self.channel = channel
        self.database_url = database_url
        self.redis = redis_client
        p = channel.provider
        self.rate = rate or Rate(redis_client, p.rate_per_second, p.rate_key, margin=p.margin)
        self.loop = loop or SharedBackoff(redis_client, p.name, p.retry_base_seconds, p.retry_max_seconds,
                                          probe_seconds=p.probe_seconds)
        self.shares = Shares.of(self.rate) if channel.shares else None

    # ---- Redis marks: waiting, re-sent -----------------------------------------------------------

    def not_waiting(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.exists(names.delivery_waiting_key(self.channel.name, i))
        return [i for i, waiting in zip(ids, pipe.execute()) if not waiting]

    def mark_waiting(self, ids: list[str], seconds: float) -> None:
        if ids:
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.set(names.delivery_waiting_key(self.channel.name, i), 1,
                         ex=max(1, int(seconds + WAITING_SLACK_SECONDS)))
            pipe.execute()

    def claim_for_resend(self, ids: list[str]) -> list[str]:
        """The sweep's pick among stale pending rows: those no task waits to come back for, and not
        re-sent by an earlier sweep within the channel's `resend_every`."""
        ids = self.not_waiting(ids)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.set(names.delivery_resent_key(self.channel.name, i), 1, nx=True, ex=self.channel.resend_every)
        return [i for i, first in zip(ids, pipe.execute()) if first]

    def _recorded(self, results: list) -> None:
        """After the outcomes' commit, one round trip: their rows are waited for no more (a waiting
        mark outlives its come-back by WAITING_SLACK_SECONDS: left, it would turn away the first try
        of `callflow notifications retry` for the row that just failed), and the outcomes counted. A
        Redis that does not answer loses neither (the rows hold the truth; a mark expires)."""
        if not results:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(*[names.delivery_waiting_key(self.channel.name, row_id) for row_id, _, _, _ in results])
            delivery_metrics.add_counts(pipe, self.channel.name, [status for _, status, _, _ in results])
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("deliver: outcomes not counted", channel=self.channel.name, error=str(exc)[:200])

    # ---- one run -------------------------------------------------------------------------------

    def run(self, ids: list[str], attempt: Attempt = Attempt(), top_up: bool = True) -> Delivery:
        """`top_up`: a first try fills its batch up with other pending rows (a first try where the
        rows were decided sends just those: the others have runs of their own under way)."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        out = Delivery()
        if attempt.slot is not None and self.channel.limited:
            wait = self.rate.until_slot(attempt.slot)
            if wait > EARLY_TOLERANCE_SECONDS:  # not yet: another hop, no database work
                return self._again(out, ids, hop(wait), attempt, "waiting for its booked send time")
        with get_pool(self.database_url).connection() as conn:
            try:
                if not attempt.back:
                    # A first try tops a batch up with what else is pending, and leaves alone the
                    # rows a task waits to come back for (one task per row, each at its own step).
                    if top_up and self.channel.batch_size > 1 and len(ids) < self.channel.batch_size:
                        ids += self.channel.more_pending(conn, self.channel.batch_size - len(ids), ids)
                    ids = self.not_waiting(ids)
                # The rows locked from the read to their recorded outcome, in one transaction: a
                # second task for them meanwhile skips them, and a worker killed mid-send loses its
                # connection and the locks with it (the redelivered task, or the sweep's, sends
                # again). The transaction's clock comes in the same round trip.
                with conn.pipeline():
                    clock = conn.execute("select now() as now")
                    rows = self.channel.load(conn, ids, lock=True) if ids else []
                    now = clock.fetchone()["now"]
                return self._deliver(conn, [r for r in rows if r.status == "pending"], now, attempt, out)
            except BaseException:
                conn.rollback()
                raise

    def _holder(self, ids: list[str]) -> str:
        """Who a booking is for: the same rows, the same booking (a duplicate task reuses it)."""
        return ids[0] if len(ids) == 1 else hashlib.sha1(",".join(sorted(ids)).encode()).hexdigest()

    def _again(self, out: Delivery, ids: list[str], seconds: float, attempt: Attempt, cause: str) -> Delivery:
        out.ids, out.come_back_in, out.again, out.cause = ids, seconds, attempt.again(), cause
        return out

    def _come_back_later(self, rows: list[Record], wait: float, now: datetime, results: list, out: Delivery,
                         attempt: Attempt, cause: str) -> None:
        """Rows that got no answer: they go again in `wait` seconds, but one that would then be too
        late is skipped now (with the cause)."""
        at = now + timedelta(seconds=wait)
        keep = []
        for row in rows:
            why = self.channel.skip_reason(row, now, at)
            if why:
                results.append((row.id, "skipped", None, f"{why} ({cause})"))
            else:
                keep.append(row.id)
        if keep:
            self._again(out, keep, wait, attempt, cause)

    def _within_shares(self, rows: list[Record], now: datetime, results: list, out: Delivery) -> list[Record]:
        """The rows their recipients' shares let go now; the others wait for theirs (a task comes
        back for them), or are skipped when they could not go within their share in time."""
        ordered = sorted(rows, key=self.channel.order)
        waits = self.shares.book([self.channel.share_of(r, now) for r in ordered])
        go: set[str] = set()
        later: dict[float, list[str]] = {}
        beyond: list[str] = []
        for row, wait in zip(ordered, waits):
            if wait == TOO_LATE:
                results.append((row.id, "skipped", None, self.channel.share_skip_reason(row)))
            elif wait == BEYOND_HORIZON:
                beyond.append(row.id)
            elif wait <= 0:
                go.add(row.id)
            else:
                step = math.ceil(wait / SHARE_STEP_SECONDS) * SHARE_STEP_SECONDS
                later.setdefault(step, []).append(row.id)
        out.deferred += [Deferral(seconds, ids, shared=True) for seconds, ids in sorted(later.items())]
        if beyond:  # nothing booked: they try again once the horizon has moved on
            out.deferred.append(Deferral(self.shares.horizon, beyond, shared=False))
        return [r for r in rows if r.id in go]

    def _deliver(self, conn, rows: list[Record], now: datetime, attempt: Attempt, out: Delivery) -> Delivery:
        channel = self.channel
        results: list[tuple[str, str, str | None, str | None]] = []
        sendable = []
        for row in rows:
            if channel.expiry is not None and row.created_at < now - channel.expiry:
                results.append((row.id, "failed", None, outbox.expired_reason(channel)))
                continue
            why = channel.skip_reason(row, now, now)
            if why:
                results.append((row.id, "skipped", None, why))
            else:
                sendable.append(row)
        # One batch a run, with a send time booked for it alone: the rest goes to other tasks.
        out.others = [r.id for r in sendable[channel.batch_size:]]
        sendable = sendable[:channel.batch_size]
        if sendable and not attempt.shared and self.shares is not None:
            # Each recipient's share first: only what it lets go now books the rate, so one
            # account's flood cannot book the line ahead of everyone else's messages.
            sendable = self._within_shares(sendable, now, results, out)
        if self.shares is not None:
            attempt = replace(attempt, shared=True)  # booked from here on (or not of use: skipped)
        turn = self.loop.turn() if sendable and channel.limited else None
        if turn and turn.wait > 0:  # the provider gave no answer lately: nobody asks before its loop says so
            self._come_back_later(sendable, turn.wait + random.uniform(0, 0.2), now, results, out, attempt,
                                  f"{channel.provider.name} gave no answer lately")
            sendable = []
        if sendable and channel.limited:
            slot = attempt.slot
            if slot is None:
                wait, slot = self.rate.book(len(sendable), holder=f"{channel.name}:{self._holder([r.id for r in sendable])}",
                                            horizon=channel.booking_horizon)
                if slot is None or wait > EARLY_TOLERANCE_SECONDS:
                    # Not before the booked time: whatever would then be too late is skipped now.
                    self._come_back_later(sendable, hop(wait), now, results, out, replace(attempt, slot=slot),
                                          "waiting for its booked send time")
                    sendable = []
            if sendable and channel.provider.spacing:
                wait = self.rate.pass_gate()
                if wait > 0:
                    self._again(out, [r.id for r in sendable], wait, replace(attempt, slot=slot),
                                "keeping the spacing of requests")
                    sendable = []
        if sendable:
            self._send(conn, sendable, now, turn, attempt, results, out)
        elif turn is not None and turn.wait == 0:
            self.loop.release(turn)  # a probe that waits for its send time asks nothing: the next one may
        if out.come_back_in is not None:
            self.mark_waiting(out.ids, out.come_back_in)
        for deferral in out.deferred:
            self.mark_waiting(deferral.ids, deferral.seconds)
        outbox.finish(conn, channel, results)
        conn.commit()
        self._recorded(results)
        for _, status, _, _ in results:
            setattr(out, status, getattr(out, status) + 1)
        return out

    def _send(self, conn, rows: list[Record], now: datetime, turn, attempt: Attempt, results: list,
              out: Delivery) -> None:
        channel = self.channel
        ids = [r.id for r in rows]
        messages = [channel.compose(r, now) for r in rows]
        try:
            answers = channel.send(messages)
            if answers and all(isinstance(a, NoAnswer) for a in answers):
                raise none_answered(answers)
        except Unavailable as exc:
            outbox.attempted(conn, channel, ids)
            outbox.note_error(conn, channel, ids, str(exc))
            if exc.rate_limited and exc.retry_after and channel.limited:
                self.rate.hold_off(exc.retry_after)
            wait = self.loop.failed(turn, exc.retry_after) if turn is not None else \
                (exc.retry_after or backoff_delay(attempt.failures + 1, channel.provider.retry_base_seconds,
                                                  channel.provider.retry_max_seconds))
            wait = max(wait, 0.2) + random.uniform(0, 0.2)
            self._come_back_later(rows, wait, now, results, out, replace(attempt, slot=None, failures=attempt.failures + 1),
                                  f"{channel.provider.name} gave no answer: {exc}")
            log.warning("delivery: no answer", channel=channel.name, error=str(exc)[:300], messages=len(rows),
                        come_back_in=round(wait, 2))
            return
        except Rejected as exc:
            outbox.attempted(conn, channel, ids)
            if turn is not None:
                self.loop.succeeded()  # a refusal is an answer
            results += [(r.id, "failed", None, str(exc)) for r in rows]
            log.warning("delivery: refused", channel=channel.name, error=str(exc)[:300], messages=len(rows))
            return
        # Counted in the transaction that records the outcome, after the request: nothing but the
        # request stands between the rows' read and the provider (a process that dies in the
        # request rolls the count back either way).
        outbox.attempted(conn, channel, ids)
        if turn is not None:
            self.loop.succeeded()
        gone: list[str] = []
        unanswered: list[Record] = []
        for row, message, answer in zip(rows, messages, answers):
            if isinstance(answer, Sent):
                results.append((row.id, "sent", answer.provider_id, None))
                log.info("delivery: sent", channel=channel.name, id=row.id, provider_id=answer.provider_id,
                         **channel.describe_sent(row, message, answer))
            elif isinstance(answer, Refused):
                results.append((row.id, "failed", None, answer.error))
                if answer.gone:
                    gone.append(answer.gone)
                log.warning("delivery: failed", channel=channel.name, id=row.id, error=answer.error[:300])
            elif isinstance(answer, NoAnswer):
                unanswered.append(row)
        channel.forget(conn, gone)
        if unanswered:
            outbox.note_error(conn, channel, [r.id for r in unanswered], "the provider asked to slow down")
            wait = backoff_delay(attempt.failures + 1, channel.provider.retry_base_seconds,
                                 channel.provider.retry_max_seconds)
            self._come_back_later(unanswered, wait, now, results, out,
                                  replace(attempt, slot=None, failures=attempt.failures + 1),
                                  "the provider asked to slow down")
