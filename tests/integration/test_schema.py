"""The database guard and row level security on real Postgres, acting as Supabase does: clients
run as role `authenticated` with `request.jwt.claims` set for the transaction; callflow's workers
use a connection that bypasses RLS (the `db` fixture, or role `service_role`)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

from devstack import services

TERMINAL = ["accepted", "declined", "cancelled", "missed", "busy", "failed"]
ALL_STATUSES = ["pending", "ringing", *TERMINAL]
LEGAL = {
    "pending": {"ringing", "accepted", "declined", "cancelled", "busy", "failed"},
    "ringing": {"accepted", "declined", "cancelled", "missed"},
}
DEFAULT_REASON = {"accepted": "answered", "declined": "declined", "cancelled": "caller_cancelled",
                  "missed": "timeout", "busy": "callee_busy", "failed": "error"}


@contextmanager
def acting_as(database_url: str, uid: str | None, role: str = "authenticated"):
    """One transaction as Supabase runs a client's request; commits if the block succeeds."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute(f"set local role {role}")
        claims = {"role": role, **({"sub": uid} if uid else {})}
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


@pytest.fixture
def users(make_user):
    return {"caller": make_user("Caller"), "callee": make_user("Callee"), "other": make_user("Other")}


@pytest.fixture
def svc(database_url):
    """The workers' view: a connection that bypasses RLS, rows as dicts, autocommit."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def _invite(svc, caller: str, callee: str, status: str = "pending", room: str | None = None, **cols) -> dict:
    row = svc.execute(
        "insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning *",
        (room or f"room-{uuid.uuid4().hex[:8]}", caller, callee),
    ).fetchone()
    if status == "ringing" or status in TERMINAL and status not in LEGAL["pending"]:
        row = _set(svc, row["id"], "ringing", ringing_at=datetime.now(timezone.utc),
                   ring_deadline=datetime.now(timezone.utc) + timedelta(seconds=30))
    if status not in ("pending", "ringing"):
        row = _set(svc, row["id"], status)
    if cols:
        row = _set(svc, row["id"], row["status"], **cols)
    return row


def _set(conn, invitation_id, status: str, **cols) -> dict:
    assignments = ", ".join(["status = %s", *(f"{k} = %s" for k in cols)])
    row = conn.execute(f"update call_invitations set {assignments} where id = %s returning *",
                       (status, *cols.values(), invitation_id)).fetchone()
    return row


def _get(svc, invitation_id) -> dict:
    return svc.execute("select * from call_invitations where id = %s", (invitation_id,)).fetchone()


# ---- inserting ----------------------------------------------------------------------------------


def test_a_caller_inserts_their_own_pending_invitation(database_url, svc, users):
    past = datetime(2020, 1, 1, tzinfo=timezone.utc)
    with acting_as(database_url, users["caller"]) as conn:
        row = conn.execute(
            """insert into call_invitations (room_name, caller_id, callee_id, call_type, metadata, created_at)
               values ('room-a', %s, %s, 'audio', '{"topic": "hi"}', %s) returning *""",
            (users["caller"], users["callee"], past),
        ).fetchone()
    stored = _get(svc, row["id"])
    assert stored["status"] == "pending" and stored["call_type"] == "audio"
    assert stored["metadata"] == {"topic": "hi"}
    assert stored["created_at"] > past  # the database's clock, not the client's
    assert stored["call_id"] is None and stored["ended_at"] is None and stored["end_reason"] is None


def test_the_default_call_type_is_video(database_url, users):
    with acting_as(database_url, users["caller"]) as conn:
        row = conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s) "
                           "returning call_type, status", (users["caller"], users["callee"])).fetchone()
    assert row == {"call_type": "video", "status": "pending"}


def test_new_rows_get_time_ordered_ids(database_url, svc, users):
    """A row's default id is a version 7 UUID (migration 20261208000010): its first 48 bits are the
    insert's Unix milliseconds, so later rows sort after earlier ones in every index keyed by id."""
    before = int(time.time() * 1000)
    first = _invite(svc, users["caller"], users["callee"])["id"]
    time.sleep(0.002)
    with acting_as(database_url, users["caller"]) as conn:  # a client leaving the id out
        second = conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) "
                              "returning id", (f"room-{uuid.uuid4().hex[:8]}", users["caller"], users["callee"])
                              ).fetchone()["id"]
    after = int(time.time() * 1000)
    for made in (first, second):
        assert made.version == 7 and made.variant == uuid.RFC_4122
        assert before - 5 <= made.int >> 80 <= after + 5
    assert first < second
    defaults = svc.execute("""select c.table_name from information_schema.columns c
                                join information_schema.tables t using (table_schema, table_name)
                               where c.table_schema = 'public' and t.table_type = 'BASE TABLE'
                                 and c.column_name = 'id' and c.data_type = 'uuid'
                                 and c.column_default is distinct from 'callflow_uuid_v7()'""").fetchall()
    assert defaults == [], f"tables whose ids are not time-ordered: {defaults}"


