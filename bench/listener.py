"""Listener benchmark: `.venv/bin/python -m bench.listener [--rows N] [--rate R] [--writers W]`.

In one run, on loopback, against a fresh database on the local Postgres and a private
`redis-server` started here:
  1. `raw INSERT`: W writer connections insert N invitations as the caller's client would (one
     transaction each: `set local role authenticated`, JWT claims, INSERT with the RLS check and
     the guard + NOTIFY triggers), no listener running: the ceiling;
  2. for each source (`postgres` LISTEN; `realtime` = the real `realtime` client against the
     Realtime stand-in of devstack/standins, itself fed by LISTEN + a row read, so its cost is in the
     figure), the `listener` process (`python -m workers.listener`, production defaults):
     - latency: one writer paced at R inserts/s; a reader BLPOPs the `events` queue; latency = from
       the INSERT's commit returning to the task being on the queue (p50/p99);
     - sustained: W writers flood N inserts; rate = N / (first INSERT start -> last task on the queue).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack import services  # noqa: E402
from orchestration import names  # noqa: E402

DEV_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def _insert(conn: psycopg.Connection, caller: str, callee: str) -> str:
    with conn.transaction():
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": caller, "role": "authenticated"}),))
        row = conn.execute("insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) "
                           "returning id", (f"bench-{uuid.uuid4().hex[:12]}", caller, callee)).fetchone()
    return str(row[0])


def flood(url: str, pairs: list[tuple[str, str]], rows: int, writers: int) -> tuple[float, float, list[str]]:
    """W writers insert `rows` invitations as fast as they can; returns (start, end, ids)."""
    ids: list[str] = []
    lock = threading.Lock()
    per = [rows // writers + (1 if i < rows % writers else 0) for i in range(writers)]
    conns = [psycopg.connect(url) for _ in range(writers)]
    barrier = threading.Barrier(writers + 1)

    def work(i: int) -> None:
        caller, callee = pairs[i % len(pairs)]
        barrier.wait()
        mine = [_insert(conns[i], caller, callee) for _ in range(per[i])]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    end = time.perf_counter()
    for c in conns:
        c.close()
    return start, end, ids


class QueueReader(threading.Thread):
    """BLPOPs `events` and records when each invitation's task arrived."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            item = self.client.blpop(["events"], timeout=0.2)
            if item is None:
                continue
            now = time.perf_counter()
            message = json.loads(item[1])
            args = json.loads(base64.b64decode(message["body"]))[0]
            self.arrived.setdefault(args[0]["invitation_id"], now)

    def wait_for(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in self.arrived for i in ids):
                return True
            time.sleep(0.01)
        return False


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_source(source: str, db_url: str, redis_server: services.RedisServer, pairs, args, log_dir: Path) -> dict:
    redis.Redis.from_url(redis_server.url).flushdb()
    env = dict(os.environ, DATABASE_URL=db_url, REDIS_URL=redis_server.url, CALLFLOW_LISTENER_SOURCE=source,
               CALLFLOW_ENV="development")
    standin = None
    if source == "realtime":
        import jwt

        from devstack.standins.realtime_server import RealtimeStandIn

        key = jwt.encode({"role": "service_role", "iss": "supabase-demo", "exp": int(time.time()) + 86400},
                         DEV_JWT_SECRET, algorithm="HS256")
        standin = RealtimeStandIn(db_url, apikey=key).start()
        env.update(SUPABASE_URL=standin.url, SUPABASE_SERVICE_ROLE_KEY=key)
    proc = services.Process(f"bench-listener-{source}", [sys.executable, "-m", "workers.listener", "--id", f"bench-{source}"],
                            env, log_dir).start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        services.wait_for(lambda: json.loads(client.get(names.listener_key("bench-" + source)) or "{}").get("state") == "live",
                          timeout=30, what=f"{source} listener live")
        time.sleep(0.5)
        reader = QueueReader(redis_server.url)
        reader.start()
        # latency at a paced rate
        lat_ids, committed = [], {}
        conn = psycopg.connect(db_url)
        caller, callee = pairs[0]
        interval = 1.0 / args.rate
        next_at = time.perf_counter()
        for _ in range(args.latency_rows):
            next_at += interval
            invitation = _insert(conn, caller, callee)
            committed[invitation] = time.perf_counter()
            lat_ids.append(invitation)
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        conn.close()
        if not reader.wait_for(lat_ids, 60):
            raise RuntimeError(f"{source}: latency rows not all enqueued")
        lat = [(reader.arrived[i] - committed[i]) * 1000 for i in lat_ids]
        # sustained
        start, end, ids = flood(db_url, pairs, args.rows, args.writers)
        if not reader.wait_for(ids, 120):
            raise RuntimeError(f"{source}: flood rows not all enqueued")
        last = max(reader.arrived[i] for i in ids)
        reader.stop.set()
        reader.join(2)
        beat = json.loads(client.get(names.listener_key("bench-" + source)) or "{}")
        return {"source": source, "p50": statistics.median(lat), "p99": pct(lat, 99), "max": max(lat),
                "insert_rate": len(ids) / (end - start), "through": len(ids) / (last - start),
                "catch_up": beat.get("catch_up_enqueued", 0)}
    finally:
        proc.stop()
        if standin:
            standin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.listener")
    parser.add_argument("--rows", type=int, default=5000, help="rows of each flood")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="paced inserts/s of the latency run")
    parser.add_argument("--latency-rows", type=int, default=1000)
    parser.add_argument("--sources", default="postgres,realtime")
    args = parser.parse_args()

    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="callflow-bench-listener-"))
    redis_server = services.RedisServer().start()
    db_url = services.create_database("callflow_bench", invite_rate_per_minute=10_000_000)
    try:
        pairs = []
        with psycopg.connect(db_url, autocommit=True) as conn:
            for _ in range(args.writers):
                a, b = str(uuid.uuid4()), str(uuid.uuid4())
                for u in (a, b):
                    conn.execute("insert into auth.users (id, email) values (%s, %s)", (u, f"{u[:8]}@bench.test"))
                pairs.append((a, b))
        start, end, ids = flood(db_url, pairs, args.rows, args.writers)
        raw = len(ids) / (end - start)
        results = [run_source(s, db_url, redis_server, pairs, args, log_dir) for s in args.sources.split(",")]
    finally:
        redis_server.cleanup()
        services.drop_database(db_url)

    print(f"\nlistener benchmark: {args.rows} rows per flood, {args.writers} writers; latency at {args.rate:.0f} inserts/s "
          f"over {args.latency_rows} rows\n")
    header = f"{'source':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'through listener /s':>20} {'INSERT rate in flood /s':>24} {'raw INSERT /s':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['source']:<10} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} {r['through']:>20.0f} "
              f"{r['insert_rate']:>24.0f} {raw:>14.0f}")
    print(f"\n(raw INSERT: {args.rows} rows, {args.writers} writers, no listener running; logs in {log_dir})")


if __name__ == "__main__":
    main()
