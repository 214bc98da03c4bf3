"""Ringing never waits behind emails: invitation → `ringing` latency with and without a backlog of
missed-call emails queued behind the global Resend rate limit.

The stack: a fresh database, a private Redis, the real LiveKit server, the listener (LISTEN
source), beat, and one worker run as the Procfile runs it (all queues, its default concurrency =
the machine's cores). Emails go through the rate-limited Resend path to the Resend stand-in, each
answered after `--send-latency` seconds, like a real API call.

1. baseline: `--probes` invitations, one at a time, insert → `ringing` (LISTEN) timed;
2. backlog: `--backlog` invitations from distinct callers are inserted at once and ring for 2 s;
   each is then missed and queues one email (rate `CALLFLOW_EMAIL_RATE_PER_SECOND`, 2/s);
3. loaded: the same probes again while that backlog drains.

It runs twice, each in a fresh stack: once with the backlog's callees opted out of missed-call
emails (the same missed calls, database growth and lifecycle work, but no email queued), once
with their emails queued. The email backlog's cost is the difference between the two loaded phases.

    .venv/bin/python -m bench.isolation [--backlog 1000] [--probes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.stack import machine, percentile, stack, table
from devstack.standins.resend_server import Answer, ResendStandIn


async def _users(database_url: str, n: int, meta: dict | None = None) -> list[str]:
    users = [str(uuid.uuid4()) for _ in range(n)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        async with conn.cursor() as cur:
            await cur.executemany("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                                  [(u, f"{u[:8]}@bench.test", json.dumps(meta or {})) for u in users])
    return users


class Ringing:
    """Times insert → `ringing` from the database's own notifications (LISTEN callflow_invitations)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.waiting: dict[str, asyncio.Future] = {}

    async def __aenter__(self) -> "Ringing":
        self.listen = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await self.listen.execute("listen callflow_invitations")
        self.task = asyncio.create_task(self._read())
        self.pool = AsyncConnectionPool(self.database_url, min_size=4, max_size=16, open=False)
        await self.pool.open()
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await self.listen.close()
        await self.pool.close()

    async def _read(self) -> None:
        async for note in self.listen.notifies():
            data = json.loads(note.payload)
            fut = self.waiting.get(data["id"])
            if data["status"] == "ringing" and fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

    async def invite(self, caller: str, callee: str) -> tuple[str, float]:
        """Inserts as the caller's client would (RLS); returns (id, insert commit time)."""
        async with self.pool.connection() as c:
            async with c.transaction():
                await c.execute("set local role authenticated")
                await c.execute("select set_config('request.jwt.claims', %s, true)",
                                (json.dumps({"sub": caller, "role": "authenticated"}),))
                cur = await c.execute(
                    "insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning id",
                    (f"iso-{uuid.uuid4().hex[:12]}", caller, callee))
                inv_id = str((await cur.fetchone())[0])
                self.waiting[inv_id] = asyncio.get_running_loop().create_future()
        return inv_id, time.perf_counter()

    async def probe(self, users: list[str], gap: float) -> list[float]:
        latencies = []
        for i in range(0, len(users), 2):
            inv_id, at = await self.invite(users[i], users[i + 1])
            latencies.append(await asyncio.wait_for(self.waiting[inv_id], 60) - at)
            await asyncio.sleep(gap)
        return latencies


async def _count(pool: AsyncConnectionPool, sql: str) -> int:
    async with pool.connection() as c:
        return (await (await c.execute(sql)).fetchone())[0]


