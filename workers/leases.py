"""One at a time across worker processes: a short Redis lease, renewed while its holder works.

A plain lock with a long expiry outlives a SIGKILLed holder by that whole expiry (a sweep lock of
60 s kept every sweep away for up to a minute after its worker died). A lease is short and a
thread renews it while the work runs, so a dead holder frees it within `lease_seconds`, and a
holder that runs long keeps it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import redis
import structlog

log = structlog.get_logger("callflow.leases")


@contextlib.contextmanager
def one_at_a_time(client: redis.Redis, key: str, lease_seconds: float) -> Iterator[bool]:
    """Yields True while holding `key` (renewed every third of the lease), False if another holds it."""
    # thread_local=False: the renewing thread must see the token the acquiring thread got.
    lease = client.lock(key, timeout=lease_seconds, blocking=False, thread_local=False)
    if not lease.acquire(blocking=False):
        yield False
        return
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease_seconds / 3):
            try:
                lease.reacquire()
            except redis.exceptions.LockNotOwnedError:
                log.warning("lease lost while held: another may run alongside", key=key)
                return
            except redis.exceptions.RedisError as exc:
                # Redis away: try again at the next beat; if it stays away the lease expires,
                # which is what a dead holder would give anyway.
                log.warning("lease not renewed", key=key, error=str(exc))

    renewer = threading.Thread(target=renew, name=f"lease:{key}", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(redis.exceptions.LockError, redis.exceptions.RedisError):
            lease.release()
