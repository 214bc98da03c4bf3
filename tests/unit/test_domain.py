"""The pure domain: the state machine and the outcome rules, no services."""

from datetime import datetime, timedelta, timezone

import pytest

from orchestration.domain.model import (
    TERMINAL,
    TRANSITIONS,
    CallStatus,
    IllegalTransition,
    Invitation,
    InvitationStatus as S,
    Participant,
    EndReason,
    is_one_to_one,
    room_parties,
    Call,
    call_settles,
    call_started_at,
    can_transition,
    check_transition,
    decide_ring_timeout,
    deserves_missed_call_email,
    seconds_between,
    unanswered_call_outcome,
)

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)


def test_terminal_statuses_never_move():
    for status in TERMINAL:
        for target in S:
            assert not can_transition(status, target)


@pytest.mark.parametrize("old,new", [
    ("pending", "ringing"), ("pending", "accepted"), ("pending", "declined"), ("pending", "cancelled"),
    ("pending", "busy"), ("pending", "failed"), ("ringing", "accepted"), ("ringing", "declined"),
    ("ringing", "cancelled"), ("ringing", "missed"),
])
def test_contract_transitions_are_allowed(old, new):
    check_transition(old, new)


@pytest.mark.parametrize("old,new", [
    ("pending", "missed"), ("ringing", "busy"), ("ringing", "failed"), ("ringing", "pending"), ("ringing", "ringing"),
])
def test_other_transitions_are_illegal(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_transitions_match_the_database_guard():
    # The SQL function callflow_transition_allowed encodes the same table.
    assert TRANSITIONS[S.PENDING] == {S.RINGING, S.ACCEPTED, S.DECLINED, S.CANCELLED, S.BUSY, S.FAILED}
    assert TRANSITIONS[S.RINGING] == {S.ACCEPTED, S.DECLINED, S.CANCELLED, S.MISSED}


def test_missed_call_email_policy():
    assert deserves_missed_call_email("missed", T0, T0 + timedelta(seconds=30))
    assert deserves_missed_call_email("busy", None, T0)
    assert deserves_missed_call_email("cancelled", T0, T0 + timedelta(seconds=3))
    assert not deserves_missed_call_email("cancelled", T0, T0 + timedelta(seconds=2.9))
    assert not deserves_missed_call_email("cancelled", None, T0)  # never rang
    for status in ("declined", "accepted", "failed"):
        assert not deserves_missed_call_email(status, T0, T0 + timedelta(seconds=60))


@pytest.mark.parametrize("statuses,outcome", [
    (["missed", "declined"], "missed"),
    (["declined", "busy"], "busy"),
    (["cancelled", "declined"], "declined"),
    (["cancelled"], "cancelled"),
    (["failed", "cancelled"], "cancelled"),
    (["failed"], "failed"),
])
def test_unanswered_call_outcome_order(statuses, outcome):
    status, reason = unanswered_call_outcome(statuses)
    assert status == CallStatus(outcome)
    assert reason == {"missed": "timeout", "busy": "callee_busy", "declined": "declined",
                      "cancelled": "caller_cancelled", "failed": "error"}[outcome]


def test_a_call_settles_only_when_nothing_can_be_answered_and_nothing_was():
    assert call_settles(["declined", "missed"])
    assert not call_settles(["declined", "ringing"])
    assert not call_settles(["declined", "accepted"])
    assert not call_settles([])


def test_started_at_is_the_second_identity_to_join_whatever_the_order():
    sessions = [
        Participant("call", "callee", "PA_2", T0 + timedelta(seconds=5)),
        Participant("call", "caller", "PA_1", T0),
        Participant("call", "caller", "PA_3", T0 + timedelta(seconds=9)),  # a re-join
    ]
    assert call_started_at(sessions) == T0 + timedelta(seconds=5)
    assert call_started_at(reversed(sessions)) == T0 + timedelta(seconds=5)
    assert call_started_at(sessions[1:2]) is None


def test_seconds_between():
    assert seconds_between(T0, T0 + timedelta(seconds=61.4)) == 61
    assert seconds_between(None, T0) == 0
    assert seconds_between(T0 + timedelta(seconds=1), T0) == 0


def _ringing(deadline):
    return Invitation("i", "r", "a", "b", "video", S.RINGING, ring_deadline=deadline)


def test_ring_timeout_decisions():
    inv = _ringing(T0)
    assert decide_ring_timeout(inv, T0 - timedelta(seconds=1), None).action == "reschedule"
    assert decide_ring_timeout(inv, T0, False).action == "miss"
    assert decide_ring_timeout(inv, T0 + timedelta(seconds=1), True).action == "answer"
    done = Invitation("i", "r", "a", "b", "video", S.ACCEPTED, ring_deadline=T0)
    assert decide_ring_timeout(done, T0 + timedelta(seconds=1), False).action == "nothing"


def _inv(id, status, caller="a", callee="b", room="r", call_id=None, reason=None, created=T0):
    return Invitation(id, room, caller, callee, "video", S(status), call_id=call_id, end_reason=reason,
                      created_at=created)


def test_glare_never_earns_an_email():
    assert not deserves_missed_call_email("cancelled", T0, T0 + timedelta(seconds=10), EndReason.GLARE)
    assert deserves_missed_call_email("cancelled", T0, T0 + timedelta(seconds=10), EndReason.ROOM_CLOSED)


def test_an_unanswered_call_keeps_the_reason_of_its_invitation():
    invs = [_inv("1", "cancelled", reason="room_closed"), _inv("2", "declined", reason="declined")]
    assert unanswered_call_outcome(invs) == (CallStatus.DECLINED, "declined")
    assert unanswered_call_outcome(invs[:1]) == (CallStatus.CANCELLED, "room_closed")
    aborted = [_inv("1", "cancelled", reason="connection_aborted")]
    assert unanswered_call_outcome(aborted) == (CallStatus.CANCELLED, "connection_aborted")


def test_the_parties_of_a_room():
    live = Call("c1", "r", "video", "a", CallStatus.ACTIVE, T0)
    invs = [
        _inv("1", "accepted", "a", "b", call_id="c1"),           # answered into the live call
        _inv("2", "ringing", "a", "c", call_id="c1"),            # still ringing
        _inv("3", "declined", "a", "d", call_id="c1"),           # declined: no longer a party
        _inv("4", "accepted", "e", "f", call_id="old"),          # answered into an ended call
        _inv("5", "accepted", "g", "h"),                         # answered, not linked yet
    ]
    assert room_parties(invs, live) == {"a", "b", "c", "g", "h"}
    assert room_parties([], live) == {"a"}
    assert room_parties(invs[2:4], None) == set()


def test_a_call_is_one_to_one_while_it_involves_two_users():
    assert is_one_to_one([_inv("1", "accepted", "a", "b")])
    assert is_one_to_one([_inv("1", "declined", "a", "b"), _inv("2", "accepted", "a", "b")])
    assert not is_one_to_one([_inv("1", "accepted", "a", "b"), _inv("2", "ringing", "a", "c")])
