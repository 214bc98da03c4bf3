"""Ringing an iPhone: insert → the VoIP push at APNs, beside insert → `ringing`, at a steady call rate (issue 25).

The stack: a fresh database, a private Redis, the real LiveKit server, the listener (LISTEN
source), beat, and one worker run as the Procfile runs it (all queues, concurrency = the machine's
cores), with APNS_* pointed at the APNs stand-in (devstack/standins/apns_server.py, real HTTP/2 with
prior knowledge, checking the provider JWT's ES256 signature; threads of this process).

Each callee registers one PushKit VoIP token through `register_push_token(..., 'apns_voip')`, as
its client would. Calls then come open loop, `--rate` a second for `--seconds`, each from a distinct
caller to a distinct callee (inserted as the caller's client, under RLS), and each is cancelled by
its caller once its VoIP push has reached the stand-in (or after `--timeout` seconds). Per call,
from the insert's commit: to `ringing` (the database's own NOTIFY, LISTEN callflow_invitations)
and to its VoIP push arriving at the stand-in (the request's last frame read).

    .venv/bin/python -m bench.voip [--rate 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
import uuid

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.driver import ClientDriver
from bench.isolation import _users
from bench.stack import cpu_by_process, cpu_delta, machine, percentile, stack, table
from devstack.standins.apns_server import ApnsStandin

BUDGET_MS = 20
KEY_ID, TEAM_ID, TOPIC = "BENCHKEY01", "BENCHTEAM1", "com.example.callflow"


class Apns(ApnsStandin):
    """The stand-in, telling the benchmark when an invitation's VoIP push arrives (answered 200)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[str, asyncio.Future] = {}

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def _respond(self, conn, number, stream, headers, body, arrived) -> None:
        super()._respond(conn, number, stream, headers, body, arrived)
        with self._lock:
            record = next((r for r in reversed(self.requests) if r.connection == number and r.stream == stream), None)
        if record is None or record.status != 200 or self.loop is None:
            return
        fut = self.waiting.get((record.payload or {}).get("invitation_id"))
        if fut is not None:
            self.loop.call_soon_threadsafe(lambda f=fut, t=record.at: f.done() or f.set_result(t))


