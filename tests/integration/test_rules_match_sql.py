"""The domain's rules and the SQL's, held equal on generated rooms and histories (hypothesis).

Some rules are written twice because two languages need them: the database decides in one statement
(under its locks) what the domain decides in Python for the lifecycle and its fakes. Here each
example is written into the real test database in one transaction, both sides are asked, and the
transaction is rolled back:

- the parties of a room: `callflow_room_parties` (the insert rule, removals, the token route) and
  `domain.model.room_parties` (the lifecycle's decisions about joins, and the fakes); and the token
  route's decision (granted exactly to the parties; the grants of a video call exactly when one of
  the rows that make them a party is video);
- the missed-call notices' opt-out and repeat window: the outbox's inserts
  (`add_missed_call_notifications`, `add_pushes`: the row born `pending` or `skipped`, and why)
  and `domain.notices.notice_skip_reason` (the fakes); and the email's delivery (`skip_reason`)
  agreeing with the birth on the opt-out and the address;
- which devices get which push (an `apns_voip` device the incoming call only): `add_pushes` and
  `domain.decision.push_goes_to` (the fakes).

The rows are written as they stand (`session_replication_role = replica`: no triggers), since the
state machine's guards are not what is under test here and any state rows can be in is fair.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from orchestration import join_tokens, names
from orchestration.adapters.postgres_store import PostgresUnitOfWork
from orchestration.domain.decision import Decision, MissedCallEmail, Push, SendPushes, push_goes_to
from orchestration.domain.model import Call, CallStatus, Invitation, InvitationStatus, room_parties
from orchestration.domain.notices import EarlierNotice, notice_skip_reason
from orchestration.channels.missed_call_email import MissedCallEmailChannel, skip_reason
from orchestration.lifecycle.context import Ports
from orchestration.lifecycle.effects import run_effects
from tests.support.fakes import FakeScheduler

EXAMPLES = int(os.environ.get("CALLFLOW_RULES_EXAMPLES", "100"))
NOW = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=timezone.utc)
ROOM, OTHER_ROOM = "room-under-test", "room-next-door"

SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def in_rolled_back_transaction(db, body) -> None:
    """`body()` inside a transaction that is always rolled back (the example leaves nothing)."""
    with db.transaction(force_rollback=True):
        db.execute("set local session_replication_role = replica")
        body()


def _insert_call(db, room: str, status: str, caller: str | None, call_type: str, n: int) -> Call:
    row = db.execute(
        """insert into public.calls (room_name, call_type, caller_id, status, created_at)
           values (%s, %s, %s, %s, %s) returning *""",
        (room, call_type, caller, status, NOW - timedelta(minutes=10 - n))).fetchone()
    return Call.from_row(row)


def _insert_invitation(db, room: str, caller: str, callee: str, status: str, *, call_id: str | None = None,
                       call_type: str = "video", n: int = 0, ringing_at=None, ended_at=None) -> Invitation:
    row = db.execute(
        """insert into public.call_invitations (room_name, caller_id, callee_id, call_type, status, call_id,
                                                created_at, ringing_at, ended_at)
           values (%s, %s, %s, %s, %s, %s, %s, %s, %s) returning *""",
        (room, caller, callee, call_type, status, call_id, NOW - timedelta(minutes=5, seconds=-n),
         ringing_at, ended_at)).fetchone()
    return Invitation.from_row(row)


@pytest.fixture
def users(make_user):
    return [make_user(f"user {i}") for i in range(4)]


# ---- the parties of a room ---------------------------------------------------------------------

CALL_STATUSES = [s.value for s in CallStatus]
LIVE, ENDED = ["ringing", "active"], [s for s in CALL_STATUSES if s not in ("ringing", "active")]
INVITATION_STATUSES = [s.value for s in InvitationStatus]


@st.composite
def rooms(draw):
    """The room under test and the one next door: their calls (at most one live each, as the
    database's unique index keeps it) and invitations, some linked to a call of their own room (the
    only links the lifecycle makes: a call is made for its invitation's room)."""
    calls = []
    for room in (ROOM, OTHER_ROOM):
        n = draw(st.integers(0, 3))
        live_at = draw(st.one_of(st.none(), st.integers(0, n - 1))) if n else None
        for k in range(n):
            calls.append(dict(room=room, status=draw(st.sampled_from(LIVE if k == live_at else ENDED)),
                              caller=draw(st.one_of(st.none(), st.integers(0, 3))),
                              call_type=draw(st.sampled_from(["audio", "video"]))))
    invitations = []
    for _ in range(draw(st.integers(0, 7))):
        room = draw(st.sampled_from([ROOM, ROOM, OTHER_ROOM]))
        caller, callee = draw(st.lists(st.integers(0, 3), min_size=2, max_size=2, unique=True))
        own = [i for i, c in enumerate(calls) if c["room"] == room]
        invitations.append(dict(room=room, caller=caller, callee=callee,
                                status=draw(st.sampled_from(INVITATION_STATUSES)),
                                call=draw(st.one_of(st.none(), st.sampled_from(own))) if own else None,
                                call_type=draw(st.sampled_from(["audio", "video"]))))
    return calls, invitations


def _expected_grant(user: str, invs: list[Invitation], live: Call | None) -> tuple[bool, str]:
    """The domain's answer for the token route: whether `user` is a party, and the call type of
    their grant (video when one of the rows that make them a party is video)."""
    if user not in room_parties(invs, live):
        return False, ""
    video_invs = [i for i in invs if i.call_type == "video" and i.involves(user)]
    video_live = live if live is None or live.call_type == "video" else replace(live, caller_id=None)
    return True, "video" if user in room_parties(video_invs, video_live) else "audio"


def test_the_parties_of_a_room_are_the_same_in_sql_the_domain_and_the_token_route(db, users):
    @SETTINGS
    @given(rooms())
    def check(example):
        calls_spec, invitations_spec = example

        def body():
            calls = [_insert_call(db, c["room"], c["status"], users[c["caller"]] if c["caller"] is not None else None,
                                  c["call_type"], n) for n, c in enumerate(calls_spec)]
            invs = [_insert_invitation(db, i["room"], users[i["caller"]], users[i["callee"]], i["status"],
                                       call_id=calls[i["call"]].id if i["call"] is not None else None,
                                       call_type=i["call_type"], n=n)
                    for n, i in enumerate(invitations_spec)]
            db.execute("set local session_replication_role = origin")
            for room in (ROOM, OTHER_ROOM):
                room_invs = [i for i in invs if i.room_name == room]
                live = next((c for c in calls if c.room_name == room and c.live), None)
                sql = {str(r["p"]) for r in db.execute(
                    "select p from public.callflow_room_parties(%s) p", (room,)).fetchall()}
                assert sql == room_parties(room_invs, live), (room, calls, room_invs)
                for user in users:
                    row = db.execute(join_tokens.QUERY, join_tokens.query_params(user, room_name=room)).fetchone()
                    decision = join_tokens.decide(row, by_invitation=False)
                    party, call_type = _expected_grant(user, room_invs, live)
                    assert (decision.outcome == "granted") == party, (room, user, decision, calls, room_invs)
                    if party:
                        assert decision.call_type == call_type, (room, user, decision, calls, room_invs)
                    for inv in room_invs:
                        if inv.involves(user):  # asked by one of their invitations: the same answer
                            row = db.execute(join_tokens.QUERY,
                                             join_tokens.query_params(user, invitation_id=inv.id)).fetchone()
                            by_inv = join_tokens.decide(row, by_invitation=True)
                            assert (by_inv.outcome, by_inv.call_type) == (decision.outcome, decision.call_type)

        in_rolled_back_transaction(db, body)

    check()


# ---- missed-call notices: opt-out and repeat window ----------------------------------------------

WINDOWS = [0.0, 0.5, 60.0, 900.0]
OPT_OUT_VALUES = st.one_of(
    st.booleans(), st.none(), st.integers(-1, 1),
    st.sampled_from(["false", "False", "FALSE", " false", "false ", "\tfalse\n", "true", "no", "0", "", "fals"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),  # what jsonb holds
)
METAS = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"missed_call_emails": OPT_OUT_VALUES}),
    st.fixed_dictionaries({"full_name": st.just("Bruno"), "missed_call_emails": OPT_OUT_VALUES}),
    st.sampled_from([None, [], ["missed_call_emails"], "false", False]),  # metadata that is no object
)
EMAILS = st.sampled_from([None, "", " ", "\t", "bruno@example.test", " bruno@example.test "])


