"""The sweep's look for lost client transitions, against commits that come late.

A transition is stamped with its transaction's start (`now()`, the guard's `updated_at`) and seen
only once committed. The look walks `updated_at` from a mark (where the last look got to): a client
update committed after a look walked past its time must still be found by a later look. The real
Postgres and the real sweep, on a database of the module's own (the run's beat sweeps the shared
one); LiveKit and the queue are the fakes (nothing here asks them anything that matters).
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from orchestration.adapters.postgres_store import PostgresStore
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.sweep import UNRECORDED_AFTER, run_sweep
from tests.support.calls import as_client
from tests.support.fakes import FakeRooms, FakeScheduler, FakeThrottle


@pytest.fixture(scope="module")
def sweep_database():
    from devstack import services

    with services.scratch_database("callflow_sweep") as url:
        yield url


def _user(conn) -> str:
    uid = str(uuid.uuid4())
    conn.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"u-{uid[:8]}@example.test"))
    return uid


def test_a_cancel_committed_after_a_look_walked_past_its_time_is_recovered(sweep_database):
    admin = psycopg.connect(sweep_database, autocommit=True)
    ana, bo = _user(admin), _user(admin)
    with admin.transaction():
        as_client(admin, ana)
        invitation_id = str(admin.execute(
            "insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning id",
            (f"late-{uuid.uuid4().hex[:8]}", ana, bo)).fetchone()[0])

    store = PostgresStore(sweep_database, pool_size=2)
    ports = Ports(store, FakeRooms(), FakeScheduler(), LifecycleConfig(ring_timeout=30.0, grace=5.0))
    throttle = FakeThrottle()  # the mark carries from look to look, as Redis's does
    try:
        # The caller's client begins its update (a row lock, a slow commit: here, a pause) ...
        with psycopg.connect(sweep_database) as client:
            as_client(client, ana)
            started = client.execute("select now()").fetchone()[0]
            time.sleep(UNRECORDED_AFTER + 0.3)
            # ... while a look walks past the time its change will carry.
            run_sweep(ports, throttle, interval=1.0)
            assert throttle.mark("unrecorded") > started.timestamp(), "harness: the look did not walk past it"
            client.execute("update public.call_invitations set status = 'cancelled' where id = %s", (invitation_id,))
        updated = admin.execute("select updated_at from public.call_invitations where id = %s",
                                (invitation_id,)).fetchone()[0]
        assert updated == started, "harness: the guard stamps the transaction's start"

        run_sweep(ports, throttle, interval=1.0)

        recovered = admin.execute(
            "select source from public.call_events where event_id = %s",
            (f"transition_recovered:{invitation_id}:cancelled",)).fetchall()
        assert recovered == [("sweep",)], "the late cancel was never looked at"
    finally:
        admin.close()  # the store's pool is closed with the database
