"""`GET /api/calls` on a million calls: the read the API runs answers from an index on the user's
participation, under RLS as the user, in milliseconds, whoever asks.

The history is made with SQL (`generate_series`) in a database of this module's own (dropped
after), once for the module: 1,000,000 calls of 10,000 users (one invitation each, so every user
is a party of ~200 calls spread over a year), plus four users to ask as: one with ~200 calls,
one who never called, one whose 20 calls are all older than anyone else's, and one with 50,000.
Rows go in with triggers off (`session_replication_role = replica`) and the secondary indexes are
built afterwards (as a restore would): ~20 s here, against minutes through the triggers.

Before issue 23 the read was `select * from calls order by created_at desc, id limit 20` under the
calls policy: calls_created_at walked from the newest call and the policy checked on each row until
20 were the user's — all 1,000,000 rows for a user with no calls or only old ones (110-130 ms).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from devstack import services
from orchestration.auth import User

CALLS = 1_000_000
USERS = 10_000
HEAVY_CALLS = 50_000

TYPICAL = "00000000-0000-4000-8000-000000000005"   # ~100 calls as caller and ~100 as callee
NEVER = "00000000-0000-4000-8000-0000000f0001"     # no calls at all
LAPSED = "00000000-0000-4000-8000-0000000f0002"    # 20 calls, older than every other
HEAVY = "00000000-0000-4000-8000-0000000f0003"     # 50,000 calls
PROBES = {"typical": TYPICAL, "never": NEVER, "lapsed": LAPSED, "heavy": HEAVY}

TABLES = ("calls", "call_invitations", "callflow_call_parties")


def _user(n: str) -> str:
    return f"('00000000-0000-4000-8000-' || lpad(to_hex({n}), 12, '0'))::uuid"


def _id(prefix: str, n: str) -> str:
    return f"('{prefix}-0000-4000-8000-' || lpad(to_hex({n}), 12, '0'))::uuid"


LOAD = f"""
insert into auth.users (id, email)
  select {_user('g')}, 'bulk-' || g || '@example.test' from generate_series(1, {USERS}) g
  union all select u::uuid, 'probe-' || u || '@example.test' from unnest(array['{NEVER}', '{LAPSED}', '{HEAVY}']) u;

-- 1,000,000 calls, one every 30 s back from now; call g's caller is user 1 + g % 10000.
insert into public.calls (id, room_name, caller_id, status, call_type, created_at, started_at, ended_at,
                          duration_seconds, end_reason)
  select {_id('c0000000', 'g')}, 'bulk-' || g, {_user('1 + g % 10000')}, 'completed', 'video',
         now() - make_interval(secs => g * 30), now() - make_interval(secs => g * 30 - 5),
         now() - make_interval(secs => g * 30 - 65), 60, 'hangup'
    from generate_series(1, {CALLS}) g;
insert into public.call_invitations (id, room_name, caller_id, callee_id, status, call_id, created_at, updated_at,
                                     answered_at, ended_at, end_reason)
  select {_id('a0000000', 'g')}, 'bulk-' || g, {_user('1 + g % 10000')},
         {_user('1 + (g % 10000 + 1 + (g / 10000) % 9999) % 10000')}, 'accepted', {_id('c0000000', 'g')},
         now() - make_interval(secs => g * 30), now() - make_interval(secs => g * 30),
         now() - make_interval(secs => g * 30 - 5), now() - make_interval(secs => g * 30 - 5), 'answered'
    from generate_series(1, {CALLS}) g;

-- The lapsed user: 20 calls before all of those. The heavy user: 50,000, one every 10 minutes.
insert into public.calls (id, room_name, caller_id, status, call_type, created_at, ended_at, end_reason)
  select {_id('c1000000', 'g')}, 'lapsed-' || g, '{LAPSED}', 'missed', 'audio',
         now() - make_interval(secs => {CALLS} * 30 + g * 3600), now() - make_interval(secs => {CALLS} * 30 + g * 3600 - 30),
         'timeout'
    from generate_series(1, 20) g;
insert into public.call_invitations (id, room_name, caller_id, callee_id, status, call_id, created_at, updated_at)
  select {_id('a1000000', 'g')}, 'lapsed-' || g, '{LAPSED}', {_user('1 + g')}, 'missed', {_id('c1000000', 'g')},
         now() - make_interval(secs => {CALLS} * 30 + g * 3600), now()
    from generate_series(1, 20) g;
