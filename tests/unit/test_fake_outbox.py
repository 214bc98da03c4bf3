"""The fake store's outboxes skip as the domain's rules say (`domain.notices`), emails and pushes alike.

The rules themselves are held equal to the database's SQL by `tests/integration/test_rules_match_sql.py`;
this checks that the fake asks them, for both outboxes, and decides a decision's rows together as the
database's one statement does.
"""

from __future__ import annotations

from orchestration.domain.decision import Decision, MissedCallEmail, Push, SendNotification, SendPushes
from orchestration.domain.model import Invitation, InvitationStatus as S
from orchestration.domain.notices import OPTED_OUT, repeat_reason
from tests.support.fakes import FakeClock, FakeStore

WINDOW = 900.0


def world():
    clock = FakeClock()
    store = FakeStore(clock, email_repeat_window=WINDOW)
    store.push_tokens = {"bo": ["bo-phone", "bo-tablet"]}
    return clock, store


def missed(store: FakeStore, n: int, caller: str = "ana", callee: str = "bo") -> Invitation:
    inv = Invitation(id=f"inv-{n}", room_name=f"r{n}", caller_id=caller, callee_id=callee, call_type="video",
                     status=S.MISSED, created_at=store.clock.now())
    store.invitations[inv.id] = inv
    return inv


def notify(store: FakeStore, inv: Invitation, *kinds: str) -> list:
    outbox = [MissedCallEmail(inv.id, inv.caller_id, inv.callee_id)]
    outbox += [Push(kind, inv.id, inv.caller_id, inv.callee_id) for kind in kinds or ("missed_call",)]
    with store.transaction(inv.room_name) as uow:
        return uow.apply(Decision("test", outbox=outbox))


def pushes(store: FakeStore, inv: Invitation, kind: str = "missed_call") -> list[str]:
    return [status for (k, i, _), status in sorted(store.push_messages.items()) if k == kind and i == inv.id]


def test_a_callee_who_turned_notices_off_gets_no_email_and_no_missed_call_push():
    _, store = world()
    store.user_meta["bo"] = {"missed_call_emails": False}
    inv = missed(store, 1)
    follow = notify(store, inv, "missed_call", "call_ended")
    assert store.notifications[inv.id].status == "skipped"
    assert store.notifications[inv.id].last_error == OPTED_OUT["email"]
    assert pushes(store, inv) == ["skipped", "skipped"]
    assert pushes(store, inv, "call_ended") == ["pending", "pending"]  # only missed_call follows the opt-out
    assert not any(isinstance(f, SendNotification) for f in follow)
    assert [len(f.message_ids) for f in follow if isinstance(f, SendPushes)] == [2]


def test_a_callee_without_an_address_gets_no_email_but_the_push():
    _, store = world()
    store.user_emails["bo"] = " "
    inv = missed(store, 1)
    notify(store, inv)
    assert store.notifications[inv.id].status == "skipped"
    assert pushes(store, inv) == ["pending", "pending"]


def test_the_repeat_window_holds_for_emails_and_pushes_each_counting_its_own():
    clock, store = world()
    first = missed(store, 1)
    notify(store, first)
    # every device of one decision is decided against the outbox before it: both go
    assert store.notifications[first.id].status == "pending" and pushes(store, first) == ["pending", "pending"]

    clock.advance(WINDOW - 1)
    again = missed(store, 2)
    notify(store, again)
    assert store.notifications[again.id].status == "skipped"
    assert store.notifications[again.id].last_error == repeat_reason("email", WINDOW)
    assert pushes(store, again) == ["skipped", "skipped"]

    other = missed(store, 3, caller="cy")  # another caller: a pair of its own
    notify(store, other)
    assert store.notifications[other.id].status == "pending" and pushes(store, other) == ["pending", "pending"]

    clock.advance(1)  # the window runs from the first's created_at; skipped ones don't count
    later = missed(store, 4)
    notify(store, later)
    assert store.notifications[later.id].status == "pending" and pushes(store, later) == ["pending", "pending"]


def test_a_skipped_or_failed_notice_opens_no_window():
    clock, store = world()
    store.user_meta["bo"] = {"missed_call_emails": "FALSE"}
    notify(store, missed(store, 1))
    store.user_meta["bo"] = {}
    clock.advance(1)
    inv = missed(store, 2)
    notify(store, inv)
    assert store.notifications[inv.id].status == "pending" and pushes(store, inv) == ["pending", "pending"]
