"""One rate limiter for every channel: send times booked in Redis, for all workers together.

A provider limits requests per account (Resend: CALLFLOW_EMAIL_RATE_PER_SECOND; Expo:
CALLFLOW_PUSH_RATE_PER_SECOND); Celery's `rate_limit` is per worker, so it cannot keep N workers
under one account's limit. Each decision is one Lua call read on Redis's own clock (`TIME`), so
the workers' clocks do not matter.

- `Rate.book(cost, holder, horizon)`: books the next free send time for `cost` messages and holds
  the line for them after it (`(1 + margin) / rate` seconds each: a request may reach the provider
  up to `margin` seconds after its grant and still keep every second within the rate). A `holder`
  has one booking: asking again while it is ahead gives the same time back (a second task for the
  same email does not use up another slot). Nothing is booked beyond `horizon` seconds (0: only
  now — the non-booking form). Tasks never sleep on a booking (a sleeping task holds a worker slot
  an event could use): they come back at the booked time.
- `pass_gate()`: a second line that spaces the requests themselves, for channels that send one
  message per request (a booked task that comes back late does not squeeze in right before the
  next one).
- `hold_off(seconds)`: nobody sends before then (the provider's 429 `retry-after`).
- `Shares`: each holder's share of the rate (issue 23: one account's flood cannot book the line
  ahead of everyone). The messages of one holder (a callee) book that holder's own line first, at
  a fraction of the rate after a burst; only what its share lets go now books the global line. A
  message that could not go within its share before it is useless is not booked (`TOO_LATE`),
  nor beyond the share's horizon (`BEYOND_HORIZON`).
"""

from __future__ import annotations

import random
import time

import redis

# Returns {now, slot} in ms: slot >= now booked (slot = now: go now); slot < 0: nothing booked, the
# line reaches past the horizon by -slot ms. KEYS: the line, then (optional) the holder's booking.
# ARGV: ms per unit of cost, cost, horizon ms (-1: none).
_BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #KEYS > 1 then
  local held = tonumber(redis.call('GET', KEYS[2]) or '-1')
  if held >= now then
    return {now, held}
  end
end
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local horizon = tonumber(ARGV[3])
if horizon >= 0 and slot - now > horizon then
  return {now, -(slot - now - horizon)}
end
local free_at = slot + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.0f', free_at), 'PX', math.ceil(free_at - now) + 60000)
if #KEYS > 1 then
  redis.call('SET', KEYS[2], string.format('%.0f', slot), 'PX', math.ceil(slot - now) + 1000)
end
return {now, slot}
"""

_NOW_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Nobody gets a slot for the next ARGV[1] milliseconds (a 429's retry-after).
_HOLD_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local free_at = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > free_at then
  redis.call('SET', KEYS[1], string.format('%.0f', until_ms), 'PX', math.ceil(tonumber(ARGV[1])) + 60000)
end
return 0
"""

# KEYS: one line per holder (the time its share is booked up to). ARGV: ms per message, burst ms,
# horizon ms, then for each message: its holder's index in KEYS (from 1), and the ms it must go
# within (-1: no limit). Returns, per message, the ms until it may go (booked), or -1 (it could not
# go within its limit) or -2 (beyond the horizon): those two are not booked.
_SHARE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per, burst, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lines = {}
for i, key in ipairs(KEYS) do
  lines[i] = math.max(now, tonumber(redis.call('GET', key) or '0'))