insert into public.calls (id, room_name, caller_id, status, call_type, created_at, ended_at, end_reason)
  select {_id('c2000000', 'g')}, 'heavy-' || g, {_user('1 + g % 10000')}, 'declined', 'video',
         now() - make_interval(secs => g * 600 + 7), now() - make_interval(secs => g * 600), 'declined'
    from generate_series(1, {HEAVY_CALLS}) g;
insert into public.call_invitations (id, room_name, caller_id, callee_id, status, call_id, created_at, updated_at)
  select {_id('a2000000', 'g')}, 'heavy-' || g, {_user('1 + g % 10000')}, '{HEAVY}', 'declined', {_id('c2000000', 'g')},
         now() - make_interval(secs => g * 600 + 7), now()
    from generate_series(1, {HEAVY_CALLS}) g;
"""

# What the calls policy lets a user read, newest first: the answer every read must give.
TRUTH = """select c.id from public.calls c
            where exists (select 1 from public.call_invitations i
                           where i.call_id = c.id and (i.caller_id = %(user)s or i.callee_id = %(user)s))
            order by c.created_at desc, c.id limit %(limit)s"""


def _secondary_indexes(conn) -> list[tuple[str, str]]:
    """(name, definition) of the indexes of the history tables that no constraint owns."""
    return [(r["indexname"], r["indexdef"]) for r in conn.execute(
        """select indexname, indexdef from pg_indexes i
            where schemaname = 'public' and tablename = any(%s)
              and not exists (select 1 from pg_constraint c where c.conname = i.indexname)""",
        (list(TABLES),)).fetchall()]


@pytest.fixture(scope="module")
def million():
    with services.scratch_database("callflow_history") as url:
        started = time.monotonic()
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("set maintenance_work_mem = '256MB'")
            conn.execute("set session_replication_role = replica")  # no triggers, no FK checks: a bulk load
            indexes = _secondary_indexes(conn)
            for name, _ in indexes:
                conn.execute(f'drop index public."{name}"')
            conn.execute(LOAD)
            # The participation index of a history loaded with triggers off, as an operator would fill it.
            if conn.execute("select to_regprocedure('public.callflow_call_parties_backfill()') f").fetchone()["f"]:
                conn.execute("select public.callflow_call_parties_backfill()")
            for _, definition in indexes:
                conn.execute(definition)
            conn.execute("set session_replication_role = origin")
            for table in ("auth.users", *(f"public.{t}" for t in TABLES)):
                if conn.execute("select to_regclass(%s) r", (table,)).fetchone()["r"]:
                    conn.execute(f"vacuum analyze {table}")
            assert conn.execute("select count(*) n from public.calls").fetchone()["n"] == CALLS + 20 + HEAVY_CALLS
        print(f"\nHISTORY: {CALLS + 20 + HEAVY_CALLS:,} calls loaded in {time.monotonic() - started:.1f} s")
        yield url


def _as_api_user(user_id: str) -> User:
    return User(id=user_id, role="authenticated", claims={"sub": user_id, "role": "authenticated"})


def test_history_of_a_million_calls_answers_in_milliseconds(million):
    """The API's own read (CallStore.recent_calls), for each kind of user: the right calls, fast."""
    from workers.web.call_store import CallStore

    with psycopg.connect(million, autocommit=True, row_factory=dict_row) as conn:
        truth = {name: [str(r["id"]) for r in conn.execute(TRUTH, {"user": uid, "limit": 20}).fetchall()]
                 for name, uid in PROBES.items()}
        truth_100 = [str(r["id"]) for r in conn.execute(TRUTH, {"user": HEAVY, "limit": 100}).fetchall()]
    assert len(truth["typical"]) == 20 and truth["never"] == [] and len(truth["lapsed"]) == 20

    async def measure() -> dict[str, float]:
        store = CallStore(million)
        try:
            medians = {}
            for name, uid in PROBES.items():
                times = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    calls = await store.recent_calls(_as_api_user(uid), 20)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert [c["id"] for c in calls] == truth[name], name
                    assert all(i["caller_id"] == uid or i["callee_id"] == uid for c in calls for i in c["invitations"])
                medians[name] = statistics.median(times[2:])  # the first ones open the pool's connection
            calls = await store.recent_calls(_as_api_user(HEAVY), 100)
            assert [c["id"] for c in calls] == truth_100
            return medians
        finally:
            if store._pool is not None:
                await store._pool.close()

    medians = asyncio.run(measure())
    print("HISTORY: GET /api/calls read, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    for name, ms in medians.items():
        assert ms < 50, f"{name}: {ms:.1f} ms"


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _explain(conn, sql: str, params) -> dict:
    return conn.execute("explain (analyze, buffers, format json) " + sql, params).fetchone()["QUERY PLAN"][0]


@pytest.mark.parametrize("who", list(PROBES))
def test_history_plan_uses_the_participation_index_not_a_scan_of_calls(million, who):
    """EXPLAIN ANALYZE of each statement of the read, run as the API runs it (the ids as the
    service, the calls and their invitations as `authenticated` with request.jwt.claims set):
    index scans only, and the calls table touched for the rows shown, not for the table."""
    from workers.web import call_store

    uid = PROBES[who]
    with psycopg.connect(million, row_factory=dict_row) as conn:  # one transaction, rolled back
        ids_plan = _explain(conn, call_store.HISTORY_IDS, {"user_id": uid, "n": 20})
        ids = [r["call_id"] for r in conn.execute(call_store.HISTORY_IDS, {"user_id": uid, "n": 20}).fetchall()]
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"sub": uid, "role": "authenticated"}),))
        calls_plan = _explain(conn, call_store.HISTORY_CALLS, {"ids": ids})
        invitations_plan = _explain(conn, call_store.HISTORY_INVITATIONS, {"ids": ids})
        conn.rollback()
    report = []
    for label, plan in (("ids", ids_plan), ("calls", calls_plan), ("invitations", invitations_plan)):
        nodes = list(_nodes(plan["Plan"]))
        scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes if "Relation Name" in n]
        report.append(f"{label} {plan['Execution Time']:.2f} ms {scans}")
        seq = [s for s in scans if s[0] == "Seq Scan" and s[1] in TABLES]
        assert not seq, f"{who} {label}: sequential scan {seq}"
        # Rows of calls looked at (kept + filtered out, every loop): those shown, not the table's.
        touched = sum((n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)) * n.get("Actual Loops", 1)
                      for n in nodes if n.get("Relation Name") == "calls")
        assert touched <= 40, f"{who} {label}: {touched} rows of calls read for 20 shown"
    by_relation = {s[1]: s for label_plan in (ids_plan, calls_plan) for s in
                   ((n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in _nodes(label_plan["Plan"]))
                   if s[1]}
    assert by_relation["callflow_call_parties"][2] == "callflow_call_parties_recent"
    if ids:
        assert by_relation["calls"][0] in ("Index Scan", "Bitmap Heap Scan", "Index Only Scan")
    print(f"HISTORY EXPLAIN {who}: " + " | ".join(report))


def test_the_participation_index_follows_invitations_and_calls(million):
    """The triggers keep it whatever writes: an invitation given a call (as the lifecycle does), a
    call deleted. (The model-based tests drive the lifecycle itself over it.)"""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(million, autocommit=True, row_factory=dict_row) as conn:
        for uid in (a, b):
            conn.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"{uid[:8]}@example.test"))
        inv = conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values ('p-1', %s, %s)"
                           " returning id", (a, b)).fetchone()["id"]
        call = conn.execute("insert into calls (room_name, caller_id) values ('p-1', %s) returning id, created_at",
                            (a,)).fetchone()
        conn.execute("update call_invitations set status = 'ringing', call_id = %s where id = %s", (call["id"], inv))
        parties = conn.execute("select user_id::text u, call_created_at from callflow_call_parties where call_id = %s",
                               (call["id"],)).fetchall()
        assert sorted(p["u"] for p in parties) == sorted([a, b])
        assert {p["call_created_at"] for p in parties} == {call["created_at"]}
        conn.execute("update call_invitations set status = 'accepted' where id = %s", (inv,))  # no change of call
        assert conn.execute("select count(*) n from callflow_call_parties where call_id = %s",
                            (call["id"],)).fetchone()["n"] == 2
        conn.execute("delete from calls where id = %s", (call["id"],))
        assert conn.execute("select count(*) n from callflow_call_parties where call_id = %s",
                            (call["id"],)).fetchone()["n"] == 0


