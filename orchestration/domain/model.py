"""The invitation state machine and the call outcome rules of the contract.

The database enforces the same transitions (supabase/migrations/*_invitation_guard.sql); this
module is what the workers decide with, and what the unit tests pin down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Iterable


class InvitationStatus(StrEnum):
    PENDING = "pending"
    RINGING = "ringing"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    MISSED = "missed"
    BUSY = "busy"
    FAILED = "failed"


class EndReason(StrEnum):
    ANSWERED = "answered"
    DECLINED = "declined"
    CALLER_CANCELLED = "caller_cancelled"
    TIMEOUT = "timeout"
    CALLEE_BUSY = "callee_busy"
    ROOM_CLOSED = "room_closed"
    CONNECTION_ABORTED = "connection_aborted"
    ERROR = "error"


class CallStatus(StrEnum):
    RINGING = "ringing"
    ACTIVE = "active"
    COMPLETED = "completed"
    MISSED = "missed"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    BUSY = "busy"
    FAILED = "failed"


S = InvitationStatus

TERMINAL: frozenset[InvitationStatus] = frozenset({S.ACCEPTED, S.DECLINED, S.CANCELLED, S.MISSED, S.BUSY, S.FAILED})

TRANSITIONS: dict[InvitationStatus, frozenset[InvitationStatus]] = {
    S.PENDING: frozenset({S.RINGING, S.ACCEPTED, S.DECLINED, S.CANCELLED, S.BUSY, S.FAILED}),
    S.RINGING: frozenset({S.ACCEPTED, S.DECLINED, S.CANCELLED, S.MISSED}),
}

DEFAULT_END_REASON: dict[InvitationStatus, EndReason] = {
    S.ACCEPTED: EndReason.ANSWERED,
    S.DECLINED: EndReason.DECLINED,
    S.CANCELLED: EndReason.CALLER_CANCELLED,
    S.MISSED: EndReason.TIMEOUT,
    S.BUSY: EndReason.CALLEE_BUSY,
    S.FAILED: EndReason.ERROR,
}

# Outcome of a call nobody answered: the first status present in this order wins.
UNANSWERED_OUTCOME_ORDER: tuple[InvitationStatus, ...] = (S.MISSED, S.BUSY, S.DECLINED, S.CANCELLED, S.FAILED)

# A cancelled invitation earns a missed-call email only if it rang at least this long.
MIN_RING_FOR_CANCELLED_EMAIL = timedelta(seconds=3)


class IllegalTransition(Exception):
    pass


def can_transition(old: str, new: str) -> bool:
    return InvitationStatus(new) in TRANSITIONS.get(InvitationStatus(old), frozenset())


def check_transition(old: str, new: str) -> None:
    if not can_transition(old, new):
        raise IllegalTransition(f"illegal invitation transition {old} -> {new}")


@dataclass(frozen=True)
class Invitation:
    id: str
    room_name: str
    caller_id: str
    callee_id: str
    call_type: str
    status: InvitationStatus
    call_id: str | None = None
    created_at: datetime | None = None
    ringing_at: datetime | None = None
    ring_deadline: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "Invitation":
        return cls(
            id=str(row["id"]),
            room_name=row["room_name"],
            caller_id=str(row["caller_id"]),
            callee_id=str(row["callee_id"]),
            call_type=row["call_type"],
            status=InvitationStatus(row["status"]),
            call_id=str(row["call_id"]) if row.get("call_id") else None,
            created_at=row.get("created_at"),
            ringing_at=row.get("ringing_at"),
            ring_deadline=row.get("ring_deadline"),
            answered_at=row.get("answered_at"),
            ended_at=row.get("ended_at"),
            end_reason=row.get("end_reason"),
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def deserves_missed_call_email(status: str, ringing_at: datetime | None, ended_at: datetime | None) -> bool:
    """missed and busy always; cancelled only after ringing >= 3 s; never declined/accepted/failed."""
    status = InvitationStatus(status)
    if status in (S.MISSED, S.BUSY):
        return True
    if status == S.CANCELLED:
        return ringing_at is not None and ended_at is not None and ended_at - ringing_at >= MIN_RING_FOR_CANCELLED_EMAIL
    return False


def unanswered_call_outcome(statuses: Iterable[str]) -> tuple[CallStatus, str]:
    """The outcome of a call whose invitations all ended and none was accepted."""
    present = {InvitationStatus(s) for s in statuses}
    for status in UNANSWERED_OUTCOME_ORDER:
        if status in present:
            return CallStatus(status.value), DEFAULT_END_REASON[status].value
    return CallStatus.FAILED, EndReason.ERROR.value


def call_settles(statuses: Iterable[str]) -> bool:
    """A ringing call is over once none of its invitations can still be answered or was answered."""
    statuses = [InvitationStatus(s) for s in statuses]
    return bool(statuses) and all(s in TERMINAL for s in statuses) and S.ACCEPTED not in statuses


@dataclass(frozen=True)
class ParticipantSession:
    identity: str
    participant_sid: str
    joined_at: datetime | None
    left_at: datetime | None = None


def call_started_at(sessions: Iterable[ParticipantSession]) -> datetime | None:
    """When a second participant joined: the first join of the second distinct identity to arrive.

    Computed from all sessions so that it does not depend on the order events arrive in.
    """
    first_join: dict[str, datetime] = {}
    for s in sessions:
        if s.joined_at is None:
            continue
        if s.identity not in first_join or s.joined_at < first_join[s.identity]:
            first_join[s.identity] = s.joined_at
    if len(first_join) < 2:
        return None
    return sorted(first_join.values())[1]


def seconds_between(start: datetime | None, end: datetime | None) -> int:
    if start is None or end is None or end <= start:
        return 0
    return int(round((end - start).total_seconds()))


@dataclass(frozen=True)
class TimeoutDecision:
    """What a ring-timeout check (countdown or sweep) does with one invitation."""

    action: str  # "reschedule", "miss", "answer", "nothing"
    at: datetime | None = None


def decide_ring_timeout(inv: Invitation, now: datetime, callee_in_room: bool | None) -> TimeoutDecision:
    if inv.status != S.RINGING:
        return TimeoutDecision("nothing")
    if inv.ring_deadline is not None and now < inv.ring_deadline:
        return TimeoutDecision("reschedule", inv.ring_deadline)
    if callee_in_room:
        return TimeoutDecision("answer")
    return TimeoutDecision("miss")

