"""The global push rate, shared by all workers: a booking of send times in Redis (one Lua call).

A batch of n messages books the next free slot and holds the rate for n messages after it, so
batches are spaced to keep every second under `CALLFLOW_PUSH_RATE_PER_SECOND` across all workers.
The task that booked a slot in the future re-queues itself to run then: nobody sleeps in a slot.
"""

from __future__ import annotations

import redis

KEY = "callflow:ratelimit:expo"

# ARGV: ms per message, messages. Returns the ms until the booked slot (0: now).
_BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local free_at = slot + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.0f', free_at), 'PX', math.ceil(free_at - now) + 60000)
return slot - now
"""


class PushRate:
    def __init__(self, client: redis.Redis, rate_per_second: float, key: str = KEY) -> None:
        self.client = client
        self.ms_per_message = 1000.0 / rate_per_second
        self.key = key
        self._book = client.register_script(_BOOK)

    def book(self, messages: int) -> float:
        """Seconds until the slot booked for `messages` sends (0: send now)."""
        return int(self._book(keys=[self.key], args=[self.ms_per_message, messages])) / 1000.0
