"""The callee-busy check on real Postgres (`PostgresUnitOfWork.busy_users`), the contract's rule:
busy when in an active call other than the room rung — connected in it, or its accepted
invitation's call is active; being rung elsewhere is not busy. Each case on a database of this
module's own, with rows written as the lifecycle leaves them (triggers on: the history index the
check reads is kept by them)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from devstack import services
from orchestration.adapters.postgres_store import PostgresStore
from orchestration.db import connect


@pytest.fixture(scope="module")
def url():
    with services.scratch_database("callflow_busy") as database_url:
        yield database_url


@pytest.fixture(scope="module")
def store(url):
    return PostgresStore(url, pool_size=2)


@pytest.fixture
def conn(url):
    with connect(url, autocommit=True) as c:
        yield c


def user(conn) -> str:
    uid = str(uuid.uuid4())
    conn.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"{uid[:8]}@busy.test"))
    return uid


def call(conn, caller: str, callee: str, status: str = "active", created_at: datetime | None = None,
         invitation: str = "accepted") -> tuple[str, str]:
    """A call in a room of its own, with one invitation from caller to callee; (call id, room)."""
    room = f"busy-{uuid.uuid4().hex[:8]}"
    created_at = created_at or datetime.now(timezone.utc)
    call_id = conn.execute(
        """insert into public.calls (room_name, status, caller_id, created_at, started_at, ended_at)
           values (%s, %s, %s, %s, %s, %s) returning id""",
        (room, status, caller, created_at, created_at if status != "ringing" else None,
         None if status in ("ringing", "active") else created_at + timedelta(minutes=1))).fetchone()["id"]
    conn.execute("set session_replication_role = replica")  # the client's guard would refuse these
    conn.execute("""insert into public.call_invitations (room_name, caller_id, callee_id, status, call_id, answered_at)
                    values (%s, %s, %s, %s, %s, %s)""",
                 (room, caller, callee, invitation, call_id, created_at if invitation == "accepted" else None))
    conn.execute("set session_replication_role = origin")
    conn.execute("""insert into public.callflow_call_parties (call_id, user_id, call_created_at)
                    values (%s, %s, %s), (%s, %s, %s) on conflict do nothing""",
                 (call_id, caller, created_at, call_id, callee, created_at))
    return str(call_id), room


def join(conn, call_id: str, who: str, left: bool = False) -> None:
    now = datetime.now(timezone.utc)
    conn.execute("""insert into public.call_participants (call_id, identity, participant_sid, joined_at, left_at)
                    values (%s, %s, %s, %s, %s)""",
                 (call_id, who, f"PA_{uuid.uuid4().hex[:10]}", now, now if left else None))


def busy(store, who: str, room: str = "elsewhere") -> bool:
    with store.transaction() as uow:
        return who in uow.busy_users([(who, room)])


def test_connected_in_an_active_call_is_busy_but_not_for_its_own_room(store, conn):
    a, b = user(conn), user(conn)
    call_id, room = call(conn, a, b)
    join(conn, call_id, b)
    assert busy(store, b) and busy(store, a) is False  # a never joined, and is no callee of it
    assert not busy(store, b, room)  # rung into the room of that very call


def test_an_accepted_invitation_whose_call_is_active_is_busy_before_joining_and_after_leaving(store, conn):
    a, b = user(conn), user(conn)
    call_id, _ = call(conn, a, b)
    assert busy(store, b)  # accepted, not connected yet
    join(conn, call_id, b, left=True)
    assert busy(store, b)  # left, the call still active (its grace period, or the caller alone)


def test_an_ended_call_or_an_invitation_still_ringing_is_not_busy(store, conn):
    a, b, c = user(conn), user(conn), user(conn)
    ended, _ = call(conn, a, b, status="completed")
    join(conn, ended, b, left=True)
    call(conn, a, c, status="ringing", invitation="ringing")
    assert not busy(store, b) and not busy(store, c)


def test_an_old_active_call_is_found_however_many_calls_came_after(store, conn):
    """The check reads the callee's calls since the oldest active call began: a call active for
    hours, and a long history of the callee's before and after it."""
    a, b = user(conn), user(conn)
    now = datetime.now(timezone.utc)
    for hours in (48, 30, 20):
        call(conn, a, b, status="completed", created_at=now - timedelta(hours=hours))
    old, _ = call(conn, a, b, created_at=now - timedelta(hours=10))  # active for ten hours
    for minutes in (300, 60, 5):
        call(conn, a, b, status="completed", created_at=now - timedelta(minutes=minutes))
    assert busy(store, b)
    conn.execute("update public.calls set status = 'completed', ended_at = now() where id = %s", (old,))
    assert not busy(store, b)


def test_busy_users_answers_for_many_callees_at_once(store, conn):
    a, b, c, d = user(conn), user(conn), user(conn), user(conn)
    connected, _ = call(conn, a, b)
    join(conn, connected, b)
    call(conn, a, c)
    with store.transaction() as uow:
        assert uow.busy_users([(b, "x"), (c, "y"), (d, "z")]) == {b, c}
