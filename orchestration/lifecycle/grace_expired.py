"""Use case: a participant left and its grace period is over (its countdown, or the sweep).

Came back (the same identity is in the room again, from any device): nothing. Otherwise a caller
who gave up stops their invitations still ringing (in a group call too), and a 1:1 call that was
answered ends: either side gone for longer than the grace period hangs it up. Whether they came
back is LiveKit's to say: while it gives no answer nothing is decided (the sweep asks again).
"""

from __future__ import annotations

from orchestration.domain.decision import Decision, EventRecord, Snapshot, Want
from orchestration.domain.model import CallStatus, EndReason, InvitationStatus as S, is_one_to_one
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.state import Working


def decide(snap: Snapshot, participant_sid: str, identity: str, aborted: bool | None, back_in_room: bool,
           source: str) -> Decision:
    w = Working(snap)
    session = w.participants.get(participant_sid)
    call = w.calls.get(session.call_id) if session else None
    result = "nothing"
    if call is None or not call.live:
        result = "call_not_live"
    elif back_in_room or _came_back(w.participants_of(call.id), session):
        result = "came_back"
    else:
        if aborted is None:
            aborted = participant_sid in snap.aborted_sids
        reason = EndReason.CONNECTION_ABORTED if aborted else EndReason.CALLER_CANCELLED
        for inv in w.invitations_of(call.id):
            if inv.caller_id == identity and inv.open:
                rules.end_invitation(w, inv, S.CANCELLED, reason)
                result = "caller_gave_up"
        rules.settle_call(w, call.id)
        call = w.calls[call.id]
        if call.status == CallStatus.ACTIVE and is_one_to_one(w.invitations_of(call.id)):
            rules.end_call(w, call, CallStatus.COMPLETED, "hangup", session.left_at)
            result = "hung_up"
    w.record(EventRecord(f"grace:{participant_sid}", "sweep" if source == "sweep" else "timer", "grace_expired",
                         call.room_name if call else snap.room_name, None, w.now,
                         {"participant_sid": participant_sid, "identity": identity, "result": result}))
    return w.decision(result)


def _came_back(sessions, left) -> bool:
    """Another session of the same identity outlived this one (a rejoin, or another device):
    its own leave, if any, has a grace period of its own."""
    return any(p.identity == left.identity and p.sid != left.sid
               and (p.left_at is None or (left.left_at is not None and p.left_at > left.left_at))
               for p in sessions)


def handle_grace_expired(room_name: str, participant_sid: str, identity: str, aborted: bool | None,
                         ports: Ports, source: str = "timer") -> Outcome:
    event_id = f"grace:{participant_sid}"
    with ports.store.transaction() as uow:
        if uow.event_seen(event_id):
            return Outcome("duplicate")
    # participant_left can arrive after a quick re-join: ask LiveKit who is really there. No answer
    # decides nothing (an active call is never ended for lack of one): the sweep asks again.
    live = ports.rooms.list_participants(room_name)
    if live is None:
        return Outcome("livekit_unanswered", [], None, None, room_name)
    back = any(p.identity == identity and p.sid != participant_sid for p in live)
    want = Want(room_name=room_name, participant_sids=(participant_sid,), event_ids=(event_id,),
                aborted_sids=(participant_sid,) if aborted is None else ())
    with ports.store.transaction(room_name) as uow:
        snap = uow.load(want)
        if event_id in snap.seen_events:
            return Outcome("duplicate")
        decision = decide(snap, participant_sid, identity, aborted, back, source)
        effects = apply_decision(uow, decision, ports)
    run_effects(effects, ports)
    session = snap.participants.get(participant_sid)
    return Outcome(decision.result, effects, None, session.call_id if session else None, room_name)
