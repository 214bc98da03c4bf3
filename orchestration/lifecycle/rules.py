"""The rules every use case shares, each in one place: ending an invitation, settling and ending a
call, answering, sessions and call times. They change a `Working` copy; nothing here does I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from orchestration.domain.decision import MissedCallEmail, Push, ReleaseRoom, ScheduleRingTimeout
from orchestration.domain.model import (
    Call,
    CallStatus,
    EndReason,
    Invitation,
    InvitationStatus as S,
    Participant,
    call_settles,
    call_started_at,
    deserves_missed_call_email,
    seconds_between,
    unanswered_call_outcome,
)
from orchestration.lifecycle.state import Working


def end_invitation(w: Working, inv: Invitation, status: S, reason: str, at: datetime | None = None) -> Invitation:
    """A worker's move of an open invitation to a terminal status, and what its end calls for."""
    ended = w.put_invitation(inv.end(status, reason, at or w.now))
    announce_end(w, ended)
    return ended


def announce_end(w: Working, inv: Invitation) -> None:
    """An invitation ended, whoever ended it: every device that rang stops (`call_ended`), and a
    missed call earns its email and `missed_call` push. The outboxes' unique keys make this
    once-only, however often an end is looked at."""
    if inv.ringing_at is not None:
        w.outbox.append(Push("call_ended", inv.id, inv.caller_id, inv.callee_id))
    if deserves_missed_call_email(inv.status, inv.ringing_at, inv.ended_at, inv.end_reason):
        w.outbox.append(MissedCallEmail(inv.id, inv.caller_id, inv.callee_id))
        w.outbox.append(Push("missed_call", inv.id, inv.caller_id, inv.callee_id))


def ring(w: Working, inv: Invitation, ring_timeout: float) -> Invitation:
    """The invitation starts ringing: its countdown, and the callee's devices ring too."""
    ringing = w.put_invitation(inv.ring(w.now, ring_timeout))
    w.effects.append(ScheduleRingTimeout(ringing.id, ringing.ring_deadline))
    w.outbox.append(Push("incoming_call", ringing.id, ringing.caller_id, ringing.callee_id, ringing.ring_deadline))
    return ringing


def answer(w: Working, inv: Invitation, at: datetime | None = None) -> Invitation:
    """The callee answered (a join, a timeout that found them in the room, or glare)."""
    accepted = w.put_invitation(inv.end(S.ACCEPTED, EndReason.ANSWERED, at or w.now))
    announce_end(w, accepted)
    if accepted.call_id:
        activate(w, w.calls[accepted.call_id])
    return accepted


def activate(w: Working, call: Call) -> Call:
    if call.status == CallStatus.RINGING:
        return w.put_call(replace(call, status=CallStatus.ACTIVE))
    return call


def settle_call(w: Working, call_id: str | None) -> None:
    """After an invitation of the call ended: an answer makes it active; a ringing call none of
    whose invitations can still be answered ends with the outcome of its invitations."""
    if not call_id or call_id not in w.calls:
        return
    call = w.calls[call_id]
    if not call.live:
        return
    invitations = w.invitations_of(call_id)
    if any(i.status == S.ACCEPTED for i in invitations):
        activate(w, call)
        return
    if call.status == CallStatus.RINGING and call_settles(i.status for i in invitations):
        status, reason = unanswered_call_outcome(invitations)
        ended_at = max((i.ended_at for i in invitations if i.ended_at), default=w.now)
        end_call(w, call, status, reason, ended_at)


def end_call(w: Working, call: Call, status: CallStatus, reason: str, at: datetime | None) -> Call:
    """End a live call: what still rings in it stops (room closed), open sessions close at its
    end, its times are computed, and its room is released after commit."""
    at = at or w.now
    # Never before someone joined it (a late grace expiry may name an earlier departure), nor
    # before a recorded departure (the other side of a 1:1 call may have stayed on after the
    # leaver whose grace period ends it): every session lies inside its call.
    at = max([at, *(t for p in w.participants_of(call.id) for t in (p.joined_at, p.left_at) if t)])
    for inv in w.invitations_of(call.id):
        if inv.open:
            end_invitation(w, inv, S.CANCELLED, EndReason.ROOM_CLOSED, max(at, inv.ringing_at or at))
    ended = w.put_call(replace(call, status=status, end_reason=reason, ended_at=max(at, call.created_at)))
    for p in w.participants_of(call.id):
        if p.left_at is None:
            close_session(w, p, ended.ended_at)
    ended = refresh_call_times(w, ended)
    w.effects.append(ReleaseRoom(call.room_name, call.id))
    return ended


def finish_call(w: Working, call: Call, at: datetime | None) -> Call:
    """The room finished (or is gone): an answered call completed, an unanswered one its outcome."""
    if any(i.status == S.ACCEPTED for i in w.invitations_of(call.id)) or call.status == CallStatus.ACTIVE:
        return end_call(w, call, CallStatus.COMPLETED, "hangup", at)
    for inv in w.invitations_of(call.id):
        if inv.open:
            end_invitation(w, inv, S.CANCELLED, EndReason.ROOM_CLOSED, max(at or w.now, inv.ringing_at or w.now))
    status, reason = unanswered_call_outcome(w.invitations_of(call.id))
    return end_call(w, w.calls[call.id], status, reason, at)


def close_session(w: Working, p: Participant, at: datetime | None) -> Participant:
    """A session ends at `at` (never before it began: LiveKit's times have second resolution)."""
    if at is not None and p.joined_at is not None and at < p.joined_at:
        at = p.joined_at
    return w.put_participant(replace(p, left_at=at, duration_seconds=seconds_between(p.joined_at, at)))


def refresh_call_times(w: Working, call: Call) -> Call:
    """started_at = the first join of the second identity; duration from started_at to ended_at."""
    started = call_started_at(w.participants_of(call.id))
    if call.ended_at is not None and started is not None and started > call.ended_at:
        started = call.ended_at
    duration = seconds_between(started, call.ended_at)
    if (started, duration) != (call.started_at, call.duration_seconds):
        call = w.put_call(replace(call, started_at=started, duration_seconds=duration))
    return call