def test_a_client_cannot_insert_for_someone_else(database_url, users):
    with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
        with acting_as(database_url, users["other"]) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                         (users["caller"], users["callee"]))


@pytest.mark.parametrize("status", ["ringing", "accepted", "missed"])
def test_a_client_cannot_insert_another_status(database_url, users, status):
    with pytest.raises(psycopg.Error, match="must be pending|row-level security"):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id, status) values ('r', %s, %s, %s)",
                         (users["caller"], users["callee"], status))


@pytest.mark.parametrize("column,value", [("end_reason", "answered"), ("ended_at", "2030-01-01T00:00:00Z"),
                                          ("ringing_at", "2030-01-01T00:00:00Z"), ("answered_at", "2030-01-01T00:00:00Z"),
                                          ("ring_deadline", "2030-01-01T00:00:00Z")])
def test_a_client_cannot_insert_worker_columns(database_url, users, column, value):
    with pytest.raises(errors.InsufficientPrivilege, match="not by clients"):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute(f"insert into call_invitations (room_name, caller_id, callee_id, {column}) values ('r', %s, %s, %s)",
                         (users["caller"], users["callee"], value))


def test_unknown_users_are_refused(database_url, svc, users):
    ghost = str(uuid.uuid4())
    with pytest.raises(errors.ForeignKeyViolation, match="callee_id"):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                         (users["caller"], ghost))
    with pytest.raises(errors.ForeignKeyViolation, match="caller_id"):
        with acting_as(database_url, ghost) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                         (ghost, users["callee"]))
    with pytest.raises(errors.ForeignKeyViolation):  # workers too
        svc.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                    (ghost, users["callee"]))


def test_caller_equal_to_callee_is_refused(database_url, svc, users):
    with pytest.raises(errors.CheckViolation, match="caller_is_not_callee"):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                         (users["caller"], users["caller"]))
    with pytest.raises(errors.CheckViolation, match="caller_is_not_callee"):
        svc.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                    (users["caller"], users["caller"]))


@pytest.mark.parametrize("call_type", ["screen", "VIDEO", ""])
def test_an_unknown_call_type_is_refused(database_url, users, call_type):
    with pytest.raises(errors.CheckViolation, match="call_type_known"):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id, call_type) values ('r', %s, %s, %s)",
                         (users["caller"], users["callee"], call_type))


def test_clients_cannot_delete(database_url, svc, users):
    inv = _invite(svc, users["caller"], users["callee"])
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("delete from call_invitations where id = %s", (inv["id"],))
    assert _get(svc, inv["id"]) is not None


# ---- clients moving the status ------------------------------------------------------------------


@pytest.mark.parametrize("start", ["pending", "ringing"])
@pytest.mark.parametrize("target", ["accepted", "declined"])
def test_the_callee_accepts_or_declines(database_url, svc, users, start, target):
    inv = _invite(svc, users["caller"], users["callee"], start)
    with acting_as(database_url, users["callee"]) as conn:
        before = conn.execute("select now() as t").fetchone()["t"]
        row = _set(conn, inv["id"], target)
    assert row is not None and row["status"] == target
    stored = _get(svc, inv["id"])
    assert stored["status"] == target
    assert stored["end_reason"] == DEFAULT_REASON[target]
    assert stored["ended_at"] == before  # the database's clock, in the transaction of the move
    assert stored["updated_at"] == before and stored["updated_at"] > inv["updated_at"]
    if target == "accepted":
        assert stored["answered_at"] == before
    else:
        assert stored["answered_at"] is None


