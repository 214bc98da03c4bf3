"""The listener end to end: real Postgres, real Redis, the real `realtime` client against the
Realtime stand-in (devstack/standins/realtime_server.py), or the Postgres LISTEN source.

What the listener enqueued is read back from its Redis database's `events` list (no worker
consumes that database), so "each transition once" is counted exactly; `test_inserts_become_ringing`
runs the real worker and checks the lifecycle's result in the database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import redis

from devstack import services
from devstack.standins.realtime_server import MALFORMED_KINDS, RealtimeStandIn
from tests.conftest import subprocess_env, wait_for
from tests.integration.test_listener_support import (
    DEV_JWT_SECRET, LISTENER_REDIS_DB, ListenerProcess, event_counts, insert_invitations, queued, service_role_key,
    set_status,
)

KEY = service_role_key()
OUTAGE_SECONDS = {"realtime": float(os.environ.get("CALLFLOW_TEST_OUTAGE_SECONDS", "60")), "postgres": 15.0}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def database_url():
    """A database of this module's own: the run's worker and beat sweep the shared one (they ring
    stale `pending` invitations), which would move the rows these tests expect to find pending."""
    url = services.create_database(invite_rate_per_minute=100_000)  # bursts of one caller's inserts
    yield url
    services.drop_database(url)


@pytest.fixture(scope="module")
def listener_role(database_url):
    """A least-privilege login for the listener (LISTEN + reading invitations), which tests can lock out."""
    role = f"cf_listener_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"create role {role} login bypassrls password 'listener'")
        conn.execute(f"grant select on public.call_invitations to {role}")
    base = database_url.split("://", 1)[1].split("@", 1)[1]
    yield role, f"postgresql://{role}:listener@{base}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{role}'")
        conn.execute(f"drop owned by {role}")
        conn.execute(f"drop role if exists {role}")


@pytest.fixture
def ingest_redis(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/{LISTENER_REDIS_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.close()


@pytest.fixture
def users(make_user):
    return make_user("Caller"), make_user("Callee")


@pytest.fixture
def standin(database_url):
    server = RealtimeStandIn(database_url, apikey=KEY, jwt_secret=DEV_JWT_SECRET).start()
    yield server
    server.stop()


@pytest.fixture(params=["realtime", "postgres"])
def source(request):
    return request.param


class Rig:
    """The listeners of one test, their Redis, and the means to break their source."""

    def __init__(self, source, log_dir, ingest_redis, listener_role, database_url, standin):
        self.source = source
        self.log_dir = log_dir
        self.redis_url, self.redis = ingest_redis
        self.role, self.role_url = listener_role
        self.database_url = database_url
        self.standin = standin
        self.procs: list[ListenerProcess] = []

    def start(self, args: list[str] | None = None, redis_url: str | None = None, wait: bool = True) -> ListenerProcess:
        proc = ListenerProcess(self.log_dir, redis_url or self.redis_url, self.source,
                               supabase_url=self.standin.url if self.standin else None, key=KEY,
                               database_url=self.role_url, args=args).start()
        self.procs.append(proc)
        if wait:
            proc.wait_live(self.redis if redis_url is None else redis.Redis.from_url(redis_url, decode_responses=True))
        return proc

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql)

    def drop_sockets(self) -> None:
        if self.source == "realtime":
            self.standin.drop_connections()
        else:
            self.admin("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'callflow-listener'")

    def go_down(self) -> None:
        if self.source == "realtime":
            self.standin.go_down()
        else:
            self.admin(f"alter role {self.role} nologin")
            self.admin(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{self.role}'")

    def come_up(self) -> None:
        if self.source == "realtime":
            self.standin.come_up()
        else:
            self.admin(f"alter role {self.role} login")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def rig(request, source, log_dir, ingest_redis, listener_role, database_url):
    standin = request.getfixturevalue("standin") if source == "realtime" else None
    rig = Rig(source, log_dir, ingest_redis, listener_role, database_url, standin)
    yield rig
    if source == "postgres":
        rig.admin(f"alter role {listener_role[0]} login")
    rig.stop()


def wait_events(client, expected: dict[str, int] | set[str], ids: set[str], timeout: float = 30) -> None:
    want = expected if isinstance(expected, dict) else {e: 1 for e in expected}

    def done():
        counts = event_counts(client, ids)
        return all(counts.get(e, 0) >= n for e, n in want.items())

    try:
        wait_for(done, timeout=timeout, interval=0.1, what="events enqueued")
    except TimeoutError:
        counts = event_counts(client, ids)
        missing = [e for e, n in want.items() if counts.get(e, 0) < n]
        raise AssertionError(f"{len(missing)} of {len(want)} events never enqueued, e.g. {missing[:3]}") from None


def pending_events(ids) -> set[str]:
    return {f"realtime:{i}:pending" for i in ids}


# ---- tests ---------------------------------------------------------------------------------------
def test_inserts_and_client_updates_are_enqueued_once(rig, users):
    caller, callee = users
    proc = rig.start()
    ids = insert_invitations(rig.database_url, caller, callee, 3)
    set_status(rig.database_url, callee, ids[0], "accepted")
    set_status(rig.database_url, callee, ids[1], "declined")
    set_status(rig.database_url, caller, ids[2], "cancelled")
    expected = pending_events(ids) | {f"realtime:{ids[0]}:accepted", f"realtime:{ids[1]}:declined",
                                      f"realtime:{ids[2]}:cancelled"}
    wait_events(rig.redis, expected, set(ids))
    time.sleep(0.5)
    counts = event_counts(rig.redis, set(ids))
    assert counts == {e: 1 for e in expected}
    changes = {c["event_id"]: c for c in queued(rig.redis) if c["invitation_id"] in ids}
    accepted = changes[f"realtime:{ids[0]}:accepted"]
    assert accepted["type"] == "invitation_accepted" and accepted["status"] == "accepted"
    assert accepted["source"] == rig.source, "delivered by the live source, not by catch-up"
    assert accepted["room_name"].startswith("room-") and accepted["occurred_at"]
    beat = proc.heartbeat(rig.redis)
    assert beat["connected"] and beat["state"] == "live" and beat["source"] == rig.source
    assert beat["received"] >= 6 and beat["lag_seconds"] is not None and beat["lag_seconds"] < 5


def test_the_workers_own_transitions_are_dropped_where_they_arrive(rig, users):
    """The lifecycle worker rings an invitation (in-process: its real store, and its real scheduler
    on the listener's Redis): the listener drops the echo of `ringing` by the row's `status_by`
    (counted as an echo, neither marked nor listed), and the worker wrote no mark of the
    listener's; the callee's answer is handed on as before."""
    from celery import Celery

    from orchestration.adapters.celery_scheduler import CeleryScheduler
    from orchestration.adapters.postgres_store import PostgresStore
    from orchestration.ingest.mapping import Change, dedupe_key
    from orchestration.lifecycle.context import LifecycleConfig, Ports
    from orchestration.lifecycle.invitation_changed import handle_invitation_changed
    from tests.support.fakes import FakeRooms

    caller, callee = users
    proc = rig.start()
    (inv,) = insert_invitations(rig.database_url, caller, callee, 1)
    wait_events(rig.redis, pending_events([inv]), {inv})
    rooms = FakeRooms()
    rooms.new_sid = lambda prefix: f"{prefix}_{uuid.uuid4().hex}"  # unique in this module's database
    ports = Ports(store=PostgresStore(rig.database_url), rooms=rooms,
                  scheduler=CeleryScheduler(Celery("worker-echoes", broker=rig.redis_url)),
                  config=LifecycleConfig(ring_timeout=30, grace=5))
    assert handle_invitation_changed(Change(inv, "pending", rig.source, None, None, {}), ports).result == "ringing"
    assert rig.redis.get(dedupe_key(inv, "ringing")) is None, "the worker wrote no mark of the listener's"
    wait_for(lambda: proc.heartbeat(rig.redis)["echoes"] >= 1, timeout=10, what="the echo of ringing dropped")
    set_status(rig.database_url, callee, inv, "accepted")
    wait_events(rig.redis, {f"realtime:{inv}:accepted"}, {inv})
    time.sleep(0.3)
    assert event_counts(rig.redis, {inv}) == {f"realtime:{inv}:pending": 1, f"realtime:{inv}:accepted": 1}
    assert rig.redis.get(dedupe_key(inv, "ringing")) is None
    assert proc.heartbeat(rig.redis)["echoes"] == 1


def test_socket_dropped_during_a_burst_of_500_inserts_loses_none(rig, users):
    caller, callee = users
    proc = rig.start()

    def breaker(i: int) -> None:
        if i in (150, 350):
            rig.drop_sockets()

    ids = insert_invitations(rig.database_url, caller, callee, 500, on_each=breaker)
    wait_events(rig.redis, pending_events(ids), set(ids), timeout=60)
    time.sleep(1)
    counts = event_counts(rig.redis, set(ids))
    assert len(counts) == 500 and set(counts.values()) == {1}, "every insert enqueued exactly once"
    beat = proc.wait_live(rig.redis, after_reconnects=1)
    assert beat["reconnects"] >= 1 and beat["catch_up_enqueued"] >= 0


def test_server_down_for_a_minute_loses_none(rig, users):
    """The source is unreachable for OUTAGE_SECONDS (60 s for Realtime) while clients keep inserting."""
    caller, callee = users
    outage = OUTAGE_SECONDS[rig.source]
    proc = rig.start()
    before = insert_invitations(rig.database_url, caller, callee, 2)
    wait_events(rig.redis, pending_events(before), set(before))
    rig.go_down()
    during: list[str] = []
    deadline = time.monotonic() + outage
    while time.monotonic() < deadline:
        during += insert_invitations(rig.database_url, caller, callee, 1)
        if len(during) == 3:
            set_status(rig.database_url, callee, during[0], "declined")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    down_beat = proc.heartbeat(rig.redis)
    assert down_beat["state"] in ("backoff", "connecting") and not down_beat["connected"]
    assert down_beat["retry_in"] is not None and down_beat["retry_in"] <= 2.0, "backoff is capped"
    assert not any(c["invitation_id"] in during for c in queued(rig.redis)), "nothing could be read while down"
    rig.come_up()
    # the catch-up reads rows as they are now: the invitation declined while down is one `declined`
    expected = pending_events(during[1:]) | {f"realtime:{during[0]}:declined"}
    wait_events(rig.redis, expected, set(during), timeout=30)
    proc.wait_live(rig.redis, after_reconnects=2)
    wait_for(lambda: proc.heartbeat(rig.redis)["catch_up_enqueued"] >= len(during), timeout=5,
             what="the resubscribe's catch-up enqueued what was inserted while down")
    after = insert_invitations(rig.database_url, caller, callee, 1)
    wait_events(rig.redis, pending_events(after), set(after))
    assert next(c for c in queued(rig.redis) if c["invitation_id"] == after[0])["source"] == rig.source
    assert set(event_counts(rig.redis, set(before + during + after)).values()) == {1}
    # each state change logged once: a minute of failed reconnects is not a minute of log lines
    assert proc.log().count("state=backoff") <= 3, proc.log()[-2000:]


def test_two_listeners_at_once_enqueue_each_transition_once(rig, users):
    caller, callee = users
    first, second = rig.start(), rig.start(args=["--catch-up-interval", "0.5"])
    ids = insert_invitations(rig.database_url, caller, callee, 30)
    for n, invitation in enumerate(ids):
        set_status(rig.database_url, callee, invitation, "accepted" if n % 2 else "declined")
    expected = pending_events(ids) | {f"realtime:{i}:{'accepted' if n % 2 else 'declined'}" for n, i in enumerate(ids)}
    wait_events(rig.redis, expected, set(ids))
    time.sleep(1.5)  # let the second listener's periodic catch-up run over the same rows too
    counts = event_counts(rig.redis, set(ids))
    assert counts == {e: 1 for e in expected}
    a, b = first.heartbeat(rig.redis), second.heartbeat(rig.redis)
    assert a["received"] >= 60 and b["received"] >= 60, "both listeners saw every change"
    assert a["duplicates"] + b["duplicates"] >= 60, "and half of them were recognised as duplicates"


def test_malformed_frames_are_logged_and_skipped(rig, users):
    caller, callee = users
    proc = rig.start()
    if rig.source == "realtime":
        for kind in MALFORMED_KINDS:
            assert rig.standin.send_malformed(kind) == 1
        expected_malformed = len(MALFORMED_KINDS)
    else:
        payloads = ["garbage", '{"op": "INSERT", "id": "not-a-uuid", "status": "pending"}',
                    f'{{"op": "INSERT", "id": "{uuid.uuid4()}", "status": "exploded"}}', "[]"]
        for payload in payloads:
            rig.admin(f"select pg_notify('callflow_invitations', '{payload}')")
        expected_malformed = len(payloads)
    ids = insert_invitations(rig.database_url, caller, callee, 2)
    wait_events(rig.redis, pending_events(ids), set(ids))
    wait_for(lambda: proc.heartbeat(rig.redis)["malformed"] >= expected_malformed, timeout=5, what="malformed counted")
    beat = proc.heartbeat(rig.redis)
    assert beat["state"] == "live" and beat["reconnects"] == 0, "a bad frame never costs the subscription"
    assert beat["malformed"] == expected_malformed
    assert proc.log().count("malformed change skipped") == expected_malformed
    assert all(c["source"] == rig.source for c in queued(rig.redis) if c["invitation_id"] in ids)


@pytest.mark.parametrize("source", ["realtime"], indirect=True)
@pytest.mark.parametrize("misbehaviour", ["close_channel", "error_channel", "delayed_system_message", "silence"])
def test_realtime_misbehaviour_is_survived(rig, users, misbehaviour):
    """phx_close (final for the client, not for the listener), phx_error, a late 'Subscribed to
    PostgreSQL' (changes before it are not delivered), a server that stops answering."""
    caller, callee = users
    standin = rig.standin
    proc = rig.start(args=["--backoff-base", "1"])  # the first reconnect waits 0.5-1 s: a gap to insert in
    connections = standin.stats["connections"]
    if misbehaviour == "close_channel":
        standin.close_channels()
    elif misbehaviour == "error_channel":
        standin.error_channels()
    elif misbehaviour == "delayed_system_message":
        standin.system_delay = 2.0
        standin.drop_connections()
        wait_for(lambda: standin.stats["joins"] >= 2, timeout=10, what="rejoin")
    else:
        standin.silence()
    gap = insert_invitations(rig.database_url, caller, callee, 5)
    if misbehaviour == "delayed_system_message":
        assert proc.heartbeat(rig.redis)["state"] in ("subscribing", "connecting", "backoff")
    wait_events(rig.redis, pending_events(gap), set(gap), timeout=20)
    proc.wait_live(rig.redis, after_reconnects=1)
    assert standin.stats["connections"] > connections
    wait_for(lambda: proc.heartbeat(rig.redis)["catch_up_enqueued"] >= 5, timeout=5, what="catch-up counted")
    assert {c["source"] for c in queued(rig.redis) if c["invitation_id"] in gap} == {"postgres"}, \
        "rows committed in the gap came from the catch-up after the resubscribe"
    after = insert_invitations(rig.database_url, caller, callee, 1)
    wait_events(rig.redis, pending_events(after), set(after))
    assert next(c for c in queued(rig.redis) if c["invitation_id"] == after[0])["source"] == "realtime"


@pytest.mark.parametrize("source", ["realtime"], indirect=True)
def test_access_token_refreshed_before_it_expires(rig, users):
    caller, callee = users
    proc = rig.start(args=["--token-ttl", "3"])
    time.sleep(7)
    assert rig.standin.stats["access_tokens"] >= 2, "fresh tokens pushed to the channel"
    assert rig.standin.stats["expired_kicks"] == 0, "the server never had to close the channel for an expired token"
    beat = proc.heartbeat(rig.redis)
    assert beat["state"] == "live" and beat["reconnects"] == 0
    ids = insert_invitations(rig.database_url, caller, callee, 1)
    wait_events(rig.redis, pending_events(ids), set(ids))


def test_configuration_errors_exit_2_with_one_line(log_dir):
    env = subprocess_env(CALLFLOW_LISTENER_SOURCE="realtime")
    env.pop("SUPABASE_URL", None)
    result = subprocess.run([sys.executable, "-m", "workers.listener"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "SUPABASE_URL" in result.stderr
    import jwt

    expired = jwt.encode({"role": "service_role", "exp": int(time.time()) - 60}, "some-other-secret-some-other-secret",
                         algorithm="HS256")
    env.update(SUPABASE_URL="http://127.0.0.1:9", SUPABASE_SERVICE_ROLE_KEY=expired)
    result = subprocess.run([sys.executable, "-m", "workers.listener"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "SUPABASE_SERVICE_ROLE_KEY has expired" in result.stderr
    assert expired not in result.stderr + result.stdout


@pytest.mark.parametrize("source", ["postgres"], indirect=True)
def test_heartbeat_in_doctor_and_metrics(rig, users):
    from prometheus_client import CollectorRegistry, generate_latest

    from config.settings import build_settings
    from orchestration.ingest import ListenerCollector, listener_check, listener_heartbeat

    settings = build_settings(redis_url=rig.redis_url)
    name, ok, detail = listener_check(settings)
    assert (name, ok) == ("listener", False) and "no listener heartbeat" in detail
    proc = rig.start()
    name, ok, detail = listener_check(settings)
    assert ok and "1/1 connected" in detail and "postgres live" in detail
    assert [b["id"] for b in listener_heartbeat(rig.redis)] == [proc.listener_id]
    registry = CollectorRegistry()
    registry.register(ListenerCollector(rig.redis_url))
    text = generate_latest(registry).decode()
    assert f'callflow_listener_connected{{listener="{proc.listener_id}",source="postgres",state="live"}} 1.0' in text
    assert "callflow_listener_count 1.0" in text
    proc.stop()
    assert listener_heartbeat(rig.redis) == [], "a stopped listener removes its heartbeat"
    # a doctor run in a subprocess prints the line too
    env = subprocess_env(REDIS_URL=rig.redis_url)
    out = subprocess.run([str(services.VENV_BIN / "callflow"), "doctor"], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert any(line.startswith("FAIL listener") for line in out.splitlines()), out


def test_inserts_become_ringing(rig, users, livekit, redis_server, database_url, log_dir):
    """With a real worker (on this module's database) consuming the listener's queue: inserts become
    ringing invitations, and an accept and a decline drive the lifecycle."""
    from tests.conftest import _wait_worker_ready

    caller, callee = users
    broker = f"redis://127.0.0.1:{redis_server.port}/7"
    redis.Redis.from_url(broker).flushdb()
    worker = services.celery_worker(subprocess_env(DATABASE_URL=database_url, REDIS_URL=broker), log_dir,
                                    name="listener-e2e")
    _wait_worker_ready(worker)
    request_cleanup = worker.stop
    rig.start(redis_url=broker, args=["--initial-horizon", "1"])
    try:
        _inserts_become_ringing(database_url, caller, callee)
    finally:
        request_cleanup()


def _inserts_become_ringing(database_url, caller, callee):
    ids = insert_invitations(database_url, caller, callee, 3)

    def statuses():
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("select id::text, status from public.call_invitations where id = any(%s::uuid[])",
                                (ids,)).fetchall()
        return dict(rows)

    wait_for(lambda: set(statuses().values()) == {"ringing"}, timeout=30, what="invitations ringing")
    set_status(database_url, callee, ids[0], "accepted")
    set_status(database_url, callee, ids[1], "declined")
    with psycopg.connect(database_url) as conn:
        def recorded():
            rows = conn.execute("select event_id from public.call_events where invitation_id = any(%s::uuid[])",
                                (ids,)).fetchall()
            conn.commit()
            return {r[0] for r in rows}

        wait_for(lambda: {f"realtime:{ids[0]}:accepted", f"realtime:{ids[1]}:declined"} <= recorded(), timeout=30,
                 what="accept and decline recorded by the lifecycle")


@pytest.mark.parametrize("source", ["postgres"], indirect=True)
def test_metrics_endpoint_of_web_reports_the_listener(rig, web, redis_server):
    import httpx

    proc = rig.start(redis_url=redis_server.url, args=["--initial-horizon", "1"])
    text = httpx.get(f"{web}/metrics", timeout=10).text
    assert f'callflow_listener_connected{{listener="{proc.listener_id}",source="postgres",state="live"}} 1.0' in text
    assert f'callflow_listener_heartbeat_age_seconds{{listener="{proc.listener_id}",source="postgres"}}' in text
