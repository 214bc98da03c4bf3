"""What every use case is handed: its ports and settings, and what it hands back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestration.ports import Rooms, Scheduler, Store


@dataclass(frozen=True)
class LifecycleConfig:
    ring_timeout: float = 30.0
    grace: float = 5.0
    max_participants: int = 50

    @property
    def empty_timeout(self) -> int:
        # A room nobody joined closes a little after the ring would have ended.
        return int(self.ring_timeout) + 30

    @property
    def departure_timeout(self) -> int:
        # A room everybody left stays long enough for a leaver to come back within the grace period.
        return int(math.ceil(self.grace)) + 2


@dataclass
class Ports:
    store: Store
    rooms: Rooms
    scheduler: Scheduler
    config: LifecycleConfig


@dataclass
class Outcome:
    """What a use case did: a word for logs and tests, the effects it ran after commit, and the
    invitation, call and room it was about (one log line per step carries all three)."""

    result: str
    effects: list = field(default_factory=list)
    invitation_id: str | None = None
    call_id: str | None = None
    room_name: str | None = None
