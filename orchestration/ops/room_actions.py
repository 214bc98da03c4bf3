"""What operators see of the room actions still owed to LiveKit (`callflow_room_actions`, see
`orchestration/lifecycle/room_actions.py`): in /metrics, how many are pending by action and how old
the oldest is; in `callflow doctor`, one line. A few pending for a second or two is normal (written
with their decision, struck off once LiveKit answered); many, or old ones, mean LiveKit's API is not
answering: people may still be in the rooms of ended calls.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from orchestration.db import connect

CACHE_SECONDS = 5.0
# Older than this, the doctor calls it a problem (the retries' cap is 5 s).
STUCK_AFTER_SECONDS = 30.0


@dataclass(frozen=True)
class Pending:
    by_action: dict[str, int]
    oldest_age_seconds: float
    last_error: str | None

    @property
    def total(self) -> int:
        return sum(self.by_action.values())


def read_pending(conn) -> Pending:
    rows = conn.execute(
        """select action, count(*) as n, extract(epoch from now() - min(created_at))::float8 as oldest
             from public.callflow_room_actions group by action""").fetchall()
    last = conn.execute("""select last_error from public.callflow_room_actions where last_error is not null
                            order by created_at limit 1""").fetchone()
    return Pending({r["action"]: r["n"] for r in rows}, max((r["oldest"] for r in rows), default=0.0),
                   last["last_error"] if last else None)


class RoomActionsCollector:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._pending: Pending | None = None

    def _read(self) -> Pending | None:
        try:
            with connect(self.database_url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("set statement_timeout = 2000")
                return read_pending(conn)
        except Exception:  # noqa: BLE001 - a scrape must not fail because of us
            return None

    def collect(self):
        with self._lock:
            if time.monotonic() - self._read_at > CACHE_SECONDS:
                self._pending, self._read_at = self._read(), time.monotonic()
            pending = self._pending
        if pending is None:
            return
        family = GaugeMetricFamily("callflow_room_actions_pending",
                                   "Room actions LiveKit has not answered yet (make, release, remove)",
                                   labels=["action"])
        for action in ("make", "release", "remove"):
            family.add_metric([action], pending.by_action.get(action, 0))
        yield family
        yield GaugeMetricFamily("callflow_room_actions_oldest_age_seconds",
                                "Age of the oldest room action still pending (0: none)",
                                value=pending.oldest_age_seconds)


_collector: RoomActionsCollector | None = None


def register(registry=REGISTRY) -> RoomActionsCollector | None:
    global _collector
    if _collector is None:
        from config.settings import ConfigurationError, get_settings

        try:
            _collector = RoomActionsCollector(get_settings().database_url)
        except ConfigurationError:
            return None
        registry.register(_collector)
    return _collector


def doctor_check(settings) -> tuple[str, bool, str]:
    """For `orchestration.doctor.EXTRA_CHECKS`: one line, never raises, never prints a secret."""
    try:
        with connect(settings.database_url, connect_timeout=5, autocommit=True) as conn:
            pending = read_pending(conn)
    except Exception as exc:  # noqa: BLE001
        return "room actions", False, f"cannot read callflow_room_actions: {exc.__class__.__name__}"
    if not pending.total:
        return "room actions", True, "none pending: LiveKit has done everything asked of it"
    counts = ", ".join(f"{n} {a}" for a, n in sorted(pending.by_action.items()))
    detail = f"{pending.total} pending ({counts}), oldest {pending.oldest_age_seconds:.0f} s"
    if pending.oldest_age_seconds > STUCK_AFTER_SECONDS:
        return "room actions", False, detail + f"; LiveKit is not answering: {(pending.last_error or '')[:200]}"
    return "room actions", True, detail
