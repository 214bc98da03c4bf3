"""Use case: the sweep compares live calls with what LiveKit says, and ends what is over.

- **strangers**: anyone in a live call's room who is not one of the room's parties is removed
  (a lost `participant_joined` webhook must not leave them in): `participant_removed:<sid>`.

- **room gone**: LiveKit drops webhooks that waited more than 30 s in its queue, so a call can be
  left live with its room long closed. It is finished as `room_finished` would have finished it:
  at its last participant's departure, or now (`room_reconciled:<call id>`).
- **nobody came**: an answered call that nobody is in, answered longer than the ring timeout
  ago and with no leaver still within grace, ends `completed` (`join_window_expired:<call id>`).
"""

from __future__ import annotations

from datetime import timedelta

from orchestration.domain.decision import Decision, EventRecord, ReleaseRoom, RemoveParticipant, Snapshot, Want
from orchestration.domain.model import CallStatus
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import LifecycleConfig, Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.state import Working
from orchestration.ports import LiveParticipant


def decide_room_members(snap: Snapshot, listed: list[LiveParticipant]) -> Decision:
    w = Working(snap)
    parties = w.parties()
    removed = 0
    for p in listed:
        if p.identity not in parties:
            w.effects.append(RemoveParticipant(w.room_name, p.identity, p.sid))
            w.record(EventRecord(f"participant_removed:{p.sid}", "sweep", "participant_removed", w.room_name, None,
                                 w.now, {"identity": p.identity, "participant_sid": p.sid,
                                         "reason": "not a party of this room (found by the sweep)"}))
            removed += 1
    return w.decision(f"removed {removed}" if removed else "nothing")


def handle_room_members(room_name: str, ports: Ports) -> Outcome:
    """Compare a live call's room with LiveKit's participant list; remove who has no right there."""
    listed = ports.rooms.list_participants(room_name)
    if listed is None:
        return Outcome("livekit_unanswered")
    if not listed:
        return Outcome("nothing")
    with ports.store.transaction(room_name) as uow:
        # Everyone listed, even a session removed before: LiveKit may still list it (the SDK may
        # resume a removed connection), and only a removal that took counts. The removal's event
        # is recorded once.
        snap = uow.load(Want(room_name=room_name))
        decision = decide_room_members(snap, listed)
        effects = apply_decision(uow, decision, ports)
    run_effects(effects, ports)
    return Outcome(decision.result, effects)


def decide_room_gone(snap: Snapshot, call_id: str) -> Decision:
    w = Working(snap)
    call = w.calls.get(call_id)
    if call is None or not call.live:
        return Decision("call_not_live")
    last_left = max((p.left_at for p in w.participants_of(call_id) if p.left_at), default=None)
    rules.finish_call(w, call, last_left or w.now)
    w.effects[:] = [e for e in w.effects if not isinstance(e, ReleaseRoom)]
    w.record(EventRecord(f"room_reconciled:{call_id}", "sweep", "room_reconciled", call.room_name, None, w.now,
                         {"reason": "room gone from LiveKit without a room_finished webhook"}))
    return w.decision("reconciled")


def decide_silent_call(snap: Snapshot, call_id: str, anyone_in_room: bool, config: LifecycleConfig) -> Decision:
    w = Working(snap)
    call = w.calls.get(call_id)
    if call is None or call.status != CallStatus.ACTIVE or anyone_in_room:
        return Decision("nothing")
    sessions = w.participants_of(call_id)
    if any(p.connected for p in sessions):
        return Decision("nothing")
    last_left = max((p.left_at for p in sessions if p.left_at), default=None)
    if last_left is not None and w.now < last_left + timedelta(seconds=config.grace):
        return Decision("nothing")
    answered = [i.answered_at for i in w.invitations_of(call_id) if i.answered_at]
    if not answered or w.now < min(answered) + timedelta(seconds=config.ring_timeout):
        return Decision("nothing")
    rules.end_call(w, call, CallStatus.COMPLETED, "hangup", last_left or w.now)
    w.record(EventRecord(f"join_window_expired:{call_id}", "sweep", "join_window_expired", call.room_name, None,
                         w.now, {"last_left_at": last_left.isoformat() if last_left else None}))
    return w.decision("ended_silent")


def handle_silent_call(call_id: str, room_name: str, ports: Ports) -> Outcome:
    live = ports.rooms.list_participants(room_name)
    if live is None:
        return Outcome("livekit_unanswered")
    with ports.store.transaction(room_name) as uow:
        snap = uow.load(Want(room_name=room_name, call_ids=(call_id,),
                             event_ids=(f"join_window_expired:{call_id}",)))
        if f"join_window_expired:{call_id}" in snap.seen_events:
            return Outcome("duplicate")
        decision = decide_silent_call(snap, call_id, bool(live), ports.config)
        effects = apply_decision(uow, decision, ports)
    run_effects(effects, ports)
    return Outcome(decision.result, effects)


def reconcile_live_calls(ports: Ports, older_than: float = 60.0, limit: int = 200) -> int | None:
    """End live calls whose LiveKit room is gone; returns how many (None: LiveKit gave no answer,
    so nothing was decided)."""
    with ports.store.transaction() as uow:
        candidates = uow.live_calls_older_than(older_than, limit)
    if not candidates:
        return 0
    existing = ports.rooms.existing_rooms(sorted({c["room_name"] for c in candidates}))
    if existing is None:
        return None
    ended = 0
    for candidate in candidates:
        if candidate["room_name"] in existing:
            continue
        call_id, room_name = str(candidate["id"]), candidate["room_name"]
        with ports.store.transaction(room_name) as uow:
            snap = uow.load(Want(room_name=room_name, call_ids=(call_id,), event_ids=(f"room_reconciled:{call_id}",)))
            if f"room_reconciled:{call_id}" in snap.seen_events:
                continue
            decision = decide_room_gone(snap, call_id)
            effects = apply_decision(uow, decision, ports)
        run_effects(effects, ports)
        ended += decision.result == "reconciled"
    return ended

