"""The call domain: invitations, calls and participant sessions, and the contract's rules on them.

Pure: no I/O, no clock of its own. The lifecycle's use cases (`orchestration.lifecycle`) decide
with these; the database keeps only the guards the contract gives it (the transition table,
terminal statuses, client rights), which mirror `TRANSITIONS` here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    GLARE = "glare"
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

OPEN: frozenset[InvitationStatus] = frozenset({S.PENDING, S.RINGING})
TERMINAL: frozenset[InvitationStatus] = frozenset({S.ACCEPTED, S.DECLINED, S.CANCELLED, S.MISSED, S.BUSY, S.FAILED})
LIVE_CALL: frozenset[CallStatus] = frozenset({CallStatus.RINGING, CallStatus.ACTIVE})
# Statuses only a worker makes: their echo through the listener carries no work.
WORKER_ONLY: frozenset[InvitationStatus] = frozenset({S.RINGING, S.MISSED, S.BUSY, S.FAILED})

TRANSITIONS: dict[InvitationStatus, frozenset[InvitationStatus]] = {
    S.PENDING: frozenset({S.RINGING, S.ACCEPTED, S.DECLINED, S.CANCELLED, S.BUSY, S.FAILED}),
    S.RINGING: frozenset({S.ACCEPTED, S.DECLINED, S.CANCELLED, S.MISSED}),
}

# What a client may do (the database enforces the same): (who, from, to).
CLIENT_MOVES: frozenset[tuple[str, InvitationStatus, InvitationStatus]] = frozenset(
    [("callee", old, new) for old in OPEN for new in (S.ACCEPTED, S.DECLINED)]
    + [("caller", old, S.CANCELLED) for old in OPEN]
)

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


# ---- entities -----------------------------------------------------------------------------------
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

    @property
    def open(self) -> bool:
        return self.status in OPEN

    def involves(self, user: str) -> bool:
        return user in (self.caller_id, self.callee_id)

    def end(self, status: InvitationStatus, reason: str, at: datetime) -> "Invitation":
        """The move to a terminal status, as a worker makes it (its own reason and time)."""
        check_transition(self.status, status)
        return replace(self, status=status, end_reason=reason, ended_at=at,
                       answered_at=at if status == S.ACCEPTED else self.answered_at)

    def ring(self, at: datetime, timeout: float) -> "Invitation":
        check_transition(self.status, S.RINGING)
        return replace(self, status=S.RINGING, ringing_at=at, ring_deadline=at + timedelta(seconds=timeout))


def order_key(inv: Invitation) -> tuple:
    """The contract's order of invitations: by `created_at`, then `id`."""
    return (inv.created_at is None, inv.created_at, inv.id)


@dataclass(frozen=True)
class Call:
    id: str
    room_name: str
    call_type: str
    caller_id: str | None
    status: CallStatus
    created_at: datetime
    livekit_room_sid: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: int = 0
    end_reason: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "Call":
        return cls(
            id=str(row["id"]), room_name=row["room_name"], call_type=row["call_type"],
            caller_id=str(row["caller_id"]) if row.get("caller_id") else None,
            status=CallStatus(row["status"]), created_at=row["created_at"],
            livekit_room_sid=row.get("livekit_room_sid"), started_at=row.get("started_at"),
            ended_at=row.get("ended_at"), duration_seconds=row.get("duration_seconds") or 0,
            end_reason=row.get("end_reason"),
        )

    @property
    def live(self) -> bool:
        return self.status in LIVE_CALL


@dataclass(frozen=True)
class Participant:
    """One participant session (a LiveKit participant sid) in one call."""

    call_id: str
    identity: str
    sid: str
    joined_at: datetime | None
    left_at: datetime | None = None
    duration_seconds: int = 0

    @classmethod
    def from_row(cls, row: dict) -> "Participant":
        return cls(call_id=str(row["call_id"]), identity=row["identity"], sid=row["participant_sid"],
                   joined_at=row.get("joined_at"), left_at=row.get("left_at"),
                   duration_seconds=row.get("duration_seconds") or 0)

    @property
    def connected(self) -> bool:
        return self.left_at is None