def _as_a_party_of_open_invitations(conn, id_prefix: str, room_prefix: str) -> str:
    """In `conn`'s transaction: 300 ringing invitations (user 1 + g calls user 2 + g, as under
    load), then act as user 152 (`authenticated`, under RLS), callee of the 150th and caller of the
    151st; returns that user's id."""
    conn.execute("set local session_replication_role = replica")
    conn.execute(f"""insert into public.call_invitations (id, room_name, caller_id, callee_id, status)
                       select {_id(id_prefix, 'g')}, '{room_prefix}-' || g, {_user('1 + g')}, {_user('2 + g')}, 'ringing'
                         from generate_series(1, 300) g""")
    conn.execute("set local session_replication_role = origin")
    user = conn.execute(f"select {_user('2 + 150')}::text as id").fetchone()["id"]
    conn.execute("set local role authenticated")
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": user, "role": "authenticated"}),))
    return user


def test_an_answer_reads_its_own_invitation_not_every_open_one(million):
    """A client's answer (`update ... set status = 'accepted' where id = $1`, as the callee, under
    RLS): the policy adds `status in ('pending', 'ringing')`, which matched the predicate of the
    partial index of open invitations by room: on a big table the planner read that whole index,
    filtering on id, for each answer, decline and cancel (every open invitation's entries, dead ones
    too: 236 buffers an answer at saturation on a year of history, 32 on an empty database). It must
    find the row by its id. (Here, on a million invitations, the planner took the primary key even
    before migration 20261208000007; on the 7,700,000 of bench.history it did not.)"""
    with psycopg.connect(million, row_factory=dict_row) as conn:  # one transaction, rolled back
        _as_a_party_of_open_invitations(conn, "a3000000", "open")  # the callee of open-150
        plan = _explain(conn, f"update public.call_invitations set status = 'accepted' where id = {_id('a3000000', '150')}"
                              " returning call_id::text", {})
        conn.rollback()
    [scan] = [n for n in _nodes(plan["Plan"]) if n.get("Relation Name") == "call_invitations"
              and ("Index Name" in n or n["Node Type"] == "Seq Scan")]
    assert "id" in scan.get("Index Cond", ""), f"the answer read {scan.get('Index Name', scan['Node Type'])} " \
                                               f"filtering on id: {scan.get('Filter')}"
    assert scan["Actual Rows"] == 1 and scan.get("Rows Removed by Filter", 0) == 0, scan


