"""The one path every invitation change takes: Redis dedupe and a list the workers take from.

`IngestSink.submit(changes)` runs one Lua script for the whole batch (the backlog's
`LIST_ONCE_LUA`, which `web` uses too): for each change, `SET
callflow:ingest:seen:realtime:<invitation id>:<status> NX EX ttl` and, only if the mark is new,
`LPUSH` the change (the task argument, as JSON) onto the list `callflow:ingest:changes`.
Mark and change go in together or not at all, so two listeners, a reconnect and the catch-ups
list each transition exactly once, and a crash never leaves a mark without its change. (The
lifecycle is idempotent on `call_events.event_id` anyway.) The echo of a transition the
lifecycle worker made itself (`Change.worker_echo`: the row's `status_by`, written by the
database in the worker's transaction) is dropped before, neither marked nor listed; the
catch-up skips such rows too.

Workers are nudged, not handed one task per change: the list is a backlog
(`orchestration.ingest.backlog`) whose nudge is one `callflow.invitations_changed` message (no
arguments, pre-built like the webhook consumer's, announced with its `task-sent` event) on queue
`events`; that task takes up to 32 waiting changes and decides them together. A lost change is
made good by the sweeps.

`catch_up()` is the safety net behind both sources (Realtime delivers at most once; NOTIFY is
lost while nobody listens): it reads the invitations whose `(updated_at, id)` is past the
watermark kept in Redis (shared by every listener and the beat task), feeds them through the same
sink, and moves the watermark (monotonically) to the database time of the scan minus an overlap.
So each catch-up re-reads only the last overlap-plus-interval of changes; rows seen again hit their
dedupe keys and are not enqueued again, and older rows are never read again, so old rows are not
re-enqueued forever (not even after their dedupe keys expire).

`updated_at` is stamped with the writer's transaction start (`now()`), so a row becomes visible
up to one transaction's length after its `updated_at`: the overlap (default 30 s) must exceed
the longest transaction that writes invitations (clients write with single statements).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from psycopg.rows import tuple_row
from redis.exceptions import ResponseError as RedisResponseError

from orchestration import names
from orchestration.ingest.backlog import CHANGES, LIST_ONCE_LUA, TAKE_AT_MOST, Backlog
from orchestration.ingest.mapping import (
    TASK_NAME, TASK_QUEUE, Change, MalformedChange, dedupe_key, from_row, is_worker_echo,
)

WATERMARK_KEY = names.INGEST_WATERMARK
DEDUPE_TTL_SECONDS = names.INGEST_SEEN_TTL_SECONDS
CHANGES_KEY = CHANGES.items
NUDGE_KEY = CHANGES.nudged

# KEYS[1]: watermark. ARGV[1]: microseconds since the epoch. Only ever moves forward.
_ADVANCE = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
"""

@dataclass
class SubmitResult:
    enqueued: list[Change] = field(default_factory=list)
    duplicates: int = 0
    echoes: int = 0  # dropped: the echo of a transition the lifecycle worker made itself


class IngestSink:
    """Dedupe + list the changes on the Celery Redis broker `redis` (the `REDIS_URL` the workers
    consume), nudging a worker; and, on the workers' side, take them."""

    def __init__(self, redis: Any, *, queue: str = TASK_QUEUE, ttl_seconds: int = DEDUPE_TTL_SECONDS) -> None:
        from orchestration.adapters.celery_messages import CeleryMessageBuilder

        self.redis = redis
        self.queue = queue
        self.ttl = int(ttl_seconds)
        builder = CeleryMessageBuilder.for_task(TASK_NAME, queue)
        self.backlog = Backlog(redis, CHANGES, queue, builder.prebuilt)
        self._enqueue = redis.register_script(LIST_ONCE_LUA)

    def submit(self, changes: Iterable[Change]) -> SubmitResult:
        """List each change whose transition was not listed before; raises if Redis fails.

        The echo of a transition the lifecycle worker made itself is dropped here, unlisted and
        unmarked: its effects were committed with it (the worker's guard in
        `invitation_changed` would only record it)."""
        unique: dict[str, Change] = {}
        duplicates = echoes = 0
        for change in changes:
            if change.worker_echo:
                echoes += 1
                continue
            key = dedupe_key(change.invitation_id, change.status)
            if key in unique:
                duplicates += 1
            else:
                unique[key] = change
        if not unique:
            return SubmitResult(duplicates=duplicates, echoes=echoes)
        keys = list(unique)
        batch = [unique[k] for k in keys]
        nudge = self.backlog.nudge()
        listed = self._enqueue(keys=keys + [CHANGES_KEY, NUDGE_KEY, self.queue],
                               args=[self.ttl, self.backlog.sent_channel, nudge.message, nudge.sent_event,
                                     *(json.dumps(c.to_wire()) for c in batch)])
        failed = [r for r in listed if not isinstance(r, int)]
        if failed:  # the script kept no mark for these: the listener's retry lists them
            text = failed[0].decode(errors="replace") if isinstance(failed[0], bytes) else str(failed[0])
            raise RedisResponseError(f"listing changes failed: {text}")
        enqueued = [c for c, t in zip(batch, listed) if t == 1]
        return SubmitResult(enqueued=enqueued, duplicates=duplicates + len(batch) - len(enqueued), echoes=echoes)

    # ---- the workers' side ---------------------------------------------------------------------
    def take(self, task_id: str, first: bool = True, at_most: int = TAKE_AT_MOST) -> list[dict]:
        return self.backlog.take(task_id, first, at_most)

    def done(self, task_id: str) -> None:
        self.backlog.done(task_id)

    def nudge_if_waiting(self) -> bool:
        """A nudge for changes left waiting (their nudge lost): the beat's catch-up asks every 5 s."""
        return self.backlog.nudge_if_waiting()


