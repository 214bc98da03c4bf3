"""Beat's scheduler: celery-redbeat's, kept alive while Redis gives no answer.

RedBeat extends its lock at every tick and reads the schedule from Redis; either failing raised out
of beat's loop and the process exited on the first Redis blip (every replica at once). Here a tick
that cannot reach Redis sends nothing and is tried again after a capped backoff (which starts from
its first step after a success). A lock that expired meanwhile may have been taken by another beat:
this one sends nothing until it holds the lock again, as a standby does at start.
"""

from __future__ import annotations

from redbeat import RedBeatScheduler
from redis.exceptions import LockError

from config.logging import get_logger
from orchestration.backoff import backoff_delay
from workers.transient import BROKER_ERRORS

log = get_logger("callflow.beat")


class Scheduler(RedBeatScheduler):
    _failures = 0
    _lock_lost = False

    def tick(self, *args, **kwargs):
        try:
            if self._lock_lost:
                if not self.lock.acquire(blocking=False):
                    return self.max_interval  # another beat sends meanwhile
                self._lock_lost = False
                log.info("beat: holding the lock again")
            interval = super().tick(*args, **kwargs)
        except LockError:  # our lock expired while Redis was away
            self._lock_lost = True
            log.warning("beat: lost its lock while Redis was away; sending again once it holds it")
            return self.max_interval
        except BROKER_ERRORS as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning("beat: Redis gives no answer; ticking again with backoff", error=str(exc)[:200])
            return backoff_delay(self._failures, 0.5, 2.0)
        if self._failures:
            log.info("beat: Redis answers again", after_failures=self._failures)
            self._failures = 0
        return interval
