"""A user's places for event streams, counted across every `web` process (CALLFLOW_STREAMS_PER_USER).

Each open stream holds a lease in Redis: a member of the sorted set `callflow:streams:<user id>`
scored by when it runs out (Redis's clock, so the processes' clocks need not agree). A Lua script
drops the run-out leases, counts the rest and adds one only under the limit, atomically. A live
stream renews its lease every `RENEW_SECONDS`; a closed one gives it back. A process that dies
without giving its leases back (SIGKILL, a lost machine) costs its users those places for at most
`LEASE_SECONDS`, after which they run out by themselves: nothing to clean up.

When Redis gives no answer the stream is let in on the process's own count (the caller keeps
one per process too), so an outage of Redis never stops calls from ringing in browsers.
"""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from orchestration import names

LEASE_SECONDS = 60.0
RENEW_SECONDS = 15.0

_ACQUIRE = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, now + lease, ARGV[3])
redis.call('PEXPIRE', key, lease)
return 1
"""

# Renewing a lease that ran out meanwhile (Redis restarted empty, a long pause) takes it again:
# the stream is open, so it counts.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class StreamLeases:
    def __init__(self, client: aioredis.Redis, *, limit: int, lease_seconds: float = LEASE_SECONDS,
                 prefix: str = names.STREAMS_PREFIX) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.client = client
        self.limit = limit
        self.lease_ms = int(lease_seconds * 1000)
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    def _key(self, user_id: str) -> str:
        return f"{self.prefix}:{user_id}"

    async def acquire(self, user_id: str) -> str | None:
        """A new lease's id, or None when the user holds `limit` live ones. Raises RedisError."""
        lease = uuid.uuid4().hex
        taken = await self._acquire(keys=[self._key(user_id)], args=[self.limit, self.lease_ms, lease])
        return lease if int(taken) else None

    async def renew(self, user_id: str, lease: str) -> None:
        await self._renew(keys=[self._key(user_id)], args=[self.lease_ms, lease])

    async def release(self, user_id: str, lease: str) -> None:
        await self.client.zrem(self._key(user_id), lease)
