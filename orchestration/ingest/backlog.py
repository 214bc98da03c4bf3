"""A backlog the workers take from in batches: a Redis list of task arguments, and one nudge.

Two paths use it: invitation changes (`orchestration.ingest.sink`, listed by the listener and the
catch-ups) and LiveKit's webhook events (`orchestration.adapters.redis_enqueue`, listed by `web`).
Whoever lists an item also pushes a nudge message (a pre-built Celery task with no arguments) onto
the queue, unless one is waiting already (the nudge mark, `SET NX` with a short expiry), and
publishes the nudge's `task-sent` event with it (`orchestration.adapters.celery_messages.PreBuiltTask`), as
`send_task` would, so Flower lists it from the moment it is queued. The task a nudge starts
`take`s up to `at_most` items, oldest first, and nudges another worker if more are waiting: at low
load an item is one task, under load the backlog itself is the batch, and the busier the workers,
the bigger (and cheaper per item) their batches.

What a task took stays under `<taken prefix><task id>` until it is `done`: a retry, or the
redelivery of a task whose worker died, takes the same items again first. A lost nudge is made good
by the beat (`nudge_if_waiting`, every few seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from orchestration import names
from orchestration.adapters.celery_messages import PUSH_TASK_LUA, PreBuiltTask, task_sent_channel_of

# A task decides at most this many items together (bigger batches hold a worker process longer).
TAKE_AT_MOST = 32
# A nudge mark outlives its message only this long (a lost nudge blocks no other for longer).
NUDGE_TTL_SECONDS = names.NUDGE_TTL_SECONDS
# What a task took is kept this long for its retry or redelivery (then the sweeps have it).
TAKEN_TTL_SECONDS = names.TAKEN_TTL_SECONDS

# Listing (both listers: `web` for webhook events, the listener and catch-ups for changes).
# KEYS: the items' dedupe marks, then the list, the nudge mark and the queue. ARGV: the marks' ttl,
# the `task-sent` channel, the nudge message and its `task-sent` event ('' for none), then the
# items. For each item: `SET mark NX`, and only if the mark is new `LPUSH` the item (if that fails
# the mark is deleted: never a mark without its item); then, if anything was listed and no nudge
# waits, the nudge and its event. Per item: 1 listed now, 0 duplicate, or the error text. A nudge
# that cannot be pushed leaves no mark (the beat nudges within seconds).
LIST_ONCE_LUA = PUSH_TASK_LUA + f"""
local n = #KEYS - 3
local items, nudged, queue, ttl = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], ARGV[1]
local out, listed = {{}}, 0
for i = 1, n do
  local marked = redis.pcall('SET', KEYS[i], '1', 'NX', 'EX', ttl)
  if not marked then
    out[i] = 0
  elseif marked.err then
    out[i] = marked.err
  else
    local pushed = redis.pcall('LPUSH', items, ARGV[i + 4])
    if type(pushed) == 'table' and pushed.err then
      redis.pcall('DEL', KEYS[i])
      out[i] = pushed.err
    else
      out[i] = 1
      listed = listed + 1
    end
  end
end
if listed > 0 then
  local nudge = redis.pcall('SET', nudged, '1', 'NX', 'EX', {NUDGE_TTL_SECONDS})
  if nudge and not nudge.err then
    local pushed = push_task(queue, ARGV[3], ARGV[2], ARGV[4])
    if type(pushed) == 'table' and pushed.err then redis.pcall('DEL', nudged) end
  end
end
return out
"""

# Taking. KEYS: the list, the nudge mark, the queue, this task's taken list. ARGV: at most, the nudge
# message, 1 on a task's first take (its nudge is spent), the `task-sent` channel and the nudge's
# event. Returns the items taken.
_TAKE = PUSH_TASK_LUA + f"""
local items_key, nudged, queue, taken = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if ARGV[3] == '1' then redis.call('DEL', nudged) end
local mine = redis.call('LRANGE', taken, 0, -1)
if #mine > 0 then return mine end
local items = redis.call('RPOP', items_key, ARGV[1])
if not items then return {{}} end
redis.call('RPUSH', taken, unpack(items))
redis.call('EXPIRE', taken, {TAKEN_TTL_SECONDS})
if redis.call('LLEN', items_key) > 0 and redis.call('SET', nudged, '1', 'NX', 'EX', {NUDGE_TTL_SECONDS}) then
  local pushed = push_task(queue, ARGV[2], ARGV[4], ARGV[5])
  if type(pushed) == 'table' then return pushed end
end
return items
"""

# A nudge for items left waiting. KEYS: the list, the nudge mark, the queue. ARGV: the nudge message,
# the `task-sent` channel, the nudge's event. Returns 1 when it nudged.
_NUDGE_IF_WAITING = PUSH_TASK_LUA + f"""
if redis.call('LLEN', KEYS[1]) == 0 or not redis.call('SET', KEYS[2], '1', 'NX', 'EX', {NUDGE_TTL_SECONDS}) then
  return 0
end
local pushed = push_task(KEYS[3], ARGV[1], ARGV[2], ARGV[3])
if type(pushed) == 'table' then
  redis.call('DEL', KEYS[2])
  return pushed
end
return 1
"""


@dataclass(frozen=True)
class BacklogKeys:
    items: str  # the list (LPUSH to list, RPOP to take: oldest first)
    nudged: str  # the nudge mark
    taken_prefix: str  # + task id: what that task took


CHANGES = BacklogKeys(names.INGEST_CHANGES, names.INGEST_NUDGED, names.INGEST_TAKEN_PREFIX)
WEBHOOK_EVENTS = BacklogKeys(names.WEBHOOK_EVENTS, names.WEBHOOK_NUDGED, names.WEBHOOK_TAKEN_PREFIX)


class Backlog:
    """The workers' side of a backlog on the Celery Redis broker `redis` (sync client)."""

    def __init__(self, redis: Any, keys: BacklogKeys, queue: str, nudge: Callable[[], PreBuiltTask]) -> None:
        """`nudge()`: a new nudge (a task message with an id of its own, and its `task-sent` event)
        each time (`CeleryMessageBuilder.prebuilt`)."""
        self.redis = redis
        self.keys = keys
        self.queue = queue
        self.nudge = nudge
        self.sent_channel = task_sent_channel_of(redis)
        self._take = redis.register_script(_TAKE)
        self._nudge_if_waiting = redis.register_script(_NUDGE_IF_WAITING)

    def take(self, task_id: str, first: bool = True, at_most: int = TAKE_AT_MOST) -> list:
        """Up to `at_most` waiting items (JSON-decoded), oldest first, or what this task took before
        and is not done with; nudges another worker when more are waiting."""
        nudge = self.nudge()
        raw = self._take(keys=[self.keys.items, self.keys.nudged, self.queue, self.keys.taken_prefix + task_id],
                         args=[at_most, nudge.message, 1 if first else 0, self.sent_channel, nudge.sent_event])
        return [json.loads(item) for item in raw]

    def done(self, task_id: str) -> None:
        self.redis.delete(self.keys.taken_prefix + task_id)

    def nudge_if_waiting(self) -> bool:
        """A nudge for items left waiting (their nudge lost)."""
        nudge = self.nudge()
        return self._nudge_if_waiting(keys=[self.keys.items, self.keys.nudged, self.queue],
                                      args=[nudge.message, self.sent_channel, nudge.sent_event]) == 1
