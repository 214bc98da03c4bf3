"""The one path every invitation change takes: Redis dedupe and the Celery task, atomically.

`IngestSink.submit(changes)` runs one Lua script for the whole batch: for each change,
`SET callflow:ingest:seen:realtime:<invitation id>:<status> NX EX ttl` and, only if the mark is
new, `LPUSH` onto queue `events` the message `app.send_task("callflow.invitation_changed",
args=[change], queue="events")` would push (built by the webhook consumer's
`CeleryMessageBuilder`). Mark and message go in together or not at all, so two listeners, a
reconnect and the catch-ups enqueue each transition exactly once, and a crash never leaves a
mark without its message. (The lifecycle task is idempotent on `call_events.event_id` anyway.)

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

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from orchestration.ingest.mapping import TASK_NAME, TASK_QUEUE, Change, MalformedChange, dedupe_key, from_row

WATERMARK_KEY = "callflow:ingest:watermark"
DEDUPE_TTL_SECONDS = 2 * 24 * 3600

# KEYS: the dedupe keys, then the queue list. ARGV: ttl, then one message per key.
# Returns 1 per change marked and queued now, 0 per duplicate.
_ENQUEUE_ONCE = """
local n = #KEYS - 1
local queue = KEYS[#KEYS]
local out = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], 'sent', 'NX', 'EX', ARGV[1]) then
    local pushed = redis.pcall('LPUSH', queue, ARGV[i + 1])
    if type(pushed) == 'table' and pushed.err then
      redis.call('DEL', KEYS[i])
      return redis.error_reply(pushed.err)
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

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


class IngestSink:
    """Dedupe + enqueue onto the Celery Redis broker `redis` (the `REDIS_URL` the workers consume)."""

    def __init__(self, redis: Any, *, queue: str = TASK_QUEUE, ttl_seconds: int = DEDUPE_TTL_SECONDS) -> None:
        from orchestration.webhooks import CeleryMessageBuilder

        self.redis = redis
        self.queue = queue
        self.ttl = int(ttl_seconds)
        self.builder = CeleryMessageBuilder.for_task(TASK_NAME, queue)
        self._script = redis.register_script(_ENQUEUE_ONCE)

    def message(self, change: Change) -> bytes:
        arg = change.as_task_arg()
        return self.builder.build([arg], argsrepr=f"[{{'event_id': {change.event_id!r}, ...}}]")

    def submit(self, changes: Iterable[Change]) -> SubmitResult:
        """Enqueue each change whose transition was not enqueued before; raises if Redis fails."""
        unique: dict[str, Change] = {}
        duplicates = 0
        for change in changes:
            key = dedupe_key(change.invitation_id, change.status)
            if key in unique:
                duplicates += 1
            else:
                unique[key] = change
        if not unique:
            return SubmitResult(duplicates=duplicates)
        keys = list(unique)
        batch = [unique[k] for k in keys]
        taken = self._script(keys=keys + [self.queue], args=[self.ttl] + [self.message(c) for c in batch])
        enqueued = [c for c, t in zip(batch, taken) if int(t) == 1]
        return SubmitResult(enqueued=enqueued, duplicates=duplicates + len(batch) - len(enqueued))


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
    malformed: int = 0
    watermark: datetime | None = None
    started_from: datetime | None = None


_PAGE_SQL = """
select id, status, room_name, caller_id, callee_id, call_type, created_at, updated_at
  from public.call_invitations
 where (updated_at, id) > (%s, %s::uuid)
 order by updated_at, id
 limit %s
"""


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
        rows = conn.execute(_PAGE_SQL, (cursor_ts, cursor_id, page_size)).fetchall()
        if not rows:
            break
        changes: list[Change] = []
        for row in rows:
            if not isinstance(row, dict):
                row = dict(zip(("id", "status", "room_name", "caller_id", "callee_id", "call_type",
                                "created_at", "updated_at"), row))
            try:
                changes.append(from_row(row, source))
            except MalformedChange as exc:
                result.malformed += 1
                if on_malformed:
                    on_malformed(str(exc))
            cursor_ts, cursor_id = row["updated_at"], str(row["id"])
        submitted = sink.submit(changes)
        result.enqueued.extend(submitted.enqueued)
        result.duplicates += submitted.duplicates
        result.scanned += len(rows)
        if len(rows) < page_size:
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