class Driver(ClientDriver):
    clock = staticmethod(time.monotonic)  # the APNs stand-in records arrivals on it

    def __init__(self, database_url: str, apns: Apns) -> None:
        super().__init__(database_url, min_size=8, max_size=24)
        self.apns = apns

    def watching(self, invitation_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.apns.waiting[invitation_id] = loop.create_future()

    async def call(self, caller: str, callee: str, timeout: float) -> tuple[float | None, float | None, str, float]:
        """One call: (insert → ringing, insert → VoIP push) in seconds (None: not within `timeout`),
        with its invitation id and the insert's commit on the wall clock (the database's)."""
        row = await self.as_client(caller, "insert into public.call_invitations (room_name, caller_id, callee_id)"
                                           " values (%s, %s, %s) returning id",
                                   (f"voip-{uuid.uuid4().hex[:12]}", caller, callee), watch=True)
        at, wall = time.monotonic(), time.time()
        inv = str(row[0])
        ring = push = None
        deadline = at + timeout
        try:
            ring = await asyncio.wait_for(self.ringing[inv], max(0.01, deadline - time.monotonic())) - at
        except asyncio.TimeoutError:
            pass
        try:
            push = await asyncio.wait_for(self.apns.waiting[inv], max(0.01, deadline - time.monotonic())) - at
        except asyncio.TimeoutError:
            pass
        try:
            await self.as_client(caller, "update public.call_invitations set status = 'cancelled' where id = %s"
                                         " and status in ('pending', 'ringing') returning id", (inv,))
        except psycopg.Error:
            pass  # it ended otherwise meanwhile
        return ring, push, inv, wall


async def _register(driver: Driver, callees: list[str]) -> list[str]:
    tokens = [secrets.token_hex(32) for _ in callees]
    sem = asyncio.Semaphore(8)

    async def one(user: str, tok: str) -> None:
        async with sem:
            await driver.as_client(user, "select id from public.register_push_token(%s, 'ios', 'iPhone', 'apns_voip')",
                                   (tok,))

    await asyncio.gather(*(one(u, t) for u, t in zip(callees, tokens)))
    return tokens


async def run(database_url: str, apns: Apns, args) -> dict:
    apns.watch(asyncio.get_running_loop())
    n = int(round(args.rate * args.seconds))
    warm = 10
    users = await _users(database_url, 2 * (n + warm))
    callers, callees = users[0::2], users[1::2]
    out: dict = {}
    async with Driver(database_url, apns) as d:
        await _register(d, callees)
        for i in range(warm):  # warm up, one at a time (first connections, provider tokens, rooms)
            await d.call(callers[n + i], callees[n + i], args.timeout)
        await asyncio.sleep(1.0)
        tasks = []
        t0, cpu0 = time.monotonic(), cpu_by_process()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
            tasks.append(asyncio.create_task(d.call(callers[i], callees[i], args.timeout)))
        offered = time.monotonic() - t0
        results = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        out["cpu"] = {k: v / elapsed for k, v in cpu_delta(cpu0, cpu_by_process()).items()}
        out["offered_rate"] = (n - 1) / offered if offered > 0 else float("nan")
        out["ring"] = [r for r, _, _, _ in results if r is not None]
        out["push"] = [p for _, p, _, _ in results if p is not None]
        out["diff"] = [p - r for r, p, _, _ in results if r is not None and p is not None]
        out["calls"] = n
        out["no_ring"] = sum(1 for r, _, _, _ in results if r is None)
        out["no_push"] = sum(1 for _, p, _, _ in results if p is None)
        async with d.pool.connection() as c:
            # Where the push's time goes: the delivery run's transaction starts at its first statement
            # (`sent_at` is its now()), so ringing → run start is the publish, the queue and the
            # task's start; run start → APNs is the run's own work and the request.
            started = {str(inv): sent_at.timestamp() for inv, sent_at in await (await c.execute(
                """select m.invitation_id, m.sent_at from public.push_messages m where m.sent_at is not null
                     and m.invitation_id = any(%s::uuid[])""", ([inv for _, _, inv, _ in results],))).fetchall()}
            out["to_run"] = [started[inv] - wall - r for r, p, inv, wall in results
                             if r is not None and p is not None and inv in started]
            out["run"] = [p - (started[inv] - wall) for r, p, inv, wall in results
                          if r is not None and p is not None and inv in started]
            out["rows"] = dict(await (await c.execute(
                """select m.status, count(*) from public.push_messages m join public.push_tokens t
                     on t.id = m.push_token_id where t.provider = 'apns_voip' group by m.status""")).fetchall())
    with apns._lock:
        out["answers"] = {}
        for r in apns.requests:
            out["answers"][r.status] = out["answers"].get(r.status, 0) + 1
        out["requests"] = len(apns.requests)
    out["connections"], out["jwts"] = apns.connections, len(apns.jwts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="calls a second (open loop)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of calls")
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="seconds a call waits for its push before it is cancelled")
    args = ap.parse_args()

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    apns = Apns(key.public_key(), KEY_ID, TEAM_ID, topic=TOPIC).start()
    env = {"APNS_KEY_ID": KEY_ID, "APNS_TEAM_ID": TEAM_ID, "APNS_PRIVATE_KEY": pem, "APNS_TOPIC": TOPIC,
           "APNS_URL": apns.url, "CALLFLOW_SWEEP_INTERVAL_SECONDS": "1"}
    try:
        with stack(env, workers=1, concurrency=os.cpu_count() or 2, listener=True, beat=True) as s:
            r = asyncio.run(run(s.database_url, apns, args))
    finally:
        apns.stop()

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f} ms" if values else "-"

    rows = [[name, str(len(r[k])), ms(r[k], 50), ms(r[k], 99), ms(r[k], 100)]
            for name, k in (("insert → ringing (NOTIFY)", "ring"), ("insert → VoIP push at APNs", "push"),
                            ("push − ringing (per call)", "diff"),
                            ("  ringing → the delivery run starts", "to_run"),
                            ("  the run's start → at APNs", "run"))]
    print(f"machine: {machine()}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"worker: the Procfile's command, concurrency {os.cpu_count()}; {r['calls']} calls offered at "
          f"{r['offered_rate']:.1f}/s (asked {args.rate:g}/s for {args.seconds:g} s), each to a distinct callee "
          f"with one VoIP device, cancelled once its push arrived (or after {args.timeout:g} s)")
    print(table(rows, ["from the insert's commit", "calls", "p50", "p99", "max"]))
    added = (percentile(r["push"], 99) - percentile(r["ring"], 99)) * 1000
    print(f"p99 of the VoIP push − p99 of ringing: {added:+.0f} ms (budget: +{BUDGET_MS} ms) "
          f"{'within' if added <= BUDGET_MS else 'OVER'}")
    print(f"no ringing: {r['no_ring']}, no VoIP push: {r['no_push']}; APNs stand-in: {r['requests']} requests "
          + ", ".join(f"{n} × {s}" for s, n in sorted(r["answers"].items()))
          + f", over {r['connections']} connection(s), {r['jwts']} provider token(s); VoIP push rows: "
          + ", ".join(f"{n} {s}" for s, n in sorted(r["rows"].items())))
    print("CPU while the calls ran (cores busy, whole machine by role): " + ", ".join(
        f"{role} {v:.2f}" for role, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if v >= 0.01))


if __name__ == "__main__":
    main()