async def run(database_url: str, backlog: int, probes: int, gap: float, control: bool = False) -> dict:
    users = await _users(database_url, 4 * probes)
    base_users, loaded_users = users[:2 * probes], users[2 * probes:4 * probes]
    backlog_users = await _users(database_url, 2 * backlog, {"missed_call_emails": False} if control else None)
    async with Ringing(database_url) as ringing:
        await ringing.probe(users[:4], gap)  # warm up (first connections, first room)
        baseline = await ringing.probe(base_users, gap)

        started = time.perf_counter()
        ids = [inv_id for inv_id, _ in await asyncio.gather(
            *(ringing.invite(backlog_users[i], backlog_users[i + 1]) for i in range(0, 2 * backlog, 2)))]
        pending_sql = "select count(*) from public.notifications where status = 'pending'"
        # Built once every backlog invitation has been missed (each queued its email).
        open_sql = (f"select count(*) from public.call_invitations where status in ('pending', 'ringing') "
                    f"and id = any('{{{','.join(ids)}}}'::uuid[])")
        while await _count(ringing.pool, open_sql) > 0:
            if time.perf_counter() - started > 900:
                raise TimeoutError("the backlog did not build up")
            await asyncio.sleep(0.5)
        built = time.perf_counter() - started
        pending_before = await _count(ringing.pool, pending_sql)
        sent_before = await _count(ringing.pool, "select count(*) from public.notifications where status = 'sent'")
        t0, wall0 = time.perf_counter(), time.time()
        loaded = await ringing.probe(loaded_users, gap)
        elapsed, wall1 = time.perf_counter() - t0, time.time()
        pending_after = await _count(ringing.pool, pending_sql)
        sent_after = await _count(ringing.pool, "select count(*) from public.notifications where status = 'sent'")
    return {"baseline": baseline, "loaded": loaded, "built": built, "pending_before": pending_before,
            "pending_after": pending_after, "sent": sent_after - sent_before, "elapsed": elapsed,
            "window": (wall0, wall1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backlog", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between probe invitations")
    ap.add_argument("--send-latency", type=float, default=0.15, help="seconds the Resend stand-in takes per email")
    args = ap.parse_args()

    results = {}
    for control in (True, False):  # each in a fresh stack
        resend = ResendStandIn().start()
        resend.script(*[Answer(200, delay=args.send_latency)] * (args.backlog + 4 * args.probes + 100))
        env = {"RESEND_API_KEY": "re_bench_isolation_key", "RESEND_API_URL": resend.url,
               "CALLFLOW_EMAIL_FROM": "Calls <calls@bench.test>", "CALLFLOW_RING_TIMEOUT_SECONDS": "2",
               "CALLFLOW_SWEEP_INTERVAL_SECONDS": "1"}
        try:
            with stack(env, workers=1, concurrency=os.cpu_count() or 2, listener=True, beat=True) as s:
                result = asyncio.run(run(s.database_url, args.backlog, args.probes, args.gap, control))
        finally:
            resend.stop()
        # What Resend saw while the loaded probes ran: the rate must still hold (2/s by default).
        arrivals = sorted(r.at for r in resend.requests if result["window"][0] <= r.at <= result["window"][1])
        result["requests"] = len(arrivals)
        result["busiest"] = max((sum(1 for b in arrivals if a <= b < a + 1.0) for a in arrivals), default=0)
        results[control] = result

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f} ms"

    control, emails = results[True], results[False]
    phases = (("fresh stack, nothing queued", control["baseline"]),
              (f"after {args.backlog} missed calls, callees opted out (no email)", control["loaded"]),
              ("fresh stack, nothing queued", emails["baseline"]),
              (f"after {args.backlog} missed calls, their {emails['pending_before']} emails queued", emails["loaded"]))
    rows = [[name, str(len(v)), ms(v, 50), ms(v, 95), ms(v, 99), ms(v, 100)] for name, v in phases]
    print(f"machine: {machine()}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"worker: the Procfile's command, concurrency {os.cpu_count()}; Resend stand-in answering in "
          f"{args.send_latency * 1000:.0f} ms")
    print(table(rows, ["invitation → ringing", "n", "p50", "p95", "p99", "max"]))
    added = (percentile(emails["loaded"], 99) - percentile(control["loaded"], 99)) * 1000
    print(f"p99 added by the email backlog (same missed calls with and without their emails): {added:.0f} ms "
          f"(bound: 100 ms)")
    print(f"emails: {emails['pending_before']} pending when the probes started ({emails['built']:.0f} s to build), "
          f"{emails['pending_after']} after; {emails['sent']} sent during the {emails['elapsed']:.0f} s of probes "
          f"({emails['sent'] / emails['elapsed']:.2f}/s); Resend saw {emails['requests']} requests then, "
          f"at most {emails['busiest']} in any second")


if __name__ == "__main__":
    main()
