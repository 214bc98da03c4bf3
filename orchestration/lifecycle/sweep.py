"""Use case: the beat sweep makes every piece of overdue work happen, whatever was lost.

- ring deadlines overdue by half an interval (their countdown was lost or is late): ended here,
  together;
- grace periods whose countdown never ran;
- invitations still `pending` long after insert (their change was lost): handed on again;
- client-made transitions (`accepted`, `declined`, `cancelled`) whose change was never taken
  (Realtime delivers at most once; a task can be lost after the listener's dedupe mark):
  re-read as `transition_recovered:<invitation id>:<status>`;
- answered calls nobody is in (see `reconcile.py`);
- every few seconds, the rooms of live calls against LiveKit's participant lists (strangers out);
- every half minute, live calls whose LiveKit room is gone;
- room actions (make, delete, remove) whose next attempt is due: failed ones, or ones whose
  worker died before it ran them (`room_actions.py`).

Each piece is handed on at most once per few seconds (the throttle), so a backlog is not
multiplied; the use cases' own idempotency makes a repeat harmless anyway. What depends on who is
in a room (a ring deadline, a grace period, the comparisons with LiveKit) is looked at again
within LOOK_AGAIN_AFTER seconds while LiveKit gives no answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from orchestration.ingest.mapping import Change
from orchestration.lifecycle import room_actions
from orchestration.lifecycle.context import Ports
from orchestration.lifecycle.grace_expired import handle_grace_expired
from orchestration.lifecycle.invitation_changed import handle_invitation_changed
from orchestration.lifecycle.reconcile import handle_room_members, handle_silent_call, reconcile_live_calls
from orchestration.lifecycle.ring_timeout import handle_ring_timeouts
from orchestration.ports import Throttle

STALE_PENDING_AFTER = 10.0       # seconds a pending invitation may wait for its change
UNRECORDED_AFTER = 2.0           # seconds a client's transition may wait for its change
UNRECORDED_WITHIN = 900.0        # how far back lost transitions are looked for (a look starts where the last got to)
UNRECORDED_EVERY = 5.0           # seconds between two looks
# Each look starts this far before where the last got to. A transition is stamped with its
# transaction's start (`now()`) but seen only once committed: a client's update that waited on a
# row lock, or a commit behind slow WAL flushes, becomes visible after a look has walked past its
# time. Looks overlap by this much (a commit up to UNRECORDED_AFTER + this late is still found);
# what they found twice is already recorded and left by the look's own condition.
UNRECORDED_OVERLAP = 10.0
RECONCILE_EVERY = 30.0
# Decisions waiting for LiveKit's answer are looked at again this soon (the contract: at most 2 s).
LOOK_AGAIN_AFTER = 2.0
MEMBERS_EVERY = 3.0
# Rooms compared with LiveKit per look: each is a ListParticipants call and a read, so many live
# calls are looked at in turns (20 live calls: every 3 s; 1,000: every 2.5 min).
MEMBERS_PER_LOOK = 25


@dataclass
class SweepReport:
    timeouts: int = 0
    graces: int = 0
    pending: int = 0
    recovered: int = 0
    silent: int = 0
    removed: int = 0
    reconciled: int = 0
    room_actions: int = 0
    results: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "results"}

    @property
    def did_something(self) -> bool:
        return any(self.as_dict().values())


def recovery_change(row: dict) -> Change:
    """A client's transition whose change was never taken, re-read once."""
    invitation_id, status = str(row["id"]), row["status"]
    return Change(invitation_id, status, "sweep", row["room_name"], row["updated_at"].isoformat(),
                  {"reason": f"no change of {status} was taken"},
                  event_id=f"transition_recovered:{invitation_id}:{status}", type="transition_recovered")


def stale_pending_change(row: dict) -> Change:
    """A pending invitation whose change never came: handed on as its pending change."""
    return Change(str(row["id"]), "pending", "sweep", row["room_name"], row["updated_at"].isoformat(),
                  {"reason": "stale pending"})


