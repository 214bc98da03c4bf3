"""Who made an invitation's last status change (issue 24): the database writes `status_by` in the
transaction that changes `status`, 'worker' only for the lifecycle worker's own transaction
(`callflow.actor`, declared by the Postgres store), so the echo of the worker's transition is
dropped where it arrives (the listener's sink, the catch-up), and the worker writes no key of the
listener's. A client can never forge it.

In-process against the real Postgres and Redis: the real store and the real Celery scheduler (on a
Redis database of this module's own, the sink's too, which no worker consumes), LiveKit faked.
"""

from __future__ import annotations

import json
import time
import uuid

import psycopg
import pytest
import redis
from celery import Celery

from orchestration.adapters.celery_scheduler import CeleryScheduler
from orchestration.adapters.postgres_store import PostgresStore
from orchestration.ingest.mapping import Change, dedupe_key, from_notify, from_realtime
from orchestration.ingest.sink import CHANGES_KEY, IngestSink, catch_up
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.invitation_changed import handle_invitation_changed
from tests.support.calls import as_client, client_set_status, insert_invitation
from tests.support.fakes import FakeRooms

REDIS_DB = 12


@pytest.fixture
def broker(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


@pytest.fixture
def ports(database_url, broker):
    url, _client = broker
    rooms = FakeRooms()
    rooms.new_sid = lambda prefix: f"{prefix}_{uuid.uuid4().hex}"  # unique in the run's database
    return Ports(store=PostgresStore(database_url), rooms=rooms,
                 scheduler=CeleryScheduler(Celery("worker-transitions", broker=url)),
                 config=LifecycleConfig(ring_timeout=30, grace=5))


def row(db, invitation_id: str) -> dict:
    return db.execute("select * from public.call_invitations where id = %s", (invitation_id,)).fetchone()


def notifications(conn: psycopg.Connection, invitation_id: str, timeout: float = 5.0) -> list[dict]:
    """The `callflow_invitations` notifications of one invitation received on `conn` since the last look."""
    found, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [json.loads(n.payload) for n in conn.notifies(timeout=0.3)]
        found += [p for p in got if p["id"] == invitation_id]
        if found and not got:
            break
    return found


def realtime_record(db, invitation_id: str) -> dict:
    """The `postgres_changes` payload Supabase Realtime sends for the row as it is now."""
    record = db.execute("select to_jsonb(i) as r from public.call_invitations i where id = %s",
                        (invitation_id,)).fetchone()["r"]
    return {"data": {"schema": "public", "table": "call_invitations", "type": "UPDATE", "record": record,
                     "old_record": {"id": invitation_id}, "commit_timestamp": record["updated_at"], "errors": None}}


def test_the_workers_transition_is_marked_in_its_own_transaction_and_its_echo_dropped(
        database_url, db, make_user, ports, broker):
    _url, client = broker
    caller, callee = make_user(), make_user()
    with psycopg.connect(database_url, autocommit=True) as listen:
        listen.execute("listen callflow_invitations")
        inv = insert_invitation(database_url, caller, callee)
        assert row(db, inv["id"])["status_by"] == "client"

        outcome = handle_invitation_changed(Change(inv["id"], "pending", "postgres", None, None, {}), ports)
        assert outcome.result == "ringing"
        ringing = row(db, inv["id"])
        assert (ringing["status"], ringing["status_by"]) == ("ringing", "worker")
        assert not client.keys("callflow:ingest:seen:*"), "the worker wrote no mark of the listener's"

        heard = {n["status"]: n for n in notifications(listen, inv["id"])}
        assert heard["pending"]["status_by"] == "client" and heard["ringing"]["status_by"] == "worker"

        sink = IngestSink(client)
        # The echo, as the LISTEN source and as Realtime deliver it: dropped, neither marked nor listed.
        for echo in (from_notify(json.dumps(heard["ringing"])), from_realtime(realtime_record(db, inv["id"]))):
            assert echo.worker_echo
            result = sink.submit([echo])
            assert result.echoes == 1 and not result.enqueued
        assert client.get(dedupe_key(inv["id"], "ringing")) is None
        assert client.llen(CHANGES_KEY) == 0

        # The catch-up skips the row too (its status is the worker's).
        with psycopg.connect(database_url, autocommit=True) as conn:
            caught = catch_up(conn, sink, initial_horizon_seconds=60)
        assert inv["id"] not in {c.invitation_id for c in caught.enqueued} and caught.echoes >= 1
        assert client.get(dedupe_key(inv["id"], "ringing")) is None

        # The callee's answer is the client's: handed on as before.
        client_set_status(database_url, callee, inv["id"], "accepted")
        answered = row(db, inv["id"])
        assert (answered["status"], answered["status_by"]) == ("accepted", "client")
        accepted = [n for n in notifications(listen, inv["id"]) if n["status"] == "accepted"]
        change = from_notify(json.dumps(accepted[0]))
        assert not change.worker_echo
        assert [c.event_id for c in sink.submit([change]).enqueued] == [f"realtime:{inv['id']}:accepted"]
        assert json.loads(client.lindex(CHANGES_KEY, 0)) == change.to_wire()


def test_a_transition_of_the_worker_that_rolls_back_leaves_nothing_behind(database_url, db, make_user, broker):
    _url, client = broker
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    store = PostgresStore(database_url)
    with pytest.raises(RuntimeError):
        with store.transaction(inv["room_name"]) as uow:
            uow.conn.execute("select set_config('callflow.actor', 'worker', true)")
            uow.conn.execute("update public.call_invitations set status = 'busy' where id = %s", (inv["id"],))
            raise RuntimeError("the decision fails after its write")
    after = row(db, inv["id"])
    assert (after["status"], after["status_by"]) == ("pending", "client")
    assert not client.keys("*seen*")


def test_a_client_cannot_forge_the_marker(database_url, db, make_user):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    # Declaring itself the worker does not make a client's transition the worker's.
    with psycopg.connect(database_url) as conn:
        as_client(conn, callee)
        conn.execute("select set_config('callflow.actor', 'worker', true)")
        conn.execute("update public.call_invitations set status = 'declined' where id = %s", (inv["id"],))
    declined = row(db, inv["id"])
    assert (declined["status"], declined["status_by"]) == ("declined", "client")

    other = insert_invitation(database_url, caller, callee)
    # Writing the column itself, with or without a status: refused, as any column but status is.
    for sql in ("update public.call_invitations set status = 'cancelled', status_by = 'worker' where id = %s",
                "update public.call_invitations set status_by = 'worker' where id = %s"):
        with psycopg.connect(database_url) as conn:
            as_client(conn, caller)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="status_by"):
                conn.execute(sql, (other["id"],))
    with psycopg.connect(database_url) as conn:  # an insert that says so is the client's all the same
        as_client(conn, caller)
        inserted = conn.execute(
            """insert into public.call_invitations (room_name, caller_id, callee_id, status_by)
               values (%s, %s, %s, 'worker') returning status_by""",
            (f"{other['room_name']}-2", caller, callee)).fetchone()
    assert inserted[0] == "client"
    assert row(db, other["id"])["status_by"] == "client"


def test_only_the_workers_declared_transaction_is_the_workers(database_url, db, make_user):
    caller, callee = make_user(), make_user()
    inv = insert_invitation(database_url, caller, callee)
    # The service role without the declaration (an operator's script): not the worker's.
    db.execute("update public.call_invitations set status = 'ringing' where id = %s", (inv["id"],))
    assert row(db, inv["id"])["status_by"] == "client"
    with db.transaction():
        db.execute("select set_config('callflow.actor', 'worker', true)")
        db.execute("update public.call_invitations set status = 'missed' where id = %s", (inv["id"],))
    assert row(db, inv["id"])["status_by"] == "worker"
    # A write that leaves the status alone leaves the marker alone, and the setting is the transaction's only.
    db.execute("update public.call_invitations set metadata = '{\"x\": 1}' where id = %s", (inv["id"],))
    assert row(db, inv["id"])["status_by"] == "worker"
    assert db.execute("select current_setting('callflow.actor', true) as a").fetchone()["a"] in (None, "")
