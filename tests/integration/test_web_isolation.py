"""One user must not take `web` from everyone (issue 23, finding 4): accept and decline stay fast
while one user hammers `GET /api/calls` with reads that hang.

Slowness is real: a transaction holds `lock table calls in access exclusive mode`, which every read
of `calls` waits for. Everything runs against a database of this module's own and a web process
of its own (the run's worker and beat never see these rows, and the lock stalls nobody else).
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from config.settings import build_settings
from orchestration.auth import dev_access_token
from tests.conftest import subprocess_env
from tests.support import services


def token_for(user_id: str) -> str:
    return dev_access_token(build_settings(), user_id, ttl_seconds=600)


def bearer(user_id: str) -> dict:
    return {"Authorization": f"Bearer {token_for(user_id)}"}


class Web:
    def __init__(self, proc: services.Process, port: int) -> None:
        self.proc, self.port, self.base = proc, port, f"http://127.0.0.1:{port}"


def start_web(log_dir, database_url: str, **env) -> Web:
    port = services.free_port()
    proc = services.web_server(subprocess_env(DATABASE_URL=database_url, **env), log_dir, port)
    try:
        services.wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                          or not proc.alive(), timeout=30, what="web up")
        assert proc.alive(), proc.log()[-3000:]
    except BaseException:
        proc.stop()
        raise
    return Web(proc, port)


@pytest.fixture(scope="module")
def isolated(log_dir):
    """A migrated database of this module's own and a web process on it."""
    with services.scratch_database("callflow_isolation") as url:
        web = start_web(log_dir, url)
        try:
            yield url, web
        finally:
            web.proc.stop()


@pytest.fixture
def sdb(isolated):
    with psycopg.connect(isolated[0], autocommit=True, row_factory=dict_row) as conn:
        yield conn


def new_user(sdb) -> str:
    uid = str(uuid.uuid4())
    sdb.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"u-{uid[:8]}@example.test"))
    return uid

# ---- slow reads -------------------------------------------------------------------------------

class CallsLock:
    """`lock table calls in access exclusive mode` in a transaction of its own, on a thread: it
    may have to wait (for a writer) before it holds."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        self.pid = self.conn.info.backend_pid
        self.thread = threading.Thread(target=self.conn.execute,
                                       args=("lock table public.calls in access exclusive mode",), daemon=True)

    def take(self) -> "CallsLock":
        self.thread.start()
        return self

    def release(self) -> None:
        self.thread.join(10)
        self.conn.rollback()
        self.conn.close()


def lock_state(sdb, pid: int) -> str | None:
    row = sdb.execute("""select l.granted from pg_locks l join pg_class c on c.oid = l.relation
                          where c.relname = 'calls' and l.mode = 'AccessExclusiveLock' and l.pid = %s""",
                      (pid,)).fetchone()
    return None if row is None else ("held" if row["granted"] else "waiting")


def reads_of_calls_waiting(sdb) -> int:
    return sdb.execute("""select count(*) n from pg_stat_activity
                           where datname = current_database() and wait_event_type = 'Lock'
                             and query ilike '%%from public.calls%%'""").fetchone()["n"]

def test_accept_and_decline_stay_fast_while_one_user_hammers_history(isolated, sdb):
    """One user keeps 24 `GET /api/calls` in flight for 6.5 s, every one stuck on a lock; another
    user's accepts and declines are answered in well under a second all along, and nobody waits
    forever."""
    url, web = isolated
    caller, callee, hammer = new_user(sdb), new_user(sdb), new_user(sdb)
    with httpx.Client(base_url=web.base, timeout=10) as api:
        invitations = []
        for _ in range(6):
            resp = api.post("/api/calls", headers=bearer(caller), json={"callee_ids": [callee]})
            assert resp.status_code == 201, resp.text
            invitations.append(resp.json()["invitations"][0]["id"])
    # The hammering user has a history (a user without one reads no row of calls).
    room = f"history-{uuid.uuid4().hex[:8]}"
    call = sdb.execute("insert into calls (room_name, caller_id, status) values (%s, %s, 'completed') returning id",
                       (room, hammer)).fetchone()["id"]
    sdb.execute("insert into call_invitations (room_name, caller_id, callee_id, status, call_id)"
                " values (%s, %s, %s, 'pending', %s)", (room, hammer, caller, call))

    lock = CallsLock(url).take()
    services.wait_for(lambda: lock_state(sdb, lock.pid) == "held", timeout=5, what="lock held")
    stop = threading.Event()
    answers: list[int] = []

    def hammering() -> None:
        with httpx.Client(base_url=web.base, timeout=30) as client:
            while not stop.is_set():
                try:
                    answers.append(client.get("/api/calls", headers=bearer(hammer)).status_code)
                except httpx.HTTPError:
                    answers.append(-1)

    threads = [threading.Thread(target=hammering, daemon=True) for _ in range(24)]
    timings = []
    try:
        for t in threads:
            t.start()
        services.wait_for(lambda: reads_of_calls_waiting(sdb) >= 1, timeout=5, what="history reads stuck")
        stuck_at = time.monotonic()
        time.sleep(0.5)
        with httpx.Client(base_url=web.base, timeout=10) as api:
            for n, invitation in enumerate(invitations):  # spread over the 6.5 s the lock is held
                action = "accept" if n % 2 == 0 else "decline"
                t0 = time.monotonic()
                resp = api.post(f"/api/calls/{invitation}/{action}", headers=bearer(callee))
                timings.append(time.monotonic() - t0)
                assert resp.status_code == 200, (action, resp.status_code, resp.text)
                time.sleep(max(0.0, 0.5 + (n + 1) * 1.0 - (time.monotonic() - stuck_at)))
        time.sleep(max(0.0, 6.5 - (time.monotonic() - stuck_at)))
    finally:
        stop.set()
        lock.release()
        for t in threads:
            t.join(40)
    print(f"\nISOLATION: accept/decline while history hammered: max {max(timings) * 1000:.0f} ms, "
          f"hammer answers {sorted(set(answers))}")
    assert max(timings) < 1.0, timings
    assert not any(t.is_alive() for t in threads)
    assert set(answers) <= {200, 429, 503}, sorted(set(answers))
    # The hammering user's own requests were bounded: stuck ones ran out of time (503), the ones
    # over their share of the pool waited their turn and were told to slow down (429).
    assert {429, 503} <= set(answers), sorted(set(answers))
