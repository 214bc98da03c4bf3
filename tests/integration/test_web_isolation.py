"""One user, or one slow read, must not take `web` from everyone (issue 23, findings 4 and 5).

- `GET /api/calls/events`: at most CALLFLOW_STREAMS_PER_USER streams a user across every web
  process (429 `rate_limited` past it; others unaffected), at most CALLFLOW_STREAMS_PER_PROCESS in
  one process (503 `unavailable` past it).
- A stream keeps delivering while another stream's database read is stuck, and the stuck read is
  retried until it gets through: no event is lost.
- Accept and decline stay fast while one user hammers `GET /api/calls` with reads that hang.

Slowness is real: a transaction holds `lock table calls in access exclusive mode`, which every read
of `calls` waits for. Everything runs against a database of this module's own and web processes
of its own (the run's worker and beat never see these rows, and the lock stalls nobody else).
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
import uuid

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from config.settings import build_settings
from devstack import services
from orchestration.auth import dev_access_token
from tests.conftest import subprocess_env


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


class Stream:
    """A raw `GET /api/calls/events` client: the status and error body, or the events on a thread.
    `close()` closes the socket, as a browser tab going away does."""

    def __init__(self, web: Web, user_id: str) -> None:
        self.events: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        self.sock.sendall(f"GET /api/calls/events?access_token={token_for(user_id)} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = None
        if self.status != 200:
            self.body = json.loads(self.file.read(int(self.headers["content-length"])))
            self.close()
            return
        self.sock.settimeout(None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = None
        try:
            for raw in self.file:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    self.events.put((event, json.loads(line[6:])))
        except (OSError, ValueError):
            pass
        finally:
            self.ended.set()

    def next(self, kind: str, match=lambda row: True, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} event within {timeout} s")
            try:
                event, row = self.events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"no {kind} event within {timeout} s") from None
            if event == kind and match(row):
                return row

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def open_streams(web: Web, user_id: str, n: int) -> list[Stream]:
    streams = [Stream(web, user_id) for _ in range(n)]
    assert [s.status for s in streams] == [200] * n
    return streams


def close_all(streams) -> None:
    for s in streams:
        s.close()


def assert_error(stream: Stream, status: int, code: str) -> None:
    assert stream.status == status, (stream.status, stream.body)
    assert stream.body["error"]["code"] == code, stream.body
    assert set(stream.body["error"]) == {"code", "message"}
    assert int(stream.headers["retry-after"]) >= 1


# ---- caps -----------------------------------------------------------------------------------------

def test_the_eleventh_stream_of_a_user_is_refused_across_web_processes(isolated, sdb, log_dir):
    """CALLFLOW_STREAMS_PER_USER (10): counted in Redis, so two web processes share one count; a
    closed stream frees its place; other users are unaffected."""
    url, web = isolated
    other_web = start_web(log_dir, url)
    user, other = new_user(sdb), new_user(sdb)
    streams = []
    try:
        streams += open_streams(web, user, 6) + open_streams(other_web, user, 4)
        for w in (web, other_web):
            eleventh = Stream(w, user)
            assert_error(eleventh, 429, "rate_limited")
        theirs = open_streams(web, other, 10)  # another user: their own ten
        streams += theirs
        caller = new_user(sdb)
        inv = sdb.execute("insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)"
                          " returning id", (f"cap-{uuid.uuid4().hex[:8]}", caller, other)).fetchone()["id"]
        for s in theirs:
            s.next("invitation", lambda r: r["id"] == str(inv))
        streams[0].close()  # one of the user's ten goes away: its place is free again
        services.wait_for(lambda: Stream(other_web, user).status == 200, timeout=5, interval=0.2,
                          what="a place freed by a closed stream")
    finally:
        close_all(streams)
        other_web.proc.stop()


def test_streams_closed_at_once_give_their_places_back(isolated, sdb):
    """Clients that hang up as soon as they have asked (before the first byte of the stream) leave
    nothing counted: the user can still open their ten, and the process's count is back to 0."""
    _, web = isolated
    user = new_user(sdb)
    request = (f"GET /api/calls/events?access_token={token_for(user)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
    for n in range(60):
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
            if n % 2:  # half of them reset the connection rather than close it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request)
    time.sleep(1.0)

    def open_streams_gauge() -> float:
        text = httpx.get(f"{web.base}/metrics", timeout=5).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("callflow_event_streams ")))

    services.wait_for(lambda: open_streams_gauge() == 0, timeout=5, interval=0.2, what="no stream counted")
    streams = open_streams(web, user, 10)
    close_all(streams)


