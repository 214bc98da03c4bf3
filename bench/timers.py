"""Timer lateness: many invitations ringing at once, each ended `missed` at its deadline.

Inserts `--count` invitations over about `--insert-seconds` (as clients, through the listener),
so that all of them ring at once, then waits for every ring timeout and reports
(ended_at − ring_deadline) p50/p99/max, the rate at which the deadlines came due (they follow the
ringing: missed / ringing spread), and the peak PSS of the workers (summed over all their
processes). With `--kill`, two workers run and one is SIGKILLed halfway through the timeouts:
the ones it held must still fire within the sweep interval plus one second.

    .venv/bin/python -m bench.timers [--count 10000] [--insert-seconds 10] [--ring-timeout 120] [--kill]
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import uuid

import psycopg

from bench.stack import machine, percentile, stack, table


def insert_all(database_url: str, count: int, seconds: float) -> None:
    users = [str(uuid.uuid4()) for _ in range(2 * count)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.cursor() as cur:
            # The callees opted out of emails: this measures timers, not the mail queue.
            cur.executemany("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                            [(u, f"{u[:8]}@bench.test", '{"missed_call_emails": false}') for u in users])
    batch = 50
    batches = (count + batch - 1) // batch
    start = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for b in range(batches):
            rows = [(f"t-{uuid.uuid4().hex[:12]}", users[2 * i], users[2 * i + 1])
                    for i in range(b * batch, min(count, (b + 1) * batch))]
            with conn.cursor() as cur:
                cur.executemany("insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)", rows)
            pause = start + (b + 1) * seconds / batches - time.perf_counter()
            if pause > 0:
                time.sleep(pause)


def counts(conn) -> dict:
    return {r[0]: r[1] for r in conn.execute("select status, count(*) from public.call_invitations group by status")}


def run(count: int, insert_seconds: float, ring_timeout: float, kill: bool, concurrency: int) -> dict:
    env = {"CALLFLOW_RING_TIMEOUT_SECONDS": str(ring_timeout), "CALLFLOW_SWEEP_INTERVAL_SECONDS": "1"}
    with stack(env, workers=2 if kill else 1, concurrency=concurrency, listener=True, beat=True) as s:
        peak = {"pss": 0.0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["pss"] = max(peak["pss"], s.worker_pss_mib())
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        insert_all(s.database_url, count, insert_seconds)
        inserted = time.perf_counter() - t0
        killed_at = None
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            all_ringing_at = None
            while True:
                c = counts(conn)
                if all_ringing_at is None and c.get("pending", 0) == 0 and c.get("ringing", 0) + c.get("missed", 0) >= count:
                    all_ringing_at = time.perf_counter() - t0
                if kill and killed_at is None and c.get("missed", 0) >= count // 2:
                    s.workers[1].kill(signal.SIGKILL)
                    killed_at = time.perf_counter() - t0
                if c.get("missed", 0) + c.get("accepted", 0) + c.get("failed", 0) + c.get("busy", 0) >= count:
                    break
                if time.perf_counter() - t0 > ring_timeout + 900:
                    raise TimeoutError(f"timers did not all fire: {c}")
                time.sleep(0.2)
            stop.set()
            rows = conn.execute(
                """select extract(epoch from (ended_at - ring_deadline)) from public.call_invitations
                    where status = 'missed'""").fetchall()
            ring_spread = conn.execute(
                "select extract(epoch from (max(ringing_at) - min(ringing_at))) from public.call_invitations").fetchone()[0]
            statuses = counts(conn)
        lateness_ms = [float(r[0]) * 1000 for r in rows]
        return {"lateness": lateness_ms, "pss": peak["pss"], "inserted_in": inserted, "all_ringing_at": all_ringing_at,
                "ring_spread": float(ring_spread or 0), "killed_at": killed_at, "statuses": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--insert-seconds", type=float, default=10)
    ap.add_argument("--ring-timeout", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=2, help="prefork processes per worker (the Procfile worker: one per core)")
    ap.add_argument("--kill", action="store_true", help="also run with one of two workers SIGKILLed halfway")
    ap.add_argument("--kill-only", action="store_true", help="only the run with a worker SIGKILLed")
    args = ap.parse_args()
    runs = ([] if args.kill_only else [("1 worker", False)]) + \
        ([("2 workers, one SIGKILLed halfway", True)] if args.kill or args.kill_only else [])
    rows = []
    for label, kill in runs:
        r = run(args.count, args.insert_seconds, args.ring_timeout, kill, args.concurrency)
        lat = r["lateness"]
        rows.append([label, f"{len(lat)}", f"{percentile(lat, 50):.0f}", f"{percentile(lat, 99):.0f}", f"{max(lat):.0f}",
                     f"{r['pss']:.0f}", f"{r['inserted_in']:.1f}", f"{r['ring_spread']:.1f}",
                     f"{len(lat) / max(r['ring_spread'], 0.001):.0f}"])
        print(f"{label}: statuses {r['statuses']}, all ringing after {r['all_ringing_at']}, killed at {r['killed_at']}")
    print(f"\nmachine: {machine()}")
    print(f"{args.count} invitations, ring timeout {args.ring_timeout:.0f} s, sweep interval 1 s, prefork {args.concurrency}\n")
    print(table(rows, ["run", "missed", "p50 ms", "p99 ms", "max ms", "worker PSS MiB", "insert s", "ringing spread s",
                       "deadlines due /s"]))
    print("\nceiling: lateness 0; targets p99 <= 250 ms, PSS <= 250 MB, max with a kill <= sweep interval + 1 s")


if __name__ == "__main__":
    main()
