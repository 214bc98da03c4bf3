"""LiveKit usage on real Postgres: generated histories with known answers (the pure definitions of
`orchestration.usage.figures` computed on the generator's own model), the rollup kept exact
through inserts, updates, deletes and call ends written straight in SQL, the alert thresholds
firing once each, their emails, the command and the /metrics collector.

These tests use a database of their own: the run's lifecycle tests write calls too.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import date, datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from devstack import services
from devstack.standins.resend_server import ResendStandIn
from orchestration import names
from orchestration.db import connect
from orchestration.notifications.mailers import OutboxMailer, ResendMailer
from orchestration.usage import store
from orchestration.channels.usage_alert_email import UsageAlertEmailChannel
from orchestration.delivery.loop import Deliverer
from orchestration.delivery.rate import Rate
from orchestration.notifications.mailers import resend_provider
from orchestration.shared_backoff import SharedBackoff
from orchestration.usage.check import check_usage
from orchestration.usage.figures import Session, month_bounds, month_of, participant_minutes, peak_concurrency
from orchestration.usage.metrics import UsageCollector
from orchestration.usage.plans import PLANS
from orchestration.usage.report import month_usage

UTC = timezone.utc
NOV, DEC = date(2026, 11, 1), date(2026, 12, 1)
NOW = datetime(2026, 12, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def usage_db():
    url = services.create_database("callflow_usage")
    try:
        yield url
    finally:
        from orchestration.db import close_pools

        close_pools()
        services.drop_database(url)


def _hours(start: datetime, end: datetime):
    while start < end:
        yield start
        start += timedelta(hours=1)


class History:
    """The generator's model of calls and sessions, and the same rows in the database."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.calls: dict[str, datetime | None] = {}  # id -> ended_at
        self.created: dict[str, datetime] = {}  # id -> created_at
        self.sessions: dict[str, list] = {}  # id -> [call_id, joined_at, left_at]

    def add_call(self, created_at: datetime, ended_at: datetime | None = None) -> str:
        cid = str(uuid.uuid4())
        self.conn.execute(
            """insert into public.calls (id, room_name, status, created_at, started_at, ended_at)
               values (%s, %s, %s, %s, %s, %s)""",
            (cid, f"room-{cid}", "active" if ended_at is None else "completed", created_at, created_at, ended_at))
        self.calls[cid] = ended_at
        self.created[cid] = created_at
        return cid

    def add_session(self, call_id: str, joined_at: datetime, left_at: datetime | None = None) -> str:
        pid = str(uuid.uuid4())
        self.conn.execute(
            """insert into public.call_participants (id, call_id, identity, participant_sid, joined_at, left_at)
               values (%s, %s, %s, %s, %s, %s)""", (pid, call_id, f"user-{pid[:8]}", f"PA_{pid}", joined_at, left_at))
        self.sessions[pid] = [call_id, joined_at, left_at]
        return pid

    def leave(self, pid: str, left_at: datetime) -> None:
        self.conn.execute("update public.call_participants set left_at = %s where id = %s", (left_at, pid))
        self.sessions[pid][2] = left_at

    def end_call(self, cid: str, ended_at: datetime) -> None:
        self.conn.execute("update public.calls set ended_at = %s, status = 'completed' where id = %s", (ended_at, cid))
        self.calls[cid] = ended_at

    def delete_session(self, pid: str) -> None:
        self.conn.execute("delete from public.call_participants where id = %s", (pid,))
        del self.sessions[pid]

    def delete_call(self, cid: str) -> None:
        self.conn.execute("delete from public.calls where id = %s", (cid,))  # cascades to its sessions
        del self.calls[cid]
        del self.created[cid]
        for pid in [p for p, s in self.sessions.items() if s[0] == cid]:
            del self.sessions[pid]

    def month_calls(self, month: date) -> tuple[int, int]:
        start, end = month_bounds(month)
        made = [cid for cid, at in self.created.items() if start <= at < end]
        return len(made), sum(1 for cid in made if self.calls[cid] is not None)

    def model(self) -> list[Session]:
        return [Session(joined, left if left is not None else self.calls[cid])
                for cid, joined, left in self.sessions.values()]