def test_streams_past_the_process_cap_are_refused_503(isolated, sdb, log_dir):
    url, _ = isolated
    capped = start_web(log_dir, url, CALLFLOW_STREAMS_PER_PROCESS="3")
    streams = []
    try:
        for _ in range(3):
            streams += open_streams(capped, new_user(sdb), 1)
        fourth = Stream(capped, new_user(sdb))
        assert_error(fourth, 503, "unavailable")
        streams.pop().close()
        services.wait_for(lambda: (lambda s: s.close() or s.status == 200)(Stream(capped, new_user(sdb))),
                          timeout=5, interval=0.2, what="a place freed by a closed stream")
    finally:
        close_all(streams)
        capped.proc.stop()


def test_without_redis_streams_open_and_the_process_counts_a_users(isolated, sdb, log_dir):
    """Redis gives no answer (nothing listens on its port): streams still open, the cap per user
    holds on this process's own count."""
    url, _ = isolated
    no_redis = start_web(log_dir, url, REDIS_URL=f"redis://127.0.0.1:{services.free_port()}/0")
    user = new_user(sdb)
    streams = []
    try:
        streams += open_streams(no_redis, user, 10)
        assert_error(Stream(no_redis, user), 429, "rate_limited")
        streams += open_streams(no_redis, new_user(sdb), 1)
    finally:
        close_all(streams)
        no_redis.proc.stop()


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


def test_a_stream_keeps_delivering_while_another_streams_read_is_stuck(isolated, sdb):
    """B's call changes; the web's read of that row waits on a lock for 4 s. A's invitation, changed
    meanwhile, reaches A at once; B's call event arrives once the lock goes (retried, not lost)."""
    url, web = isolated
    a, b, c = new_user(sdb), new_user(sdb), new_user(sdb)
    room = f"slow-{uuid.uuid4().hex[:8]}"
    call = sdb.execute("insert into calls (room_name, caller_id) values (%s, %s) returning id", (room, c)).fetchone()["id"]
    sdb.execute("insert into call_invitations (room_name, caller_id, callee_id, call_id) values (%s, %s, %s, %s)",
                (room, c, b, call))
    # A's invitation exists before the lock (an insert checks its call_id's foreign key: it would
    # wait on the lock too); during the lock it moves on, an update that needs nothing of `calls`.
    inv = sdb.execute("insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)"
                      " returning id", (f"fast-{uuid.uuid4().hex[:8]}", a, c)).fetchone()["id"]
    stream_a, stream_b = Stream(web, a), Stream(web, b)
    lock = None
    try:
        assert (stream_a.status, stream_b.status) == (200, 200)
        # The change of B's call commits while the lock waits for it: the lock is granted as the
        # change's notification goes out, so the web's read of the row meets it.
        with psycopg.connect(url) as writer:
            writer.execute("update calls set status = 'active', started_at = now() where id = %s", (call,))
            lock = CallsLock(url).take()
            services.wait_for(lambda: lock_state(sdb, lock.pid) == "waiting", timeout=5, what="lock queued")
            writer.commit()
        services.wait_for(lambda: lock_state(sdb, lock.pid) == "held", timeout=5, what="lock held")
        services.wait_for(lambda: reads_of_calls_waiting(sdb) >= 1, timeout=5, what="the web's read stuck")
        stuck_at = time.monotonic()

        sdb.execute("update call_invitations set status = 'ringing' where id = %s", (inv,))
        row = stream_a.next("invitation", lambda r: r["id"] == str(inv) and r["status"] == "ringing", timeout=2.0)
        assert row["caller_id"] == a
        with pytest.raises(TimeoutError):  # still stuck
            stream_b.next("call", timeout=0.1)

        time.sleep(max(0.0, 4.0 - (time.monotonic() - stuck_at)))  # past the read's own time bound
        lock.release()
        lock = None
        row = stream_b.next("call", lambda r: r["id"] == str(call), timeout=8.0)
        assert row["status"] == "active"
        assert not stream_a.ended.is_set() and not stream_b.ended.is_set()
    finally:
        if lock is not None:
            lock.release()
        stream_a.close()
        stream_b.close()


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


# ---- the per-user count in Redis ----------------------------------------------------------------

def test_a_crashed_process_leaks_no_places(redis_server):
    """A stream's place is a lease in Redis, renewed while the stream lives: a process that dies
    without giving its places back loses them when the leases run out."""
    import asyncio

    import redis.asyncio as aioredis

    from workers.web.stream_slots import StreamLeases

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        leases = StreamLeases(client, limit=2, lease_seconds=1.0)
        user = str(uuid.uuid4())
        first, second = await leases.acquire(user), await leases.acquire(user)
        assert first and second and not await leases.acquire(user)
        await leases.release(user, first)
        third = await leases.acquire(user)
        assert third
        await asyncio.sleep(0.6)
        await leases.renew(user, third)  # a live stream keeps its place; `second` is not renewed
        await asyncio.sleep(0.6)
        assert await leases.acquire(user)  # second's lease ran out
        assert not await leases.acquire(user)  # third's did not
        await client.aclose()

    asyncio.run(scenario())
