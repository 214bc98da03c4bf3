"""What a use case loads and what it decides: the values the lifecycle, the store port and its
adapters share.

- `Want` names what a use case needs loaded, and the store answers with a `Snapshot`;
- a `Decision` is what the use case decided on it: the rows that changed, the `EventRecord`s to
  record, the outbox requests to add (`MissedCallEmail`, `Push`) and the effects to run after
  commit (`ScheduleRingTimeout`, `ScheduleGrace`, `SendNotification`, `SendPushes`, and the room
  actions `EnsureRoom`, `ReleaseRoom`, `RemoveParticipant`, written down with the decision).

Pure values, no I/O. They live in the domain, not beside the use cases
(`orchestration.lifecycle.state`, which makes them), so that the port (`orchestration.ports`) and
the stores that apply a decision need nothing of the lifecycle's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Iterable

from orchestration.domain.model import Call, Invitation, Participant


@dataclass(frozen=True)
class Want:
    """What a use case needs loaded (besides the room's live call and open invitations)."""

    room_name: str
    other_rooms: tuple[str, ...] = ()      # rooms whose live call and open invitations are needed too
    invitation_ids: tuple[str, ...] = ()
    call_ids: tuple[str, ...] = ()
    participant_sids: tuple[str, ...] = ()
    room_sids: tuple[str, ...] = ()  # LiveKit room sids whose calls are needed (live or ended)
    event_ids: tuple[str, ...] = ()
    # (user, room): is this user busy in a call other than that room's?
    busy: tuple[tuple[str, str], ...] = ()
    # (caller, callee): open invitations callee -> caller (the other half of a glare)
    counter_pairs: tuple[tuple[str, str], ...] = ()
    # Sessions known to have aborted (LiveKit's participant_connection_aborted), among these sids.
    aborted_sids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """The state a decision is made on, read inside the transaction that applies it."""

    now: datetime
    room_name: str
    invitations: dict[str, Invitation]
    calls: dict[str, Call]
    participants: dict[str, Participant]
    seen_events: frozenset[str] = frozenset()
    busy_users: frozenset[str] = frozenset()
    counter_invitations: tuple[Invitation, ...] = ()
    aborted_sids: frozenset[str] = frozenset()


@dataclass
class EventRecord:
    """One row of `call_events`."""

    event_id: str
    source: str
    type: str
    room_name: str | None
    invitation_id: str | None
    occurred_at: datetime | None
    payload: dict


# ---- effects: what happens outside the database, after commit (each idempotent) ---------------
@dataclass(frozen=True)
class ScheduleRingTimeout:
    invitation_id: str
    at: datetime


@dataclass(frozen=True)
class ScheduleGrace:
    room_name: str
    participant_sid: str
    identity: str
    aborted: bool


@dataclass(frozen=True)
class SendNotification:
    notification_id: str


# Room actions: what callflow must do in a LiveKit room. Each is also written down, in the
# transaction of the decision that calls for it, as a `callflow_room_actions` row under its `key`,
# and struck off once LiveKit has answered: retried until then, whoever dies (orchestration/lifecycle/room_actions.py).
@dataclass(frozen=True)
class ReleaseRoom:
    """A call ended: remove everyone left in its room and delete it, unless a newer call lives there."""

    room_name: str
    call_id: str
    action: ClassVar[str] = "release"  # callflow_room_actions.action

    @property
    def key(self) -> str:
        return f"release:{self.call_id}"


@dataclass(frozen=True)
class RemoveParticipant:
    room_name: str
    identity: str
    participant_sid: str
    action: ClassVar[str] = "remove"

    @property
    def key(self) -> str:
        return f"remove:{self.participant_sid}"


@dataclass(frozen=True)
class EnsureRoom:
    """A live call with no LiveKit room yet (answered before it rang, or rung while LiveKit gave no
    answer): make it, then record its sid on the call."""

    room_name: str
    call_id: str
    action: ClassVar[str] = "make"

    @property
    def key(self) -> str:
        return f"make:{self.call_id}"


ROOM_ACTIONS = (EnsureRoom, ReleaseRoom, RemoveParticipant)
# A written-down room action is the sweep's once this long has passed without its worker striking
# it off (the worker died, or LiveKit is slow to answer): a repeat is harmless, a loss is not.
ROOM_ACTION_FIRST_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class MissedCallEmail:
    """Ask the outbox for a missed-call email to the invitation's callee (the outbox decides skips)."""

    invitation_id: str
    caller_id: str
    callee_id: str


@dataclass(frozen=True)
class Push:
    """Ask the push outbox for one `kind` message to each enabled device of the callee.

    `deadline`: an incoming call's ring deadline (a push that cannot go before it is skipped).
    """

    kind: str  # incoming_call, call_ended, missed_call
    invitation_id: str
    caller_id: str
    callee_id: str
    deadline: datetime | None = None


# Ringing like a phone (the contract): an `apns_voip` device (a PushKit VoIP token) gets the
# incoming call only, which the app reports to CallKit; `expo` and `fcm` devices get every kind.
# The push outbox's insert (`PostgresUnitOfWork.add_pushes`) says the same in SQL
# (tests/integration/test_rules_match_sql.py holds them equal); the fakes ask this.
INCOMING_CALL_ONLY_PROVIDERS = frozenset({"apns_voip"})


def push_goes_to(provider: str, kind: str) -> bool:
    """Does a device of this provider (`push_tokens.provider`) get a push of this kind?"""
    return provider not in INCOMING_CALL_ONLY_PROVIDERS or kind == "incoming_call"


@dataclass(frozen=True)
class SendPushes:
    """Queue the delivery of a decision's `pending` push messages, grouped by their device's
    provider (each provider's are sent by its own channel: `names.PUSH_CHANNELS`).

    `by_provider`: ((provider, (message id, ...)), ...), each provider once, none without ids.
    """

    by_provider: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, rows: Iterable[tuple[str, str]]) -> SendPushes | None:
        """From (message id, provider) pairs, providers in the order first met; None for none."""
        groups: dict[str, list[str]] = {}
        for message_id, provider in rows:
            groups.setdefault(provider, []).append(message_id)
        return cls(tuple((p, tuple(ids)) for p, ids in groups.items())) if groups else None

    @property
    def message_ids(self) -> tuple[str, ...]:
        return tuple(m for _, ids in self.by_provider for m in ids)


@dataclass
class Decision:
    result: str
    invitations: list[Invitation] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    participants: list[Participant] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    outbox: list = field(default_factory=list)  # MissedCallEmail and Push requests
    effects: list = field(default_factory=list)