def assert_matches_model(conn, history: History, months=(NOV, DEC), now=NOW) -> None:
    for month in months:
        got = month_usage(conn, PLANS["build"], month, now)
        want_minutes = participant_minutes(history.model(), month, now)
        want_peak = peak_concurrency(history.model(), month, now)
        assert (got.participant_minutes, got.peak_concurrent_participants, got.peak_at) == (want_minutes, *want_peak), month
        assert store.participant_minutes_direct(conn, month, now) == want_minutes
        assert (got.calls, got.completed_calls) == history.month_calls(month) == store.calls_direct(conn, month), month
    assert_kept_summaries_stand_for_their_rows(conn)


def assert_kept_summaries_stand_for_their_rows(conn) -> None:
    """The levels, days and hours the usage figures keep are still what their rows sum to."""
    levels = conn.execute("""select l.month, l.level, (select coalesce(sum(net), 0) from public.callflow_usage_minutes
                                                        where minute < l.month) as summed
                               from public.callflow_usage_month_levels l order by l.month""").fetchall()
    assert all(r["level"] == r["summed"] for r in levels), levels
    hours = conn.execute("""select k.hour, (k.calls, k.completed_calls) as kept,
                                   (select (count(*), count(*) filter (where c.status = 'completed')) from public.calls c
                                     where c.created_at >= k.hour and c.created_at < k.hour + interval '1 hour') as counted
                              from public.callflow_usage_call_hours k""").fetchall()
    assert all(r["kept"] == r["counted"] for r in hours), hours
    for day in conn.execute("select day, net, rise, rise_at from public.callflow_usage_day_peaks").fetchall():
        minutes = conn.execute("""select net, rise, rise_at from public.callflow_usage_minutes
                                   where minute >= %s and minute < %s order by minute""",
                               (day["day"], day["day"] + timedelta(days=1))).fetchall()
        level, best = 0, (None, None)
        for m in minutes:  # the day's highest level above its start, first reached when
            if m["rise"] > 0 and (best[0] is None or level + m["rise"] > best[0]):
                best = (level + m["rise"], m["rise_at"])
            level += m["net"]
        assert (day["net"], day["rise"], day["rise_at"]) == (level, *best), day


def random_moment(rng: random.Random) -> datetime:
    # Crowded around the November/December boundary and around midnights, plus anywhere.
    choice = rng.random()
    if choice < 0.35:
        return datetime(2026, 12, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(-7200, 7200))
    if choice < 0.6:
        day = datetime(2026, 11, 20, tzinfo=UTC) + timedelta(days=rng.randrange(25))
        return day + timedelta(seconds=rng.uniform(-1800, 1800))
    return datetime(2026, 10, 31, tzinfo=UTC) + timedelta(seconds=rng.uniform(0, 50 * 86400))


def test_generated_histories_match_the_definitions_through_every_kind_of_write(usage_db):
    rng = random.Random(16)
    with connect(usage_db, autocommit=True) as conn:
        history = History(conn)
        calls = []
        for _ in range(120):
            start = min(random_moment(rng), NOW - timedelta(hours=3))
            cid = history.add_call(start)
            people = []
            for _ in range(rng.randint(1, 4)):
                joined = start + timedelta(seconds=rng.uniform(0, 120), microseconds=rng.randrange(10**6))
                people.append(history.add_session(cid, joined))
            calls.append((cid, start, people))
        assert_matches_model(conn, history)  # every session open: they count up to now

        # Sessions end one by one, some only through their call's end, some never.
        for cid, start, people in calls:
            for pid in people:
                if rng.random() < 0.6:
                    history.leave(pid, history.sessions[pid][1] + timedelta(seconds=rng.choice([0, 1, 59, 60, 61, rng.uniform(0, 9000)])))
            if rng.random() < 0.8:
                history.end_call(cid, start + timedelta(seconds=rng.uniform(60, 10000)))
        assert_matches_model(conn, history)

        # Rewrites: a session's times corrected, sessions and whole calls deleted.
        for cid, start, people in calls[:30]:
            pid = people[0]
            if pid in history.sessions:
                history.leave(pid, history.sessions[pid][1] + timedelta(minutes=rng.randint(1, 200)))
        for cid, start, people in calls[30:40]:
            history.delete_session(people[-1])
        for cid, start, people in calls[40:45]:
            history.delete_call(cid)
        assert_matches_model(conn, history)

        # A bulk statement (the triggers take whole statements), then a call ended while its
        # participants still show as connected.
        conn.execute("update public.call_participants set left_at = joined_at + interval '90 seconds' where left_at is null "
                     "and joined_at < %s", (datetime(2026, 11, 15, tzinfo=UTC),))
        for s in history.sessions.values():
            if s[2] is None and s[1] < datetime(2026, 11, 15, tzinfo=UTC):
                s[2] = s[1] + timedelta(seconds=90)
        assert_matches_model(conn, history)
        assert conn.execute("select count(*) as n from public.callflow_usage_dirty").fetchone()["n"] == 0
        # The peaks above started from the levels (and days) kept at the first look, then moved
        # or forgotten by every change: assert_matches_model held them to their sums each time.
        months = [r["month"] for r in conn.execute("select month from public.callflow_usage_month_levels order by month")]
        assert months == [datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)]
        assert conn.execute("select count(*) as n from public.callflow_usage_day_peaks").fetchone()["n"] > 0
        assert conn.execute("select count(*) as n from public.callflow_usage_call_hours").fetchone()["n"] > 0


