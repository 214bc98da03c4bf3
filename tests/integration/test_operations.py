"""Operations (issue 12): every Procfile process starts from a clean checkout, two beats hand over,
local users for the README's call, failed tasks kept and re-run, queue figures from Redis,
and email send times booked instead of slept for."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest

from devstack import services
from devstack.services import ROOT, VENV_BIN, Process, free_port, wait_for
from orchestration import names
from orchestration.delivery.rate import Rate
from orchestration.ops.queues import OperationsCollector
from tests.conftest import subprocess_env

CALLFLOW = str(VENV_BIN / "callflow")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([CALLFLOW, *args], env=subprocess_env(**env), capture_output=True, text=True, timeout=60)


def redis_db(redis_server, n: int) -> str:
    """A Redis database of its own, so the run's worker and beat (database 0) never see ours."""
    url = redis_server.url.rpartition("/")[0] + f"/{n}"
    redis.Redis.from_url(url).flushdb()
    return url


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name.strip(): cmd.strip() for name, _, cmd in (line.partition(":") for line in lines if line.strip())}


# ---- every Procfile process from a clean checkout ---------------------------------------------


class InCheckout(Process):
    def __init__(self, name, argv, env, log_dir, cwd: Path) -> None:
        super().__init__(name, argv, env, log_dir)
        self.cwd = cwd

    def start(self) -> "InCheckout":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self