def run_sweep(ports: Ports, throttle: Throttle, *, interval: float, parallel_map: Callable = map,
              limit: int = 500) -> SweepReport:
    cfg = ports.config
    # Room actions first: a room made now is one the comparisons below find.
    room_actions_taken = room_actions.retry_due(ports, parallel_map)
    overdue_by = min(0.5, interval / 2)
    hold = max(2.0, interval * 4)
    with ports.store.transaction() as uow:
        due = uow.due_ring_timeouts(limit, overdue_by)
        graces = uow.due_grace_expiries(cfg.grace, limit)
        stale = uow.stale_pending(STALE_PENDING_AFTER, limit)
        lost, looked_through = [], None
        if throttle.once("unrecorded", UNRECORDED_EVERY):
            # From where the last look got to, less the overlap (each change looked at about
            # twice, not the whole window every look: 45,000 rows at 50 calls/s), and never
            # further back than the window.
            since = throttle.mark("unrecorded")
            lost = uow.unrecorded_transitions(
                UNRECORDED_AFTER, UNRECORDED_WITHIN, limit,
                since=(datetime.fromtimestamp(since, timezone.utc) - timedelta(seconds=UNRECORDED_OVERLAP)
                       if since is not None else None))
            looked_through = (lost[-1]["updated_at"] if len(lost) >= limit
                              else uow.now() - timedelta(seconds=UNRECORDED_AFTER))
    report = SweepReport(room_actions=room_actions_taken)

    overdue = [r for r in due if throttle.once(f"timeout:{r['id']}", LOOK_AGAIN_AFTER)]
    results = [o.result for o in handle_ring_timeouts(overdue, "sweep", ports, parallel_map)]
    report.timeouts = sum(1 for r in results if r in ("missed", "answered"))

    graces = [g for g in graces if throttle.once(f"grace:{g['participant_sid']}", LOOK_AGAIN_AFTER)]
    results = list(parallel_map(lambda g: handle_grace_expired(g["room_name"], g["participant_sid"], g["identity"],
                                                               None, ports, "sweep").result, graces))
    report.graces = sum(1 for r in results if r != "duplicate")

    for row in stale:
        invitation_id = str(row["id"])
        if throttle.once(f"pending:{invitation_id}", 30):
            ports.scheduler.invitation_changed(stale_pending_change(row))
            report.pending += 1

    lost = [row for row in lost if throttle.once(f"recover:{row['id']}:{row['status']}", hold)]
    results = list(parallel_map(lambda row: handle_invitation_changed(recovery_change(row), ports).result, lost))
    report.recovered = sum(1 for r in results if r != "duplicate")
    if looked_through is not None:  # only once they are handed on: a sweep that fails looks again
        throttle.move_mark("unrecorded", looked_through.timestamp(), UNRECORDED_WITHIN)

    # Looked for after the recoveries: a recovered answer may be long past its join window.
    with ports.store.transaction() as uow:
        silent = uow.silent_active_calls(cfg.ring_timeout, cfg.grace, limit)
    silent = [row for row in silent if throttle.once(f"silent:{row['id']}", LOOK_AGAIN_AFTER)]
    results = list(parallel_map(lambda row: handle_silent_call(str(row["id"]), row["room_name"], ports).result,
                                silent))
    report.silent = sum(1 for r in results if r == "ended_silent")

    if throttle.once("members", MEMBERS_EVERY):
        with ports.store.transaction() as uow:
            rooms = uow.live_rooms(10_000)
            turn = int(uow.now().timestamp() // MEMBERS_EVERY)
        if len(rooms) > MEMBERS_PER_LOOK:
            start = (turn * MEMBERS_PER_LOOK) % len(rooms)
            rooms = (rooms + rooms)[start:start + MEMBERS_PER_LOOK]
        results = list(parallel_map(lambda room: handle_room_members(room, ports).result, rooms))
        report.removed = sum(int(r.split()[1]) for r in results if r.startswith("removed"))
        if "livekit_unanswered" in results:
            throttle.forget("members")  # not taken on no answer: asked again at the next sweep

    if throttle.once("reconcile", RECONCILE_EVERY):
        reconciled = reconcile_live_calls(ports)
        if reconciled is None:
            throttle.forget("reconcile")
        report.reconciled = reconciled or 0

    return report
