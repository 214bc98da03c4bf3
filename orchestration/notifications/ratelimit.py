"""One request rate for all workers together: a token bucket in Redis, decided by a Lua script.

Resend limits requests per account (CALLFLOW_EMAIL_RATE_PER_SECOND, 2/s by default); Celery's
`rate_limit` is per worker, so it cannot keep N workers under one account's limit.

The bucket holds one token and refills one every `(1 + margin) / rate` seconds, read on Redis's
own clock (`TIME` inside the script, so the workers' clocks don't matter). Holding at most one
token means no bursts: between any two grants lie at least `(1 + margin) / rate` seconds, so any
one-second window holds at most `rate` grants even when a request reaches Resend up to `margin`
seconds later than its grant (connection set-up, scheduling). A 429 from Resend pushes the next
grant for everybody to after its `retry-after` (`hold_off`).

Tasks never sleep for a token (a sleeping task holds a worker slot an event could use):
`reserve(horizon)` books the next free send time for the caller, at most `horizon` seconds ahead,
and the task re-queues itself with a countdown to that time, holding the booking. Bookings keep the
average rate; a second key, the gate (`pass_gate`), keeps the spacing of the requests themselves:
a booked task that comes back late does not squeeze in right before the next one. A backlog of N emails therefore costs two database runs per email (the
booking, the send) and, while it waits, one Redis call a minute; never N tasks polling together.
`try_acquire` / `acquire` are the non-booking forms (tools and tests).
"""

from __future__ import annotations

import random
import time
import uuid

import redis

from orchestration import names

DEFAULT_KEY = names.RATELIMIT_RESEND
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

# Books the next free grant time, at most ARGV[2] ms ahead, for the holder KEYS[2] (one booking per
# holder: a second task for the same email gets the same slot instead of using up another one).
# Returns {now, slot}: slot = now means "send now"; slot > now: booked for then; slot < 0: nothing
# booked, the queue reaches past the horizon (by -slot ms).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = tonumber(redis.call('GET', KEYS[2]) or '-1')
if held >= now then
  return {now, held}
end
local interval = tonumber(ARGV[1])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
if slot - now > tonumber(ARGV[2]) then
  return {now, -(slot - now - tonumber(ARGV[2]))}
end
local free_at = slot + interval
redis.call('SET', KEYS[1], string.format('%.0f', free_at), 'PX', math.ceil(free_at - now) + 60000)
redis.call('SET', KEYS[2], string.format('%.0f', slot), 'PX', math.ceil(slot - now) + 1000)
return {now, slot}
"""

_NOW_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
        self.gate_key = f"{key}:gate"
        self.rate = rate_per_second
        self.interval_ms = (1.0 + margin) / rate_per_second * 1000.0
        self._acquire = client.register_script(_ACQUIRE)
        self._hold_off = client.register_script(_HOLD_OFF)
        self._reserve = client.register_script(_RESERVE)
        self._now_ms = client.register_script(_NOW_MS)

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

    def reserve(self, horizon: float, holder: str | None = None) -> tuple[float, float | None]:
        """Book a send time for `holder` (its booking, if one is still ahead, is returned again).
        Returns (seconds to wait, booked slot): (0, slot) = send now; (w, slot) = come back in w
        seconds and send then; (w, None) = nothing booked (the queue of bookings reaches past the
        horizon): come back in w seconds and ask again."""
        holder_key = f"{self.key}:held:{holder or uuid.uuid4().hex}"
        now, slot = (int(v) for v in self._reserve(keys=[self.key, holder_key],
                                                   args=[f"{self.interval_ms:.3f}", f"{horizon * 1000.0:.0f}"]))
        if slot < 0:
            return -slot / 1000.0, None
        return (slot - now) / 1000.0, slot / 1000.0

    def until_slot(self, slot: float) -> float:
        """Seconds until a booked slot (0 once it has come), on Redis's clock."""
        now_ms = int(self._now_ms(keys=[self.key]))
        return max(0.0, slot * 1000.0 - now_ms) / 1000.0

    def pass_gate(self) -> float:
        """Right before a request: 0.0 when at least one interval passed since the last request
        (and this one is recorded), else the seconds to wait. Holds the spacing whatever the
        bookings' tasks' punctuality."""
        return int(self._acquire(keys=[self.gate_key], args=[f"{self.interval_ms:.3f}"])) / 1000.0

    def hold_off(self, seconds: float) -> None:
        """Nobody sends before `seconds` from now (Resend answered 429 with this retry-after)."""
        if seconds > 0:
            for key in (self.key, self.gate_key):
                self._hold_off(keys=[key], args=[f"{seconds * 1000.0:.0f}"])
