"""Latency as users feel it, through the doors they use (issue 26): a caller's insert → the callee's
event stream (`GET /api/calls/events`) showing `ringing`, and the callee's
`POST /api/calls/{id}/accept` → the caller's stream showing `accepted`, at a steady call rate.

The stack (bench/stack.py): the `web` process (the Procfile's uvicorn: the event streams and the
accept route), the listener, beat, one worker run as the Procfile runs it, the real LiveKit server,
on a fresh database, or with `--database URL` on an existing migrated one (bench.history's year of
history: `python -m bench.history` prints its URL) which is kept.

Every user's event stream is open before the calls start, as each app keeps its own (raw HTTP/1.1
on loopback, `?access_token=` as EventSource sends it; opened in waves of 100). Calls then come
open loop, `--rate` a second for `--seconds`, each between two users of their own: the caller
inserts the invitation as its client would (under RLS); the callee, once its stream shows
`ringing`, accepts through the route. Per call: from the insert's commit to the `ringing` row on the callee's
stream (beside its ceiling, the same insert → `ringing` by the database's own NOTIFY: the
lifecycle's part), and from the accept's 200 (its commit) to the `accepted` row on the caller's
stream.

    .venv/bin/python -m bench.doors [--rate 50] [--seconds 20] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import httpx

from bench.driver import ClientDriver
from bench.isolation import _users
from bench.sse import open_stream
from bench.stack import cpu_by_process, cpu_delta, machine, percentile, stack, table

BUDGET_MS = 100  # the issue's: p99 of each hop under 100 ms at 50 calls a second


class Stream:
    """One user's `GET /api/calls/events`: when each (invitation, status) row arrived."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.seen: dict[tuple[str, str], asyncio.Future] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    def expect(self, invitation_id: str, status: str) -> asyncio.Future:
        return self.seen.setdefault((invitation_id, status), asyncio.get_running_loop().create_future())

    async def open(self) -> "Stream":
        self.reader, self.writer = await open_stream(self.port, self.token)
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while line := await self.reader.readline():
            if line.startswith(b"data: "):
                at = time.perf_counter()
                row = json.loads(line[6:])
                if "status" in row and "callee_id" in row:  # an invitation's row (a `call` event has no callee)
                    fut = self.expect(str(row["id"]), row["status"])
                    if not fut.done():
                        fut.set_result(at)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


async def call(driver: ClientDriver, http: httpx.AsyncClient, streams: dict[str, Stream], tokens: dict[str, str],
               caller: str, callee: str, timeout: float) -> dict:
    """One call: {"ring": insert → callee's stream, "notify": insert → ringing by NOTIFY, "accept":
    accept → caller's stream} in seconds (None: not within `timeout`)."""
    out: dict = {"ring": None, "notify": None, "accept": None, "error": None}
    try:
        row = await driver.as_client(caller, "insert into public.call_invitations (room_name, caller_id, callee_id)"
                                             " values (%s, %s, %s) returning id",
                                     (f"doors-{uuid.uuid4().hex[:12]}", caller, callee), watch=True)
        committed = time.perf_counter()
        inv = str(row[0])
        ringing = streams[callee].expect(inv, "ringing")
        accepted = streams[caller].expect(inv, "accepted")
        out["ring"] = await asyncio.wait_for(ringing, timeout) - committed
        out["notify"] = await asyncio.wait_for(driver.ringing[inv], timeout) - committed
        answer = await http.post(f"/api/calls/{inv}/accept", headers={"Authorization": f"Bearer {tokens[callee]}"})
        answered = time.perf_counter()
        if answer.status_code != 200:
            out["error"] = f"accept: {answer.status_code} {answer.text[:120]}"
            return out
        out["accept"] = await asyncio.wait_for(accepted, timeout) - answered
    except (asyncio.TimeoutError, OSError, httpx.HTTPError) as exc:
        out["error"] = f"{exc.__class__.__name__}: {exc}"[:160]
    return out


