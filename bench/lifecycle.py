"""Lifecycle throughput and latency: complete invitations per second beside pgbench on the same
Postgres, the latencies at a fixed offered load, and ring-timeout lateness at saturation.

One lifecycle = a client inserts an invitation (under RLS, as the product does) → the listener
(LISTEN source) enqueues it → a worker makes the LiveKit room and rings it → the callee's client
sees `ringing` (a `callflow_invitations` notification) and accepts it → the worker records the
answer and the call becomes `active` (a `callflow_calls` notification). LiveKit's webhooks go to a
closed port (LiveKit retries each for ~15 s, then gives up); with `--web` they go to the `web`
process, as deployed, which hands each (`room_started` for every room made) to the workers.

    .venv/bin/python -m bench.lifecycle [--count 1000] [--in-flight 200] [--rate 50] [--rate-seconds 20]
                                        [--ring-count 1000 | --no-ring-check] [--workers 1 --concurrency 6]

One stack (ring timeout 120 s, sweep every 1 s) runs, after a warm-up of 200 lifecycles:

1. Offered load: `--rate` lifecycles/s for `--rate-seconds`, open loop (lifecycle i starts at
   t0 + i/rate however many are in flight). insert→ringing: from its scheduled start to its client
   seeing `ringing`; accept→active: from the accept UPDATE's commit returning to its client seeing
   the call `active`. p50/p99/max of each.
2. Saturation: `--count` lifecycles, `--in-flight` at once. Lifecycles/s (first insert → last call
   active, polled every 10 ms once all are accepted) and insert→ringing p50/p99, beside pgbench simple-update (4 clients, 10 s, a database of
   its own, after the run). Postgres transactions per lifecycle: the change of `xact_commit +
   xact_rollback` in pg_stat_database for the bench database over the run, read 11 s after it and
   likewise before it (a busy backend reports at most once a second, an idle one within 10 s), split
   into the driver's own (counted as it makes them: the client's insert and accept, its polls, its new
   connections) and callflow's (the rest, including its idle work: sweeps, beat, and Postgres's own
   transaction for each NOTIFY a listening backend reads: the listener's three per lifecycle, and
   the driver's LISTEN connection's); and, exactly, the transactions that wrote (transaction ids given out, whole cluster; read-only ones take none). CPU
   ms per lifecycle by process role from the first insert to the last call active (whole machine),
   and callflow's own processes (celery worker, listener, celery beat, web) summed.
3. Ring timeout at saturation (skipped with `--no-ring-check`): a second stack with a 3 s ring timeout,
   `--ring-count` lifecycles, `--in-flight` at once, every third invitation never accepted. Once all
   of those have ended: max and p99 of ended_at − ring_deadline over them, beside the bound
   "sweep interval + 1 s".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.stack import cpu_by_process, cpu_delta, machine, machine_seconds, percentile, stack, table

SWEEP_INTERVAL_SECONDS = 1
RING_CHECK_TIMEOUT_SECONDS = 3
# A busy backend reports its transaction counts at most once a second, an idle one within 10 s.
PGSTAT_SETTLE_SECONDS = 11
CALLFLOW_ROLES = ("celery worker", "listener", "celery beat", "web")
# What PostgREST runs first in each request's transaction: the role and the JWT's claims, one statement.
AS_CLIENT = "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)"


@dataclass
class Run:
    elapsed: float  # first start → the last accepted call active
    ringing: list[float]  # insert → ringing, s, of the accepted invitations
    active: list[float]  # accept returning → call active, s
    transactions: int | None  # in the bench database over the run (measured runs), all clients
    writes: int | None  # of the whole cluster's transactions, those that wrote (transaction ids given out)
    cpu: dict[str, float]  # CPU seconds by process role over the run (measured runs)
    cores: dict[str, float]  # the machine's core-seconds over the run: busy, idle, steal (measured runs)
    driver_transactions: int  # of those, the driver's own
    unanswered: list[tuple[str, float | None]]  # never-accepted invitations: status, ended_at − ring_deadline (s)
    ringing_started: list[float] = field(default_factory=list)  # each `ringing` sample's insert (perf_counter)


async def drive(database_url: str, count: int, *, in_flight: int = 0, rate: float = 0.0, devices: int = 0,
                unanswered_every: int = 0, measure: bool = False, watch_calls: bool = False,
                cpu_of: Callable[[], dict[str, float]] = cpu_by_process) -> Run:
    """`count` lifecycles, `in_flight` at once (closed loop) or one every 1/`rate` s (open loop).
    Every `unanswered_every`-th invitation is inserted and never accepted (and not waited for).
    `watch_calls`: each call's `active` is seen by LISTEN (per-call latency, at two more NOTIFYs per
    lifecycle for Postgres and the driver); otherwise the calls are polled for once all are accepted.
    `cpu_of`: CPU seconds by process role, read before and after a measured run (the whole
    machine's by default)."""
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
    ringing: dict[str, asyncio.Future[float]] = {}  # invitation id → when its client saw it ringing
    accepted: dict[str, float] = {}  # call id → when its accept returned
    active_at: dict[str, float] = {}  # call id → when first seen active (may come before its accept returns)
    unanswered_ids: list[str] = []
    transactions = 0  # the driver's own in the bench database
    loop = asyncio.get_running_loop()

    listen = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listen.execute("listen callflow_invitations")
    if watch_calls:
        await listen.execute("listen callflow_calls")
    polling = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    stats = await psycopg.AsyncConnection.connect(database_url, autocommit=True)

    async def notifications() -> None:
        async for note in listen.notifies():
            seen = time.perf_counter()
            data = json.loads(note.payload)
            if note.channel == "callflow_calls":
                if data["status"] == "active":
                    active_at.setdefault(data["id"], seen)
            elif data["status"] == "ringing" and (fut := ringing.get(data["id"])) and not fut.done():
                fut.set_result(seen)

    async def poll_stragglers() -> None:
        # LISTEN delivers at most once per connection; a notification lost to a reconnect is polled.
        nonlocal transactions
        while True:
            await asyncio.sleep(0.5)
            unrung = [k for k, f in list(ringing.items()) if not f.done()]
            if unrung:
                transactions += 1
                cur = await polling.execute(
                    "select id::text from public.call_invitations where id = any(%s::uuid[]) and status <> 'pending'",
                    (unrung,))
                for (inv_id,) in await cur.fetchall():
                    if not ringing[inv_id].done():
                        ringing[inv_id].set_result(time.perf_counter())
            inactive = [k for k in list(accepted) if k not in active_at]
            if inactive:
                transactions += 1
                cur = await polling.execute(
                    "select id::text from public.calls where id = any(%s::uuid[]) and status = 'active'", (inactive,))
                for (call_id,) in await cur.fetchall():
                    active_at.setdefault(call_id, time.perf_counter())

    async def xacts() -> tuple[int, int]:
        cur = await stats.execute(
            """select xact_commit + xact_rollback, pg_current_xact_id()::text::bigint
                 from pg_stat_database where datname = current_database()""")
        return await cur.fetchone()

    async def count_connection(_: psycopg.AsyncConnection) -> None:
        nonlocal transactions
        transactions += 1  # a backend's start is a transaction

    listener_task = asyncio.create_task(notifications())
    poller_task = asyncio.create_task(poll_stragglers())
    pool = AsyncConnectionPool(database_url, min_size=8, max_size=24, open=False, configure=count_connection)
    await pool.open(wait=True)
    ring_latencies: list[float] = []
    ring_starts: list[float] = []
    semaphore = asyncio.Semaphore(in_flight or count)  # open loop: no bound
    if measure:
        await asyncio.sleep(PGSTAT_SETTLE_SECONDS)
        before = await xacts()
        transactions = 1  # that read; the driver's own from here on
        cpu_before = cpu_of()
        machine_before = machine_seconds()
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal transactions
        answer = not unanswered_every or (i + 1) % unanswered_every != 0
        if rate:
            await asyncio.sleep(t0 + i / rate - time.perf_counter())
        async with semaphore:
            caller, callee = users[2 * i], users[2 * i + 1]
            start = t0 + i / rate if rate else time.perf_counter()
            async with pool.connection() as c:
                async with c.transaction():
                    await c.execute(AS_CLIENT, (json.dumps({"sub": caller, "role": "authenticated"}),))
                    cur = await c.execute(
                        "insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning id",
                        (f"bench-{uuid.uuid4().hex[:12]}", caller, callee))
                    inv_id = str((await cur.fetchone())[0])
                    if answer:
                        ringing[inv_id] = loop.create_future()
            transactions += 1
            if not answer:
                unanswered_ids.append(inv_id)
                return
            rang_at = await asyncio.wait_for(ringing[inv_id], 120)
            ring_latencies.append(rang_at - start)
            ring_starts.append(start)
            async with pool.connection() as c:
                async with c.transaction():
                    await c.execute(AS_CLIENT, (json.dumps({"sub": callee, "role": "authenticated"}),))
                    cur = await c.execute(
                        "update public.call_invitations set status = 'accepted' where id = %s returning call_id::text",
                        (inv_id,))
                    call_id = (await cur.fetchone())[0]
            accepted[call_id] = time.perf_counter()
            transactions += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    # Complete = every accepted call active (the worker has logged the answer), every other invitation ended.
    while any(k not in active_at for k in accepted):
        if time.perf_counter() - t0 > 600:
            raise TimeoutError(f"only {sum(k in active_at for k in accepted)} of {len(accepted)} calls became active")
        if not watch_calls:
            transactions += 1
            cur = await polling.execute("select id::text from public.calls where id = any(%s::uuid[]) and status = 'active'",
                                        ([k for k in accepted if k not in active_at],))
            seen = time.perf_counter()
            for (call_id,) in await cur.fetchall():
                active_at.setdefault(call_id, seen)
        await asyncio.sleep(0.01)
    finished = max(active_at[k] for k in accepted)
    cpu = cpu_delta(cpu_before, cpu_of()) if measure else {}
    cores = {k: v - machine_before[k] for k, v in machine_seconds().items()} if measure else {}
    unanswered: list[tuple[str, float | None]] = []
    if unanswered_ids:
        async with pool.connection() as c:
            while True:
                transactions += 1
                cur = await c.execute(
                    """select status, extract(epoch from ended_at - ring_deadline)::float8 from public.call_invitations
                        where id = any(%s::uuid[]) and ended_at is not null""", (unanswered_ids,))
                unanswered = await cur.fetchall()
                if len(unanswered) == len(unanswered_ids):
                    break
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError(f"only {len(unanswered)} of {len(unanswered_ids)} unanswered invitations ended")
                await asyncio.sleep(0.2)
    listener_task.cancel()
    poller_task.cancel()
    await asyncio.gather(listener_task, poller_task, return_exceptions=True)
    # Closed, the driver's backends report what they still held.
    await listen.close()
    await polling.close()
    await pool.close()
    total = writes = None
    if measure:
        await asyncio.sleep(PGSTAT_SETTLE_SECONDS)
        after = await xacts()
        total, writes = after[0] - before[0], after[1] - before[1] - 1  # not the two reads' own ids
    await stats.close()
    return Run(elapsed=finished - t0, ringing=ring_latencies, ringing_started=ring_starts, active=[active_at[k] - at for k, at in accepted.items()],
               transactions=total, writes=writes, cpu=cpu, cores=cores, driver_transactions=transactions, unanswered=unanswered)


def livekit_events_recorded(database_url: str) -> dict:
    """call_events of LiveKit's webhooks by type, and the calls made (a room each): with `--web`,
    every room's `room_started` should be there (the workers kept up with `web`)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        events = dict(conn.execute("""select type, count(*) from public.call_events where source = 'livekit'
                                       group by type order by type""").fetchall())
        calls = conn.execute("select count(*) from public.calls").fetchone()[0]
    return {"events": events, "calls": calls}


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


def ms(values: list[float], *ps: float) -> list[str]:
    return [f"{percentile(values, p) * 1000:.0f}" for p in ps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="lifecycles in the saturation run")
    ap.add_argument("--in-flight", type=int, default=200, help="lifecycles at once in the saturation and ring-timeout runs")
    ap.add_argument("--rate", type=float, default=50, help="lifecycles/s offered in the open-loop run")
    ap.add_argument("--rate-seconds", type=float, default=20, help="length of the open-loop run")
    ap.add_argument("--ring-count", type=int, default=1000, help="lifecycles in the ring-timeout run")
    ap.add_argument("--no-ring-check", action="store_true", help="skip the ring-timeout run (a second stack)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    ap.add_argument("--devices", type=int, default=0, help="push tokens per callee (the push path's cost)")
    ap.add_argument("--web", action="store_true", help="run `web` and send LiveKit's webhooks to it (as deployed)")
    args = ap.parse_args()
    env = {"CALLFLOW_RING_TIMEOUT_SECONDS": "120", "CALLFLOW_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS)}
    workers = {"workers": args.workers, "concurrency": args.concurrency, "listener": True, "beat": True, "pool": args.pool,
               "web": args.web}
    offered_count = round(args.rate * args.rate_seconds)
    with stack(env, **workers) as s:
        asyncio.run(drive(s.database_url, min(200, args.count), in_flight=args.in_flight, devices=args.devices))  # warm-up
        offered = asyncio.run(drive(s.database_url, offered_count, rate=args.rate, devices=args.devices,
                                    watch_calls=True))
        saturated = asyncio.run(drive(s.database_url, args.count, in_flight=args.in_flight, devices=args.devices,
                                      measure=True))
        cpu = saturated.cpu
        tps = pgbench(s.database_url)
        recorded = livekit_events_recorded(s.database_url) if args.web else None
    ring = None
    if not args.no_ring_check:
        with stack({**env, "CALLFLOW_RING_TIMEOUT_SECONDS": str(RING_CHECK_TIMEOUT_SECONDS)}, **workers) as s:
            ring = asyncio.run(drive(s.database_url, args.ring_count, in_flight=args.in_flight, devices=args.devices,
                                     unanswered_every=3))

    n = args.count
    print(f"machine: {machine()}")
    print(f"workers: {args.workers} x {args.pool} {args.concurrency}; {args.devices} push device(s) per callee; "
          f"LiveKit's webhooks {'to web' if args.web else 'to a closed port'}\n")
    print(f"saturation: {n} lifecycles, {args.in_flight} in flight")
    print(table([
        ["callflow lifecycles (insert→ringing→accept→active)", f"{n / saturated.elapsed:,.0f}/s",
         "insert→ringing p50 {} ms, p99 {} ms".format(*ms(saturated.ringing, 50, 99))],
        ["pgbench simple-update (4 clients), same Postgres", f"{tps:,.0f} tx/s",
         f"ceiling: one small write transaction; a lifecycle ≈ {tps * saturated.elapsed / n:.0f} of them"],
    ], ["what", "rate", "notes"]))
    callflow_tx = saturated.transactions - saturated.driver_transactions
    print("\nPostgres transactions per lifecycle in the saturation run (pg_stat_database, the bench database):")
    print(table([
        ["all", f"{saturated.transactions / n:.1f}", f"{saturated.transactions:,} transactions"],
        ["driver (client) tx/lifecycle", f"{saturated.driver_transactions / n:.1f}",
         "insert, accept, polls, new connections"],
        ["callflow tx/lifecycle", f"{callflow_tx / n:.1f}",
         "workers, beat, and every NOTIFY read by a listening backend (a transaction each)"],
        ["writing transactions (all clients)", f"{saturated.writes / n:.1f}",
         f"{saturated.writes:,} transaction ids given out (exact; read-only ones take none)"],
    ], ["who", "tx/lifecycle", "notes"]))
    print("\nwhere the CPU went during the saturation run (ms of CPU per lifecycle):")
    rows = [[k, f"{v * 1000 / n:.1f}"] for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])]
    own = sum(v for k, v in cpu.items() if k in CALLFLOW_ROLES)
    print(table(rows + [["callflow processes total", f"{own * 1000 / n:.1f}"]], ["process", "ms/lifecycle"]))
    cores = saturated.cores
    print("the cores over the run: {:.0f} % busy, {:.0f} % idle, {:.0f} % stolen by the hypervisor".format(
        *(100 * cores[k] / (sum(cores.values()) or 1) for k in ("busy", "idle", "steal"))))
    if recorded is not None:
        kinds = ", ".join(f"{k} {v:,}" for k, v in recorded["events"].items()) or "none"
        print(f"\nLiveKit's webhooks recorded once each in call_events over the whole run (read after pgbench): {kinds}; "
              f"{recorded['calls']:,} calls made")
    print(f"\noffered load: {args.rate:g} lifecycles/s for {args.rate_seconds:g} s, open loop ({offered_count} lifecycles; "
          f"the last call active after {offered.elapsed:.1f} s, {offered_count / offered.elapsed:.0f}/s completed):")
    print(table([["insert→ringing", *ms(offered.ringing, 50, 99, 100)],
                 ["accept→active", *ms(offered.active, 50, 99, 100)]],
                ["latency", "p50 ms", "p99 ms", "max ms"]))
    if ring:
        late = [x for _, x in ring.unanswered if x is not None]
        statuses = ", ".join(f"{k} {v}" for k, v in Counter(st for st, _ in ring.unanswered).most_common())
        print(f"\nring timeout at saturation: ring timeout {RING_CHECK_TIMEOUT_SECONDS} s, {args.ring_count} lifecycles, "
              f"{args.in_flight} in flight, every third never accepted ({statuses}; {len(late)} rang):")
        bound = f"sweep interval + 1 s = {(SWEEP_INTERVAL_SECONDS + 1) * 1000} ms"
        print(table([["ended_at − ring_deadline, max", f"{max(late, default=float('nan')) * 1000:.0f} ms", bound],
                     ["ended_at − ring_deadline, p99", f"{percentile(late, 99) * 1000:.0f} ms", bound]],
                    ["figure", "value", "bound"]))


if __name__ == "__main__":
    main()
