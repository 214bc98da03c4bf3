"""One retry loop per dependency, shared by every worker: its backoff kept in Redis.

When Resend or Expo gives no answer, every task that would talk to it next would get none either;
were each to try on its own, an outage would cost one request per waiting message per step, and a
dependency slower than the client's timeout would hold one worker process per message for the
whole timeout (a process that no ringing call can use). So all tasks share one loop:

- `turn()` before a request: its `wait` is 0 = go, else the seconds to come back after (nothing
  was asked). While the loop is backing off, nobody asks; once its wait is over, one task at a time
  asks (a probe, leased for `probe_seconds`), the others look again a step later (or when the
  probe's lease ends, if sooner): a probe that got an answer is not waited for a whole lease.
- `release(turn)` when a turn granted is not used (the request waits for its rate): a probe that
  asks nothing must not hold the lease, or the next probe (its own task's, when it comes back)
  waits for the whole lease after the dependency is back.
- `failed(turn, retry_after)` after no answer: the next step of `backoff_delay` (or the
  dependency's own retry-after). A request that was let through before the last failure was
  recorded says nothing new (it was in flight meanwhile): it does not push the loop further up,
  nor end the probe under way. Returns the wait.
- `succeeded()` after an answer (any answer: a refusal is an answer too): the loop starts again
  from its first step.

The clock is Redis's (`TIME`), so the workers' clocks don't matter. An idle loop forgets its
failures `IDLE_RESET_SECONDS` after its last wait ended.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from orchestration import names
from orchestration.backoff import backoff_delay

IDLE_RESET_SECONDS = 300

# KEYS: state hash, probe lease. ARGV: probe lease ms, this turn's token.
# Returns {ms to wait (0: go), now ms, 1 when the go is the probe's lease}.
_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
if failures == 0 then
  return {0, now, 0}
end
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if now < until_ms then
  return {until_ms - now, now, 0}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then
  return {0, now, 1}
end
local step = tonumber(redis.call('HGET', KEYS[1], 'step') or ARGV[1])
return {math.max(100, math.min(redis.call('PTTL', KEYS[2]), step)), now, 0}
"""

# KEYS: probe lease. ARGV: the token of the turn that holds it. Ends the lease only if it is still that turn's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: state hash, probe lease. ARGV: when the failed request was let through (ms).
# Returns {failures, -1} when this failure counts (the caller sets the wait), else {failures, ms to
# wait}: the request was let through at or before the last recorded failure.
_FAILED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'failed_at') or '-1')
if failures > 0 and tonumber(ARGV[1]) <= last then
  local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if now < until_ms then
    return {failures, until_ms - now}
  end
  local step = tonumber(redis.call('HGET', KEYS[1], 'step') or '100')
  return {failures, math.max(100, math.min(redis.call('PTTL', KEYS[2]), step))}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'failed_at', string.format('%.0f', now))
return {redis.call('HINCRBY', KEYS[1], 'failures', 1), -1}
"""

# KEYS: state hash. ARGV: wait ms, idle reset ms. Returns the wait ms.
_BACK_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'until', string.format('%.0f', now + tonumber(ARGV[1])), 'step', ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) + tonumber(ARGV[2])))
return tonumber(ARGV[1])
"""


@dataclass(frozen=True)
class Turn:
    wait: float     # seconds to come back after; 0 = go
    granted_ms: int  # Redis's clock when it was given
    probe: str | None = None  # the lease's token when this go is the loop's probe


class SharedBackoff:
    def __init__(self, client: redis.Redis, name: str, base: float, cap: float, probe_seconds: float) -> None:
        self.client = client
        self.key = names.backoff_key(name)
        self.probe_key = f"{self.key}:probe"
        self.base, self.cap = base, cap
        self.probe_ms = int(probe_seconds * 1000)
        self._turn = client.register_script(_TURN)
        self._failed = client.register_script(_FAILED)
        self._back_off = client.register_script(_BACK_OFF)
        self._release = client.register_script(_RELEASE)

    def turn(self) -> Turn:
        token = uuid.uuid4().hex
        wait_ms, now_ms, probe = (int(v) for v in self._turn(keys=[self.key, self.probe_key],
                                                              args=[self.probe_ms, token]))
        return Turn(wait_ms / 1000.0, now_ms, token if probe else None)

    def release(self, turn: Turn) -> None:
        """A go that asked nothing: its probe lease (if it had one) ends now, for the next probe."""
        if turn.probe is not None:
            self._release(keys=[self.probe_key], args=[turn.probe])

    def failed(self, turn: Turn, retry_after: float | None = None) -> float:
        failures, wait_ms = (int(v) for v in self._failed(keys=[self.key, self.probe_key], args=[turn.granted_ms]))
        if wait_ms >= 0:
            return wait_ms / 1000.0
        delay = retry_after if retry_after is not None else backoff_delay(failures, self.base, self.cap)
        return int(self._back_off(keys=[self.key], args=[f"{delay * 1000:.0f}", IDLE_RESET_SECONDS * 1000])) / 1000.0

    def succeeded(self) -> None:
        self.client.delete(self.key, self.probe_key)

    @property
    def failures(self) -> int:
        return int(self.client.hget(self.key, "failures") or 0)
