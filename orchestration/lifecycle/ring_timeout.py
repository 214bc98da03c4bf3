"""Use case: an invitation's ring deadline came (a bucket's countdown, its own, or the sweep).

Recorded once as `timeout:<invitation id>`, only once the deadline has passed: an early look
re-schedules itself and records nothing. LiveKit is asked who is in the room before an invitation
is called missed (webhooks lag): a callee already there has answered. LiveKit giving no answer
decides nothing either (`livekit_unanswered`: the sweep looks again every 2 s), until 10 s past the
deadline, when what the database knows decides.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from orchestration import names
from orchestration.domain.decision import Decision, EventRecord, Snapshot, Want
from orchestration.domain.model import EndReason, InvitationStatus as S, decide_ring_timeout
from orchestration.lifecycle import rules
from orchestration.lifecycle.context import Outcome, Ports
from orchestration.lifecycle.effects import apply_decision, run_effects
from orchestration.lifecycle.state import Working, in_rounds, merge_decisions

log = structlog.get_logger("callflow.lifecycle")

# Ring deadlines are grouped in buckets this wide (`orchestration.names`, beside the buckets' key).
TIMER_BUCKET_SECONDS = names.TIMER_BUCKET_SECONDS


def decide(snap: Snapshot, invitation_id: str, source: str, callee_in_room: bool | None) -> Decision:
    """`callee_in_room`: LiveKit's answer (None: it gave none)."""
    w = Working(snap)
    inv = w.invitations.get(invitation_id)
    if inv is None:
        return Decision("unknown_invitation")
    joined = inv.call_id is not None and any(p.identity == inv.callee_id and p.connected
                                             for p in w.participants_of(inv.call_id))
    verdict = decide_ring_timeout(inv, w.now, callee_in_room, joined)
    if verdict.action == "reschedule":
        return Decision("rescheduled")
    if verdict.action == "wait":
        return Decision("livekit_unanswered")
    result = "nothing"
    if verdict.action == "answer":
        rules.answer(w, inv)
        result = "answered"
    elif verdict.action == "miss":
        missed = rules.end_invitation(w, inv, S.MISSED, EndReason.TIMEOUT)
        rules.settle_call(w, missed.call_id)
        result = "missed"
    payload = {"decision": result}
    if callee_in_room is None:
        payload["livekit"] = "no answer: decided from the database"
    w.record(EventRecord(f"timeout:{inv.id}", "timer" if source == "timer" else "sweep", "ring_timeout",
                         inv.room_name, inv.id, inv.ring_deadline, payload))
    return w.decision(result)


def handle_ring_timeout(invitation_id: str, source: str, ports: Ports) -> Outcome:
    """One invitation's deadline (its own countdown): a first look, then the decision."""
    event_id = f"timeout:{invitation_id}"
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
    row = {"id": inv.id, "room_name": inv.room_name, "caller_id": inv.caller_id, "callee_id": inv.callee_id}
    return handle_ring_timeouts([row], source, ports)[0]


def handle_ring_timeouts(due: list[dict], source: str, ports: Ports, parallel_map: Callable = map) -> list[Outcome]:
    """Deadlines found passed by a query (rows of id, room_name, callee_id, caller_id), ended
    together: LiveKit is asked about their rooms side by side, then one transaction per round of
    invitations that share no room or user (deadlines arrive as fast as invitations rang: one
    transaction each could not keep up with a burst)."""
    if not due:
        return []
    live = list(parallel_map(lambda row: ports.rooms.list_participants(row["room_name"]), due))
    in_room = {str(row["id"]): None if people is None else any(p.identity == str(row["callee_id"]) for p in people)
               for row, people in zip(due, live)}
    keys = lambda row: {f"room:{row['room_name']}", f"user:{row['callee_id']}", f"user:{row['caller_id']}"}  # noqa: E731
    outcomes: dict[str, Outcome] = {}
    effects: list = []  # run once every round has committed: the rooms released side by side
    for together in in_rounds(due, keys):
        rooms = sorted({row["room_name"] for row in together})
        ids = [str(row["id"]) for row in together]
        decided: list[tuple[str, Decision]] = []
        with ports.store.transaction(*rooms) as uow:
            snap = uow.load(Want(room_name=rooms[0], other_rooms=tuple(rooms[1:]), invitation_ids=tuple(ids),
                                 event_ids=tuple(f"timeout:{i}" for i in ids)))
            for row, invitation_id in zip(together, ids):
                if f"timeout:{invitation_id}" in snap.seen_events:
                    outcomes[invitation_id] = Outcome("duplicate")
                else:
                    decided.append((invitation_id, decide(replace(snap, room_name=row["room_name"]), invitation_id,
                                                          source, in_room[invitation_id])))
            if decided:
                effects += apply_decision(uow, merge_decisions([d for _, d in decided]), ports)
        for invitation_id, decision in decided:
            inv = snap.invitations.get(invitation_id)
            outcomes[invitation_id] = Outcome(decision.result, decision.effects, invitation_id,
                                              inv.call_id if inv else None, inv.room_name if inv else None)
    run_effects(effects, ports, parallel_map)
    return [outcomes[str(row["id"])] for row in due]


def handle_ring_timeouts_due(bucket_end: float, ports: Ports, parallel_map: Callable = map) -> Outcome:
    """A timer bucket's countdown: every invitation whose deadline fell in the bucket, together.

    Buckets are disjoint, so two workers never look at the same deadline through them; an
    invitation a lost bucket left behind is the sweep's. Early (clocks differ): re-schedule.
    """
    end = datetime.fromtimestamp(bucket_end, tz=timezone.utc)
    with ports.store.transaction() as uow:
        if uow.now() < end:
            ports.scheduler.ring_timeout_bucket(bucket_end)
            return Outcome("rescheduled")
        rows = uow.ringing_due_between(end - timedelta(seconds=TIMER_BUCKET_SECONDS), end)
    outcomes = handle_ring_timeouts(rows, "timer", ports, parallel_map)
    for o in outcomes:  # one line per invitation this countdown ended
        if o.result in ("missed", "answered"):
            log.info("ring_timeout done", result=o.result, invitation_id=o.invitation_id, call_id=o.call_id,
                     room_name=o.room_name)
    results = [o.result for o in outcomes]
    if not rows:
        return Outcome("none due")
    return Outcome(f"{len(rows)} due: " + ", ".join(f"{results.count(r)} {r}" for r in sorted(set(results))))