@st.composite
def ages(draw, window: float):
    """How long before NOW an earlier notice was created: about the window's edge, or anywhere."""
    edge = timedelta(seconds=window)
    return draw(st.one_of(
        st.sampled_from([edge, edge - timedelta(microseconds=1), edge + timedelta(microseconds=1),
                         timedelta(0), timedelta(seconds=-1)]),
        st.integers(0, int(2 * window * 1e6) + 1).map(lambda us: timedelta(microseconds=us)),
    ))


@st.composite
def histories(draw, kinds=("missed_call",)):
    """The window, the recipient's metadata and address, and the outbox's earlier notices: each
    (kind, whether from the caller under test, whether to the recipient under test, status, age)."""
    window = draw(st.sampled_from(WINDOWS))
    earlier = draw(st.lists(st.tuples(st.sampled_from(kinds), st.booleans(), st.booleans(),
                                      st.sampled_from(["pending", "sent", "failed", "skipped"]), ages(window)),
                            max_size=5))
    return window, draw(METAS), draw(EMAILS), earlier


def _set_recipient(db, user: str, meta, email) -> None:
    db.execute("update auth.users set raw_user_meta_data = %s::jsonb, email = %s where id = %s",
               (json.dumps(meta), email, user))


def _missed(db, caller: str, callee: str, n: int) -> Invitation:
    return _insert_invitation(db, f"notices-{n}", caller, callee, "missed", n=n, ringing_at=NOW - timedelta(minutes=1),
                              ended_at=NOW - timedelta(seconds=30))


