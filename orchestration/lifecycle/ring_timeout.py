"""Use case: an invitation's ring deadline came (a bucket's countdown, its own, or the sweep).

Recorded once as `timeout:<invitation id>`, only once the deadline has passed: an early look
re-schedules itself and records nothing. LiveKit is asked who is in the room before an invitation
is called missed (webhooks lag): a callee already there has answered.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from orchestration.domain.model import EndReason, InvitationStatus as S, decide_ring_timeout
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.state import Decision, EventRecord, Snapshot, Want, Working

log = structlog.get_logger("callflow.lifecycle")

# Ring deadlines are grouped in buckets this wide: one countdown task per bucket ends every
# invitation due in it, so 10,000 ringing invitations are a few thousand timers, not 10,000.
TIMER_BUCKET_SECONDS = 0.05


def decide(snap: Snapshot, invitation_id: str, source: str, callee_in_room: bool | None) -> Decision:
    w = Working(snap)
    inv = w.invitations.get(invitation_id)
    if inv is None:
        return Decision("unknown_invitation")
    verdict = decide_ring_timeout(inv, w.now, callee_in_room)
    if verdict.action == "reschedule":
        return Decision("rescheduled")
    result = "nothing"
    if verdict.action == "answer":
        rules.answer(w, inv)
        result = "answered"
    elif verdict.action == "miss":
        missed = rules.end_invitation(w, inv, S.MISSED, EndReason.TIMEOUT)
        rules.settle_call(w, missed.call_id)
        result = "missed"
    w.record(EventRecord(f"timeout:{inv.id}", "timer" if source == "timer" else "sweep", "ring_timeout",
                         inv.room_name, inv.id, inv.ring_deadline, {"decision": result}))
    return w.decision(result)


def handle_ring_timeout(invitation_id: str, source: str, ports: Ports, due: dict | None = None) -> Outcome:
    """One invitation's deadline. `due` (room_name, callee_id) comes from a query that found it
    ringing past its deadline, which spares the first look."""
    event_id = f"timeout:{invitation_id}"
    if due is not None:
        room_name, callee_id, action = due["room_name"], str(due["callee_id"]), "miss"
    else:
        with ports.store.transaction() as uow:
            if uow.event_seen(event_id):
                return Outcome("duplicate")
            inv = uow.invitation(invitation_id)
            if inv is None:
                return Outcome("unknown_invitation")
            now = uow.now()
        verdict = decide_ring_timeout(inv, now, callee_in_room=None)
        if verdict.action == "reschedule":
            if source == "timer":
                ports.scheduler.ring_timeout_at(invitation_id, verdict.at)
            return Outcome("rescheduled")
        room_name, callee_id, action = inv.room_name, inv.callee_id, verdict.action
    callee_in_room = False
    if action != "nothing":
        live = ports.rooms.list_participants(room_name)
        callee_in_room = bool(live) and any(p.identity == callee_id for p in live)

    with ports.store.transaction(room_name) as uow:
        snap = uow.load(Want(room_name=room_name, invitation_ids=(invitation_id,), event_ids=(event_id,)))
        if event_id in snap.seen_events:
            return Outcome("duplicate")
        decision = decide(snap, invitation_id, source, callee_in_room)
        effects = apply_decision(uow, decision, ports)
    run_effects(effects, ports)
    inv = snap.invitations.get(invitation_id)
    return Outcome(decision.result, effects, invitation_id, inv.call_id if inv else None, room_name)


def handle_ring_timeouts_due(bucket_end: float, ports: Ports, parallel_map: Callable = map) -> Outcome:
    """A timer bucket's countdown: every invitation whose deadline fell in the bucket, at once.

    Buckets are disjoint, so two workers never look at the same deadline through them; an
    invitation a lost bucket left behind is the sweep's. Early (clocks differ): re-schedule.
    """
    end = datetime.fromtimestamp(bucket_end, tz=timezone.utc)
    with ports.store.transaction() as uow:
        if uow.now() < end:
            ports.scheduler.ring_timeout_bucket(bucket_end)
            return Outcome("rescheduled")
        rows = uow.ringing_due_between(end - timedelta(seconds=TIMER_BUCKET_SECONDS), end)
    outcomes = list(parallel_map(lambda row: handle_ring_timeout(str(row["id"]), "timer", ports, due=row), rows))
    for o in outcomes:  # one line per invitation this countdown ended
        if o.result in ("missed", "answered"):
            log.info("ring_timeout done", result=o.result, invitation_id=o.invitation_id, call_id=o.call_id,
                     room_name=o.room_name)
    results = [o.result for o in outcomes]
    if not rows:
        return Outcome("none due")
    return Outcome(f"{len(rows)} due: " + ", ".join(f"{results.count(r)} {r}" for r in sorted(set(results))))
