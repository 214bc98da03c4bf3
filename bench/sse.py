"""Event stream benchmark: `.venv/bin/python -m bench.sse [--idle N] [--changes M] [--rate R]`.

On loopback, against a fresh database on the local Postgres and a private `redis-server`:
  1. the `web` process (the Procfile's uvicorn, one process) is started; its RSS is read;
  2. N idle `GET /api/calls/events` streams are opened (N distinct users, raw sockets from one
     asyncio client) and held; RSS is read again once they are all open and have idled 5 s;
  3. with the N streams still open, one more user's stream watches: M invitations to that user
     are inserted at R/s by a client connection (RLS, triggers: as supabase-js would); latency =
     from the INSERT's commit returning to the `invitation` event's data arriving on the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack import services  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    """uvicorn may be a child of the process we started (no reload here, but be exact)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += rss_mib(p)
        children = Path(f"/proc/{p}/task/{p}/children")
        if children.exists():
            todo += [int(c) for c in children.read_text().split()]
    return total


async def open_stream(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/calls/events?access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"stream refused: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return reader, writer


async def read_events(reader: asyncio.StreamReader, arrivals: dict[str, float]) -> None:
    while True:
        line = await reader.readline()
        if not line:
            return
        # chunked transfer: data lines come through as-is between chunk-size lines
        if line.startswith(b"data: "):
            row = json.loads(line[6:])
            arrivals.setdefault(row["id"], time.perf_counter())


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run(args, port: int, db_url: str, web_pid: int) -> dict:
    from config.settings import build_settings
    from orchestration.auth import dev_access_token

    settings = build_settings()
    rss_before = tree_rss_mib(web_pid)
    t0 = time.perf_counter()
    idle = []
    for start in range(0, args.idle, 100):  # in waves, as clients arrive
        idle += await asyncio.gather(*(open_stream(port, dev_access_token(settings, str(uuid.uuid4()), ttl_seconds=3600))
                                       for _ in range(start, min(args.idle, start + 100))))
    opened_in = time.perf_counter() - t0
    await asyncio.sleep(5)
    rss_idle = tree_rss_mib(web_pid)

    with psycopg.connect(db_url, autocommit=True) as db:
        caller, callee = str(uuid.uuid4()), str(uuid.uuid4())
        for uid in (caller, callee):
            db.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"{uid[:8]}@bench.test"))
        db.execute("insert into callflow_settings (key, value) values ('CALLFLOW_INVITE_RATE_PER_MINUTE', '1000000') "
                   "on conflict (key) do update set value = excluded.value")
    reader, writer = await open_stream(port, dev_access_token(settings, callee, ttl_seconds=3600))
    arrivals: dict[str, float] = {}
    reading = asyncio.create_task(read_events(reader, arrivals))
    committed: dict[str, float] = {}
    with psycopg.connect(db_url) as conn:
        for i in range(args.changes):
            with conn.transaction():
                conn.execute("set local role authenticated")
                conn.execute("select set_config('request.jwt.claims', %s, true)",
                             (json.dumps({"sub": caller, "role": "authenticated"}),))
                row = conn.execute("insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)"
                                   " returning id", (f"bench-{i}-{uuid.uuid4().hex[:8]}", caller, callee)).fetchone()
            committed[str(row[0])] = time.perf_counter()
            await asyncio.sleep(1 / args.rate)
    await asyncio.sleep(1)
    reading.cancel()
    latencies = [(arrivals[i] - t) * 1000 for i, t in committed.items() if i in arrivals]
    writer.close()
    for _, w in idle:
        w.close()
    return {
        "idle_streams": args.idle, "opened_in_s": round(opened_in, 2),
        "rss_mib_before": round(rss_before, 1), "rss_mib_with_idle_streams": round(rss_idle, 1),
        "changes": args.changes, "delivered": len(latencies),
        "latency_ms_p50": round(statistics.median(latencies), 1), "latency_ms_p99": round(pct(latencies, 99), 1),
        "latency_ms_max": round(max(latencies), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0)
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="callflow-bench-sse-"))
    redis_server = services.RedisServer().start()
    db_url = services.create_database("callflow_bench")
    port = services.free_port()
    env = {**__import__("os").environ, "DATABASE_URL": db_url, "REDIS_URL": redis_server.url,
           "CALLFLOW_ENV": "development", "PORT": str(port)}
    web = services.web_server(env, log_dir, port)
    try:
        services.wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
                          timeout=30, what="web")
        result = asyncio.run(run(args, port, db_url, web.proc.pid))
        print(json.dumps(result, indent=2))
    finally:
        web.stop()
        redis_server.cleanup()
        services.drop_database(db_url)


if __name__ == "__main__":
    main()