def test_the_email_outbox_skips_as_the_domain_does(db, users):
    caller, other_caller, recipient, other_recipient = users

    @SETTINGS
    @given(histories())
    def check(example):
        window, meta, email, earlier_spec = example

        def body():
            _set_recipient(db, recipient, meta, email)
            earlier = []
            for n, (_kind, same_caller, same_recipient, status, age) in enumerate(earlier_spec):
                inv = _missed(db, caller if same_caller else other_caller,
                              recipient if same_recipient else other_recipient, n)
                db.execute("""insert into public.notifications (kind, invitation_id, recipient_id, recipient_email,
                                                                status, created_at)
                              values ('missed_call', %s, %s, 'x@example.test', %s, %s)""",
                           (inv.id, inv.callee_id, status, NOW - age))
                earlier.append(EarlierNotice(inv.caller_id, inv.callee_id, status, NOW - age))
            new = _missed(db, caller, recipient, len(earlier_spec))
            db.execute("set local session_replication_role = origin")

            PostgresUnitOfWork(db, lambda: NOW, window).add_missed_call_notifications(
                [MissedCallEmail(new.id, caller, recipient)])
            row = db.execute("select id, status, last_error from public.notifications where invitation_id = %s",
                             (new.id,)).fetchone()
            why = notice_skip_reason("email", caller_id=caller, recipient_id=recipient, recipient_meta=meta,
                                     recipient_email=email, earlier=earlier, now=NOW,
                                     window=timedelta(seconds=window))
            assert (row["status"], row["last_error"]) == (("skipped", why) if why else ("pending", None)), example

            # The delivery asks again (opt-out, address) before it sends: the same answer as the birth's.
            at_delivery = skip_reason(MissedCallEmailChannel.load(db, [str(row["id"])])[0])
            if row["status"] == "pending" or "within" in (row["last_error"] or ""):
                assert at_delivery is None, example
            else:
                assert at_delivery == row["last_error"], example

        in_rolled_back_transaction(db, body)

    check()


PROVIDERS = ("expo", "apns_voip", "fcm")


def _device(db, user: str, provider: str = "expo", disabled: bool = False) -> str:
    """A push token of this provider, well formed for it; returns its id."""
    mark = uuid.uuid4().hex
    tok = {"expo": f"ExponentPushToken[rules-{mark[:12]}]", "apns_voip": mark + mark,
           "fcm": f"fcm:{mark}-rules"}[provider]
    return str(db.execute(
        """insert into public.push_tokens (user_id, provider, token, platform, disabled_at)
           values (%s, %s, %s, 'ios', %s) returning id""",
        (user, provider, tok, NOW if disabled else None)).fetchone()["id"])


