"""A per-key sliding-window rate limiter in Redis, shared by every `web` process.

One sorted set per key holds the accepted requests of the last window (scored by the Redis
server's clock, so machines with skewed clocks agree). A Lua script trims, counts and admits
atomically; a refused request is not counted, so a client that keeps retrying gets in as soon
as the window frees a slot, and `retry_after` says when that is.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from orchestration import names

_SCRIPT = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
  return {1, limit - count - 1, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local retry = window
if oldest[2] then retry = tonumber(oldest[2]) + window - now end
return {0, 0, retry}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    remaining: int
    retry_after_ms: int

    @property
    def retry_after_seconds(self) -> int:
        """For the `Retry-After` header: whole seconds, at least 1."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


class RateLimiter:
    def __init__(self, client: aioredis.Redis, *, limit: int, window_seconds: float = 60.0,
                 prefix: str = names.RATELIMIT_PREFIX) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.client = client
        self.limit = limit
        self.window_ms = int(window_seconds * 1000)
        self.prefix = prefix
        self._script = client.register_script(_SCRIPT)

    async def hit(self, key: str) -> RateDecision:
        allowed, remaining, retry = await self._script(
            keys=[f"{self.prefix}:{key}"], args=[self.limit, self.window_ms, uuid.uuid4().hex]
        )
        return RateDecision(bool(int(allowed)), int(remaining), max(0, int(retry)))