@pytest.mark.parametrize("start", ["pending", "ringing"])
def test_the_caller_cancels(database_url, svc, users, start):
    inv = _invite(svc, users["caller"], users["callee"], start)
    with acting_as(database_url, users["caller"]) as conn:
        _set(conn, inv["id"], "cancelled")
    stored = _get(svc, inv["id"])
    assert (stored["status"], stored["end_reason"]) == ("cancelled", "caller_cancelled")
    assert stored["ended_at"] is not None and stored["answered_at"] is None


@pytest.mark.parametrize("who,target", [
    ("caller", "accepted"), ("caller", "declined"), ("callee", "cancelled"),
    ("callee", "ringing"), ("caller", "ringing"), ("callee", "missed"), ("callee", "busy"),
    ("callee", "failed"), ("caller", "missed"),
])
def test_clients_cannot_make_other_moves(database_url, svc, users, who, target):
    inv = _invite(svc, users["caller"], users["callee"], "pending")
    # not theirs to make (insufficient_privilege), or no legal move at all (check_violation)
    with pytest.raises((errors.InsufficientPrivilege, errors.CheckViolation), match="call_invitations: |row-level"):
        with acting_as(database_url, users[who]) as conn:
            _set(conn, inv["id"], target)
    assert _get(svc, inv["id"])["status"] == "pending"


def test_someone_else_cannot_move_it(database_url, svc, users):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    for target in ("accepted", "declined", "cancelled"):
        with acting_as(database_url, users["other"]) as conn:
            assert _set(conn, inv["id"], target) is None  # not theirs: invisible, nothing updated
    assert _get(svc, inv["id"])["status"] == "ringing"


@pytest.mark.parametrize("column,value", [
    ("metadata", '{"x": 1}'), ("room_name", "elsewhere"), ("call_type", "audio"), ("end_reason", "timeout"),
    ("ended_at", "2030-01-01T00:00:00Z"), ("answered_at", "2030-01-01T00:00:00Z"),
    ("ring_deadline", "2030-01-01T00:00:00Z"), ("created_at", "2020-01-01T00:00:00Z"),
])
@pytest.mark.parametrize("with_status", [False, True])
def test_clients_cannot_touch_other_columns(database_url, svc, users, column, value, with_status):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    sql = f"update call_invitations set {column} = %s" + (", status = 'accepted'" if with_status else "") + " where id = %s"
    with pytest.raises(errors.InsufficientPrivilege, match=f"status only, not {column}"):
        with acting_as(database_url, users["callee"]) as conn:
            conn.execute(sql, (value, inv["id"]))
    after = _get(svc, inv["id"])
    assert after == inv


def test_a_callee_cannot_reassign_an_invitation(database_url, svc, users):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    with pytest.raises(errors.InsufficientPrivilege, match="status only, not callee_id"):
        with acting_as(database_url, users["callee"]) as conn:
            conn.execute("update call_invitations set callee_id = %s, status = 'accepted' where id = %s",
                         (users["other"], inv["id"]))


# ---- the state machine, whoever writes ----------------------------------------------------------


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("writer", ["service", "service_role", "client"])
def test_terminal_statuses_never_change(database_url, svc, users, terminal, writer):
    inv = _invite(svc, users["caller"], users["callee"], terminal)
    assert inv["status"] == terminal
    for target in ALL_STATUSES:
        if target == terminal:
            continue
        if writer == "service":
            with pytest.raises(errors.CheckViolation, match=f"already {terminal}"):
                _set(svc, inv["id"], target)
        elif writer == "service_role":
            with pytest.raises(errors.CheckViolation, match=f"already {terminal}"):
                with acting_as(database_url, None, role="service_role") as conn:
                    _set(conn, inv["id"], target)
        else:
            for who in ("caller", "callee"):
                with acting_as(database_url, users[who]) as conn:
                    assert _set(conn, inv["id"], target) is None
    after = _get(svc, inv["id"])
    assert after["status"] == terminal and after["ended_at"] == inv["ended_at"]


