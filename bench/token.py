"""Join tokens: `POST /api/livekit/token` and its authorisation query, on a database with history.

`.venv/bin/python -m bench.token [--history 200000] [--requests 3000] [--concurrency 16]`

On loopback, against a fresh database on the local Postgres and a private `redis-server`:

1. the database gets users and a history written with SQL (`--history` ended 1:1 calls with their
   invitations), then live rooms: 1:1 calls ringing and active, group calls (a caller, 8 callees:
   accepted, ringing, declined), and reused rooms (the same name for 500 ended calls, then a live one);
2. a mix of requests is drawn (seeded): a party by room name (1:1, group, reused room), by
   invitation id, a declined callee and a stranger (403), an unknown room (404);
3. **query**: `JoinTokenStore.authorise` in this process (the route's pool, 8 connections): one at a
   time (latency p50/p99), then `--concurrency` at once (requests/s);
4. **route**: the same requests over HTTP to the `web` process (uvicorn, one process; keep-alive):
   one at a time, then `--concurrency` at once. The whole route: the user token's check, the rate
   limit in Redis (set out of reach), the query, the LiveKit token's signature.

Every answer is checked against what the request expects (a benchmark of wrong answers is worthless).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from bench.stack import machine, percentile, table
from devstack import services

GROUP_SIZE = 8
REUSED_CALLS = 500


def seed(db_url: str, users: int, history: int, live: int, groups: int, reused: int) -> dict:
    """The rows, written as they stand (triggers off: this is the data, not the lifecycle)."""
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute("set session_replication_role = replica")
        db.execute("""insert into auth.users (id, email, raw_user_meta_data)
                      select ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                             'user' || g || '@bench.test', jsonb_build_object('full_name', 'User ' || g)
                        from generate_series(1, %s) g""", (users,))
        uid = "('00000000-0000-4000-8000-' || lpad(to_hex({}), 12, '0'))::uuid"
        # ended 1:1 calls, each with its invitation (completed, declined or missed)
        db.execute(f"""
            with c as (
              insert into public.calls (id, room_name, call_type, caller_id, status, created_at, started_at, ended_at,
                                        end_reason)
              select gen_random_uuid(), 'old-' || g, case when g %% 3 = 0 then 'audio' else 'video' end,
                     {uid.format('1 + g %% %(users)s')}, (array['completed', 'declined', 'missed'])[1 + g %% 3],
                     now() - (g || ' minutes')::interval, now() - (g || ' minutes')::interval,
                     now() - (g || ' minutes')::interval + interval '2 minutes',
                     (array['hangup', 'declined', 'timeout'])[1 + g %% 3]
                from generate_series(1, %(history)s) g
              returning id, room_name, call_type, caller_id, status, created_at
            )
            insert into public.call_invitations (room_name, caller_id, callee_id, call_type, status, call_id, created_at,
                                                 ringing_at, answered_at, ended_at, end_reason)
            select room_name, caller_id, {uid.format("1 + (substr(room_name, 5)::int + 1) %% %(users)s")},
                   call_type, case status when 'completed' then 'accepted' else status end, id, created_at,
                   created_at, case when status = 'completed' then created_at end, created_at + interval '30 seconds',
                   case status when 'completed' then 'answered' when 'declined' then 'declined' else 'timeout' end
              from c""", {"history": history, "users": users})

        def live_room(prefix: str, n: int, call_status: str, inv_status: str) -> None:
            db.execute(f"""
                with c as (
                  insert into public.calls (id, room_name, call_type, caller_id, status, created_at)
                  select gen_random_uuid(), '{prefix}-' || g, case when g %% 4 = 0 then 'audio' else 'video' end,
                         {uid.format('1 + (g * 13) %% %(users)s')}, %(call_status)s, now() from generate_series(1, %(n)s) g
                  returning id, room_name, call_type, caller_id
                )
                insert into public.call_invitations (room_name, caller_id, callee_id, call_type, status, call_id,
                                                     created_at, ringing_at)
                select room_name, caller_id, {uid.format("1 + (split_part(room_name, '-', 2)::int * 13 + 5) %% %(users)s")},
                       call_type, %(inv_status)s, id, now(), now() from c""",
                       {"n": n, "users": users, "call_status": call_status, "inv_status": inv_status})

        live_room("ringing", live, "ringing", "ringing")
        live_room("active", live, "active", "accepted")
        # group calls: a caller, 8 callees (4 accepted, 3 ringing, 1 declined)
        db.execute(f"""
            with c as (
              insert into public.calls (id, room_name, call_type, caller_id, status, created_at)
              select gen_random_uuid(), 'group-' || g, 'video', {uid.format('1 + (g * 17) %% %(users)s')}, 'active', now()
                from generate_series(1, %(groups)s) g
              returning id, room_name, caller_id
            )
            insert into public.call_invitations (room_name, caller_id, callee_id, call_type, status, call_id, created_at)
            select room_name, caller_id,
                   {uid.format("1 + (split_part(room_name, '-', 2)::int * 17 + k) %% %(users)s")}, 'video',
                   case when k <= 4 then 'accepted' when k <= 7 then 'ringing' else 'declined' end, id, now()
              from c, generate_series(1, {GROUP_SIZE}) k""", {"groups": groups, "users": users})
        # reused rooms: 500 ended calls under one name, then a live one
        db.execute(f"""
            with c as (
              insert into public.calls (id, room_name, call_type, caller_id, status, created_at, ended_at)
              select gen_random_uuid(), 'dm-' || r, 'video', {uid.format('1 + (r * 19) %% %(users)s')},
                     case when k = {REUSED_CALLS + 1} then 'active' else 'completed' end,
                     now() - ((1000 - k) || ' minutes')::interval,
                     case when k = {REUSED_CALLS + 1} then null else now() - ((999 - k) || ' minutes')::interval end
                from generate_series(1, %(reused)s) r, generate_series(1, {REUSED_CALLS + 1}) k
              returning id, room_name, caller_id, created_at
            )
            insert into public.call_invitations (room_name, caller_id, callee_id, call_type, status, call_id, created_at)
            select room_name, caller_id, {uid.format("1 + (split_part(room_name, '-', 2)::int * 19 + 3) %% %(users)s")},
                   'video', 'accepted', id, created_at from c""", {"reused": reused, "users": users})
        db.execute("set session_replication_role = origin")
        db.execute("analyze")
        rows = db.execute("""select i.id::text, i.room_name, i.caller_id::text, i.callee_id::text, i.status
                               from public.call_invitations i
                              where i.room_name not like 'old-%'""").fetchall()
        old = db.execute("select room_name, caller_id::text from public.call_invitations where room_name like 'old-%' "
                         "order by random() limit 2000").fetchall()
        counts = db.execute("select (select count(*) from public.calls) as calls, "
                            "(select count(*) from public.call_invitations) as invitations").fetchone()
    return {"live": rows, "old": old, "calls": counts[0], "invitations": counts[1]}


def draw_requests(data: dict, users: int, n: int, rng: random.Random) -> list[tuple[str, dict, int]]:
    """(user id, body, expected status)."""
    def user(k: int) -> str:
        return f"00000000-0000-4000-8000-{k:012x}"

    by_kind: dict[str, list] = {"ringing": [], "active": [], "group": [], "dm": []}
    declined = []
    for inv_id, room, caller, callee, status in data["live"]:
        kind = room.split("-")[0]
        if status == "declined":
            declined.append((callee, room))
        else:
            by_kind[kind].append((inv_id, room, caller, callee))
    dm_live = {}
    for item in by_kind["dm"]:
        dm_live[item[1]] = item  # the newest row per room: the live call's (inserted last)
    mix = []
    for _ in range(n):
        r = rng.random()
        if r < 0.30:    # a 1:1 party by room name
            inv_id, room, caller, callee = rng.choice(by_kind[rng.choice(["ringing", "active"])])
            mix.append((rng.choice([caller, callee]), {"room_name": room}, 200))
        elif r < 0.50:  # a 1:1 party by invitation
            inv_id, room, caller, callee = rng.choice(by_kind[rng.choice(["ringing", "active"])])
            mix.append((rng.choice([caller, callee]), {"invitation_id": inv_id}, 200))
        elif r < 0.65:  # a member of a group call
            inv_id, room, caller, callee = rng.choice(by_kind["group"])
            mix.append((rng.choice([caller, callee]), {"room_name": room}, 200))
        elif r < 0.75:  # a room reused for 500 calls
            inv_id, room, caller, callee = rng.choice(list(dm_live.values()))
            mix.append((rng.choice([caller, callee]), {"room_name": room}, 200))
        elif r < 0.82:  # the declined callee of a group call
            callee, room = rng.choice(declined)
            mix.append((callee, {"room_name": room}, 403))
        elif r < 0.90:  # a party of an ended call
            room, caller = rng.choice(data["old"])
            mix.append((caller, {"room_name": room}, 403))
        elif r < 0.95:  # a stranger (a user in no room)
            inv_id, room, caller, callee = rng.choice(by_kind["active"])
            mix.append((user(users + rng.randint(1, 100)), {"room_name": room}, 403))
        else:           # nowhere
            mix.append((user(users + rng.randint(1, 100)), {"room_name": f"nowhere-{rng.getrandbits(48):x}"}, 404))
    return mix


def _status(decision) -> int:
    return {"granted": 200, "forbidden": 403, "not_found": 404}[decision.outcome]


async def bench_query(db_url: str, mix, concurrency: int) -> dict:
    from orchestration.join_tokens import JoinTokenStore

    store = JoinTokenStore(db_url)
    try:
        async def one(user, body, expected):
            decision = await store.authorise(user, **body)
            assert _status(decision) == expected, (user, body, decision)

        for item in mix[:200]:  # warm: the pool, prepared statements, plans
            await one(*item)
        latencies = []
        for item in mix:
            t = time.perf_counter()
            await one(*item)
            latencies.append((time.perf_counter() - t) * 1000)
        rate = await _concurrently(one, mix, concurrency)
    finally:
        await store.close()
    return _figures(latencies, rate)


async def bench_route(port: int, mix, tokens: dict[str, str], concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10) as client:
        async def one(user, body, expected):
            resp = await client.post("/api/livekit/token", content=json.dumps(body),
                                     headers={"Authorization": f"Bearer {tokens[user]}",
                                              "Content-Type": "application/json"})
            assert resp.status_code == expected, (user, body, resp.status_code, resp.text)

        for item in mix[:200]:
            await one(*item)
        latencies = []
        for item in mix:
            t = time.perf_counter()
            await one(*item)
            latencies.append((time.perf_counter() - t) * 1000)
        rate = await _concurrently(one, mix, concurrency)
    return _figures(latencies, rate)


async def _concurrently(one, mix, concurrency: int) -> float:
    queue = list(mix)

    async def runner():
        while queue:
            await one(*queue.pop())

    t = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return len(mix) / (time.perf_counter() - t)


def _figures(latencies: list[float], rate: float) -> dict:
    return {"p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 99),
            "mean_ms": statistics.fmean(latencies), "per_second": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--history", type=int, default=200_000, help="ended 1:1 calls before the live ones")
    parser.add_argument("--live", type=int, default=2_000, help="1:1 calls ringing, and as many active")
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--reused", type=int, default=20, help="rooms reused for 500 calls each")
    parser.add_argument("--requests", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=24)
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="callflow-bench-token-"))
    redis_server = services.RedisServer().start()
    db_url = services.create_database("callflow_bench")
    web = None
    try:
        t = time.perf_counter()
        data = seed(db_url, args.users, args.history, args.live, args.groups, args.reused)
        seeded_in = time.perf_counter() - t
        mix = draw_requests(data, args.users, args.requests, random.Random(args.seed))

        from config.settings import build_settings
        from orchestration.auth import dev_access_token

        os.environ.update({"DATABASE_URL": db_url, "REDIS_URL": redis_server.url, "CALLFLOW_ENV": "development"})
        settings = build_settings()
        tokens = {user: dev_access_token(settings, user, ttl_seconds=3600) for user, _, _ in mix}

        query = asyncio.run(bench_query(db_url, mix, args.concurrency))

        port = services.free_port()
        env = {**os.environ, "PORT": str(port), "CALLFLOW_TOKEN_RATE_PER_MINUTE": "1000000000"}
        for key in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET"):
            env.pop(key, None)
        web = services.web_server(env, log_dir, port)
        services.wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
                          timeout=30, what="web")
        route = asyncio.run(bench_route(port, mix, tokens, args.concurrency))
    finally:
        if web is not None:
            web.stop()
        redis_server.cleanup()
        services.drop_database(db_url)

    print(f"machine: {machine()}")
    print(f"database: {data['calls']:,} calls, {data['invitations']:,} invitations (seeded in {seeded_in:.1f} s); "
          f"{len(mix):,} requests ({sum(1 for m in mix if m[2] == 200):,} granted), concurrency {args.concurrency}\n")
    rows = [[name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}", f"{r['per_second']:.0f}"]
            for name, r in (("query (authorise)", query), ("route (HTTP)", route))]
    print(table(rows, ["what", "p50 ms", "p99 ms", "mean ms", f"req/s at {args.concurrency}"]))


if __name__ == "__main__":
    main()
