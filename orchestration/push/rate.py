"""The push rate, shared by all workers: a booking of send times in Redis (one Lua call each).

- `PushRate`, the global rate: a batch of n messages books the next free slot and holds the rate
  for n messages after it, so batches are spaced to keep every second under
  `CALLFLOW_PUSH_RATE_PER_SECOND` across all workers.
- `CalleeShare`, each callee's share of it (issue 23): the messages to one user's devices book that
  user's own line first, at 1/50 of the global rate (10/s of the default 500/s) after a burst of 30
  (one call's three kinds of push to 10 devices go at once). Only what its share lets go now books
  the global line, so one account's flood (its own devices rung by invitation after invitation)
  cannot book the global line ahead of everyone: the other users' pushes still find it free now,
  and the flooded account's wait for its own share. A message that could not go within its share
  before it is useless (an incoming call's ring deadline, a call_ended's time to live) is not
  booked (the delivery skips it); nothing is booked more than `HORIZON_SECONDS` ahead (the
  delivery comes back then).

A task whose booked time is in the future re-queues itself to run then: nobody sleeps in a slot.
"""

from __future__ import annotations

import redis

from orchestration import names

KEY = names.RATELIMIT_EXPO

SHARE_OF_RATE = 50       # a callee's share: 1/50 of the global rate, at least MIN_SHARE_PER_SECOND
MIN_SHARE_PER_SECOND = 1.0
SHARE_BURST = 30         # messages to one callee that go at once (or SHARE_BURST_SECONDS of its share)
SHARE_BURST_SECONDS = 4.0
HORIZON_SECONDS = 60.0   # a callee's share is never booked further ahead
TOO_LATE = -1.0          # `CalleeShare.book`: could not go within its share before its limit (not booked)
BEYOND_HORIZON = -2.0    # its share is booked beyond the horizon (not booked)

# ARGV: ms per message, messages. Returns the ms until the booked slot (0: now).
_BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local free_at = slot + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.0f', free_at), 'PX', math.ceil(free_at - now) + 60000)
return slot - now
"""

# KEYS: one line per callee (the time its share is booked up to). ARGV: ms per message, burst ms,
# horizon ms, then for each message: its callee's index in KEYS (from 1), and the ms it must go
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


class PushRate:
    def __init__(self, client: redis.Redis, rate_per_second: float, key: str = KEY) -> None:
        self.client = client
        self.rate_per_second = rate_per_second
        self.ms_per_message = 1000.0 / rate_per_second
        self.key = key
        self._book = client.register_script(_BOOK)

    def book(self, messages: int) -> float:
        """Seconds until the slot booked for `messages` sends (0: send now)."""
        return int(self._book(keys=[self.key], args=[self.ms_per_message, messages])) / 1000.0


class CalleeShare:
    """Each callee's share of the push rate: a line per user in Redis (`<prefix><user id>`)."""

    def __init__(self, client: redis.Redis, rate_per_second: float, prefix: str,
                 burst: float | None = None, horizon: float = HORIZON_SECONDS) -> None:
        self.rate_per_second = rate_per_second
        self.ms_per_message = 1000.0 / rate_per_second
        self.burst = burst if burst is not None else max(SHARE_BURST, SHARE_BURST_SECONDS * rate_per_second)
        self.horizon = horizon
        self.prefix = prefix
        self._book = client.register_script(_SHARE)

    @classmethod
    def of(cls, rate: PushRate) -> "CalleeShare":
        """The share of `rate`'s global rate, its lines beside the global line's key."""
        return cls(rate.client, max(MIN_SHARE_PER_SECOND, rate.rate_per_second / SHARE_OF_RATE),
                   prefix=f"{rate.key}:callee:")

    def book(self, wants: list[tuple[str, float | None]]) -> list[float]:
        """For each (callee, seconds it must go within or None), in the order given: the seconds until
        its share lets it go (booked), or TOO_LATE / BEYOND_HORIZON (not booked)."""
        if not wants:
            return []
        callees = list(dict.fromkeys(c for c, _ in wants))
        index = {c: i + 1 for i, c in enumerate(callees)}
        args: list = [self.ms_per_message, self.burst * self.ms_per_message, self.horizon * 1000]
        for callee, within in wants:
            args += [index[callee], -1 if within is None else max(0, int(within * 1000))]
        out = self._book(keys=[self.prefix + c for c in callees], args=args)
        return [float(v) if v < 0 else v / 1000.0 for v in (int(x) for x in out)]