def test_the_grace_sweeps_look_for_an_abort_reads_aborted_events_only(million):
    """The grace sweep asks whether a left session aborted, by room (it does not know the event's
    id). Migration 20261208000006 dropped the only index of events by room, and on bench.history's
    20,000,000 events that look became a sequential scan of them all; it must read the aborted
    events of the room alone (call_events_aborted_in_room, migration 20261208000011)."""
    from orchestration.adapters.postgres_store import ABORTED_SESSIONS_SQL
    with psycopg.connect(million, row_factory=dict_row) as conn:  # one transaction, rolled back
        conn.execute("""insert into public.call_events (event_id, source, type, room_name, payload)
                          select 'EV_bulk_' || g, 'livekit', 'participant_left', 'bulk-' || g % 50000,
                                 jsonb_build_object('participant', jsonb_build_object('sid', 'PA_' || g))
                            from generate_series(1, 200000) g""")
        conn.execute("""insert into public.call_events (event_id, source, type, room_name, payload)
                          values ('EV_aborted', 'livekit', 'participant_connection_aborted', 'bulk-7',
                                  '{"participant": {"sid": "PA_7"}}')""")
        conn.execute("analyze public.call_events")
        plan = _explain(conn, ABORTED_SESSIONS_SQL, ("bulk-7", ["PA_7", "PA_50007"]))
        conn.rollback()
    [scan] = [n for n in _nodes(plan["Plan"]) if n.get("Relation Name") == "call_events"]
    assert scan.get("Index Name") == "call_events_aborted_in_room", scan
    assert scan["Actual Rows"] == 1, scan


def test_a_users_live_invitations_read_open_ones_not_the_callers_history(million):
    """A user's live invitations (the event stream's snapshot, as the user, under RLS): read through the
    index of open invitations by caller (migration 20261208000012, which replaced the (caller_id,
    status) index) and the callee's index, never a walk of every invitation the user ever made."""
    from workers.web.call_store import LIVE_INVITATIONS_SQL
    with psycopg.connect(million, row_factory=dict_row) as conn:  # one transaction, rolled back
        user = _as_a_party_of_open_invitations(conn, "a4000000", "live")  # callee of live-150, caller of live-151
        plan = _explain(conn, LIVE_INVITATIONS_SQL, (user, user))
        conn.rollback()
    scans = [n for n in _nodes(plan["Plan"]) if n.get("Relation Name") == "call_invitations" or "Index Name" in n]
    used = {n.get("Index Name", n["Node Type"]) for n in scans}
    assert used <= {"call_invitations_caller_open", "call_invitations_callee", "Bitmap Heap Scan"}, used
    assert "call_invitations_caller_open" in used, used
    assert plan["Plan"]["Actual Rows"] == 2, plan["Plan"]  # one as caller, one as callee
