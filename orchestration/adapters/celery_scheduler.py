"""The scheduler port on Celery: countdown tasks and queue hand-offs, sent after commit."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Mapping

import redis
import structlog
from celery import Celery


from orchestration import names
from orchestration.ingest.mapping import Change
from orchestration.adapters.celery_messages import PUSH_TASK_LUA, CeleryMessageBuilder, task_sent_channel_of
from orchestration.delivery.loop import Deliverer, report
from orchestration.names import TIMER_BUCKET_SECONDS

log = structlog.get_logger("callflow.delivery")

BUCKET_TASK = names.RING_TIMEOUTS_DUE
BUCKET_TTL_SECONDS = names.TIMER_BUCKET_TTL_SECONDS
# KEYS: the buckets' marks, then the queue. ARGV: the marks' ttl, the `task-sent` channel, then per
# bucket its countdown message and that message's `task-sent` event ('' for none). A bucket's
# message (and event) is pushed only by whoever sets its mark. Returns how many were pushed.
_BUCKETS = PUSH_TASK_LUA + """
local queue = KEYS[#KEYS]
local pushed = 0
for i = 1, #KEYS - 1 do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    local reply = push_task(queue, ARGV[1 + 2 * i], ARGV[2], ARGV[2 + 2 * i])
    if type(reply) == 'table' then return reply end
    pushed = pushed + 1
  end
end
return pushed
"""


def bucket_end(at: datetime) -> float:
    """The end of the bucket holding `at` (unix seconds, a multiple of the bucket width)."""
    return math.ceil(round(at.timestamp() / TIMER_BUCKET_SECONDS, 6)) * TIMER_BUCKET_SECONDS


class CeleryScheduler:
    def __init__(self, app: Celery, redis_client: redis.Redis | None = None,
                 first_try_here: Mapping[str, Deliverer] | None = None) -> None:
        """`redis_client`: the broker's Redis (the worker process's shared client, `workers.clients`);
        without one, a client on the app's `broker_url` is made on first use. `first_try_here`: the
        channels whose first try runs in this process, with their deliverers (a worker's pushes)."""
        self.app = app
        self.first_try_here = dict(first_try_here or {})
        self._redis: redis.Redis | None = redis_client
        self._buckets = None
        self._builder: CeleryMessageBuilder | None = None
        self._sent_channel = b""

    def _r(self) -> redis.Redis:
        if self._buckets is None:
            if self._redis is None:
                self._redis = redis.Redis.from_url(self.app.conf.broker_url)
            self._sent_channel = task_sent_channel_of(self._redis)
            # Announced as `send_task` would announce them with this app: `task_send_sent_event`.
            self._builder = CeleryMessageBuilder.for_task(BUCKET_TASK, names.Q_TIMERS,
                                                          sent_events=bool(self.app.conf.task_send_sent_event))
            self._buckets = self._redis.register_script(_BUCKETS)  # last: set means ready
        return self._redis

    def ring_timeouts(self, deadlines: list[tuple[str, datetime]]) -> None:
        # A countdown task per deadline bucket, sent by the first invitation in it: marks and
        # pre-built messages in one script call (send_task was a fifth of a ringing's worker CPU).
        # The beat sweep enforces the same deadlines without them.
        ends = sorted({bucket_end(at) for _, at in deadlines})
        if not ends:
            return
        self._r()
        keys = [names.timer_bucket_key(int(round(end * 1000))) for end in ends]
        countdowns = [self._builder.prebuilt([end], eta=datetime.fromtimestamp(end, tz=timezone.utc)) for end in ends]
        self._buckets(keys=keys + [names.Q_TIMERS],
                      args=[BUCKET_TTL_SECONDS, self._sent_channel, *(part for task in countdowns for part in task)])

    def ring_timeout_bucket(self, end: float) -> None:
        self.app.send_task(BUCKET_TASK, args=[end], queue=names.Q_TIMERS,
                           eta=datetime.fromtimestamp(end, tz=timezone.utc))

    def ring_timeout_at(self, invitation_id: str, at: datetime) -> None:
        """One invitation's own countdown (a re-schedule after an early look)."""
        self.app.send_task(names.RING_TIMEOUT, args=[invitation_id, "timer"], eta=at, queue=names.Q_TIMERS)

    def grace_expiry(self, room_name: str, participant_sid: str, identity: str, aborted: bool | None, delay: float) -> None:
        self.app.send_task(names.GRACE_EXPIRED, args=[room_name, participant_sid, identity, aborted],
                           countdown=delay, queue=names.Q_TIMERS)

    def deliver(self, channel: str, ids: list[str]) -> None:
        """A first try of `channel`'s rows: here and now for a channel in `first_try_here`, else a
        task on the channel's queue."""
        here = self.first_try_here.get(channel)
        if here is None:
            self.queue_delivery(channel, ids)
            return
        # A ring's pushes go from the process that made it ring, right after its commit: no queue
        # between `ringing` and the phone. The run never sleeps (a booked send time, a provider
        # giving no answer, a share taken: each is a countdown task, as in the task itself).
        try:
            out = here.run(ids, top_up=False)
        except Exception as exc:  # noqa: BLE001 - the decision is committed: never fail it for a push
            log.warning("delivery: first try here failed, the task takes it", channel=channel,
                        error=repr(exc)[:300])
            self.queue_delivery(channel, ids)
            return
        report(channel, out)
        for follow in out.follow_ups(here.channel.batch_size):
            self.queue_delivery(channel, follow.ids, follow.countdown, follow.kwargs)

    def queue_delivery(self, channel: str, ids: list[str], countdown: float | None = None,
                       attempt: dict | None = None) -> None:
        """A `callflow.deliver` task for `channel`'s rows on its queue (in `countdown` seconds, with
        the `attempt` a run left: `Delivery.follow_ups`)."""
        self.app.send_task(names.DELIVER, args=[channel, ids], kwargs=attempt or None, countdown=countdown,
                           queue=names.CHANNEL_QUEUES[channel])

    def invitation_changed(self, change: Change) -> None:
        self.app.send_task(names.INVITATION_CHANGED, args=[change.to_wire()], queue=names.Q_EVENTS)


# KEYS: the mark. ARGV: where the walk got to, how long the mark is kept (ms). Never moves back.
_MOVE_MARK = """
local now = tonumber(redis.call('GET', KEYS[1]) or '-1e300')
if tonumber(ARGV[1]) > now then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class RedisThrottle:
    """`once(key, seconds)` across all workers: a Redis key set only if absent, with an expiry; and
    the marks of walks shared by all workers (`mark`, `move_mark`)."""

    def __init__(self, client: redis.Redis, prefix: str = names.SWEEP_THROTTLE_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._move_mark = client.register_script(_MOVE_MARK)

    def once(self, key: str, seconds: float) -> bool:
        return bool(self.client.set(self.prefix + key, 1, nx=True, px=max(1, int(seconds * 1000))))

    def forget(self, key: str) -> None:
        self.client.delete(self.prefix + key)

    def mark(self, key: str) -> float | None:
        value = self.client.get(self.prefix + "mark:" + key)
        return float(value) if value is not None else None

    def move_mark(self, key: str, at: float, keep_seconds: float) -> None:
        self._move_mark(keys=[self.prefix + "mark:" + key], args=[repr(at), max(1, int(keep_seconds * 1000))])