def clean_checkout(into: Path) -> Path:
    """What a fresh `git clone` gives once this working tree is committed: the tracked and new
    (not ignored) files, and nothing the local set-up made (.local, .venv, caches)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    assert not (into / ".local").exists()
    return into


def test_every_procfile_process_runs_10_seconds_from_a_clean_checkout(log_dir, redis_server, database_url):
    checkout = clean_checkout(Path(tempfile.mkdtemp(prefix="callflow-clone-")))
    port, flower_port = free_port(), free_port()
    env = {k: v for k, v in subprocess_env().items() if k not in ("CALLFLOW_OUTBOX_DIR", "WEB_HOST")}
    env.update(REDIS_URL=redis_db(redis_server, 11), DATABASE_URL=database_url, PORT=str(port),
               FLOWER_PORT=str(flower_port), PYTHONPATH=str(checkout), PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    processes = {}
    try:
        for name, command in procfile().items():
            # As honcho or a platform runs a Procfile line: through the shell, in the checkout.
            processes[name] = InCheckout(f"clone-{name}", ["/bin/sh", "-c", f"exec {command}"], env, log_dir,
                                         checkout).start()
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200, timeout=30,
                 what="web /healthz from the checkout")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{flower_port}/healthcheck", timeout=1).status_code == 200,
                 timeout=30, what="flower from the checkout")
        time.sleep(10)
        for name, proc in processes.items():
            assert proc.alive(), f"{name} died:\n{proc.log()[-3000:]}"
            assert "Traceback" not in proc.log() and "FileNotFoundError" not in proc.log(), proc.log()[-3000:]
        assert "Acquired lock" in processes["beat"].log()
        # The worker really consumes (a ping round trip), and the sweeps beat sends are run.
        app = Celery(broker=env["REDIS_URL"])
        token = uuid.uuid4().hex
        app.send_task(names.PING, args=[token], queue="events")
        client = redis.Redis.from_url(env["REDIS_URL"])
        wait_for(lambda: client.get(names.ping_key(token)), timeout=20, what="ping run by the checkout's worker")
    finally:
        for proc in processes.values():
            proc.stop()
        shutil.rmtree(checkout, ignore_errors=True)


def test_web_binds_all_interfaces_unless_told_otherwise():
    web = procfile()["web"]
    assert "--host ${WEB_HOST:-0.0.0.0}" in web and "--port ${PORT:-8000}" in web
    assert "--schedule" not in procfile()["beat"]  # no schedule file: redbeat keeps it in Redis


# ---- two beats ----------------------------------------------------------------------------------


def sweeps_sent(client: redis.Redis) -> int:
    """`callflow.sweep` messages on the sweeps queue (other beat entries share the queue)."""
    return sum(1 for raw in client.lrange("sweeps", 0, -1) if json.loads(raw)["headers"]["task"] == names.SWEEP)


def test_two_beats_one_sigkilled_the_other_takes_over_within_10_seconds(log_dir, redis_server):
    url = redis_db(redis_server, 12)
    client = redis.Redis.from_url(url)
    env = subprocess_env(REDIS_URL=url, CALLFLOW_SWEEP_INTERVAL_SECONDS="0.5")
    argv = ["/bin/sh", "-c", f"exec {procfile()['beat']}"]
    env["PATH"] = f"{VENV_BIN}:{os.environ['PATH']}"
    first = Process("beat-a", argv, env, log_dir).start()
    wait_for(lambda: "Acquired lock" in first.log(), timeout=30, what="the first beat's lock")
    second = Process("beat-b", argv, env, log_dir).start()
    try:
        # Both up for a while: only one sends (sweep every 0.5 s -> about 2 a second, not 4).
        time.sleep(3)
        client.delete("sweeps")
        time.sleep(4)
        sent_by_one = sweeps_sent(client)
        assert 5 <= sent_by_one <= 10, sent_by_one
        assert "Acquired lock" not in second.log()

        first.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        client.delete("sweeps")
        wait_for(lambda: "Acquired lock" in second.log(), timeout=15, what="the second beat taking over")
        wait_for(lambda: sweeps_sent(client) > 0, timeout=15, interval=0.05, what="sweeps sent again")
        took = time.monotonic() - killed_at
        print(f"beat took over {took:.1f} s after the SIGKILL")
        assert took < 10, f"took over after {took:.1f} s"
        time.sleep(2)
        assert sweeps_sent(client) >= 3  # and keeps sending
    finally:
        first.stop()
        second.stop()


# ---- dev-user and `call` by email ---------------------------------------------------------------


def test_dev_user_adds_a_local_user_and_call_takes_emails(db):
    tag = uuid.uuid4().hex[:6]
    carol = cli("dev-user", "Carol Ng", "--email", f"carol-{tag}@example.com", "--timezone", "Europe/Paris")
    assert carol.returncode == 0, carol.stderr
    carol_id = carol.stdout.strip()
    row = db.execute("select email, raw_user_meta_data from auth.users where id = %s", (carol_id,)).fetchone()
    assert row["email"] == f"carol-{tag}@example.com"
    assert row["raw_user_meta_data"] == {"full_name": "Carol Ng", "timezone": "Europe/Paris"}
    again = cli("dev-user", "Carol Ng", "--email", f"CAROL-{tag}@example.com")
    assert again.returncode == 0 and again.stdout.strip() == carol_id  # idempotent: seeding twice is harmless

    dan = cli("dev-user", f"Dan {tag}")
    assert dan.returncode == 0, dan.stderr
    assert db.execute("select email from auth.users where id = %s", (dan.stdout.strip(),)).fetchone()["email"] == \
        f"dan.{tag}@example.com"

    out = cli("call", "--from", f"carol-{tag}@example.com", "--to", f"dan.{tag}@example.com")
    assert out.returncode == 0, out.stderr
    invitation_id = re.match(r"invitation (\S+) in room", out.stdout).group(1)
    inv = db.execute("select caller_id, callee_id from public.call_invitations where id = %s", (invitation_id,)).fetchone()
    assert (str(inv["caller_id"]), str(inv["callee_id"])) == (carol_id, dan.stdout.strip())

    unknown = cli("call", "--from", f"carol-{tag}@example.com", "--to", "nobody@example.com")
    assert unknown.returncode != 0 and "no user with email nobody@example.com" in unknown.stderr
    assert cli("dev-user", "X", "--timezone", "Mars/Olympus").returncode != 0
    refused = cli("dev-user", "Eve", CALLFLOW_ENV="production")
    assert refused.returncode != 0


# ---- failed tasks ---------------------------------------------------------------------------------


def test_a_failed_task_is_kept_and_tasks_retry_reruns_it_once(log_dir, redis_server, db):
    url = redis_db(redis_server, 13)
    worker = services.celery_worker(subprocess_env(REDIS_URL=url), log_dir, name=f"ops{uuid.uuid4().hex[:4]}")
    try:
        wait_for(lambda: "ready." in worker.log(), timeout=60, what="worker ready")
        marker = f"not an event {uuid.uuid4().hex}"
        task_id = Celery(broker=url).send_task(names.LIVEKIT_EVENT, args=[marker, None], queue="events").id

        def rows():
            return db.execute("select * from public.callflow_failed_tasks where args->>0 = %s order by failed_at",
                              (marker,)).fetchall()

        wait_for(lambda: len(rows()) == 1, timeout=30, what="the failure kept")
        kept = rows()[0]
        assert kept["task_id"] == task_id and kept["task_name"] == names.LIVEKIT_EVENT
        assert kept["args"] == [marker, None] and kept["queue"] == "events" and kept["attempts"] == 1
        assert "AttributeError" in kept["error"]

        listed = cli("tasks", "failed", REDIS_URL=url)
        assert listed.returncode == 0 and str(kept["id"]) in listed.stdout

        retried = cli("tasks", "retry", "--id", str(kept["id"]), REDIS_URL=url)
        assert retried.returncode == 0, retried.stderr
        new_task_id = re.search(r"as task (\S+)", retried.stdout).group(1)
        # The re-run ran (it fails the same way, and is kept under its own task id) exactly once.
        wait_for(lambda: len(rows()) == 2, timeout=30, what="the re-run")
        time.sleep(2)
        first, second = rows()
        assert len(rows()) == 2 and second["task_id"] == new_task_id
        assert first["retried_at"] is not None and first["retry_task_id"] == new_task_id
        again = cli("tasks", "retry", "--id", str(kept["id"]), REDIS_URL=url)
        assert again.returncode != 0 and "already retried" in again.stderr

        # Outcomes are counted in Redis for every process's /metrics.
        registry = CollectorRegistry()
        registry.register(OperationsCollector(url, ["events", "notifications"]))
        text = generate_latest(registry).decode()
        assert 'callflow_task_outcomes_total{outcome="failed",task="callflow.livekit_event"} 2.0' in text
    finally:
        worker.stop()


# ---- queue figures ---------------------------------------------------------------------------------


def test_queue_depth_and_oldest_age_come_from_redis(redis_server):
    url = redis_db(redis_server, 14)
    app = Celery(broker=url)
    import workers.task_outcomes  # noqa: F401 - stamps published_at on every message this process sends

    for n in range(3):
        app.send_task(names.DELIVER, args=[names.CHANNEL_EMAIL, [str(uuid.uuid4())]], queue="notifications")
    time.sleep(1.2)
    registry = CollectorRegistry()
    registry.register(OperationsCollector(url, ["events", "notifications"]))
    text = generate_latest(registry).decode()
    assert 'callflow_queue_depth{queue="notifications"} 3.0' in text
    assert 'callflow_queue_depth{queue="events"} 0.0' in text
    age = float(re.search(r'callflow_queue_oldest_age_seconds\{queue="notifications"\} (\S+)', text).group(1))
    assert 1.0 <= age < 10


# ---- the email rate limit books send times ---------------------------------------------------------


def test_bookings_are_spaced_by_the_rate_and_stop_at_the_horizon(redis_server):
    client = redis.Redis.from_url(redis_db(redis_server, 15))
    bucket = Rate(client, rate_per_second=10, margin=0.1, key=f"test:bucket:{uuid.uuid4().hex}")  # one per 110 ms
    first_wait, first_slot = bucket.book(horizon=1.0)
    assert first_wait == 0.0 and first_slot is not None
    waits = [bucket.book(horizon=1.0) for _ in range(12)]
    booked = [w for w in waits if w[1] is not None]
    assert len(booked) == 9  # 110 ms apart: 9 more fit within one second
    slots = [first_slot] + [slot for _, slot in booked]
    assert all(abs((b - a) - 0.11) < 0.002 for a, b in zip(slots, slots[1:]))
    past = [w for w in waits if w[1] is None]
    assert past and all(0 < wait < 0.5 for wait, _ in past)  # come back later to book
    assert 0.9 < bucket.until_slot(slots[-1]) <= 1.0
    assert bucket.until_slot(first_slot - 1.0) == 0.0
    # One booking per email: a second task for the same row gets the same slot back (while it is
    # still ahead: one a second apart, after a first booking that is due now).
    later = Rate(client, rate_per_second=1, margin=0.1, key=f"test:bucket:{uuid.uuid4().hex}")
    later.book(horizon=10.0, holder="row-0")
    _, mine = later.book(horizon=10.0, holder="row-1")
    later.book(horizon=10.0, holder="row-2")
    assert later.book(horizon=10.0, holder="row-1")[1] == mine
    # The gate spaces the requests themselves, whatever the bookings say.
    assert bucket.pass_gate() == 0.0
    assert 0.05 < bucket.pass_gate() <= 0.11
