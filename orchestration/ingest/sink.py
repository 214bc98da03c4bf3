"""The one path every invitation change takes: Redis dedupe, then the Celery task.

`IngestSink.submit(changes)` claims each change's dedupe key (`callflow:ingest:seen:realtime:
<invitation id>:<status>`) with one Lua call for the whole batch, enqueues the claimed ones as
`callflow.invitation_changed` on queue `events`, then marks them sent. A claim that was never
marked sent (the process died between claim and enqueue) goes stale after `stale_claim_seconds`
and the next catch-up may take it again, so a crash can at worst enqueue a transition twice (the
lifecycle task is idempotent on `call_events.event_id`), never lose it.

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

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Sequence

from orchestration.ingest.mapping import TASK_NAME, TASK_QUEUE, Change, MalformedChange, dedupe_key, from_row

WATERMARK_KEY = "callflow:ingest:watermark"
DEDUPE_TTL_SECONDS = 2 * 24 * 3600

# KEYS: dedupe keys. ARGV: now_ms, ttl_seconds, stale_ms. Returns 1 per key claimed, else 0.
_CLAIM = """
local out = {}
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  local take = 0
  if not v then
    take = 1
  elseif string.sub(v, 1, 8) == 'claimed:' then
    local at = tonumber(string.sub(v, 9))
    if at == nil or at < now - tonumber(ARGV[3]) then take = 1 end
  end
  if take == 1 then redis.call('SET', key, 'claimed:' .. ARGV[1], 'EX', ARGV[2]) end
  out[i] = take
end
return out
"""

# KEYS: dedupe keys. ARGV: claim value. Frees claims still holding that value (enqueue failed).
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
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

Sender = Callable[[Sequence[dict[str, Any]]], None]


def celery_sender(app: Any) -> Sender:
    """Enqueue task args with one producer for the batch (the Celery app of `workers.app`)."""

    def send(changes: Sequence[dict[str, Any]]) -> None:
        with app.producer_or_acquire() as producer:
            for change in changes:
                app.send_task(TASK_NAME, args=[change], queue=TASK_QUEUE, producer=producer)

    return send


@dataclass
class SubmitResult:
    enqueued: list[Change] = field(default_factory=list)
    duplicates: int = 0


class IngestSink:
    def __init__(self, redis: Any, send: Sender, *, ttl_seconds: int = DEDUPE_TTL_SECONDS,
                 stale_claim_seconds: float = 60.0) -> None:
        self.redis = redis
        self.send = send
        self.ttl = int(ttl_seconds)
        self.stale_ms = int(stale_claim_seconds * 1000)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

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
        now_ms = int(time.time() * 1000)
        keys = list(unique)
        taken = self._claim(keys=keys, args=[now_ms, self.ttl, self.stale_ms])
        claimed_keys = [k for k, t in zip(keys, taken) if int(t) == 1]
        duplicates += len(keys) - len(claimed_keys)
        if not claimed_keys:
            return SubmitResult(duplicates=duplicates)
        claimed = [unique[k] for k in claimed_keys]
        try:
            self.send([c.as_task_arg() for c in claimed])
        except BaseException:
            try:
                self._release(keys=claimed_keys, args=[f"claimed:{now_ms}"])
            except Exception:  # noqa: BLE001 - a stale claim is taken again by a later catch-up
                pass
            raise
        pipe = self.redis.pipeline(transaction=False)
        for key in claimed_keys:
            pipe.set(key, "sent", ex=self.ttl, xx=True)
        pipe.execute()
        return SubmitResult(enqueued=claimed, duplicates=duplicates)


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