async def run(database_url: str, port: int, args) -> dict:
    from config.settings import build_settings
    from orchestration.auth import dev_access_token

    settings = build_settings()
    n = int(round(args.rate * args.seconds))
    warm = 10
    users = await _users(database_url, 2 * (n + warm))
    tokens = {u: dev_access_token(settings, u, ttl_seconds=3600) for u in users}
    callers, callees = users[0::2], users[1::2]
    out: dict = {}
    # Every user's stream open before the calls, as an app keeps its own (waves of 100, as clients arrive).
    streams = {u: Stream(port, tokens[u]) for u in users}
    opened = time.perf_counter()
    for start in range(0, len(users), 100):
        await asyncio.gather(*(streams[u].open() for u in users[start:start + 100]))
    out["opened_in"] = time.perf_counter() - opened
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with ClientDriver(database_url, min_size=8, max_size=24) as driver, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10) as http:
            for i in range(warm):  # warm up, one at a time (connections, the web process's first reads)
                await call(driver, http, streams, tokens, callers[n + i], callees[n + i], args.timeout)
            await asyncio.sleep(1.0)
            t0, cpu0 = time.perf_counter(), cpu_by_process()
            tasks = []
            for i in range(n):
                await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
                tasks.append(asyncio.create_task(call(driver, http, streams, tokens, callers[i], callees[i],
                                                      args.timeout)))
            results = await asyncio.gather(*tasks)
            out["cpu"] = {k: v / (time.perf_counter() - t0) for k, v in cpu_delta(cpu0, cpu_by_process()).items()}
    finally:
        for stream in streams.values():
            stream.close()
    out["ring"] = [r["ring"] for r in results if r["ring"] is not None]
    out["notify"] = [r["notify"] for r in results if r["notify"] is not None]
    out["stream"] = [r["ring"] - r["notify"] for r in results if r["ring"] is not None and r["notify"] is not None]
    out["accept"] = [r["accept"] for r in results if r["accept"] is not None]
    out["errors"] = [r["error"] for r in results if r["error"]]
    out["calls"] = n
    out["streams"] = len(streams)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="calls a second (open loop)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of calls")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a hop is waited for")
    ap.add_argument("--database", help="an existing migrated database (kept), e.g. bench.history's")
    args = ap.parse_args()

    # Two streams a call: the web process's cap on streams is raised above them.
    env = {"CALLFLOW_SWEEP_INTERVAL_SECONDS": "1", "CALLFLOW_STREAMS_PER_PROCESS": "100000"}
    where = {}
    if args.database:  # e.g. bench.history's year, which beat's prune must not eat into
        from bench.history import KEEP_THE_YEAR
        where = {"database_url": args.database}
        env.update(KEEP_THE_YEAR)
    with stack(env, workers=1, concurrency=os.cpu_count() or 2,
               listener=True, beat=True, web=True, **where) as s:
        r = asyncio.run(run(s.database_url, s.web_port, args))

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f} ms" if values else "-"

    rows = [[name, str(len(r[k])), ms(r[k], 50), ms(r[k], 99), ms(r[k], 100)]
            for name, k in (("insert → callee's stream shows ringing", "ring"),
                            ("  the ceiling: insert → ringing (the database's NOTIFY)", "notify"),
                            ("  the stream's part, per call", "stream"),
                            ("accept (POST) → caller's stream shows accepted", "accept"))]
    print(f"machine: {machine()}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(f"database: {'existing, ' + args.database.rsplit('/', 1)[-1] if args.database else 'fresh'}; "
          f"{r['calls']} calls at {args.rate:g}/s for {args.seconds:g} s, each between two users of their own; "
          f"{r['streams']} streams open throughout (opened in {r['opened_in']:.1f} s)")
    print(table(rows, ["hop", "calls", "p50", "p99", "max"]))
    for name, k in (("ringing", "ring"), ("accepted", "accept")):
        p99 = percentile(r[k], 99) * 1000 if r[k] else float("nan")
        print(f"{name} p99: {p99:.0f} ms (budget < {BUDGET_MS} ms) {'within' if p99 < BUDGET_MS else 'OVER'}")
    if r["errors"]:
        print(f"{len(r['errors'])} calls with an error, e.g. {r['errors'][0]}")
    print("CPU while the calls ran (cores busy, whole machine by role): " + ", ".join(
        f"{role} {v:.2f}" for role, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if v >= 0.01))


if __name__ == "__main__":
    main()
