"""Use case: an invitation changed (Realtime, LISTEN, the listener's catch-up, or a sweep).

The change only says which invitation to look at; the row is re-read, so the order and number of
changes do not matter. A pending invitation is answered by glare, refused as busy, failed when
LiveKit refuses to make its room, or rung; any other status is linked to its call and settles it.
Ringing does not wait for LiveKit: when it gives no answer the invitation rings all the same and
the room is made later (a room action, retried until LiveKit answers; a first join makes it too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import structlog

from orchestration.domain.decision import Decision, EnsureRoom, EventRecord, Snapshot, Want
from orchestration.domain.model import (
    WORKER_ONLY,
    Call,
    CallStatus,
    EndReason,
    Invitation,
    InvitationStatus as S,
    order_key,
)
from orchestration.ingest.livekit import parse_time
from orchestration.ingest.mapping import Change
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import LifecycleConfig, Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.room_actions import create_room
from orchestration.lifecycle.state import Working, in_rounds, merge_decisions
from orchestration.ports import RoomError, RoomInfo, RoomRefused

log = structlog.get_logger("callflow.lifecycle")

NEEDS_ROOM = "needs_room"
STALE_ROOM = "stale_room"
# A room LiveKit gave no answer about: ring all the same, make it later.
ROOM_LATER = RoomInfo(name="", sid="")


def change_event(change: Change) -> EventRecord:
    """The event a change records: its own id (the transition's, or the sweep's), never rebuilt."""
    return EventRecord(
        event_id=change.event_id,
        source=change.source,
        type=change.type,
        room_name=change.room_name,
        invitation_id=change.invitation_id or None,
        occurred_at=parse_time(change.occurred_at),
        payload=dict(change.payload),
    )


# ---- decide (pure) ------------------------------------------------------------------------------
def decide(snap: Snapshot, invitation_id: str, event: EventRecord, config: LifecycleConfig,
           room: RoomInfo | None = None, room_error: str | None = None,
           new_id: Callable[[], str] | None = None) -> Decision:
    """`room`: the room LiveKit made (ROOM_LATER: it gave no answer); `room_error`: why LiveKit
    refused to make it."""
    w = Working(snap, new_id)
    inv = w.invitations[invitation_id]
    event.room_name = inv.room_name
    if inv.status == S.PENDING:
        counters = sorted((i for i in snap.counter_invitations
                           if (i.callee_id, i.caller_id) == (inv.caller_id, inv.callee_id)
                           and w.invitations.get(i.id, i).open), key=order_key)
        if counters:
            result = _glare(w, inv, w.invitations.get(counters[0].id, counters[0]), config)
        elif inv.callee_id in snap.busy_users:
            result = _busy(w, inv)
        elif room is None and room_error is None:
            return Decision(NEEDS_ROOM)
        elif room_error is not None:
            result = _failed(w, inv, room_error, event)
        elif room is ROOM_LATER:
            result = _ring(w, inv, None, config)
        else:
            if any(c.livekit_room_sid == room.sid and not c.live for c in w.calls.values()):
                # LiveKit still holds the room of an ended call: it must be made anew first.
                return Decision(STALE_ROOM)
            result = _ring(w, inv, room, config)
    elif inv.status == S.ACCEPTED:
        result = _answered(w, inv)
    else:
        result = _ended(w, inv)
    w.record(event)
    return w.decision(result)


def _call_for(w: Working, inv: Invitation, status: CallStatus = CallStatus.RINGING) -> Call:
    """The invitation's call: the one it is linked to, else its room's live call, else a new one."""
    if inv.call_id and inv.call_id in w.calls:
        return w.calls[inv.call_id]
    return w.live_call(inv.room_name) or w.new_call(inv, status)


def _glare(w: Working, inv: Invitation, counter: Invitation, config: LifecycleConfig) -> str:
    """The callee had already invited the caller: the earlier is answered, the later ends glare."""
    earlier, later = sorted((inv, counter), key=order_key)
    rules.end_invitation(w, later, S.CANCELLED, EndReason.GLARE)
    if later.call_id:
        rules.settle_call(w, later.call_id)
    earlier = w.invitations[earlier.id]
    if earlier.open:
        call = _call_for(w, earlier, CallStatus.ACTIVE)
        earlier = w.link(earlier, call)
        rules.answer(w, earlier)
        if not w.calls[call.id].livekit_room_sid:
            w.effects.append(EnsureRoom(earlier.room_name, call.id))
    w.record(EventRecord(f"glare:{later.id}", "sweep", "glare", later.room_name, later.id, w.now,
                         {"answered": earlier.id, "glare": later.id}))
    return "glare_answered" if earlier.id == inv.id else "glare"


def _busy(w: Working, inv: Invitation) -> str:
    inv = w.link(inv, _call_for(w, inv))
    rules.end_invitation(w, inv, S.BUSY, EndReason.CALLEE_BUSY)
    rules.settle_call(w, inv.call_id)
    return "busy"


def _failed(w: Working, inv: Invitation, error: str, event: EventRecord) -> str:
    inv = w.link(inv, _call_for(w, inv))
    rules.end_invitation(w, inv, S.FAILED, EndReason.ERROR)
    rules.settle_call(w, inv.call_id)
    event.payload = {**event.payload, "error": error[:500]}
    return "failed"


def _ring(w: Working, inv: Invitation, room: RoomInfo | None, config: LifecycleConfig) -> str:
    """Ring in `room` (None: LiveKit gave no answer; its room is made later)."""
    call = w.live_call(inv.room_name)
    if call is None:
        call = w.new_call(inv, sid=room.sid if room else None)
    elif room is not None and call.livekit_room_sid != room.sid:
        # The room LiveKit serves now is the call's room (made again after a deletion or timeout).
        call = w.put_call(replace(call, livekit_room_sid=room.sid))
    if not w.calls[call.id].livekit_room_sid:
        w.effects.append(EnsureRoom(inv.room_name, call.id))
    rules.ring(w, w.link(inv, call), config.ring_timeout)
    return "ringing"


def _answered(w: Working, inv: Invitation) -> str:
    rules.announce_end(w, inv)  # every other device of the callee stops ringing
    call = _call_for(w, inv, CallStatus.ACTIVE)
    if not call.live:
        return "seen_accepted"  # its call ended since; nothing left to do
    inv = w.link(inv, call)
    call = rules.activate(w, w.calls[call.id])
    if not call.livekit_room_sid:
        w.effects.append(EnsureRoom(inv.room_name, call.id))
    return "seen_accepted"


def _ended(w: Working, inv: Invitation) -> str:
    if inv.call_id is None and inv.end_reason != EndReason.GLARE:
        inv = w.link(inv, _call_for(w, inv))
    rules.announce_end(w, inv)
    rules.settle_call(w, inv.call_id)
    return f"seen_{inv.status}"


# ---- load, decide, apply ---------------------------------------------------------------------------
@dataclass
class _Item:
    """A change to decide, with what its first look found."""

    index: int
    change: Change
    event: EventRecord
    inv: Invitation
    counters: list[Invitation] = field(default_factory=list)
    room: RoomInfo | None = None
    room_error: str | None = None

    @property
    def pair(self) -> tuple[str, str] | None:
        return (self.inv.caller_id, self.inv.callee_id) if self.inv.status == S.PENDING else None

    @property
    def rooms(self) -> set[str]:
        return {self.inv.room_name, *(c.room_name for c in self.counters)}

    @property
    def keys(self) -> set[str]:
        """What no other change decided in the same transaction may share."""
        return {f"invitation:{self.inv.id}", f"user:{self.inv.caller_id}", f"user:{self.inv.callee_id}",
                *(f"room:{r}" for r in self.rooms)}


def handle_invitation_changed(change: Change, ports: Ports) -> Outcome:
    return handle_invitations_changed([change], ports)[0]


def handle_invitations_changed(changes: list[Change], ports: Ports,
                               parallel_map: Callable = map) -> list[Outcome]:
    """Changes that arrived together, decided together: one first look for all of them, their
    rooms made side by side, then one locked transaction for each round of changes that share no
    room, user or invitation (changes that do wait for the next round, in arrival order). A batch
    of one is the plain case. Returns one outcome per change, in order."""
    outcomes: dict[int, Outcome] = {}
    items: list[_Item] = []
    recorded: list[EventRecord] = []
    with ports.store.transaction() as uow:  # a first look, nothing locked
        events = [change_event(c) for c in changes]
        seen = uow.events_seen({e.event_id for e in events})
        invitations = uow.invitations({e.invitation_id for e in events if e.invitation_id})
        for index, (change, event) in enumerate(zip(changes, events)):
            inv = invitations.get(event.invitation_id or "")
            if event.event_id in seen:
                outcomes[index] = Outcome("duplicate")
            elif inv is None:
                event.invitation_id = None
                event.payload = {**event.payload, "note": "no such invitation"}
                recorded.append(event)
                outcomes[index] = Outcome("unknown_invitation")
            elif inv.status == change.status and inv.status in WORKER_ONLY and inv.call_id:
                # The echo of a transition a worker made: its effects were committed with it. (The
                # listener drops the lifecycle's own echoes by the row's `status_by`: this is the
                # safety net for one handed on all the same.)
                event.room_name = inv.room_name
                recorded.append(event)
                outcomes[index] = Outcome(f"seen_{inv.status}", [], inv.id, inv.call_id, inv.room_name)
            else:
                items.append(_Item(index, change, event, inv))
        pending = [it for it in items if it.pair]
        counters = uow.counter_invitations([it.pair for it in pending]) if pending else []
        for it in pending:
            it.counters = [c for c in counters if (c.callee_id, c.caller_id) == it.pair]
        # A room is wanted unless glare or busy will decide it (the locked decision has the last
        # word: should either have changed, it makes the room itself, or never uses this one).
        busy = uow.busy_users([(it.inv.callee_id, it.inv.room_name) for it in pending if not it.counters]) \
            if pending else set()
        if recorded:
            uow.apply(Decision("recorded", events=recorded))

    # LiveKit makes the rooms while nothing is locked, side by side.
    wanted = [it for it in pending if not it.counters and it.inv.callee_id not in busy]
    for it, (room, error) in zip(wanted, parallel_map(lambda it: _make_room(ports, it.inv.room_name), wanted)):
        it.room, it.room_error = room, error

    for together in in_rounds(items, lambda it: it.keys):
        outcomes.update(_decide_together(together, ports, parallel_map))
    return [outcomes[i] for i in range(len(changes))]


def _decide_together(items: list[_Item], ports: Ports, parallel_map: Callable = map) -> dict[int, Outcome]:
    rooms = sorted(set().union(*(it.rooms for it in items)))
    pairs = [it.pair for it in items if it.pair]
    want = Want(
        room_name=rooms[0],
        other_rooms=tuple(rooms[1:]),
        invitation_ids=tuple(i.id for it in items for i in (it.inv, *it.counters)),
        call_ids=tuple(i.call_id for it in items for i in (it.inv, *it.counters) if i.call_id),
        event_ids=tuple(it.event.event_id for it in items),
        busy=tuple((it.inv.callee_id, it.inv.room_name) for it in items if it.pair),
        counter_pairs=tuple(pairs),
    )
    outcomes: dict[int, Outcome] = {}
    decided: list[tuple[_Item, Decision]] = []
    with ports.store.transaction(*rooms, pairs=pairs) as uow:
        snap = uow.load(want)
        for it in items:
            if it.event.event_id in snap.seen_events:
                outcomes[it.index] = Outcome("duplicate")
            else:
                decided.append((it, _decide_one(replace(snap, room_name=it.inv.room_name), it, ports)))
        effects = apply_decision(uow, merge_decisions([d for _, d in decided]), ports)
    run_effects(effects, ports, parallel_map)
    for it, decision in decided:
        call_id = next((i.call_id for i in decision.invitations if i.id == it.inv.id), it.inv.call_id)
        outcomes[it.index] = Outcome(decision.result, decision.effects, it.inv.id, call_id, it.inv.room_name)
    return outcomes


def _decide_one(snap: Snapshot, it: _Item, ports: Ports) -> Decision:
    """Decide one change under its locks; makes (or remakes) its room when the locked look asks."""
    inv = it.inv
    decision = decide(snap, inv.id, change_event(it.change), ports.config, it.room, it.room_error)
    if decision.result == NEEDS_ROOM:
        # It looked busy a moment ago but is not any more: make the room now (rare).
        it.room, it.room_error = _make_room(ports, inv.room_name)
        decision = decide(snap, inv.id, change_event(it.change), ports.config, it.room, it.room_error)
    if decision.result == STALE_ROOM:
        # Under the room's lock: the ended call's room goes, and the new call gets a room of its own.
        try:
            ports.rooms.delete_room(inv.room_name)
        except RoomError:
            pass  # then the remade room below keeps the stale sid, and the invitation fails
        it.room, it.room_error = _make_room(ports, inv.room_name)
        decision = decide(snap, inv.id, change_event(it.change), ports.config, it.room, it.room_error)
        if decision.result == STALE_ROOM:
            decision = decide(snap, inv.id, change_event(it.change), ports.config, None,
                              "LiveKit kept serving the room of an ended call")
    if decision.result == "failed":
        log.error("room could not be made", invitation_id=inv.id, room_name=inv.room_name, error=it.room_error)
    return decision


def _make_room(ports: Ports, room_name: str) -> tuple[RoomInfo | None, str | None]:
    """(the room, None); (ROOM_LATER, None) when LiveKit gave no answer; (None, why) when it refused."""
    try:
        return create_room(ports, room_name), None
    except RoomRefused as exc:
        return None, str(exc) or "LiveKit refused to make the room"
    except RoomError:
        return ROOM_LATER, None