def test_known_answers(usage_db):
    """A small history worked out by hand."""
    t = lambda d, h, m=0, s=0: datetime(2026, 12 if d < 32 else 11, d if d < 32 else d - 31, h, m, s, tzinfo=UTC)  # noqa: E731
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        # Over the month boundary: 23:59:30 Nov 30 -> 00:10:00 Dec 1 (Nov: 1 minute, Dec: 10).
        a = h.add_call(datetime(2026, 11, 30, 23, 59, tzinfo=UTC), t(1, 0, 10))
        h.add_session(a, datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC))
        # Over midnight, two overlapping calls: 3 people at once at 23:55 on Dec 5.
        b = h.add_call(t(5, 23, 0), t(6, 0, 30))
        h.add_session(b, t(5, 23, 0), t(6, 0, 30))      # 90 minutes
        h.add_session(b, t(5, 23, 50, 1), t(6, 0, 0))   # 9 min 59 s -> 10
        c = h.add_call(t(5, 23, 55))
        h.add_session(c, t(5, 23, 55), t(5, 23, 56))    # 1 minute; 3 at once at 23:55
        # Open: joined 11:00 on the 20th, NOW is 12:00: 60 minutes, with nothing else at the time.
        d = h.add_call(t(20, 11))
        h.add_session(d, t(20, 11))
        got = month_usage(conn, PLANS["ship"], DEC, NOW)
        assert got.participant_minutes == 10 + 90 + 10 + 1 + 60
        assert (got.peak_concurrent_participants, got.peak_at) == (3, t(5, 23, 55))
        assert got.calls == 3 and got.completed_calls == 1  # calls created in December
        nov = month_usage(conn, PLANS["ship"], NOV, NOW)
        assert (nov.participant_minutes, nov.peak_concurrent_participants, nov.calls) == (1, 1, 1)
        as_json = got.as_dict()
        assert as_json["peak_at"] == "2026-12-05T23:55:00Z" and as_json["estimated_cost_usd"] == 50.0
        assert as_json["bandwidth"] is None and "not measurable" in as_json["bandwidth_note"]


class _Settings:
    callflow_email_rate_per_second = 100.0