# ---- rules --------------------------------------------------------------------------------------
def deserves_missed_call_email(status: str, ringing_at: datetime | None, ended_at: datetime | None,
                               end_reason: str | None = None) -> bool:
    """missed and busy always; cancelled only after ringing >= 3 s and not glare; never the rest."""
    status = InvitationStatus(status)
    if status in (S.MISSED, S.BUSY):
        return True
    if status == S.CANCELLED and end_reason != EndReason.GLARE:
        return ringing_at is not None and ended_at is not None and ended_at - ringing_at >= MIN_RING_FOR_CANCELLED_EMAIL
    return False


def unanswered_call_outcome(invitations: Iterable) -> tuple[CallStatus, str]:
    """The outcome of a call whose invitations all ended and none was accepted.

    The status is the first of missed, busy, declined, cancelled present; the reason is that of
    the earliest invitation with that status (so `room_closed` stays `room_closed`). Plain
    statuses (strings) are accepted too, with the status's default reason.
    """
    items = list(invitations)
    for status in UNANSWERED_OUTCOME_ORDER:
        matching = [i for i in items if (i.status if isinstance(i, Invitation) else InvitationStatus(i)) == status]
        if matching:
            first = min(matching, key=order_key) if isinstance(matching[0], Invitation) else None
            reason = (first.end_reason if first is not None else None) or DEFAULT_END_REASON[status].value
            return CallStatus(status.value), reason
    return CallStatus.FAILED, EndReason.ERROR.value


def call_settles(statuses: Iterable[str]) -> bool:
    """A ringing call is over once none of its invitations can still be answered or was answered."""
    statuses = [InvitationStatus(s) for s in statuses]
    return bool(statuses) and all(s in TERMINAL for s in statuses) and S.ACCEPTED not in statuses


def call_started_at(sessions: Iterable[Participant]) -> datetime | None:
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


def users_of(invitations: Iterable[Invitation]) -> set[str]:
    users: set[str] = set()
    for inv in invitations:
        users.update((inv.caller_id, inv.callee_id))
    return users


def is_one_to_one(invitations: Iterable[Invitation]) -> bool:
    """A call is 1:1 while it involves two users (a caller and one callee)."""
    return len(users_of(invitations)) <= 2


def room_parties(room_invitations: Iterable[Invitation], live_call: Call | None) -> set[str]:
    """The parties of a room (the contract's one definition).

    The caller and the callee of each invitation of the room that is pending or ringing, or
    accepted while its call is live or not yet made; and the caller of the room's live call.
    `room_invitations` are the room's invitations that could count; an accepted one counts when it
    has no call yet or belongs to `live_call`.
    """
    parties: set[str] = set()
    for inv in room_invitations:
        if inv.open or (inv.status == S.ACCEPTED and (
                inv.call_id is None or (live_call is not None and inv.call_id == live_call.id))):
            parties.update((inv.caller_id, inv.callee_id))
    if live_call is not None and live_call.caller_id:
        parties.add(live_call.caller_id)
    return parties


@dataclass(frozen=True)
class TimeoutDecision:
    """What a ring-timeout check (countdown or sweep) does with one invitation."""

    action: str  # "reschedule", "wait" (for LiveKit's answer), "miss", "answer", "nothing"
    at: datetime | None = None


# LiveKit's silence is never "the callee is not in the room" (their join webhook may lag): a
# deadline whose check finds no answer waits for one, this long at most, and is then decided from
# what the database knows.
NO_ANSWER_WAIT = timedelta(seconds=10)


def decide_ring_timeout(inv: Invitation, now: datetime, callee_in_room: bool | None,
                        callee_joined: bool = False) -> TimeoutDecision:
    """`callee_in_room`: what LiveKit says (None: no answer); `callee_joined`: whether the
    database has the callee connected in the call (the last word once LiveKit kept silent)."""
    if inv.status != S.RINGING:
        return TimeoutDecision("nothing")
    if inv.ring_deadline is not None and now < inv.ring_deadline:
        return TimeoutDecision("reschedule", inv.ring_deadline)
    if callee_in_room is None:
        if inv.ring_deadline is not None and now < inv.ring_deadline + NO_ANSWER_WAIT:
            return TimeoutDecision("wait", inv.ring_deadline + NO_ANSWER_WAIT)
        callee_in_room = callee_joined
    if callee_in_room:
        return TimeoutDecision("answer")
    return TimeoutDecision("miss")
