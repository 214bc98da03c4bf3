"""What a use case does with what it loaded: the working copy its rules change, and how decisions
are grouped.

Every use case runs the same three steps:

1. **load** a `Snapshot` through the store port, inside a transaction serialised on the room;
2. **decide** in a pure function: a `Working` copy of the snapshot is changed by the rules in
   `rules.py`, and it turns into a `Decision` (the rows that changed, the events to record, the
   outbox rows to add, and the effects to run once committed);
3. **apply** the decision in that same transaction, then run its effects after commit.

The values themselves (`Want`, `Snapshot`, `Decision`, its events, outbox requests and effects)
are the domain's (`orchestration.domain.decision`): the store port and its adapters share them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from orchestration.domain.decision import Decision, EventRecord, Snapshot
from orchestration.domain.model import (
    OPEN,
    Call,
    CallStatus,
    Invitation,
    InvitationStatus as S,
    Participant,
    order_key,
    room_parties,
)
from orchestration.ids import time_ordered_id


def in_rounds(items: list, keys_of: Callable[[object], set[str]]) -> list[list]:
    """`items` in rounds that share no key within a round (each decided in one transaction); an
    item goes in no earlier a round than any item before it that shares a key (arrival order)."""
    rounds: list[list] = []
    remaining = list(items)
    while remaining:
        taken: set[str] = set()
        now, later = [], []
        for item in remaining:
            keys = keys_of(item)
            (later if keys & taken else now).append(item)
            taken |= keys  # a later item sharing a key stays behind this one
        rounds.append(now)
        remaining = later
    return rounds


def merge_decisions(decisions: list[Decision]) -> Decision:
    """Decisions about things that share nothing (no room, user or invitation), as one to apply."""
    if len(decisions) == 1:
        return decisions[0]
    merged = Decision("together")
    for d in decisions:
        merged.invitations += d.invitations
        merged.calls += d.calls
        merged.participants += d.participants
        merged.events += d.events
        merged.outbox += d.outbox
        merged.effects += d.effects
    return merged


class Working:
    """A working copy of a snapshot that the rules change; it remembers what changed."""

    def __init__(self, snap: Snapshot, new_id: Callable[[], str] | None = None) -> None:
        self.snap = snap
        self.now = snap.now
        self.room_name = snap.room_name
        self.invitations = dict(snap.invitations)
        self.calls = dict(snap.calls)
        self.participants = dict(snap.participants)
        self._new_id = new_id or time_ordered_id
        self._changed_inv: list[str] = []
        self._changed_calls: list[str] = []
        self._changed_parts: list[str] = []
        self.events: list[EventRecord] = []
        self.outbox: list = []  # MissedCallEmail and Push requests
        self.effects: list = []

    # ---- reading ---------------------------------------------------------------------------
    def live_call(self, room_name: str | None = None) -> Call | None:
        """The room's live call (at most one: the database's unique index keeps it so)."""
        room_name = room_name or self.room_name
        live = [c for c in self.calls.values() if c.room_name == room_name and c.live]
        return min(live, key=lambda c: c.created_at) if live else None

    def invitations_of(self, call_id: str) -> list[Invitation]:
        return sorted((i for i in self.invitations.values() if i.call_id == call_id), key=order_key)

    def open_unlinked(self) -> list[Invitation]:
        """The room's invitations no call has taken yet (pending before the worker saw them)."""
        return sorted((i for i in self.invitations.values()
                       if i.room_name == self.room_name and i.call_id is None and i.status in OPEN), key=order_key)

    def participants_of(self, call_id: str) -> list[Participant]:
        return [p for p in self.participants.values() if p.call_id == call_id]

    def parties(self) -> set[str]:
        live = self.live_call()
        room_invs = [i for i in self.invitations.values() if i.room_name == self.room_name]
        return room_parties(room_invs, live)

    # ---- changing --------------------------------------------------------------------------
    def put_invitation(self, inv: Invitation) -> Invitation:
        self.invitations[inv.id] = inv
        if inv.id not in self._changed_inv:
            self._changed_inv.append(inv.id)
        return inv

    def put_call(self, call: Call) -> Call:
        self.calls[call.id] = call
        if call.id not in self._changed_calls:
            self._changed_calls.append(call.id)
        return call

    def put_participant(self, p: Participant) -> Participant:
        self.participants[p.sid] = p
        if p.sid not in self._changed_parts:
            self._changed_parts.append(p.sid)
        return p

    def new_call(self, inv: Invitation, status: CallStatus = CallStatus.RINGING, sid: str | None = None) -> Call:
        return self.put_call(Call(id=self._new_id(), room_name=inv.room_name, call_type=inv.call_type,
                                  caller_id=inv.caller_id, status=status, created_at=self.now, livekit_room_sid=sid))

    def link(self, inv: Invitation, call: Call) -> Invitation:
        if inv.call_id != call.id:
            inv = self.put_invitation(replace(inv, call_id=call.id))
        if inv.call_type == "video" and call.call_type != "video":
            self.put_call(replace(self.calls[call.id], call_type="video"))
        return inv

    def record(self, event: EventRecord) -> None:
        self.events.append(event)

    def decision(self, result: str) -> Decision:
        return Decision(
            result=result,
            invitations=[self.invitations[i] for i in self._changed_inv],
            calls=[self.calls[c] for c in self._changed_calls],
            participants=[self.participants[p] for p in self._changed_parts],
            events=self.events, outbox=self.outbox, effects=self.effects,
        )


def accepted_without_call(w: Working) -> list[Invitation]:
    return [i for i in w.invitations.values()
            if i.room_name == w.room_name and i.status == S.ACCEPTED and i.call_id is None]