@pytest.mark.parametrize("start", ["pending", "ringing"])
@pytest.mark.parametrize("target", ALL_STATUSES)
def test_workers_make_exactly_the_legal_transitions(svc, users, start, target):
    inv = _invite(svc, users["caller"], users["callee"], start)
    if target == start:
        assert _set(svc, inv["id"], target)["status"] == start  # not a transition
    elif target in LEGAL[start]:
        row = _set(svc, inv["id"], target)
        assert row["status"] == target
        if target in TERMINAL:
            assert row["ended_at"] is not None and row["end_reason"] == DEFAULT_REASON[target]
    else:
        with pytest.raises(errors.CheckViolation, match=f"illegal transition {start} -> {target}"):
            _set(svc, inv["id"], target)
        assert _get(svc, inv["id"])["status"] == start


def test_an_unknown_status_is_refused(svc, users):
    inv = _invite(svc, users["caller"], users["callee"])
    with pytest.raises(errors.CheckViolation):
        _set(svc, inv["id"], "ringing-ish")


def test_a_worker_set_end_reason_and_times_are_kept(svc, users):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    left_at = datetime(2030, 1, 1, 12, 0, 5, tzinfo=timezone.utc)
    row = _set(svc, inv["id"], "cancelled", end_reason="connection_aborted", ended_at=left_at)
    assert (row["end_reason"], row["ended_at"]) == ("connection_aborted", left_at)
    inv2 = _invite(svc, users["caller"], users["callee"], "ringing")
    assert _set(svc, inv2["id"], "cancelled", end_reason="room_closed")["end_reason"] == "room_closed"
    inv3 = _invite(svc, users["caller"], users["callee"], "ringing")
    joined = datetime(2030, 1, 1, 12, 0, 3, tzinfo=timezone.utc)
    row = _set(svc, inv3["id"], "accepted", answered_at=joined)
    assert row["answered_at"] == joined and row["end_reason"] == "answered"


def test_the_database_stamps_the_missed_move_and_updated_at(svc, users):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    row = _set(svc, inv["id"], "missed")
    assert row["end_reason"] == "timeout" and row["ended_at"] is not None
    assert row["updated_at"] > inv["updated_at"] and row["answered_at"] is None
    later = svc.execute("update call_invitations set call_id = null where id = %s returning updated_at",
                        (inv["id"],)).fetchone()
    assert later["updated_at"] > row["updated_at"]


def test_an_unknown_end_reason_is_refused(svc, users):
    inv = _invite(svc, users["caller"], users["callee"], "ringing")
    with pytest.raises(errors.CheckViolation, match="end_reason_known"):
        _set(svc, inv["id"], "missed", end_reason="bored")


# ---- reading ------------------------------------------------------------------------------------


@pytest.fixture
def group_call(svc, make_user, users):
    """A group call: caller rings callee and a second callee; `other` is in nothing."""
    second = make_user("Second")
    call = svc.execute("insert into calls (room_name, caller_id, status) values (%s, %s, 'active') returning *",
                       (f"room-{uuid.uuid4().hex[:8]}", users["caller"])).fetchone()
    inv1 = _invite(svc, users["caller"], users["callee"], room=call["room_name"], call_id=call["id"])
    inv2 = _invite(svc, users["caller"], second, room=call["room_name"], call_id=call["id"])
    for identity in (users["caller"], users["callee"]):
        svc.execute("insert into call_participants (call_id, identity, participant_sid) values (%s, %s, %s)",
                    (call["id"], identity, f"PA_{uuid.uuid4().hex[:10]}"))
    svc.execute("insert into call_events (event_id, source, type, room_name) values (%s, 'livekit', 'room_started', %s)",
                (f"EV_{uuid.uuid4().hex}", call["room_name"]))
    svc.execute("insert into notifications (invitation_id, recipient_id, recipient_email) values (%s, %s, 'x@example.test')",
                (inv1["id"], users["callee"]))
    lonely = svc.execute("insert into calls (room_name, status) values (%s, 'completed') returning id",
                         (f"room-{uuid.uuid4().hex[:8]}",)).fetchone()
    return {"call": call, "inv1": inv1, "inv2": inv2, "second": second, "lonely": lonely["id"]}


