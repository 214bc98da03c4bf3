"""What a device receives for each kind of push (pure).

Every message's `data` carries `kind` and `invitation_id`, so an app can drop a duplicate (a send
cut off by a crash before Expo's ticket was stored may be repeated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class PushRow:
    """A push outbox row with what its message needs, as the delivery loads it."""

    id: str
    kind: str
    status: str
    attempts: int
    token: str
    token_disabled: bool
    invitation_id: str
    room_name: str
    call_type: str
    caller_id: str
    caller_name: str
    invitation_status: str
    end_reason: str | None
    ring_deadline: datetime | None
    user_id: str = ""                  # the device's owner: whose share of the push rate it takes
    created_at: datetime | None = None


CALL_ENDED_TTL = 60  # seconds a call_ended lives at Expo (it only stops a ringing that ended by then)


def expo_message(row: PushRow, now: datetime) -> dict:
    """The Expo push message for one row (`to`, `data`, and per kind what wakes or tells the user)."""
    data = {"kind": row.kind, "invitation_id": row.invitation_id, "room_name": row.room_name}
    message: dict = {"to": row.token, "data": data}
    if row.kind == "incoming_call":
        data.update(caller_id=row.caller_id, caller_name=row.caller_name, call_type=row.call_type,
                    ring_deadline=row.ring_deadline.isoformat() if row.ring_deadline else None)
        # High priority wakes a backgrounded app; the ttl ends with the ringing (Expo drops it then).
        ttl = max(1, math.ceil((row.ring_deadline - now).total_seconds())) if row.ring_deadline else 30
        message.update(priority="high", ttl=ttl, sound="default", categoryId="incoming_call",
                       channelId="incoming-calls",
                       title=f"Incoming {row.call_type} call",
                       body=f"{row.caller_name} is calling you")
    elif row.kind == "call_ended":
        # Data only: every device that rang stops ringing, the one that answered included.
        data.update(status=row.invitation_status, end_reason=row.end_reason)
        message.update(priority="high", ttl=CALL_ENDED_TTL, _contentAvailable=True)
    else:  # missed_call
        data.update(caller_id=row.caller_id, caller_name=row.caller_name, call_type=row.call_type)
        message.update(priority="normal", sound="default", title="Missed call",
                       body=f"You missed a {row.call_type} call from {row.caller_name}")
    return message