end
local out = {}
for j = 4, #ARGV, 2 do
  local k, within = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  local booked = lines[k] + per
  local wait = math.max(0, booked - burst - now)
  if within >= 0 and wait > within then
    out[#out + 1] = -1
  elseif wait > horizon then
    out[#out + 1] = -2
  else
    lines[k] = booked
    out[#out + 1] = math.floor(wait)
  end
end
for i, key in ipairs(KEYS) do
  if lines[i] > now then
    redis.call('SET', KEYS[i], string.format('%.0f', lines[i]), 'PX', math.ceil(lines[i] - now) + 1000)
  end
end
return out
"""

TOO_LATE = -1.0        # `Shares.book`: could not go within its share before its limit (not booked)
BEYOND_HORIZON = -2.0  # its share is booked beyond the horizon (not booked)


class Rate:
    """One account's rate, shared by all workers: a line of booked send times at `key`."""

    def __init__(self, client: redis.Redis, rate_per_second: float, key: str, margin: float = 0.0) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        self.client = client
        self.key = key
        self.gate_key = f"{key}:gate"
        self.rate_per_second = rate_per_second
        self.interval_ms = (1.0 + margin) / rate_per_second * 1000.0
        self._book = client.register_script(_BOOK)
        self._hold_off = client.register_script(_HOLD_OFF)
        self._now_ms = client.register_script(_NOW_MS)

    def _run(self, key: str, cost: int, holder: str | None, horizon: float | None) -> tuple[float, float | None]:
        keys = [key] if holder is None else [key, f"{self.key}:held:{holder}"]
        now, slot = (int(v) for v in self._book(keys=keys, args=[
            f"{self.interval_ms:.3f}", cost, -1 if horizon is None else f"{horizon * 1000.0:.0f}"]))
        if slot < 0:
            return -slot / 1000.0, None
        return (slot - now) / 1000.0, slot / 1000.0

    def book(self, cost: int = 1, holder: str | None = None, horizon: float | None = None) -> tuple[float, float | None]:
        """Books a send time for `cost` messages. Returns (seconds to wait, slot): (0, slot) = send
        now; (w, slot) = come back in w seconds and send then; (w, None) = nothing booked (the line
        reaches past `horizon`): come back in w seconds and ask again."""
        return self._run(self.key, cost, holder, horizon)

    def try_acquire(self) -> float:
        """0.0 when a slot now was taken; else the seconds until the next one (nothing taken)."""
        return self.book(1, horizon=0.0)[0]

    def acquire(self, max_wait: float) -> float:
        """Takes a slot, sleeping at most `max_wait` seconds in all (tools and tests, never a task);
        0.0 when taken, else how long to come back after."""
        deadline = time.monotonic() + max_wait
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return 0.0
            if wait > deadline - time.monotonic():
                return wait + random.uniform(0, self.interval_ms / 1000.0)
            time.sleep(wait + random.uniform(0.001, 0.01))

    def until_slot(self, slot: float) -> float:
        """Seconds until a booked slot (0 once it has come), on Redis's clock."""
        return max(0.0, slot * 1000.0 - int(self._now_ms(keys=[self.key]))) / 1000.0

    def pass_gate(self) -> float:
        """Right before a request: 0.0 when at least one interval passed since the last request
        (and this one is recorded), else the seconds to wait."""
        return self._run(self.gate_key, 1, None, 0.0)[0]

    def hold_off(self, seconds: float) -> None:
        """Nobody sends before `seconds` from now (the provider answered 429 with this retry-after)."""
        if seconds > 0:
            for key in (self.key, self.gate_key):
                self._hold_off(keys=[key], args=[f"{seconds * 1000.0:.0f}"])


class Shares:
    """Each holder's share of a rate: a line per holder in Redis (`<prefix><holder>`)."""

    SHARE_OF_RATE = 50       # a holder's share: 1/50 of the rate, at least MIN_PER_SECOND
    MIN_PER_SECOND = 1.0
    BURST = 30               # messages of one holder that go at once (or BURST_SECONDS of its share)
    BURST_SECONDS = 4.0
    HORIZON_SECONDS = 60.0   # a share is never booked further ahead

    def __init__(self, client: redis.Redis, rate_per_second: float, prefix: str,
                 burst: float | None = None, horizon: float = HORIZON_SECONDS) -> None:
        self.rate_per_second = rate_per_second
        self.ms_per_message = 1000.0 / rate_per_second
        self.burst = burst if burst is not None else max(self.BURST, self.BURST_SECONDS * rate_per_second)
        self.horizon = horizon
        self.prefix = prefix
        self._book = client.register_script(_SHARE)

    @classmethod
    def of(cls, rate: Rate) -> "Shares":
        """The holders' shares of `rate`, their lines beside the rate's own key."""
        return cls(rate.client, max(cls.MIN_PER_SECOND, rate.rate_per_second / cls.SHARE_OF_RATE),
                   prefix=f"{rate.key}:callee:")

    def book(self, wants: list[tuple[str, float | None]]) -> list[float]:
        """For each (holder, seconds it must go within or None), in the order given: the seconds until
        its share lets it go (booked), or TOO_LATE / BEYOND_HORIZON (not booked)."""
        if not wants:
            return []
        holders = list(dict.fromkeys(h for h, _ in wants))
        index = {h: i + 1 for i, h in enumerate(holders)}
        args: list = [self.ms_per_message, self.burst * self.ms_per_message, self.horizon * 1000]
        for holder, within in wants:
            args += [index[holder], -1 if within is None else max(0, int(within * 1000))]
        out = self._book(keys=[self.prefix + h for h in holders], args=args)
        return [float(v) if v < 0 else v / 1000.0 for v in (int(x) for x in out)]