def _visible(database_url, uid, role="authenticated"):
    with acting_as(database_url, uid, role) as conn:
        return {
            "invitations": {r["id"] for r in conn.execute("select id from call_invitations")},
            "calls": {r["id"] for r in conn.execute("select id from calls")},
            "participants": {r["identity"] for r in conn.execute("select identity from call_participants")},
        }


def test_each_user_reads_only_what_they_take_part_in(database_url, users, group_call):
    g = group_call
    call_id = g["call"]["id"]
    caller = _visible(database_url, users["caller"])
    assert {g["inv1"]["id"], g["inv2"]["id"]} <= caller["invitations"]
    assert call_id in caller["calls"] and g["lonely"] not in caller["calls"]
    assert {users["caller"], users["callee"]} <= caller["participants"]

    callee = _visible(database_url, users["callee"])
    assert g["inv1"]["id"] in callee["invitations"] and g["inv2"]["id"] not in callee["invitations"]
    assert call_id in callee["calls"]
    assert {users["caller"], users["callee"]} <= callee["participants"]

    second = _visible(database_url, g["second"])
    assert second["invitations"] == {g["inv2"]["id"]} and second["calls"] == {call_id}

    assert _visible(database_url, users["other"]) == {"invitations": set(), "calls": set(), "participants": set()}
    assert _visible(database_url, None) == {"invitations": set(), "calls": set(), "participants": set()}


@pytest.mark.parametrize("table", ["call_events", "notifications"])
def test_clients_cannot_read_the_event_log_or_the_outbox(database_url, users, group_call, table):
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(database_url, users["callee"]) as conn:
            conn.execute(f"select * from {table}").fetchall()


@pytest.mark.parametrize("table", ["call_invitations", "calls", "call_participants", "call_events", "notifications"])
def test_anon_reads_nothing(database_url, group_call, table):
    try:
        with acting_as(database_url, None, role="anon") as conn:
            rows = conn.execute(f"select * from {table}").fetchall()
    except errors.InsufficientPrivilege:
        return
    assert rows == []


def test_anon_cannot_insert(database_url, users):
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(database_url, users["caller"], role="anon") as conn:
            conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('r', %s, %s)",
                         (users["caller"], users["callee"]))


def test_clients_cannot_write_calls(database_url, users, group_call):
    with pytest.raises(errors.InsufficientPrivilege):
        with acting_as(database_url, users["caller"]) as conn:
            conn.execute("update calls set status = 'completed' where id = %s", (group_call["call"]["id"],))


def test_a_session_that_once_acted_as_a_user_still_works_without_claims(database_url, svc, users):
    """auth.uid() must read a reverted (empty) request.jwt.claims as no user, not fail."""
    inv = _invite(svc, users["caller"], users["callee"])
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"sub": users["caller"], "role": "authenticated"}),))
        assert conn.execute("select auth.uid() as uid").fetchone()["uid"] == uuid.UUID(users["caller"])
        conn.commit()
        assert conn.execute("select auth.uid() as uid").fetchone()["uid"] is None
        conn.execute("set local role authenticated")
        assert conn.execute("select id from call_invitations where id = %s", (inv["id"],)).fetchall() == []


# ---- calls --------------------------------------------------------------------------------------