def alert_delivery(usage_db: str, redis_server, mailer, sender: str, app_url: str) -> Deliverer:
    """The usage alert channel's real deliverer, with a rate and a Resend loop of its own."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_server.url)
    mine = uuid.uuid4().hex[:8]
    channel = UsageAlertEmailChannel(mailer, resend_provider(_Settings()), sender, app_url)
    return Deliverer(channel, usage_db, client, rate=Rate(client, 100, key=f"callflow:test:rate:{mine}", margin=0.1),
                     loop=SharedBackoff(client, f"resend-test-{mine}", 1.0, 10.0, probe_seconds=17))


def test_alert_thresholds_fire_once_each_and_email_ops(usage_db, tmp_path, redis_server):
    now = datetime(2026, 12, 10, 12, tzinfo=UTC)
    build = PLANS["build"]  # 5,000 minutes, 100 concurrent
    outbox = OutboxMailer(tmp_path)
    delivery = alert_delivery(usage_db, redis_server, outbox, "C <c@example.test>", "https://app")
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        base = datetime(2026, 12, 2, tzinfo=UTC)

        def sessions(count: int, minutes: int, at: datetime) -> None:
            cid = h.add_call(at, at + timedelta(minutes=minutes))
            for _ in range(count):
                h.add_session(cid, at, at + timedelta(minutes=minutes))

        def check() -> list[tuple[str, int]]:
            with capture_logs() as logs:
                usage, to_send = check_usage(usage_db, build, "ops@example.test", now)
            warned = [(e["measure"], e["threshold_percent"]) for e in logs if e["log_level"] == "warning"]
            for alert_id in to_send:
                assert delivery.run([alert_id]).sent == 1
            return warned

        assert check() == []
        sessions(4, 1000, base)                            # 4,000 minutes: 80 % of the minutes
        assert check() == [("participant_minutes", 80)]
        assert check() == []                               # once
        sessions(80, 1, base + timedelta(days=1))          # peak 80: 80 % of the cap (4,080 minutes)
        assert check() == [("concurrent_participants", 80)]
        sessions(1, 920, base + timedelta(days=2))         # 5,000 minutes
        assert check() == [("participant_minutes", 100)]
        sessions(100, 1, base + timedelta(days=3))         # peak 100 (and 5,100 minutes)
        assert check() == [("concurrent_participants", 100)]
        assert check() == []

        rows = conn.execute("select measure, threshold_percent, status, value, limit_value from public.callflow_usage_alerts "
                            "order by created_at").fetchall()
        assert [(r["measure"], r["threshold_percent"], r["status"]) for r in rows] == [
            ("participant_minutes", 80, "sent"), ("concurrent_participants", 80, "sent"),
            ("participant_minutes", 100, "sent"), ("concurrent_participants", 100, "sent")]
        emails = sorted(tmp_path.glob("*.eml"))
        assert len(emails) == 4
        assert any("peak concurrent participants at 100% of the build plan" in p.read_text() for p in emails)
        snapshot = store.read_snapshot(conn, DEC)
        assert (snapshot["participant_minutes"], snapshot["peak_concurrent_participants"]) == (5100, 100)


def test_without_an_ops_address_alerts_are_logged_and_kept_skipped(usage_db):
    now = datetime(2026, 12, 10, 12, tzinfo=UTC)
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        cid = h.add_call(datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 3, 1, tzinfo=UTC))
        for _ in range(85):
            h.add_session(cid, datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 3, 0, 1, tzinfo=UTC))
        with capture_logs() as logs:
            _, to_send = check_usage(usage_db, PLANS["build"], None, now)
            check_usage(usage_db, PLANS["build"], None, now)
        assert to_send == []
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "LiveKit usage: peak concurrent participants at 80% of the build plan's concurrency cap"]
        row = conn.execute("select status, last_error from public.callflow_usage_alerts").fetchone()
        assert row["status"] == "skipped" and "CALLFLOW_OPS_EMAIL" in row["last_error"]
        # Self-hosted has no limits: nothing to alert on.
        assert check_usage(usage_db, PLANS["self-hosted"], "ops@example.test", now)[1] == []


def test_alert_email_through_resend_once(usage_db, redis_server):
    api = ResendStandIn().start()
    try:
        with connect(usage_db, autocommit=True) as conn:
            alert_id = conn.execute(
                """insert into public.callflow_usage_alerts (month, measure, threshold_percent, plan, value, limit_value,
                                                             recipient_email)
                   values ('2026-12-01', 'participant_minutes', 80, 'ship', 120000, 150000, 'ops@example.test')
                   returning id""").fetchone()["id"]
        mailer = ResendMailer("re_test_standin_key_0001", api.url)
        delivery = alert_delivery(usage_db, redis_server, mailer, "Calls <c@example.test>", "https://app.example.test")
        assert delivery.run([str(alert_id)]).sent == 1
        again = delivery.run([str(alert_id)])  # sent already: nothing to do
        assert (again.sent, again.failed, again.skipped, again.come_back_in) == (0, 0, 0, None)
        [email] = api.emails_to("ops@example.test")
        assert email.idempotency_key == f"callflow-usage-alert-{alert_id}"
        assert "120,000 of 150,000" in email.body["text"]
    finally:
        api.stop()


def test_command_and_metrics(usage_db, monkeypatch):
    from workers import cli
    from config.settings import get_settings

    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        now = datetime.now(UTC)
        start = now - timedelta(minutes=30)
        if start < month_bounds(now.date().replace(day=1))[0]:
            start = month_bounds(now.date().replace(day=1))[0]
        cid = h.add_call(start)
        h.add_session(cid, start)
        h.add_session(cid, start)
    monkeypatch.setenv("DATABASE_URL", usage_db)
    monkeypatch.setenv("CALLFLOW_LIVEKIT_PLAN", "ship")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main, ["usage", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        for key in ("month", "plan", "participant_minutes", "peak_concurrent_participants", "peak_at", "calls",
                    "included_minutes", "concurrency_cap", "estimated_cost_usd"):
            assert key in out
        assert out["plan"] == "ship" and out["peak_concurrent_participants"] == 2 and out["calls"] == 1
        assert out["included_minutes"] == 150_000 and out["concurrency_cap"] == 1_000
        text = CliRunner().invoke(cli.main, ["usage", "--month", "2026-11"])
        assert text.exit_code == 0 and "LiveKit usage for 2026-11" in text.output and "bandwidth" in text.output
        bad = CliRunner().invoke(cli.main, ["usage", "--month", "november"])
        assert bad.exit_code == 2 and "YYYY-MM" in bad.output
    finally:
        get_settings.cache_clear()

    registry = CollectorRegistry()
    registry.register(UsageCollector(usage_db, PLANS["ship"]))
    assert registry.get_sample_value("callflow_usage_concurrent_participants") == 2
    assert registry.get_sample_value("callflow_usage_participant_minutes", {"plan": "ship"}) == out["participant_minutes"]
    assert registry.get_sample_value("callflow_usage_peak_concurrent_participants", {"plan": "ship"}) == 2
    assert registry.get_sample_value("callflow_usage_plan_concurrency_cap", {"plan": "ship"}) == 1000
    assert registry.get_sample_value("callflow_usage_plan_included_minutes", {"plan": "ship"}) == 150_000
    # A database that does not answer leaves the usage gauges out rather than failing the scrape.
    down = CollectorRegistry()
    down.register(UsageCollector("postgresql://postgres:postgres@127.0.0.1:1/none", PLANS["ship"]))
    assert down.get_sample_value("callflow_usage_concurrent_participants") is None
    assert down.get_sample_value("callflow_usage_plan_concurrency_cap", {"plan": "ship"}) == 1000


def test_the_beat_task_on_a_real_worker_alerts_and_emails(usage_db, redis_server, log_dir, tmp_path):
    """`callflow.check_usage` as beat sends it, on a worker of its own (own database and Redis db)."""
    from celery import Celery

    from tests.conftest import subprocess_env

    now = datetime.now(UTC)
    start = max(now - timedelta(minutes=5), month_bounds(now.date().replace(day=1))[0])
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        cid = h.add_call(start)
        for _ in range(85):  # 85 connected now: 85 % of the Build plan's 100
            h.add_session(cid, start)
    broker = redis_server.url.rsplit("/", 1)[0] + "/11"
    env = subprocess_env(DATABASE_URL=usage_db, REDIS_URL=broker, CALLFLOW_OPS_EMAIL="ops@example.test",
                         CALLFLOW_LIVEKIT_PLAN="build", CALLFLOW_OUTBOX_DIR=str(tmp_path))
    worker = services.celery_worker(env, log_dir, name=f"usage-{uuid.uuid4().hex[:4]}")
    try:
        services.wait_for(lambda: "ready." in worker.log() or not worker.alive(), timeout=60, what="usage worker")
        producer = Celery("usage-test", broker=broker)
        producer.send_task(names.CHECK_USAGE, queue="sweeps")
        services.wait_for(lambda: list(tmp_path.glob("*.eml")), timeout=30, what="the alert email")
        producer.send_task(names.CHECK_USAGE, queue="sweeps")
        with connect(usage_db, autocommit=True) as conn:
            services.wait_for(lambda: conn.execute("select computed_at from public.callflow_usage_months").fetchone(),
                              timeout=10, what="the snapshot")
            rows = conn.execute("select measure, threshold_percent, status from public.callflow_usage_alerts").fetchall()
        assert [(r["measure"], r["threshold_percent"], r["status"]) for r in rows] == [("concurrent_participants", 80, "sent")]
        [email] = tmp_path.glob("*.eml")
        assert "To: ops@example.test" in email.read_text()
        assert "LiveKit usage" in worker.log() and "85" in worker.log()
    finally:
        worker.stop()


def test_rollup_stays_exact_with_concurrent_writers_and_refreshes(usage_db):
    """Writers in their own transactions (a call and its sessions, leaves, the call's end, in
    several statements each) while refreshes and the month's counts of calls run: the final rollup
    and counts equal the definitions on the rows as they ended up."""
    import threading

    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(usage_db) as conn:
                for _ in range(40):
                    with conn.transaction():
                        start = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(-3600, 3600))
                        cid = conn.execute("insert into public.calls (room_name, status, created_at) values (%s, 'active', %s) "
                                           "returning id", (f"c-{uuid.uuid4()}", start)).fetchone()["id"]
                        pids = [conn.execute("insert into public.call_participants (call_id, identity, participant_sid, joined_at) "
                                             "values (%s, 'u', %s, %s) returning id",
                                             (cid, f"PA_{uuid.uuid4()}", start + timedelta(seconds=rng.uniform(0, 30)))
                                             ).fetchone()["id"] for _ in range(rng.randint(1, 3))]
                    with conn.transaction():
                        for pid in pids[1:]:
                            conn.execute("update public.call_participants set left_at = joined_at + %s where id = %s",
                                         (timedelta(seconds=rng.uniform(0, 600)), pid))
                        if rng.random() < 0.7:
                            conn.execute("update public.calls set ended_at = created_at + interval '15 minutes', "
                                         "status = 'completed' where id = %s", (cid,))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    rng_month = random.Random(7)

    def refresher() -> None:
        try:
            with connect(usage_db) as conn:
                while not stop.is_set():
                    store.refresh(conn)
                    store.calls(conn, rng_month.choice((NOV, DEC)))  # the hours kept and followed meanwhile
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    refreshers = [threading.Thread(target=refresher) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in refreshers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in refreshers:
        t.join()
    assert not errors, errors
    with connect(usage_db, autocommit=True) as conn:
        rows = conn.execute("select p.joined_at, coalesce(p.left_at, c.ended_at) as ended_at "
                            "from public.call_participants p join public.calls c on c.id = p.call_id").fetchall()
        sessions = [Session(r["joined_at"], r["ended_at"]) for r in rows]
        for month in (NOV, DEC):
            got = month_usage(conn, PLANS["build"], month, NOW)
            assert (got.participant_minutes, got.peak_concurrent_participants, got.peak_at) == (
                participant_minutes(sessions, month, NOW), *peak_concurrency(sessions, month, NOW))
            assert (got.calls, got.completed_calls) == store.calls_direct(conn, month)
        assert_kept_summaries_stand_for_their_rows(conn)


def test_truncating_the_history_empties_the_rollup(usage_db):
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        cid = h.add_call(datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 3, 1, tzinfo=UTC))
        h.add_session(cid, datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 3, 0, 30, tzinfo=UTC))
        h.add_session(cid, datetime(2026, 12, 3, 0, 10, tzinfo=UTC))  # ends with its call
        got = month_usage(conn, PLANS["build"], DEC, NOW)
        assert (got.participant_minutes, got.peak_concurrent_participants) == (80, 2)
        conn.execute("truncate public.calls cascade")
        got = month_usage(conn, PLANS["build"], DEC, NOW)
        assert (got.participant_minutes, got.peak_concurrent_participants, got.peak_at) == (0, 0, None)


def test_the_month_count_of_calls_keeps_hours_and_follows_every_write(usage_db):
    now = datetime.now(UTC)
    this_month = month_of(now)
    month = month_of(datetime(this_month.year, this_month.month, 1, tzinfo=UTC) - timedelta(days=1))
    noon = datetime(month.year, month.month, 15, 12, tzinfo=UTC)  # an hour of last month, whatever the clock
    with connect(usage_db, autocommit=True) as conn:
        h = History(conn)
        live = h.add_call(noon)
        h.add_call(noon, noon + timedelta(minutes=5))

        def count(of: date = month) -> tuple[int, int]:
            got = store.calls(conn, of)
            assert got == h.month_calls(of) == store.calls_direct(conn, of)
            assert_kept_summaries_stand_for_their_rows(conn)
            return got

        def kept() -> list[datetime]:
            return [r["hour"] for r in conn.execute("select hour from public.callflow_usage_call_hours where calls > 0")]

        def marks() -> int:
            return conn.execute("select count(*) as n from public.callflow_usage_call_marks").fetchone()["n"]

        # Every hour of the month is kept at the first count, a live call's as well.
        assert count() == (2, 1) and kept() == [noon]
        assert conn.execute("select count(*) as n from public.callflow_usage_call_hours where hour >= %s and hour < %s",
                            month_bounds(month)).fetchone()["n"] == len(list(_hours(*month_bounds(month))))
        # Each write of a kept hour leaves a mark; the next count adds it.
        h.end_call(live, noon + timedelta(minutes=9))
        assert marks() == 1 and count() == (2, 2) and marks() == 0
        backdated = h.add_call(noon + timedelta(seconds=1), noon + timedelta(minutes=1))
        assert count() == (3, 3)
        conn.execute("update public.calls set status = 'failed' where id = %s", (backdated,))
        h.calls[backdated] = None  # (not completed any more)
        assert count() == (3, 2)
        conn.execute("update public.calls set created_at = created_at - interval '1 hour' where id = %s", (backdated,))
        h.created[backdated] -= timedelta(hours=1)
        assert count() == (3, 2) and sorted(kept()) == [noon - timedelta(hours=1), noon]
        # Updates that move neither the hour nor the completion leave no mark.
        conn.execute("update public.calls set room_name = room_name || '-renamed' where id = %s", (live,))
        assert marks() == 0
        h.delete_call(backdated)
        assert count() == (2, 2) and kept() == [noon]
        # Marks of a month not asked for yet are dropped: its hours are counted from their rows.
        other = month_of(datetime(month.year, month.month, 1, tzinfo=UTC) - timedelta(days=1))
        h.add_call(datetime(other.year, other.month, 2, 8, tzinfo=UTC))
        assert marks() == 1 and count() == (2, 2) and marks() == 0
        assert count(other) == (1, 0)
        # Taken a batch at a time (a statement takes at most its batch), the count the same.
        for _ in range(5):
            h.add_call(noon + timedelta(minutes=30))
        assert marks() == 5
        assert conn.execute("select public.callflow_usage_fold_call_marks(2) as taken").fetchone()["taken"] == 2
        assert marks() == 3 and count() == (7, 2) and marks() == 0
        # The hour in progress is kept too, and followed from there.
        h.add_call(now)
        assert count(this_month) == (1, 0)
        assert now.replace(minute=0, second=0, microsecond=0) in kept()
        h.add_call(now)
        assert count(this_month) == (2, 0)
        # A call dated after the hour in progress (no hour kept for it yet) is counted from its row.
        ahead = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
        if month_of(ahead) == this_month:
            h.add_call(ahead)
            assert count(this_month) == (3, 0)
        with pytest.raises(Exception, match="whole UTC hours"):
            conn.execute("select * from public.callflow_usage_calls(%s, %s)", (noon + timedelta(minutes=1), noon + timedelta(hours=2)))
        conn.execute("truncate public.calls cascade")
        assert conn.execute("select count(*) as n from public.callflow_usage_call_hours").fetchone()["n"] == 0
        assert marks() == 0
