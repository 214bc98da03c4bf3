"""Who may insert an invitation, as the database decides it (real Postgres, client role under RLS).

Each refusal is SQLSTATE P0001 with a message that starts with the contract's code, and changes
nothing. Also the repeat window of missed-call emails, decided in the outbox's own transaction.
"""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest

from orchestration.adapters.postgres_store import PostgresStore
from orchestration.domain.decision import MissedCallEmail

pytestmark = pytest.mark.usefixtures("database_url")


def room() -> str:
    return f"room-{uuid.uuid4().hex[:10]}"


def insert_as(database_url: str, user: str, caller: str, callee: str, room_name: str, anonymous: bool = False) -> str:
    """Insert as the signed-in `user` would through PostgREST; returns the new id."""
    with psycopg.connect(database_url) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"sub": user, "role": "authenticated", "is_anonymous": anonymous}),))
        row = conn.execute("insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)"
                           " returning id", (room_name, caller, callee)).fetchone()
    return str(row[0])


def refused(database_url, user, caller, callee, room_name, **kw) -> str:
    with pytest.raises(psycopg.errors.RaiseException) as info:
        insert_as(database_url, user, caller, callee, room_name, **kw)
    assert info.value.sqlstate == "P0001"
    return info.value.diag.message_primary


def set_status(db, invitation_id: str, status: str, call_status: str | None = None) -> None:
    """Move an invitation as the workers would (service role)."""
    inv = db.execute("select * from public.call_invitations where id = %s", (invitation_id,)).fetchone()
    if call_status is not None:
        call = db.execute("insert into public.calls (room_name, caller_id, status) values (%s, %s, %s) returning id",
                          (inv["room_name"], inv["caller_id"], call_status)).fetchone()
        db.execute("update public.call_invitations set call_id = %s where id = %s", (call["id"], invitation_id))
    if status != "pending":
        if status not in ("ringing", "accepted", "declined", "cancelled", "busy", "failed"):
            db.execute("update public.call_invitations set status = 'ringing' where id = %s", (invitation_id,))
        db.execute("update public.call_invitations set status = %s where id = %s", (status, invitation_id))


def count_in(db, room_name: str) -> int:
    return db.execute("select count(*) as n from public.call_invitations where room_name = %s", (room_name,)).fetchone()["n"]


def test_a_stranger_cannot_invite_into_a_live_call(db, database_url, make_user):
    ana, bo, mallory, friend = make_user(), make_user(), make_user(), make_user()
    r = room()
    inv = insert_as(database_url, ana, ana, bo, r)
    set_status(db, inv, "accepted", call_status="active")
    message = refused(database_url, mallory, mallory, friend, r)
    assert message.startswith("room_in_use:")
    assert count_in(db, r) == 1


def test_a_stranger_cannot_invite_into_a_room_that_only_has_a_pending_invitation(db, database_url, make_user):
    ana, bo, mallory = make_user(), make_user(), make_user()
    r = room()
    insert_as(database_url, ana, ana, bo, r)
    assert refused(database_url, mallory, mallory, bo, r).startswith("room_in_use:")


def test_a_room_whose_call_ended_takes_a_new_call_from_anyone(db, database_url, make_user):
    ana, bo, cy = make_user(), make_user(), make_user()
    r = room()
    inv = insert_as(database_url, ana, ana, bo, r)
    set_status(db, inv, "accepted", call_status="active")
    db.execute("update public.calls set status = 'completed', ended_at = now() where room_name = %s", (r,))
    insert_as(database_url, cy, cy, bo, r)
    assert count_in(db, r) == 2


def test_parties_can_add_people_and_a_callee_can_call_back(db, database_url, make_user):
    ana, bo, cy = make_user(), make_user(), make_user()
    r = room()
    insert_as(database_url, ana, ana, bo, r)
    insert_as(database_url, ana, ana, cy, r)   # the caller adds a third person (a group call)
    insert_as(database_url, bo, bo, ana, r)    # the callee calls back (glare)
    assert count_in(db, r) == 3


def test_a_declined_callee_is_no_longer_a_party(db, database_url, make_user):
    ana, bo, cy, di = make_user(), make_user(), make_user(), make_user()
    r = room()
    first = insert_as(database_url, ana, ana, bo, r)
    insert_as(database_url, ana, ana, cy, r)
    set_status(db, first, "declined")
    assert refused(database_url, bo, bo, di, r).startswith("room_in_use:")
    insert_as(database_url, ana, ana, bo, r)  # a party may invite them again


def test_one_live_invitation_per_room_and_callee(db, database_url, make_user):
    ana, bo, cy = make_user(), make_user(), make_user()
    r = room()
    insert_as(database_url, ana, ana, bo, r)
    assert refused(database_url, ana, ana, bo, r).startswith("already_invited:")
    assert refused(database_url, cy, cy, bo, r).startswith("room_in_use:")  # a stranger is refused first
    assert count_in(db, r) == 1