# ---- watermark --------------------------------------------------------------------------------
def _to_us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc) + timedelta(microseconds=us % 1_000_000)


def read_watermark(redis: Any) -> datetime | None:
    raw = redis.get(WATERMARK_KEY)
    return _from_us(int(raw)) if raw is not None else None


def advance_watermark(redis: Any, to: datetime) -> datetime:
    script = redis.register_script(_ADVANCE)
    return _from_us(int(script(keys=[WATERMARK_KEY], args=[_to_us(to)])))


# ---- catch-up ---------------------------------------------------------------------------------
@dataclass
class CatchUpResult:
    scanned: int = 0
    enqueued: list[Change] = field(default_factory=list)
    duplicates: int = 0
    echoes: int = 0
    malformed: int = 0
    watermark: datetime | None = None
    started_from: datetime | None = None


# A page of (id, status, updated_at, status_by): most rows were listed already (by a listener, or
# the last catch-up's overlap), and one MGET of their marks tells which; only the others are read
# whole. A row whose status the lifecycle worker made (ringing, missed, busy, failed with
# status_by 'worker') is skipped before: its transition was the worker's own, nothing to hand on.
_PAGE_SQL = """
select id::text, status, updated_at, status_by
  from public.call_invitations
 where (updated_at, id) > (%s, %s::uuid)
 order by updated_at, id
 limit %s
"""
_COLUMNS = ("id", "status", "room_name", "caller_id", "callee_id", "call_type", "created_at", "updated_at",
            "status_by")
_ROWS_SQL = f"select {', '.join(_COLUMNS)} from public.call_invitations where id = any(%s::uuid[]) order by updated_at, id"


def catch_up(conn: Any, sink: IngestSink, *, source: str = "postgres", overlap_seconds: float = 30.0,
             initial_horizon_seconds: float = 3600.0, page_size: int = 1000, max_rows: int = 50_000,
             on_malformed: Callable[[str], None] | None = None) -> CatchUpResult:
    """Enqueue every invitation change past the watermark that is not enqueued yet; move the watermark.

    `conn` is a psycopg connection (dict rows or tuples); nothing is written to the database.
    """
    redis = sink.redis
    result = CatchUpResult()
    row = conn.execute("select now() as now").fetchone()
    db_now = row["now"] if isinstance(row, dict) else row[0]
    mark = read_watermark(redis)
    start = mark if mark is not None else db_now - timedelta(seconds=initial_horizon_seconds)
    result.started_from = start
    cursor_ts, cursor_id = start, "00000000-0000-0000-0000-000000000000"
    truncated = False
    while True:
        if result.scanned >= max_rows:
            truncated = True
            break
        cur = conn.cursor(row_factory=tuple_row)
        page = cur.execute(_PAGE_SQL, (cursor_ts, cursor_id, page_size)).fetchall()
        if not page:
            break
        cursor_id, _, cursor_ts, _ = page[-1]
        ours = [(i, status) for i, status, _, by in page if not is_worker_echo(status, by)]
        result.echoes += len(page) - len(ours)
        marked = redis.mget([dedupe_key(i, status) for i, status in ours]) if ours else []
        unmarked = [i for (i, _), m in zip(ours, marked) if m is None]
        result.duplicates += len(ours) - len(unmarked)
        changes: list[Change] = []
        if unmarked:
            for row in cur.execute(_ROWS_SQL, (unmarked,)).fetchall():
                try:
                    changes.append(from_row(dict(zip(_COLUMNS, row)), source))
                except MalformedChange as exc:
                    result.malformed += 1
                    if on_malformed:
                        on_malformed(str(exc))
        submitted = sink.submit(changes)  # drops an echo too: the row may have moved since its page
        result.enqueued.extend(submitted.enqueued)
        result.duplicates += submitted.duplicates
        result.echoes += submitted.echoes
        result.scanned += len(page)
        if len(page) < page_size:
            break
    if hasattr(conn, "commit") and not getattr(conn, "autocommit", True):
        conn.commit()  # end the read-only transaction; nothing was written
    # Everything older than (scan time - overlap) is committed and was read; a truncated scan may
    # only claim what it read.
    target = db_now - timedelta(seconds=overlap_seconds)
    if truncated:
        target = min(target, cursor_ts)
    result.watermark = advance_watermark(redis, target)
    return result
