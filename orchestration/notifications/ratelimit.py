"""One request rate for all workers together: a token bucket in Redis, decided by a Lua script.

Resend limits requests per account (CALLFLOW_EMAIL_RATE_PER_SECOND, 2/s by default); Celery's
`rate_limit` is per worker, so it cannot keep N workers under one account's limit.

The bucket holds one token and refills one every `(1 + margin) / rate` seconds, read on Redis's
own clock (`TIME` inside the script, so the workers' clocks don't matter). Holding at most one
token means no bursts: between any two grants lie at least `(1 + margin) / rate` seconds, so any
one-second window holds at most `rate` grants even when a request reaches Resend up to `margin`
seconds later than its grant (connection set-up, scheduling). A 429 from Resend pushes the next
grant for everybody to after its `retry-after` (`hold_off`).

`try_acquire` never blocks; `acquire(max_wait)` sleeps for at most `max_wait` seconds and says how
long to come back after when it got no token, so a task can re-queue itself instead of holding a
worker slot.
"""

from __future__ import annotations

import random
import time

import redis

DEFAULT_KEY = "callflow:ratelimit:resend"
# Seconds of slack per window between a grant and the request's arrival at Resend.
DEFAULT_MARGIN = 0.1

# Returns 0 when a token was taken, else the milliseconds until the next one.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local free_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < free_at then
  return free_at - now
end
redis.call('SET', KEYS[1], string.format('%.0f', now + interval), 'PX', math.ceil(interval) + 60000)
return 0
"""

# Nobody gets a token for the next ARGV[1] milliseconds (a 429's retry-after).
_HOLD_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local free_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > free_at then
  redis.call('SET', KEYS[1], string.format('%.0f', until_ms), 'PX', math.ceil(tonumber(ARGV[1])) + 60000)
  return until_ms - now
end
return free_at - now
"""


class TokenBucket:
    def __init__(self, client: redis.Redis, rate_per_second: float, key: str = DEFAULT_KEY,
                 margin: float = DEFAULT_MARGIN) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        self.client = client
        self.key = key
        self.rate = rate_per_second
        self.interval_ms = (1.0 + margin) / rate_per_second * 1000.0
        self._acquire = client.register_script(_ACQUIRE)
        self._hold_off = client.register_script(_HOLD_OFF)

    @classmethod
    def from_url(cls, url: str, rate_per_second: float, **kwargs) -> "TokenBucket":
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), rate_per_second, **kwargs)

    def try_acquire(self) -> float:
        """0.0 when a token was taken; else the seconds until the next token (nothing taken)."""
        return int(self._acquire(keys=[self.key], args=[f"{self.interval_ms:.3f}"])) / 1000.0

    def acquire(self, max_wait: float) -> float:
        """Take a token, sleeping at most `max_wait` seconds in all; 0.0 when taken, else how
        long to come back after."""
        deadline = time.monotonic() + max_wait
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return 0.0
            remaining = deadline - time.monotonic()
            if wait > remaining:
                # Spread the returning tasks a little, so they don't all come back at once.
                return wait + random.uniform(0, self.interval_ms / 1000.0)
            # A few milliseconds of jitter so that waiting workers don't all ask at one instant.
            time.sleep(wait + random.uniform(0.001, 0.01))

    def hold_off(self, seconds: float) -> None:
        """Nobody sends before `seconds` from now (Resend answered 429 with this retry-after)."""
        if seconds > 0:
            self._hold_off(keys=[self.key], args=[f"{seconds * 1000.0:.0f}"])
