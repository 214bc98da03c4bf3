"""Use case: a LiveKit webhook event (already verified and queued by `web`).

Which call an event belongs to (the contract): a join belongs to the room's live call, a leave
follows its participant's row, `room_finished` follows its room sid. Anyone who joins a room and
is not one of its parties is removed. Every event is recorded, whether it changes anything or not.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Callable, Mapping

from orchestration.domain.decision import (
    Decision,
    EventRecord,
    ReleaseRoom,
    RemoveParticipant,
    ScheduleGrace,
    Snapshot,
    Want,
)
from orchestration.domain.model import CallStatus, InvitationStatus as S, Participant, order_key
from orchestration.ingest.livekit import RoomEvent, parse_room_event
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import LifecycleConfig, Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.state import Working, accepted_without_call, in_rounds, merge_decisions

SLACK = timedelta(seconds=1)  # LiveKit's times have second resolution


def decide(snap: Snapshot, ev: RoomEvent, config: LifecycleConfig,
           new_id: Callable[[], str] | None = None) -> Decision:
    w = Working(snap, new_id)
    result = "recorded"
    if ev.affects_lifecycle:
        if ev.kind == "room_started":
            result = _room_started(w, ev)
        elif ev.kind == "participant_joined":
            result = _joined(w, ev)
        elif ev.kind in ("participant_left", "participant_connection_aborted"):
            result = _left(w, ev, aborted=ev.kind == "participant_connection_aborted")
        elif ev.kind == "room_finished":
            result = _room_finished(w, ev)
    w.record(EventRecord(ev.event_id, "livekit", ev.kind, ev.room_name, None, ev.occurred_at, dict(ev.raw)))
    return w.decision(result)


def _room_started(w: Working, ev: RoomEvent) -> str:
    live = w.live_call()
    if live is not None and not live.livekit_room_sid and ev.room_sid:
        w.put_call(replace(live, livekit_room_sid=ev.room_sid))
    return "recorded"


def _remove(w: Working, ev: RoomEvent, why: str) -> str:
    p = ev.participant
    w.effects.append(RemoveParticipant(w.room_name, p.identity, p.sid))
    w.record(EventRecord(f"participant_removed:{p.sid}", "timer", "participant_removed", w.room_name, None, w.now,
                         {"identity": p.identity, "participant_sid": p.sid, "reason": why}))
    return "removed_stranger"


def _ended_call_at(w: Working, ev: RoomEvent, at: datetime):
    """The ended call of this room session (same sid) that was live at `at`, unless the room's live
    call had begun by then: a late event of an ended call belongs to it, not to a redial."""
    if not ev.room_sid:
        return None
    live = w.live_call()
    if live is not None and live.created_at <= at + SLACK:
        return None
    ended = [c for c in w.calls.values()
             if not c.live and c.room_name == w.room_name and c.livekit_room_sid == ev.room_sid
             and c.created_at - SLACK <= at and c.ended_at is not None and at <= c.ended_at + SLACK]
    return max(ended, key=lambda c: c.created_at) if ended else None


def _joined(w: Working, ev: RoomEvent) -> str:
    p = ev.participant
    if p is None or not p.sid:
        return "joined_without_sid"
    at = p.joined_at or ev.occurred_at or w.now
    known = w.participants.get(p.sid)
    if known is not None:
        # A duplicate, or the join arriving after its leave: the session keeps its call, and
        # starts no earlier than it.
        joined = max(min(filter(None, (known.joined_at, at))), w.calls[known.call_id].created_at)
        if joined != known.joined_at:
            known = w.put_participant(replace(known, joined_at=joined))
            if known.left_at is not None:
                rules.close_session(w, known, known.left_at)
            rules.refresh_call_times(w, w.calls[known.call_id])
        return "joined_again"

    ended = _ended_call_at(w, ev, at)
    if ended is not None:
        # A late join of a call that has ended since (its webhooks came out of order): history only.
        session = w.put_participant(Participant(ended.id, p.identity, p.sid, max(at, ended.created_at)))
        rules.close_session(w, session, ended.ended_at)
        rules.refresh_call_times(w, ended)
        return "joined_ended_call"
    call = w.live_call()
    if call is None:
        waiting = w.open_unlinked() + accepted_without_call(w)
        if not any(i.involves(p.identity) for i in waiting):
            return _remove(w, ev, "no live call in this room")
        first = min(waiting, key=order_key)
        call = w.new_call(first, CallStatus.RINGING, sid=ev.room_sid)
    if p.identity not in w.parties():
        return _remove(w, ev, "not a party of this room")
    if not call.livekit_room_sid and ev.room_sid:
        call = w.put_call(replace(call, livekit_room_sid=ev.room_sid))
    # A session starts no earlier than its call (the second of slack of LiveKit's times).
    if at < call.created_at:
        at = call.created_at
    w.put_participant(Participant(call.id, p.identity, p.sid, at))
    result = "joined"
    for inv in w.open_unlinked() + accepted_without_call(w) + w.invitations_of(call.id):
        inv = w.invitations[inv.id]
        if inv.room_name != w.room_name:
            continue
        if inv.status == S.ACCEPTED and inv.call_id is None:
            w.link(inv, w.calls[call.id])
            rules.activate(w, w.calls[call.id])
        elif inv.open and inv.callee_id == p.identity:
            inv = w.link(inv, w.calls[call.id])
            rules.answer(w, inv, max(at, inv.ringing_at or at, inv.created_at or at))
            result = "answered_by_join"
    rules.refresh_call_times(w, w.calls[call.id])
    return result


def _left(w: Working, ev: RoomEvent, aborted: bool) -> str:
    p = ev.participant
    if p is None or not p.sid:
        return "left_unknown"
    session = w.participants.get(p.sid)
    if session is None:
        # Its join never reached us: the call of the room when it joined (an ended one, by its
        # sid), else the room's live call if the leaver is one of its parties.
        call = _ended_call_at(w, ev, p.joined_at or ev.occurred_at or w.now)
        if call is None:
            call = w.live_call()
            if call is None or p.identity not in w.parties():
                return "left_unknown_call"
        joined = max(p.joined_at or call.created_at, call.created_at)
        session = Participant(call.id, p.identity, p.sid, joined)
    call = w.calls[session.call_id]
    left_at = ev.occurred_at or w.now
    if session.left_at is not None:
        left_at = min(session.left_at, left_at)
    if call.ended_at is not None:
        left_at = min(left_at, call.ended_at)
    rules.close_session(w, session, left_at)
    rules.refresh_call_times(w, call)
    if call.live:
        w.effects.append(ScheduleGrace(w.room_name, p.sid, p.identity, aborted))
    return "left"


def _room_finished(w: Working, ev: RoomEvent) -> str:
    at = ev.occurred_at or w.now
    live = w.live_call()
    same_sid = [c for c in w.calls.values() if ev.room_sid and c.livekit_room_sid == ev.room_sid]
    target = next((c for c in same_sid if c.live), None)
    if target is None and same_sid:
        # The room of an ended call: its end can only move earlier.
        call = max(same_sid, key=lambda c: c.created_at)
        if call.ended_at is not None and at < call.ended_at:
            call = w.put_call(replace(call, ended_at=max(at, call.created_at)))
            for s in w.participants_of(call.id):
                if s.left_at is None or s.left_at > call.ended_at:
                    rules.close_session(w, s, call.ended_at)
            rules.refresh_call_times(w, call)
        return "already_ended"
    if target is None and live is not None and not live.livekit_room_sid and live.created_at <= at + SLACK:
        target = live
    if target is None:
        return "finished_unknown_call"
    ended = rules.finish_call(w, target, max(at, target.created_at))
    # The room is gone already: nothing to release.
    w.effects[:] = [e for e in w.effects if not isinstance(e, ReleaseRoom)]
    return "completed" if ended.status == CallStatus.COMPLETED else f"ended_{ended.status}"


# ---- load, decide, apply ---------------------------------------------------------------------------
def handle_livekit_event(event: Mapping | RoomEvent, received_at: str | None, ports: Ports) -> Outcome:
    return handle_livekit_events([event], ports)[0]


def handle_livekit_events(events: list[Mapping | RoomEvent], ports: Ports,
                          parallel_map: Callable = map) -> list[Outcome]:
    """Events that arrived together, decided together: one locked transaction for each round of
    events that share no room (nor participant, room sid or event id); events that do wait for the
    next round, in arrival order, so a room's events are decided in the order LiveKit sent them. A
    batch of one is the plain case. Returns one outcome per event, in order."""
    parsed = [ev if isinstance(ev, RoomEvent) else parse_room_event(ev) for ev in events]
    outcomes: dict[int, Outcome] = {}
    items: list[tuple[int, RoomEvent]] = []
    for index, ev in enumerate(parsed):
        if ev.event_id:
            items.append((index, ev))
        else:
            outcomes[index] = Outcome("no_id")
    for together in in_rounds(items, _keys):
        outcomes.update(_decide_together(together, ports, parallel_map))
    return [outcomes[i] for i in range(len(parsed))]


def _keys(item: tuple[int, RoomEvent]) -> set[str]:
    ev = item[1]
    keys = {f"event:{ev.event_id}"}
    if ev.room_name:
        keys.add(f"room:{ev.room_name}")
    if ev.room_sid:
        keys.add(f"room_sid:{ev.room_sid}")
    if ev.participant and ev.participant.sid:
        keys.add(f"participant:{ev.participant.sid}")
    return keys


def _decide_together(items: list[tuple[int, RoomEvent]], ports: Ports, parallel_map: Callable) -> dict[int, Outcome]:
    rooms = sorted({ev.room_name for _, ev in items if ev.room_name})
    want = Want(room_name=rooms[0] if rooms else "", other_rooms=tuple(rooms[1:]),
                participant_sids=tuple(ev.participant.sid for _, ev in items if ev.participant and ev.participant.sid),
                room_sids=tuple(ev.room_sid for _, ev in items if ev.room_sid),
                event_ids=tuple(ev.event_id for _, ev in items))
    outcomes: dict[int, Outcome] = {}
    decided: list[tuple[int, RoomEvent, Decision]] = []
    effects: list = []
    with ports.store.transaction(*rooms) as uow:
        snap = uow.load(want)
        for index, ev in items:
            if ev.event_id in snap.seen_events:
                outcomes[index] = Outcome("duplicate")
            else:
                decided.append((index, ev, decide(replace(snap, room_name=ev.room_name or ""), ev, ports.config)))
        if decided:
            effects = apply_decision(uow, merge_decisions([d for _, _, d in decided]), ports)
    run_effects(effects, ports, parallel_map)
    for index, ev, decision in decided:
        call_id = next((c.id for c in decision.calls), None) or next((p.call_id for p in decision.participants), None)
        outcomes[index] = Outcome(decision.result, decision.effects, None, call_id, ev.room_name)
    return outcomes
