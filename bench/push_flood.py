"""Ringing for everyone else while one account floods its own devices with pushes (issue 23).

The stack: a fresh database, a private Redis, the real LiveKit server, the listener (LISTEN
source), beat, and one worker run as the Procfile runs it (all queues, concurrency = the machine's
cores); pushes go to the Expo stand-in (devstack/standins/expo_server.py, a thread of this process).

The flooding account registers `--tokens` devices through `register_push_token`, as its client
would (the cap leaves 10 of them on). Its accomplices (`--flood-rate` x 2 of them, so each stays
within the contract's 30 invitations a minute) then call it `--flood-rate` times a second, each
call cancelled by its caller after `--hold` seconds: an incoming_call and a call_ended push to each
of its devices. The global push rate is scaled down (`--push-rate`, default 50/s, for Expo's 600)
so that this flood asks for more than all of it (4 calls/s x 10 devices x 2 = 80 pushes/s).

Probes, the same in each phase: other users (one device each) called one at a time, `--gap`
apart, each cancelled once its push has arrived; timed from the insert's commit to `ringing` (the
database's own NOTIFY) and to its incoming_call push reaching the Expo stand-in.

Phases, in one run on one stack: 1. quiet; 2. flood (the account's 10 devices); 3. control: the
same calls to an account with no device (the flood's lifecycle work without its pushes).

    .venv/bin/python -m bench.push_flood [--probes 200] [--flood-rate 4] [--push-rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
import uuid

import psycopg

from bench.driver import ClientDriver
from bench.isolation import _users
from bench.stack import cpu_by_process, cpu_delta, machine, percentile, stack, table
from devstack.standins.expo_server import ExpoStandin

BOUND_MS = 20


class Expo(ExpoStandin):
    """The stand-in, telling the benchmark when a probe's incoming_call arrives."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[tuple[str, str], asyncio.Future] = {}
        self.arrivals: list[tuple[float, str]] = []  # (perf_counter, token) of every message answered ok

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def _send(self, handler, body) -> None:
        before = len(self.sends)
        super()._send(handler, body)
        at = time.perf_counter()
        for record in self.sends[before:]:
            if record.status != 200:
                continue
            self.arrivals += [(at, m["to"]) for m in record.messages]
            for m in record.messages:
                fut = self.waiting.get((m["data"].get("invitation_id"), m["data"].get("kind")))
                if fut is not None and self.loop is not None:
                    self.loop.call_soon_threadsafe(lambda f=fut, t=at: f.done() or f.set_result(t))


class Driver(ClientDriver):
    def __init__(self, database_url: str, expo: Expo) -> None:
        super().__init__(database_url, min_size=4, max_size=16)
        self.expo = expo

    def watching(self, invitation_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.expo.waiting[(invitation_id, "incoming_call")] = loop.create_future()

    async def invite(self, caller: str, callee: str, watch: bool = False) -> tuple[str, float]:
        row = await self.as_client(caller, "insert into public.call_invitations (room_name, caller_id, callee_id)"
                                           " values (%s, %s, %s) returning id",
                                   (f"flood-{uuid.uuid4().hex[:12]}", caller, callee), watch)
        return str(row[0]), time.perf_counter()

    async def cancel(self, caller: str, invitation: str) -> None:
        try:
            await self.as_client(caller, "update public.call_invitations set status = 'cancelled' where id = %s"
                                         " and status in ('pending', 'ringing') returning id", (invitation,))
        except psycopg.Error:
            pass  # it ended otherwise meanwhile

    async def probe(self, users: list[str], gap: float, timeout: float) -> tuple[list[float], list[float], int]:
        """Calls one at a time (`gap` apart, each as soon as the last rings); each is cancelled by its
        caller once its push has arrived (or, with none, after `timeout`)."""
        ring: list[float] = []
        push: list[float] = []
        missing = 0

        async def settle(caller: str, inv: str, at: float) -> None:
            nonlocal missing
            try:
                push.append(await asyncio.wait_for(self.expo.waiting[(inv, "incoming_call")], timeout) - at)
            except asyncio.TimeoutError:
                missing += 1
            await self.cancel(caller, inv)

        settling = []
        for i in range(0, len(users), 2):
            inv, at = await self.invite(users[i], users[i + 1], watch=True)
            ring.append(await asyncio.wait_for(self.ringing[inv], 60) - at)
            settling.append(asyncio.create_task(settle(users[i], inv, at)))
            await asyncio.sleep(gap)
        await asyncio.gather(*settling)
        return ring, push, missing

    async def flood(self, accomplices: list[str], target: str, rate: float, hold: float, stop: asyncio.Event) -> int:
        calls, tasks, n = 0, [], 0

        async def one(caller: str) -> None:
            inv, _ = await self.invite(caller, target)
            await asyncio.sleep(hold)
            await self.cancel(caller, inv)

        start = time.perf_counter()
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(accomplices[n % len(accomplices)])))
            n += 1
            calls += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        await asyncio.gather(*tasks, return_exceptions=True)
        return calls