def test_the_push_outbox_skips_missed_call_pushes_as_the_domain_does(db, users):
    """And gives each device the kinds its provider gets (`push_goes_to`: ringing like a phone)."""
    caller, other_caller, recipient, other_recipient = users

    @SETTINGS
    @given(histories(kinds=("missed_call", "missed_call", "incoming_call", "call_ended")),
           st.sampled_from(["missed_call", "missed_call", "incoming_call", "call_ended"]),
           st.lists(st.sampled_from(PROVIDERS), min_size=1, max_size=3), st.booleans())
    def check(example, kind, providers, one_disabled):
        window, meta, email, earlier_spec = example

        def body():
            _set_recipient(db, recipient, meta, email)
            mine = {_device(db, recipient, provider): provider for provider in providers}
            if one_disabled:
                _device(db, recipient, providers[0], disabled=True)
            theirs = _device(db, other_recipient)
            earlier = []
            for n, (old_kind, same_caller, same_recipient, status, age) in enumerate(earlier_spec):
                inv = _missed(db, caller if same_caller else other_caller,
                              recipient if same_recipient else other_recipient, n)
                db.execute("""insert into public.push_messages (kind, invitation_id, push_token_id, status, created_at)
                              values (%s, %s, %s, %s, %s)""",
                           (old_kind, inv.id, next(iter(mine)) if same_recipient else theirs, status, NOW - age))
                earlier.append(EarlierNotice(inv.caller_id, inv.callee_id, status, NOW - age, kind=old_kind))
            new = _missed(db, caller, recipient, len(earlier_spec))
            db.execute("set local session_replication_role = origin")

            pending = PostgresUnitOfWork(db, lambda: NOW, window).add_pushes([Push(kind, new.id, caller, recipient)])
            rows = db.execute("""select id, push_token_id, status, last_error from public.push_messages
                                  where invitation_id = %s""", (new.id,)).fetchall()
            why = notice_skip_reason("push", caller_id=caller, recipient_id=recipient, recipient_meta=meta,
                                     recipient_email=email, earlier=earlier, now=NOW,
                                     window=timedelta(seconds=window)) if kind == "missed_call" else None
            expected = ("skipped", why) if why else ("pending", None)
            assert sorted(str(r["push_token_id"]) for r in rows) == sorted(
                d for d, provider in mine.items() if push_goes_to(provider, kind)), example
            assert [(r["status"], r["last_error"]) for r in rows] == [expected] * len(rows), example
            assert sorted(pending) == sorted((str(r["id"]), mine[str(r["push_token_id"])])
                                             for r in rows if r["status"] == "pending"), example

        in_rolled_back_transaction(db, body)

    check()


def test_a_missed_call_rings_every_device_and_tells_all_but_the_voip_one(db, users):
    """The contract's example: an apns_voip, an fcm and an expo device; a missed call's three pushes,
    written by the store's `apply` and queued by its effect, one delivery per provider."""
    caller, _, recipient, _ = users

    def body():
        devices = {provider: _device(db, recipient, provider) for provider in PROVIDERS}
        inv = _missed(db, caller, recipient, 0)
        db.execute("set local session_replication_role = origin")
        follow = PostgresUnitOfWork(db, lambda: NOW, 900).apply(Decision("test", outbox=[
            Push(kind, inv.id, caller, recipient) for kind in ("incoming_call", "call_ended", "missed_call")]))
        rows = db.execute("""select m.id, m.kind, t.provider, m.status from public.push_messages m
                               join public.push_tokens t on t.id = m.push_token_id
                              where m.invitation_id = %s""", (inv.id,)).fetchall()
        assert sorted((r["kind"], r["provider"]) for r in rows) == sorted([
            ("incoming_call", "apns_voip"), ("incoming_call", "fcm"), ("incoming_call", "expo"),
            ("call_ended", "fcm"), ("call_ended", "expo"), ("missed_call", "fcm"), ("missed_call", "expo")])
        assert {r["status"] for r in rows} == {"pending"}
        # One SendPushes, its ids grouped by provider; one delivery per provider, to its channel.
        [send] = [f for f in follow if isinstance(f, SendPushes)]
        scheduler = FakeScheduler()
        run_effects(follow, Ports(None, None, scheduler, None))
        by_channel = {channel: sorted(ids) for channel, ids in scheduler.deliveries}
        assert len(scheduler.deliveries) == len(by_channel) == len(devices)
        assert by_channel == {names.PUSH_CHANNELS[provider]: sorted(str(r["id"]) for r in rows
                                                                    if r["provider"] == provider)
                              for provider in devices}
        assert sorted(send.message_ids) == sorted(str(r["id"]) for r in rows)

    in_rolled_back_transaction(db, body)
