"""Pure parsing of a LiveKit webhook event (protojson, as the worker receives it) into typed values.

LiveKit sends lowerCamelCase names, int64 as strings, enums as names, and may add fields a newer
server knows: unknown fields are ignored. Times are LiveKit's own (`createdAt` of the event,
`joinedAt` of a participant; seconds, or milliseconds in some newer fields); a value out of range
or unparsable is `None`, never an exception, so the event is still recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

ROOM_EVENTS = frozenset({"room_started", "room_finished", "participant_joined", "participant_left",
                         "participant_connection_aborted"})


@dataclass(frozen=True)
class ParticipantRef:
    identity: str
    sid: str
    joined_at: datetime | None


@dataclass(frozen=True)
class RoomEvent:
    event_id: str
    kind: str
    room_name: str | None
    room_sid: str | None
    occurred_at: datetime | None
    participant: ParticipantRef | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def affects_lifecycle(self) -> bool:
        return self.kind in ROOM_EVENTS and bool(self.room_name)


def parse_time(value: Any) -> datetime | None:
    """LiveKit's timestamps: unix seconds (or milliseconds) as a number or string, or ISO 8601."""
    if value in (None, "", 0, "0"):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            seconds = int(value)
            if seconds > 10**11:  # milliseconds (some fields are ms in newer servers)
                return datetime.fromtimestamp(seconds / 1000, tz=timezone.utc)
            if seconds <= 0:
                return None
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def parse_room_event(event: Mapping[str, Any]) -> RoomEvent:
    room = event.get("room") or {}
    participant = event.get("participant") or {}
    room_name = (room.get("name") or (event.get("egressInfo") or {}).get("roomName")
                 or (event.get("ingressInfo") or {}).get("roomName"))
    ref = None
    if participant.get("sid") or participant.get("identity"):
        ref = ParticipantRef(identity=str(participant.get("identity") or ""), sid=str(participant.get("sid") or ""),
                             joined_at=parse_time(participant.get("joinedAt")))
    return RoomEvent(
        event_id=str(event.get("id") or ""),
        kind=str(event.get("event") or ""),
        room_name=str(room_name) if room_name else None,
        room_sid=str(room.get("sid")) if room.get("sid") else None,
        occurred_at=parse_time(event.get("createdAt")),
        participant=ref,
        raw=event,
    )