def test_the_31st_invitation_in_a_minute_is_refused_and_changes_nothing(db, database_url, make_user):
    caller = make_user()
    callees = [make_user() for _ in range(31)]
    for callee in callees[:30]:
        insert_as(database_url, caller, caller, callee, room())
    last_room = room()
    message = refused(database_url, caller, caller, callees[30], last_room)
    assert message.startswith("rate_limited:") and "30" in message
    assert count_in(db, last_room) == 0
    assert db.execute("select count(*) as n from public.call_invitations where caller_id = %s",
                      (caller,)).fetchone()["n"] == 30
    # Workers (the service role) are not limited.
    db.execute("insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)",
               (room(), caller, callees[30]))


def test_the_invite_rate_is_read_from_callflow_settings(db, database_url, make_user):
    caller, a, b = make_user(), make_user(), make_user()
    db.execute("""insert into public.callflow_settings (key, value) values ('CALLFLOW_INVITE_RATE_PER_MINUTE', '1')
                  on conflict (key) do update set value = excluded.value""")
    try:
        insert_as(database_url, caller, caller, a, room())
        assert refused(database_url, caller, caller, b, room()).startswith("rate_limited:")
    finally:
        db.execute("delete from public.callflow_settings where key = 'CALLFLOW_INVITE_RATE_PER_MINUTE'")


def test_anonymous_callers_are_refused_unless_allowed(db, database_url, make_user):
    guest, bo = make_user(), make_user()
    assert refused(database_url, guest, guest, bo, room(), anonymous=True).startswith("anonymous:")
    db.execute("""insert into public.callflow_settings (key, value) values ('CALLFLOW_ALLOW_ANONYMOUS', 'true')
                  on conflict (key) do update set value = excluded.value""")
    try:
        insert_as(database_url, guest, guest, bo, room(), anonymous=True)
    finally:
        db.execute("delete from public.callflow_settings where key = 'CALLFLOW_ALLOW_ANONYMOUS'")


def test_a_forged_caller_is_refused(database_url, make_user):
    ana, bo, mallory = make_user(), make_user(), make_user()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        insert_as(database_url, mallory, ana, bo, room())


def test_two_first_inserts_into_one_room_cannot_both_pass(db, database_url, make_user):
    """Two strangers race for an unused room: exactly one of them gets it."""
    r = room()
    pairs = [(make_user(), make_user()) for _ in range(2)]
    results: list[object] = []
    barrier = threading.Barrier(2)

    def attempt(caller, callee):
        barrier.wait()
        try:
            results.append(insert_as(database_url, caller, caller, callee, r))
        except psycopg.errors.RaiseException as exc:
            results.append(exc.diag.message_primary)

    threads = [threading.Thread(target=attempt, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count_in(db, r) == 1
    assert sum(1 for x in results if isinstance(x, str) and x.startswith("room_in_use:")) == 1


def test_callflow_migrate_writes_the_settings_the_rules_read(db, database_url):
    from config.settings import build_settings
    from orchestration.migrate import database_settings, migrate

    settings = build_settings(database_url=database_url, callflow_invite_rate_per_minute=7,
                              callflow_allow_anonymous=True)
    try:
        migrate(database_url, settings=database_settings(settings))
        rows = {r["key"]: r["value"] for r in db.execute("select key, value from public.callflow_settings").fetchall()}
        assert rows["CALLFLOW_INVITE_RATE_PER_MINUTE"] == "7" and rows["CALLFLOW_ALLOW_ANONYMOUS"] == "true"
        assert "CALLFLOW_RING_TIMEOUT_SECONDS" in rows
    finally:
        db.execute("delete from public.callflow_settings")


# ---- the repeat window of missed-call emails -------------------------------------------------------

def _missed_call_email(uow, invitation_id, caller, callee):
    """The outbox row for one missed call: its id if it is to be sent, else None."""
    pending = uow.add_missed_call_notifications([MissedCallEmail(invitation_id, caller, callee)])
    return pending[0] if pending else None


def test_one_missed_call_email_per_pair_within_the_repeat_window(db, database_url, make_user):
    ana, bo, cy = make_user(), make_user(), make_user()
    invs = [insert_as(database_url, ana, ana, bo, room()), insert_as(database_url, ana, ana, bo, room()),
            insert_as(database_url, cy, cy, bo, room())]
    store = PostgresStore(database_url, email_repeat_window=900)
    with store.transaction() as uow:
        first = _missed_call_email(uow, invs[0], ana, bo)
    with store.transaction() as uow:
        second = _missed_call_email(uow, invs[1], ana, bo)
    with store.transaction() as uow:
        other_caller = _missed_call_email(uow, invs[2], cy, bo)
    assert first and other_caller and second is None
    row = db.execute("select status, last_error from public.notifications where invitation_id = %s",
                     (invs[1],)).fetchone()
    assert row["status"] == "skipped" and "CALLFLOW_EMAIL_REPEAT_WINDOW_SECONDS" in row["last_error"]
    # Outside the window (a skipped or failed one does not count), the next goes.
    db.execute("update public.notifications set created_at = now() - interval '1 hour' where invitation_id = %s",
               (invs[0],))
    third = insert_as(database_url, ana, ana, bo, room())
    with store.transaction() as uow:
        assert _missed_call_email(uow, third, ana, bo)