async def _register(driver: Driver, user: str, n: int) -> list[str]:
    tokens = [f"ExponentPushToken[{uuid.uuid4().hex[:22]}]" for _ in range(n)]
    for tok in tokens:
        await driver.as_client(user, "select id from public.register_push_token(%s, 'android', null)", (tok,))
    return tokens


async def _scalar(driver: Driver, sql: str, params: tuple = ()) -> int:
    async with driver.pool.connection() as c:
        return (await (await c.execute(sql, params)).fetchone())[0]


async def run(database_url: str, expo: Expo, args) -> dict:
    expo.watch(asyncio.get_running_loop())
    probes = await _users(database_url, 6 * args.probes)
    flooded, control = await _users(database_url, 2)
    accomplices = await _users(database_url, max(1, math.ceil(args.flood_rate * 2)))
    timeout = 35.0
    out: dict = {}
    async with Driver(database_url, expo) as d:
        for i in range(0, len(probes), 2):  # one device each (also keeps the phases' writes alike)
            await _register(d, probes[i + 1], 1)
        flood_tokens = set(await _register(d, flooded, args.tokens))
        out["enabled"] = await _scalar(d, "select count(*) from public.push_tokens where user_id = %s"
                                          " and disabled_at is null", (flooded,))
        await d.probe(probes[-8:], args.gap, timeout)  # warm up (first connections, first rooms)
        t0, cpu0 = time.perf_counter(), cpu_by_process()
        out["quiet"] = await d.probe(probes[:2 * args.probes], args.gap, timeout)
        out["quiet_cpu"] = {k: v / (time.perf_counter() - t0) for k, v in cpu_delta(cpu0, cpu_by_process()).items()}
        for name, target, users in (("flood", flooded, probes[2 * args.probes:4 * args.probes]),
                                    ("control", control, probes[4 * args.probes:6 * args.probes - 8])):
            stop = asyncio.Event()
            sent_before = len(expo.arrivals)
            flood = asyncio.create_task(d.flood(accomplices, target, args.flood_rate, args.hold, stop))
            await asyncio.sleep(args.lead)  # the flood builds up first
            t0, cpu0 = time.perf_counter(), cpu_by_process()
            out[name] = await d.probe(users, args.gap, timeout)
            elapsed = time.perf_counter() - t0
            out[f"{name}_cpu"] = {k: v / elapsed for k, v in cpu_delta(cpu0, cpu_by_process()).items()}
            stop.set()
            out[f"{name}_calls"] = await flood
            window = [(at, to) for at, to in expo.arrivals[sent_before:] if t0 <= at <= t0 + elapsed]
            out[f"{name}_to_flooded"] = sum(1 for _, to in window if to in flood_tokens) / elapsed
            out[f"{name}_all"] = len(window) / elapsed
            arrivals = sorted(at for at, _ in window)
            out[f"{name}_busiest"] = max((sum(1 for b in arrivals[j:j + 2000] if b < a + 1.0)
                                          for j, a in enumerate(arrivals)), default=0)
        rows = await _scalar(d, "select count(*) from public.push_messages m join public.push_tokens t"
                                " on t.id = m.push_token_id where t.user_id = %s", (flooded,))
        by_status = {}
        async with d.pool.connection() as c:
            for status, n in await (await c.execute(
                    """select m.status, count(*) from public.push_messages m join public.push_tokens t
                         on t.id = m.push_token_id where t.user_id = %s group by m.status""", (flooded,))).fetchall():
                by_status[status] = n
        out["flooded_rows"], out["flooded_by_status"] = rows, by_status
        out["probe_skipped"] = await _scalar(
            d, """select count(*) from public.push_messages m join public.push_tokens t on t.id = m.push_token_id
                   where t.user_id = any(%s::uuid[]) and m.kind = 'incoming_call' and m.status = 'skipped'""",
            ([probes[i + 1] for i in range(0, len(probes), 2)],))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=200, help="probe calls per phase")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between probe calls")
    ap.add_argument("--tokens", type=int, default=1000, help="devices the flooding account registers")
    ap.add_argument("--flood-rate", type=float, default=4.0, help="calls a second to the flooded account")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds each flood call rings before its caller cancels")
    ap.add_argument("--lead", type=float, default=10.0, help="seconds the flood runs before the probes start")
    ap.add_argument("--push-rate", type=float, default=50.0, help="CALLFLOW_PUSH_RATE_PER_SECOND")
    args = ap.parse_args()

    expo = Expo().start()
    env = {"EXPO_PUSH_URL": expo.url, "CALLFLOW_PUSH_RATE_PER_SECOND": f"{args.push_rate:g}",
           "CALLFLOW_SWEEP_INTERVAL_SECONDS": "1"}
    try:
        with stack(env, workers=1, concurrency=os.cpu_count() or 2, listener=True, beat=True) as s:
            r = asyncio.run(run(s.database_url, expo, args))
    finally:
        expo.stop()

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f} ms" if values else "-"

    names = {"quiet": "quiet",
             "flood": f"flood: {args.flood_rate:g} calls/s to one account's {r['enabled']} devices",
             "control": f"control: {args.flood_rate:g} calls/s to an account with no device"}
    rows = []
    for key in ("quiet", "flood", "control"):
        ring, push, missing = r[key]
        rows.append([names[key], str(len(ring)), ms(ring, 50), ms(ring, 99), ms(ring, 100),
                     ms(push, 50), ms(push, 99), ms(push, 100), str(missing)])
    print(f"machine: {machine()}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"worker: the Procfile's command, concurrency {os.cpu_count()}; push rate {args.push_rate:g}/s "
          f"(a callee's share: max(1, rate/50)/s after a burst of 30); the flooding account registered "
          f"{args.tokens} devices, {r['enabled']} left on")
    print(table(rows, ["phase", "probes", "ringing p50", "p99", "max", "push p50", "p99", "max", "no push"]))
    q_ring, q_push = percentile(r["quiet"][0], 99), percentile(r["quiet"][1], 99)
    f_ring, f_push = percentile(r["flood"][0], 99), percentile(r["flood"][1], 99)
    c_ring, c_push = percentile(r["control"][0], 99), percentile(r["control"][1], 99)
    print(f"p99 added by the flood, against quiet: ringing {(f_ring - q_ring) * 1000:+.0f} ms, push "
          f"{(f_push - q_push) * 1000:+.0f} ms (bound: +{BOUND_MS} ms); against the control (same calls, no "
          f"device): ringing {(f_ring - c_ring) * 1000:+.0f} ms, push {(f_push - c_push) * 1000:+.0f} ms")
    print(f"flood: {r['flood_calls']} calls; pushes reaching Expo while the probes ran: "
          f"{r['flood_to_flooded']:.1f}/s to the flooded account, {r['flood_all']:.1f}/s in all, at most "
          f"{r['flood_busiest']} in any second; the flooded account's {r['flooded_rows']} pushes: "
          + ", ".join(f"{n} {s}" for s, n in sorted(r["flooded_by_status"].items()))
          + f"; probes' incoming_call pushes skipped: {r['probe_skipped']}")
    print("CPU while the probes ran (cores busy, whole machine by role): " + "; ".join(
        f"{key} " + ", ".join(f"{role} {v:.2f}" for role, v in sorted(r[f"{key}_cpu"].items(), key=lambda kv: -kv[1])
                              if v >= 0.01)
        for key in ("quiet", "flood", "control")))


if __name__ == "__main__":
    main()