def test_at_most_one_live_call_per_room_name(svc, users):
    room = f"room-{uuid.uuid4().hex[:8]}"
    first = svc.execute("insert into calls (room_name, status) values (%s, 'ringing') returning id", (room,)).fetchone()
    for status in ("ringing", "active"):
        with pytest.raises(errors.UniqueViolation, match="calls_one_live_call_per_room"):
            svc.execute("insert into calls (room_name, status) values (%s, %s)", (room, status))
    svc.execute("update calls set status = 'active' where id = %s", (first["id"],))
    with pytest.raises(errors.UniqueViolation):
        svc.execute("insert into calls (room_name, status) values (%s, 'ringing')", (room,))
    svc.execute("update calls set status = 'completed' where id = %s", (first["id"],))
    second = svc.execute("insert into calls (room_name, status) values (%s, 'ringing') returning id", (room,)).fetchone()
    svc.execute("insert into calls (room_name, status) values (%s, 'missed')", (room,))  # ended calls share the name
    with pytest.raises(errors.UniqueViolation):
        svc.execute("update calls set status = 'active' where room_name = %s and id <> %s and status = 'completed'",
                    (room, second["id"]))


def test_calls_constraints(svc):
    with pytest.raises(errors.CheckViolation):
        svc.execute("insert into calls (room_name, status) values ('r', 'ended')")
    with pytest.raises(errors.CheckViolation):
        svc.execute("insert into calls (room_name, duration_seconds) values ('r', -1)")
    # A sid is not unique over time (LiveKit serves an empty room's sid again), but at most one
    # live call has it.
    sid = f"RM_{uuid.uuid4().hex[:10]}"
    svc.execute("insert into calls (room_name, status, livekit_room_sid) values (%s, 'completed', %s)", ("r1", sid))
    svc.execute("insert into calls (room_name, status, livekit_room_sid) values (%s, 'ringing', %s)", ("r1", sid))
    with pytest.raises(errors.UniqueViolation):
        svc.execute("insert into calls (room_name, status, livekit_room_sid) values (%s, 'active', %s)", ("r2", sid))
    svc.execute("delete from calls where livekit_room_sid = %s", (sid,))
    svc.execute("insert into calls (room_name, status, end_reason) values ('r3', 'cancelled', 'glare')")


# ---- migrate ------------------------------------------------------------------------------------


def _callflow_migrate(url: str) -> subprocess.CompletedProcess:
    from tests.conftest import subprocess_env

    return subprocess.run([str(services.VENV_BIN / "callflow"), "migrate"], env=subprocess_env(DATABASE_URL=url),
                          cwd=services.ROOT, capture_output=True, text=True, timeout=120)


def _schema_snapshot(url: str) -> list:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """select 'col', table_name || '.' || column_name || ':' || data_type from information_schema.columns
                where table_schema in ('public', 'auth')
               union all select 'con', conname::text from pg_constraint c join pg_namespace n on n.oid = c.connamespace
                where n.nspname = 'public'
               union all select 'idx', indexname::text from pg_indexes where schemaname = 'public'
               union all select 'pol', policyname::text from pg_policies where schemaname = 'public'
               union all select 'trg', tgname::text from pg_trigger where not tgisinternal
               union all select 'mig', name from public.callflow_migrations
               order by 1, 2"""
        ).fetchall()


def test_callflow_migrate_is_idempotent():
    url = services.create_database("callflow_migrate")
    try:
        before = _schema_snapshot(url)
        for _ in range(2):
            result = _callflow_migrate(url)
            assert result.returncode == 0, result.stderr
            assert "0 applied" in result.stdout and "applied 2" not in result.stdout
        assert _schema_snapshot(url) == before
    finally:
        services.drop_database(url)


def test_callflow_migrate_on_an_empty_database_then_again():
    name = f"callflow_empty_{uuid.uuid4().hex[:10]}"
    services.ensure_postgres()
    with psycopg.connect(services.ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = f"{services.ADMIN_URL.rpartition('/')[0]}/{name}"
    try:
        first = _callflow_migrate(url)
        assert first.returncode == 0, first.stderr
        assert "created the local auth schema" in first.stdout
        applied = [line for line in first.stdout.splitlines() if line.startswith("applied ")]
        assert len(applied) >= 3
        snapshot = _schema_snapshot(url)
        second = _callflow_migrate(url)
        assert second.returncode == 0, second.stderr
        assert f"0 applied, {len(applied)} already" in second.stdout
        assert "auth schema" not in second.stdout
        assert _schema_snapshot(url) == snapshot
    finally:
        services.drop_database(url)
