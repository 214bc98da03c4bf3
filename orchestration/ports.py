"""The ports the handlers take: what they need from the world, named by what it means to them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class LiveParticipant:
    identity: str
    sid: str
    state: str  # JOINING, JOINED, ACTIVE, DISCONNECTED


@dataclass(frozen=True)
class RoomInfo:
    name: str
    sid: str


class RoomError(Exception):
    """LiveKit could not do what was asked (after the adapter's own retries)."""


class Rooms(Protocol):
    """LiveKit's RoomService, as the lifecycle uses it. Every call is idempotent."""

    def create_room(self, name: str, *, empty_timeout: int, departure_timeout: int, max_participants: int,
                    metadata: str) -> RoomInfo: ...

    def list_participants(self, room: str) -> list[LiveParticipant] | None:
        """The room's live participants; [] when the room does not exist; None when LiveKit can't say."""

    def existing_rooms(self, names: list[str]) -> set[str] | None:
        """Which of these rooms exist now; None when LiveKit can't say."""

    def delete_room(self, room: str) -> None: ...

    def remove_participant(self, room: str, identity: str) -> None: ...


class Scheduler(Protocol):
    """Work that must happen later or elsewhere, handed to the task queue after commit."""

    def ring_timeout(self, invitation_id: str, at: datetime) -> None:
        """Make sure the invitation's deadline is looked at when it comes."""

    def ring_timeout_bucket(self, end: float) -> None:
        """Look at every deadline of the bucket ending at `end` (unix seconds) then."""

    def ring_timeout_at(self, invitation_id: str, at: datetime) -> None:
        """Look at this one invitation's deadline at `at`."""

    def grace_expiry(self, room_name: str, participant_sid: str, identity: str, aborted: bool, delay: float) -> None: ...

    def send_notification(self, notification_id: str) -> None: ...

    def invitation_changed(self, change: dict) -> None: ...
