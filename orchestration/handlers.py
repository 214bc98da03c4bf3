"""The lifecycle's service layer: each handler takes one event (plain data) and its ports.

A handler decides inside one transaction serialised on the room (the store's advisory lock),
records the event in `call_events` under its `event_id` in that same transaction, and returns
the effects that must happen outside the database (LiveKit calls, scheduling, emails); those run
only after commit and are idempotent themselves. A duplicate event finds its `event_id` and does
nothing.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import structlog

from orchestration.adapters.postgres_store import EventRecord, PostgresStore, Tx
from orchestration.domain.model import (
    CallStatus,
    EndReason,
    Invitation,
    InvitationStatus as S,
    call_settles,
    decide_ring_timeout,
    deserves_missed_call_email,
    unanswered_call_outcome,
)
from orchestration.ports import RoomError, Rooms, Scheduler

log = structlog.get_logger("callflow.lifecycle")


@dataclass(frozen=True)
class LifecycleConfig:
    ring_timeout: float = 30.0
    grace: float = 5.0
    # A room nobody joined closes a little after the ring would have ended; a room everybody left
    # stays long enough for a leaver to come back within the grace period.
    max_participants: int = 50

    @property
    def empty_timeout(self) -> int:
        return int(self.ring_timeout) + 30

    @property
    def departure_timeout(self) -> int:
        return int(math.ceil(self.grace)) + 2


@dataclass
class Ports:
    store: PostgresStore
    rooms: Rooms
    scheduler: Scheduler
    config: LifecycleConfig


# ---- effects (after commit) ---------------------------------------------------------------------
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


@dataclass(frozen=True)
class DeleteRoom:
    room_name: str


@dataclass(frozen=True)
class RemoveParticipant:
    room_name: str
    identity: str


@dataclass(frozen=True)
class EnsureRoom:
    room_name: str
    call_id: str


@dataclass
class Outcome:
    """What a handler did: a word for logs and tests, plus the effects to run after commit."""

    result: str
    effects: list = field(default_factory=list)


def run_effects(effects: Iterable, ports: Ports) -> None:
    for effect in effects:
        try:
            if isinstance(effect, ScheduleRingTimeout):
                ports.scheduler.ring_timeout(effect.invitation_id, effect.at)
            elif isinstance(effect, ScheduleGrace):
                ports.scheduler.grace_expiry(effect.room_name, effect.participant_sid, effect.identity,
                                             effect.aborted, ports.config.grace)
            elif isinstance(effect, SendNotification):
                ports.scheduler.send_notification(effect.notification_id)
            elif isinstance(effect, DeleteRoom):
                ports.rooms.delete_room(effect.room_name)
            elif isinstance(effect, RemoveParticipant):
                ports.rooms.remove_participant(effect.room_name, effect.identity)
            elif isinstance(effect, EnsureRoom):
                info = _create_room(ports, effect.room_name, effect.call_id)
                with ports.store.transaction(effect.room_name) as tx:
                    tx.set_room_sid(effect.call_id, info.sid)
        except RoomError as exc:
            # The sweeps and LiveKit's own timeouts make these certain; a failed one is logged.
            log.warning("effect failed", effect=type(effect).__name__, error=str(exc))


def _create_room(ports: Ports, room_name: str, call_id: str):
    cfg = ports.config
    return ports.rooms.create_room(
        room_name,
        empty_timeout=cfg.empty_timeout,
        departure_timeout=cfg.departure_timeout,
        max_participants=cfg.max_participants,
        metadata=json.dumps({"callflow_call_id": call_id}),
    )


# ---- shared decisions inside a transaction ---------------------------------------------------------
def _ensure_call(tx: Tx, inv: Invitation) -> dict:
    """The invitation's call: the one it is linked to, else the room's live call, else a new one."""
    call = tx.call(inv.call_id) if inv.call_id else None
    if call is None:
        call = tx.live_call_for_room(inv.room_name) or tx.create_call(inv.room_name, inv.call_type, inv.caller_id)
    tx.link_invitation(inv, str(call["id"]))
    return call


def _after_invitation_ended(tx: Tx, inv: Invitation, effects: list) -> None:
    """Outbox row when the outcome calls for an email; settle the call when nothing can go on."""
    if deserves_missed_call_email(inv.status, inv.ringing_at, inv.ended_at):
        notification_id = tx.add_missed_call_notification(inv)
        if notification_id:
            effects.append(SendNotification(notification_id))
    if inv.call_id:
        _settle_call(tx, inv.call_id, effects)


def _settle_call(tx: Tx, call_id: str, effects: list) -> None:
    call = tx.call(call_id, for_update=True)
    if call is None or call["status"] not in (CallStatus.RINGING, CallStatus.ACTIVE):
        return
    invitations = tx.invitations_of_call(call_id)
    statuses = [i.status for i in invitations]
    if call["status"] == CallStatus.RINGING and S.ACCEPTED in statuses:
        tx.activate_call(call_id)
        return
    if call["status"] == CallStatus.RINGING and call_settles(statuses):
        status, reason = unanswered_call_outcome(statuses)
        ended_at = max((i.ended_at for i in invitations if i.ended_at), default=None)
        tx.end_call(call_id, status, reason, ended_at)
        effects.append(DeleteRoom(call["room_name"]))


def _accept(tx: Tx, inv: Invitation, effects: list) -> Invitation | None:
    ended = tx.end_invitation(inv.id, S.ACCEPTED, EndReason.ANSWERED)
    if ended and ended.call_id:
        tx.activate_call(ended.call_id)
    return ended


def _parse_time(value: Any) -> datetime | None:
    if value in (None, "", 0, "0"):
        return None
    if isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
        seconds = int(value)
        if seconds > 10**11:  # milliseconds (some fields are ms in newer servers)
            return datetime.fromtimestamp(seconds / 1000, tz=timezone.utc)
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


# ---- invitation changes (Realtime / LISTEN / catch-up / sweep) ------------------------------------
# Statuses only a worker sets; a client-made one (accepted, declined, cancelled) needs the full look.
WORKER_MADE = frozenset({S.RINGING, S.MISSED, S.BUSY, S.FAILED})


def handle_invitation_changed(change: dict, ports: Ports) -> Outcome:
    """Look at the invitation now: ring it if it is new, else take note of where it went.

    The change only says which invitation to look at; the row is re-read under the room's lock,
    so the order and number of changes do not matter.
    """
    invitation_id = str(change.get("invitation_id") or "")
    event = EventRecord(
        event_id=str(change.get("event_id") or f"realtime:{invitation_id}:{change.get('status')}"),
        source=change.get("source") if change.get("source") in ("realtime", "postgres", "sweep") else "realtime",
        type=str(change.get("type") or f"invitation_{change.get('status')}"),
        room_name=change.get("room_name"),
        invitation_id=invitation_id or None,
        occurred_at=_parse_time(change.get("occurred_at")),
        payload=change.get("payload") or {},
    )
    # Read-only first look: nothing is locked while LiveKit makes the room of a new invitation.
    with ports.store.transaction() as tx:
        if tx.event_seen(event.event_id):
            return Outcome("duplicate")
        inv = tx.invitation(invitation_id)
        if inv is None:
            event.invitation_id = None
            event.payload = {**event.payload, "note": "no such invitation"}
            tx.record_event(event)
            return Outcome("unknown_invitation")
        if inv.status == change.get("status") and inv.status in WORKER_MADE and inv.call_id:
            # The echo of a transition a worker made: its effects were committed with it.
            tx.record_event(event)
            return Outcome(f"seen_{inv.status}")
        room, busy, call_id = None, False, ""
        if inv.status == S.PENDING:
            live = tx.live_call_for_room(inv.room_name)
            call_id = str(live["id"]) if live else str(uuid.uuid4())
            busy = tx.callee_busy(inv.callee_id, str(live["id"]) if live else None)
    event.room_name = inv.room_name
    room_error = None
    if inv.status == S.PENDING and not busy:
        try:
            room = _create_room(ports, inv.room_name, call_id)
        except RoomError as exc:
            room_error = exc

    effects: list = []
    with ports.store.transaction(inv.room_name) as tx:
        if tx.event_seen(event.event_id):
            return Outcome("duplicate")
        inv = tx.invitation(inv.id, for_update=True)
        if inv.status == S.PENDING:
            result = _ring(tx, inv, event, room, room_error, call_id, ports, effects)
        else:
            call = _ensure_call(tx, inv)
            inv = tx.invitation(inv.id)
            if inv.status == S.ACCEPTED:
                tx.activate_call(str(call["id"]))
                if not call["livekit_room_sid"]:
                    effects.append(EnsureRoom(inv.room_name, str(call["id"])))
            elif inv.terminal:
                _after_invitation_ended(tx, inv, effects)
            result = f"seen_{inv.status}"
        tx.record_event(event)
    run_effects(effects, ports)
    return Outcome(result, effects)


def _ring(tx: Tx, inv: Invitation, event: EventRecord, room, room_error: Exception | None, call_id: str,
          ports: Ports, effects: list) -> str:
    """A pending invitation: busy, failed (no room), or ringing with its deadline scheduled."""
    live = tx.live_call_for_room(inv.room_name)
    if tx.callee_busy(inv.callee_id, str(live["id"]) if live else None):
        _ensure_call(tx, inv)
        ended = tx.end_invitation(inv.id, S.BUSY, EndReason.CALLEE_BUSY)
        _after_invitation_ended(tx, ended, effects)
        return "busy"
    if room is None and room_error is None:
        # It looked busy a moment ago but its other call has ended since: make the room now
        # (rare, so holding the room's lock over this one LiveKit call is acceptable).
        try:
            room = _create_room(ports, inv.room_name, str(live["id"]) if live else call_id)
        except RoomError as exc:
            room_error = exc
    if live is None:
        live = tx.create_call(inv.room_name, inv.call_type, inv.caller_id, call_id=call_id)
    tx.link_invitation(inv, str(live["id"]))
    if room_error is not None:
        log.error("room could not be made", invitation_id=inv.id, room_name=inv.room_name, error=str(room_error))
        failed = tx.end_invitation(inv.id, S.FAILED, EndReason.ERROR)
        event.payload = {**event.payload, "error": str(room_error)[:500]}
        _after_invitation_ended(tx, failed, effects)
        return "failed"
    tx.set_room_sid(str(live["id"]), room.sid)
    deadline = tx.start_ringing(inv.id, ports.config.ring_timeout)
    effects.append(ScheduleRingTimeout(inv.id, deadline))
    return "ringing"


# ---- ring timeout (countdown task and sweep) ------------------------------------------------------
def handle_ring_timeout(invitation_id: str, source: str, ports: Ports, due: dict | None = None) -> Outcome:
    """One invitation's deadline. `due` (room_name, callee_id) comes from a query that found it
    ringing past its deadline, which spares the first look."""
    event_id = f"timeout:{invitation_id}"
    if due is not None:
        room_name, callee_id, action = due["room_name"], str(due["callee_id"]), "miss"
    else:
        with ports.store.transaction() as tx:
            if tx.event_seen(event_id):
                return Outcome("duplicate")
            inv = tx.invitation(invitation_id)
            if inv is None:
                return Outcome("unknown_invitation")
            now = tx.now()
        decision = decide_ring_timeout(inv, now, callee_in_room=None)
        if decision.action == "reschedule":
            # Early (a countdown fired before the deadline): re-schedule, record nothing.
            if source == "timer":
                ports.scheduler.ring_timeout_at(invitation_id, decision.at)
            return Outcome("rescheduled")
        room_name, callee_id, action = inv.room_name, inv.callee_id, decision.action
    callee_in_room, live = False, None
    if action != "nothing":
        # Webhooks lag: ask LiveKit whether the callee already joined before calling it missed.
        live = ports.rooms.list_participants(room_name)
        callee_in_room = bool(live) and any(p.identity == callee_id for p in live)

    effects: list = []
    with ports.store.transaction(room_name) as tx:
        inv = tx.invitation(invitation_id, for_update=True)
        if inv is None:
            return Outcome("unknown_invitation")
        now = tx.now()
        decision = decide_ring_timeout(inv, now, callee_in_room)
        if decision.action == "reschedule":
            return Outcome("rescheduled")
        result = "nothing"
        if decision.action == "answer":
            _accept(tx, inv, effects)
            result = "answered"
        elif decision.action == "miss":
            missed = tx.end_invitation(inv.id, S.MISSED, EndReason.TIMEOUT)
            if missed:
                _after_invitation_ended(tx, missed, effects)
                result = "missed"
        tx.record_event(EventRecord(event_id, "timer" if source == "timer" else "sweep", "ring_timeout",
                                    inv.room_name, inv.id, inv.ring_deadline, {"decision": result}))
    if live == []:
        # LiveKit just said nobody is in the room: there is no one to release.
        effects = [e for e in effects if not isinstance(e, DeleteRoom)]
    run_effects(effects, ports)
    return Outcome(result, effects)


def handle_ring_timeouts_due(bucket_end: float, ports: Ports, parallel_map=map) -> Outcome:
    """A timer bucket's countdown: every invitation whose deadline fell in the bucket, at once.

    Buckets are disjoint, so two workers never look at the same deadline through them; an
    invitation a lost bucket left behind is the sweep's. Early (clocks differ): re-schedule.
    """
    from orchestration.adapters.celery_scheduler import TIMER_BUCKET_SECONDS

    end = datetime.fromtimestamp(bucket_end, tz=timezone.utc)
    with ports.store.transaction() as tx:
        now = tx.now()
        if now < end:
            ports.scheduler.ring_timeout_bucket(bucket_end)
            return Outcome("rescheduled")
        ids = tx.ringing_due_between(end - timedelta(seconds=TIMER_BUCKET_SECONDS), end)
    results = list(parallel_map(lambda row: handle_ring_timeout(str(row["id"]), "timer", ports, due=row).result, ids))
    return Outcome(f"{len(ids)} due: " + ", ".join(f"{results.count(r)} {r}" for r in sorted(set(results))) if ids else "none due")


# ---- LiveKit webhooks -----------------------------------------------------------------------------
def handle_livekit_event(event: dict, received_at: str | None, ports: Ports) -> Outcome:
    event_id = str(event.get("id") or "")
    kind = str(event.get("event") or "")
    room = event.get("room") or {}
    participant = event.get("participant") or {}
    room_name = room.get("name") or (event.get("egressInfo") or {}).get("roomName") or (event.get("ingressInfo") or {}).get("roomName")
    occurred_at = _parse_time(event.get("createdAt"))
    record = EventRecord(event_id, "livekit", kind, room_name, None, occurred_at, event)
    if not event_id:
        return Outcome("no_id")

    effects: list = []
    with ports.store.transaction(room_name) as tx:
        if tx.event_seen(event_id):
            return Outcome("duplicate")
        result = "recorded"
        if room_name and kind in ("room_started", "participant_joined", "participant_left",
                                  "participant_connection_aborted", "room_finished"):
            at = occurred_at
            if kind == "participant_joined":
                at = _parse_time(participant.get("joinedAt")) or occurred_at
            call = tx.call_for_livekit(room.get("sid"), room_name, at)
            if kind == "room_started":
                if call is not None:
                    tx.set_room_sid(str(call["id"]), room.get("sid") or "")
            elif kind == "participant_joined":
                result = _participant_joined(tx, call, room, participant, at, effects)
            elif kind in ("participant_left", "participant_connection_aborted"):
                result = _participant_left(tx, call, room_name, participant, occurred_at,
                                           kind == "participant_connection_aborted", effects)
            elif kind == "room_finished":
                result = _room_finished(tx, call, occurred_at, effects)
        tx.record_event(record)
    run_effects(effects, ports)
    return Outcome(result, effects)


def _participant_joined(tx: Tx, call: dict | None, room: dict, participant: dict, joined_at: datetime | None,
                        effects: list) -> str:
    room_name = room["name"]
    identity = participant.get("identity") or ""
    sid = participant.get("sid") or ""
    answerable = tx.answerable_invitations_in_room(room_name)
    if call is None:
        if not answerable:
            # A stale token or a reused name: nothing of ours is live in this room.
            effects.append(RemoveParticipant(room_name, identity))
            return "removed_stranger"
        first = answerable[0]
        call = tx.create_call(room_name, first.call_type, first.caller_id, room.get("sid"))
    call_id = str(call["id"])
    tx.set_room_sid(call_id, room.get("sid") or "")
    if sid:
        tx.upsert_participant(call_id, identity, sid, joined_at, None)
    result = "joined"
    for inv in answerable:
        if inv.callee_id == identity and (inv.call_id in (None, call_id)):
            tx.link_invitation(inv, call_id)
            if _accept(tx, inv, effects):
                tx.activate_call(call_id)
                result = "answered_by_join"
    tx.refresh_call_times(call_id)
    return result


def _participant_left(tx: Tx, call: dict | None, room_name: str, participant: dict, left_at: datetime | None,
                      aborted: bool, effects: list) -> str:
    sid = participant.get("sid") or ""
    identity = participant.get("identity") or ""
    if call is None or not sid:
        return "left_unknown_call"
    call_id = str(call["id"])
    tx.upsert_participant(call_id, identity, sid, _parse_time(participant.get("joinedAt")), left_at)
    tx.refresh_call_times(call_id)
    if call["status"] in (CallStatus.RINGING, CallStatus.ACTIVE):
        effects.append(ScheduleGrace(room_name, sid, identity, aborted))
    return "left"


def _room_finished(tx: Tx, call: dict | None, finished_at: datetime | None, effects: list) -> str:
    if call is None:
        return "finished_unknown_call"
    call_id = str(call["id"])
    call = tx.call(call_id, for_update=True)
    for inv in tx.invitations_of_call(call_id):
        if inv.status in (S.PENDING, S.RINGING):
            ended = tx.end_invitation(inv.id, S.CANCELLED, EndReason.ROOM_CLOSED)
            if ended and deserves_missed_call_email(ended.status, ended.ringing_at, ended.ended_at):
                notification_id = tx.add_missed_call_notification(ended)
                if notification_id:
                    effects.append(SendNotification(notification_id))
    if call["status"] == CallStatus.ACTIVE:
        tx.end_call(call_id, CallStatus.COMPLETED, "hangup", finished_at)
        return "completed"
    if call["status"] == CallStatus.RINGING:
        invitations = tx.invitations_of_call(call_id)
        if any(i.status == S.ACCEPTED for i in invitations):
            tx.end_call(call_id, CallStatus.COMPLETED, "hangup", finished_at)
            return "completed"
        status, reason = unanswered_call_outcome([i.status for i in invitations])
        tx.end_call(call_id, status, reason, finished_at)
        return f"ended_{status}"
    if finished_at is not None:
        tx.lower_call_end(call_id, finished_at)
    return "already_ended"


# ---- grace period -------------------------------------------------------------------------------------
def handle_grace_expired(room_name: str, participant_sid: str, identity: str, aborted: bool | None,
                         ports: Ports, source: str = "timer") -> Outcome:
    event_id = f"grace:{participant_sid}"
    with ports.store.transaction() as tx:
        if tx.event_seen(event_id):
            return Outcome("duplicate")
    # participant_left can arrive after a quick re-join: ask LiveKit who is really there.
    live = ports.rooms.list_participants(room_name)
    back = bool(live) and any(p.identity == identity and p.sid != participant_sid for p in live)

    effects: list = []
    with ports.store.transaction(room_name) as tx:
        if tx.event_seen(event_id):
            return Outcome("duplicate")
        session = tx.participant(participant_sid)
        record = EventRecord(event_id, "sweep" if source == "sweep" else "timer", "grace_expired", room_name, None, tx.now(),
                             {"participant_sid": participant_sid, "identity": identity})
        result = "nothing"
        call = tx.call(str(session["call_id"]), for_update=True) if session else None
        if call is None or call["status"] not in (CallStatus.RINGING, CallStatus.ACTIVE):
            result = "call_not_live"
        elif back or tx.identity_connected(str(call["id"]), identity):
            result = "came_back"
        else:
            if aborted is None:
                aborted = tx.session_aborted(participant_sid)
            invitations = tx.invitations_of_call(str(call["id"]))
            if call["status"] == CallStatus.RINGING:
                reason = EndReason.CONNECTION_ABORTED if aborted else EndReason.CALLER_CANCELLED
                for inv in invitations:
                    if inv.caller_id == identity and inv.status in (S.PENDING, S.RINGING):
                        ended = tx.end_invitation(inv.id, S.CANCELLED, reason)
                        if ended:
                            _after_invitation_ended(tx, ended, effects)
                            result = "caller_gave_up"
            elif len(invitations) <= 1:
                # A 1:1 call ends when either side has left for longer than the grace period.
                tx.end_call(str(call["id"]), CallStatus.COMPLETED, "hangup", session["left_at"])
                effects.append(DeleteRoom(room_name))
                result = "hung_up"
        record.payload["result"] = result
        tx.record_event(record)
    run_effects(effects, ports)
    return Outcome(result, effects)


# ---- reconciliation with LiveKit ---------------------------------------------------------------------
def reconcile_live_calls(ports: Ports, older_than: float = 60.0, limit: int = 200) -> int:
    """End live calls whose LiveKit room is gone and whose room_finished never reached us.

    LiveKit drops webhooks that waited more than 30 s in its queue and keeps none, so a call can
    be left `active` (or `ringing`) with its room long closed. Such a call is finished as
    room_finished would have: at its last participant's departure, or now.
    """
    with ports.store.transaction() as tx:
        candidates = tx.live_calls_older_than(older_than, limit)
    if not candidates:
        return 0
    existing = ports.rooms.existing_rooms(sorted({c["room_name"] for c in candidates}))
    if existing is None:
        return 0
    ended = 0
    for candidate in candidates:
        if candidate["room_name"] in existing:
            continue
        call_id = str(candidate["id"])
        effects: list = []
        with ports.store.transaction(candidate["room_name"]) as tx:
            call = tx.call(call_id, for_update=True)
            if call is None or call["status"] not in (CallStatus.RINGING, CallStatus.ACTIVE):
                continue
            event = EventRecord(f"reconcile:{call_id}", "sweep", "room_finished", call["room_name"], None, tx.now(),
                                {"reason": "room gone from LiveKit without a room_finished webhook"})
            if not tx.record_event(event):
                continue
            _room_finished(tx, call, tx.last_left_at(call_id) or tx.now(), effects)
            ended += 1
        run_effects(effects, ports)
    return ended


# ---- the sweep ------------------------------------------------------------------------------------------
@dataclass
class SweepWork:
    due_timeouts: list[str]
    due_graces: list[tuple[str, str, str]]
    stale_pending: list[dict]


def find_sweep_work(ports: Ports, limit: int = 500, stale_after: float = 10.0, overdue_by: float = 0.5) -> SweepWork:
    """Work whose own countdown is overdue (lost with a killed worker, or never sent)."""
    with ports.store.transaction() as tx:
        return SweepWork(
            due_timeouts=[str(r["id"]) for r in tx.due_ring_timeouts(limit, overdue_by)],
            due_graces=[(r["room_name"], r["participant_sid"], r["identity"]) for r in tx.due_grace_expiries(ports.config.grace, limit)],
            stale_pending=tx.stale_pending(stale_after, limit),
        )
