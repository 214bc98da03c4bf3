"""Lifecycle throughput: complete invitations per second, beside pgbench on the same Postgres.

One lifecycle = a client inserts an invitation (under RLS, as the product does) → the listener
(LISTEN source) enqueues it → a worker makes the LiveKit room and rings it → the callee's client
sees `ringing` (a LISTEN notification) and accepts it → the worker records the answer and the
call becomes `active`. The driver keeps `--in-flight` lifecycles going at once.

    .venv/bin/python -m bench.lifecycle [--count 3000] [--in-flight 200] [--workers 1 --concurrency 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import time
import uuid

import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.stack import cpu_by_process, cpu_delta, machine, percentile, stack, table


async def drive(database_url: str, count: int, in_flight: int, devices: int = 0) -> dict:
    # Two fresh users per lifecycle: a callee still in an earlier (active) call would be busy.
    users = [str(uuid.uuid4()) for _ in range(2 * count)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        async with conn.cursor() as cur:
            await cur.executemany("insert into auth.users (id, email) values (%s, %s)",
                                  [(u, f"{u[:8]}@bench.test") for u in users])
            # Each callee's phones: every ringing then writes and sends `devices` pushes (and as many
            # call_ended on the answer), to the development outbox folder.
            await cur.executemany("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios')",
                                  [(users[2 * i + 1], f"ExponentPushToken[bench-{uuid.uuid4().hex}]")
                                   for i in range(count) for _ in range(devices)])
    ringing: dict[str, asyncio.Future] = {}
    loop = asyncio.get_running_loop()

    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute("listen callflow_invitations")

    async def notifications():
        async for note in listen.notifies():
            data = json.loads(note.payload)
            if data["status"] == "ringing":
                fut = ringing.get(data["id"])
                if fut and not fut.done():
                    fut.set_result(time.perf_counter())

    async def poll_stragglers():
        # LISTEN delivers at most once per connection; a notification lost to a reconnect is polled.
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            while True:
                await asyncio.sleep(0.5)
                waiting = [k for k, f in list(ringing.items()) if not f.done()]
                if not waiting:
                    continue
                cur = await c.execute("select id::text from public.call_invitations where id = any(%s::uuid[]) and status <> 'pending'",
                                      (waiting,))
                for (inv_id,) in await cur.fetchall():
                    if not ringing[inv_id].done():
                        ringing[inv_id].set_result(time.perf_counter())

    listener_task = asyncio.create_task(notifications())
    poller_task = asyncio.create_task(poll_stragglers())
    pool = AsyncConnectionPool(database_url, min_size=8, max_size=24, open=False)
    await pool.open()
    latencies, ring_latencies = [], []
    accepted_ids: list[str] = []
    semaphore = asyncio.Semaphore(in_flight)

    async def one(i: int):
        async with semaphore:
            caller, callee = users[2 * i], users[2 * i + 1]
            start = time.perf_counter()
            async with pool.connection() as c:
                async with c.transaction():
                    await c.execute("set local role authenticated")
                    await c.execute("select set_config('request.jwt.claims', %s, true)",
                                    (json.dumps({"sub": caller, "role": "authenticated"}),))
                    cur = await c.execute(
                        "insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning id",
                        (f"bench-{uuid.uuid4().hex[:12]}", caller, callee))
                    inv_id = str((await cur.fetchone())[0])
                    ringing[inv_id] = loop.create_future()
            rang_at = await asyncio.wait_for(ringing[inv_id], 120)
            ring_latencies.append(rang_at - start)
            async with pool.connection() as c:
                async with c.transaction():
                    await c.execute("set local role authenticated")
                    await c.execute("select set_config('request.jwt.claims', %s, true)",
                                    (json.dumps({"sub": callee, "role": "authenticated"}),))
                    await c.execute("update public.call_invitations set status = 'accepted' where id = %s", (inv_id,))
            accepted_ids.append(inv_id)
            latencies.append(start)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    # Complete = the worker has logged the answer: the call is active.
    async with pool.connection() as c:
        while True:
            cur = await c.execute(
                """select count(*) from public.call_invitations i join public.calls c on c.id = i.call_id
                    where i.status = 'accepted' and c.status = 'active' and i.id = any(%s::uuid[])""",
                (accepted_ids,))
            done = (await cur.fetchone())[0]
            if done >= count:
                break
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {done} of {count} lifecycles completed")
            await asyncio.sleep(0.05)
        finished = time.perf_counter()
    listener_task.cancel()
    poller_task.cancel()
    await listen.close()
    await pool.close()
    return {"elapsed": finished - started, "ring_latencies": ring_latencies}


def pgbench(database_url: str, seconds: int = 10, clients: int = 4) -> float:
    base = database_url.rsplit("/", 1)[0]
    db = f"pgbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'create database "{db}"')
    url = f"{base}/{db}"
    try:
        subprocess.run(["pgbench", "-i", "-q", "-s", "10", url], check=True, capture_output=True)
        out = subprocess.run(["pgbench", "-b", "simple-update", "-c", str(clients), "-j", "2", "-T", str(seconds), url],
                             check=True, capture_output=True, text=True).stdout
        return float(re.search(r"tps = ([\d.]+)", out).group(1))
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{db}" with (force)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--in-flight", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    ap.add_argument("--devices", type=int, default=0, help="push tokens per callee (the push path's cost)")
    args = ap.parse_args()
    env = {"CALLFLOW_RING_TIMEOUT_SECONDS": "120", "CALLFLOW_SWEEP_INTERVAL_SECONDS": "1"}
    with stack(env, workers=args.workers, concurrency=args.concurrency, listener=True, beat=True, pool=args.pool) as s:
        asyncio.run(drive(s.database_url, min(200, args.count), args.in_flight, args.devices))  # warm-up
        cpu_before = cpu_by_process()
        result = asyncio.run(drive(s.database_url, args.count, args.in_flight, args.devices))
        cpu = cpu_delta(cpu_before, cpu_by_process())
        tps = pgbench(s.database_url)
    rate = args.count / result["elapsed"]
    rl = [x * 1000 for x in result["ring_latencies"]]
    print(f"machine: {machine()}")
    print(f"workers: {args.workers} x {args.pool} {args.concurrency}; {args.count} lifecycles, {args.in_flight} in flight, "
          f"{args.devices} push device(s) per callee\n")
    print(table([
        ["callflow lifecycles (insert→ringing→accept→active)", f"{rate:,.0f}/s",
         f"insert→ringing p50 {percentile(rl, 50):.0f} ms, p99 {percentile(rl, 99):.0f} ms"],
        ["pgbench simple-update (4 clients), same Postgres", f"{tps:,.0f} tx/s", "ceiling: one small write transaction"],
    ], ["what", "rate", "notes"]))
    print("\nwhere the CPU went during the measured run (ms of CPU per lifecycle):")
    print(table([[k, f"{v * 1000 / args.count:.1f}"] for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])],
                ["process", "ms/lifecycle"]))


if __name__ == "__main__":
    main()
