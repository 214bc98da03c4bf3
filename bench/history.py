"""A year of history (issue 26): callflow on a database holding a year of a busy tenant, side by side
with an empty one, in one run.

    .venv/bin/python -m bench.history [--scale 1] [--rounds 1] [--count 1000] [--in-flight 200] [--rate 50]
                                      [--rate-seconds 20] [--analyze-after-warmup] [--build-only] [--rebuild]

1. The history database (`bench/history_data.py`): built once and cached on the local cluster as
   `callflow_history_s<scale>_<hash of the migrations and the generator>`, reused while present
   (`--rebuild` builds it again). Its build time and size are kept in the database's comment. The
   runs write into it (a few thousand lifecycles a run, like a day's traffic; the sample migration
   is undone after it). The empty database is a fresh migrated one, dropped at the end.
2. For each database, a stack with `web` (LiveKit's webhooks to it, as deployed), beat (sweep every
   1 s) and one worker (prefork 6): bench.lifecycle's warm-up, its offered-load run (`--rate`/s for
   `--rate-seconds`) and its saturation run (`--count`, `--in-flight` at once; callflow's CPU per
   lifecycle), all with bench.lifecycle's own `drive`; then `GET /api/calls` (limit 20) timed
   `--api-requests` times for the heavy user (user 0 of the history, ~0.2 % of all calls) and for
   a new user with no calls; `callflow usage` timed as a command. Before the first round `calls`,
   `call_invitations` and `call_participants` are analyzed with (next to) no call live, so the
   plans are those a quiet hour's statistics give (or after the warm-up, `--analyze-after-warmup`). `--rounds N`: the lifecycle runs
   N times, alternating history and empty, and the median rate is compared (the machine is shared).
   Last, on history: `--pruning-rounds` runs at the offered rate while retention prunes the oldest
   days in turns of 10 s on, 10 s off; the ringing of the samples that overlapped a tick of the
   pruner against that of the samples far from any (`pruning_run`).
3. The statements: a second stack on the same database with `auto_explain` loaded into every
   session of it (`ALTER DATABASE ... SET session_preload_libraries = 'auto_explain'`,
   `log_min_duration = 0`, `log_analyze`, `log_buffers`, `log_nested_statements`: what the real
   code runs, including inside the database's functions and triggers), ring timeout 3 s: 30
   lifecycles (every third never answered: ring timeouts), every `/api/` route and `/metrics`
   through `web`, beat's usage check, and 12 s of beat (sweep, every channel's outbox sweep, the
   catch-up). The plans are read back from the server's log (the backends of that database only)
   and printed, the slowest execution of each distinct statement; flagged: over 5 ms, or a Seq
   Scan on a table that grows with history.
4. `callflow migrate` (its `migrate()`) of a sample migration in a temporary copy of the migrations
   folder (adds a nullable column and an index to `calls`, as one would), while a probe per hot
   table (`call_invitations`, `calls`, `call_participants`, `call_events`) writes a row every 10 ms
   (as the service, rolled back: its triggers and foreign-key checks take the locks a real write
   takes): the longest wait each saw.

The table printed last compares both; its last line is `history/empty lifecycle rate ratio: X`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from psycopg.rows import dict_row

from bench import history_data
from bench.lifecycle import CALLFLOW_ROLES, drive, ms
from bench.stack import ROOT, cpu_of_processes, machine, percentile, stack, table
from devstack import services

SWEEP_INTERVAL_SECONDS = 1
# Every stack keeps the whole year: with the default retention (90 days) beat's prune deleted nine
# months of the history, a tick a minute, through every measured run on the history side alone
# (its deletes wrote full pages of old tables into the WAL), and ate into the cached database.
# What pruning costs the lifecycle is measured on its own, by the pruning runs.
KEEP_THE_YEAR = {"CALLFLOW_RETENTION_DAYS": "400"}
# The lifecycle runs' stack (the saturation runs' silent calls are ended by the sweep 120 s later).
LIFECYCLE_ENV = {**KEEP_THE_YEAR, "CALLFLOW_RING_TIMEOUT_SECONDS": "120",
                 "CALLFLOW_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS)}
SLOW_MS = 5.0
# Tables that grow with history: a sequential scan of one of them is flagged.
# (Not callflow_room_actions nor callflow_usage_dirty: their rows go once done.)
GROWING = ("call_invitations", "calls", "call_participants", "call_events", "push_messages", "notifications",
           "callflow_call_parties", "callflow_usage_sessions", "callflow_usage_deltas", "callflow_usage_minutes",
           "users", "push_tokens", "callflow_usage_alerts", "callflow_failed_tasks")
HOT_TABLES = ("call_invitations", "calls", "call_participants", "call_events")
SERVER_LOG = Path(os.environ.get("CALLFLOW_PG_LOG", "/var/tmp/callflow/run/postgres.log"))
# bench.history's sample migration (never committed): a nullable column and its index on calls, as
# a migration on a hot table is written (docs/INTERNALS.md): the index in a file of its own, built
# concurrently.
SAMPLE_MIGRATION = {
    "29991231000001_history_probe.sql": "alter table public.calls add column history_probe text;\n",
    "29991231000002_history_probe_index.sql":
        "create index concurrently if not exists calls_history_probe on public.calls (history_probe);\n",
}
UNDO_SAMPLE = "alter table public.calls drop column if exists history_probe"
AUTO_EXPLAIN = {"session_preload_libraries": "auto_explain", "auto_explain.log_min_duration": "0",
                "auto_explain.log_analyze": "on", "auto_explain.log_buffers": "on",
                "auto_explain.log_nested_statements": "on", "auto_explain.log_timing": "on"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the cached history database ----------------------------------------------------------------

def _admin(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/postgres"


def history_name(scale: float) -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "supabase" / "migrations").glob("*.sql")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(repr((history_data.VERSION, history_data.HELPERS, history_data.PLAN, history_data.LOAD,
                        history_data.TABLES)).encode())
    tag = f"{scale:g}".replace(".", "p")
    return f"callflow_history_s{tag}_{digest.hexdigest()[:10]}"


@dataclass
class History:
    url: str
    name: str
    built_seconds: float
    size_bytes: int
    reused: bool
    heavy_user: str


def history_database(scale: float, rebuild: bool = False) -> History:
    services.ensure_postgres()
    name = history_name(scale)
    need = 2.1 * 2**30 * scale / 0.1 * 1.3  # 2.1 GiB measured at 0.1, and room for sorts and WAL
    data_dir = Path(os.environ.get("CALLFLOW_PG_DATA", "/var/tmp/callflow/postgres"))
    base = services.ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    with psycopg.connect(services.ADMIN_URL, autocommit=True) as admin:
        exists = admin.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if exists and rebuild:
            admin.execute(f'drop database "{name}" with (force)')
            exists = None
        reused = bool(exists)
        if not exists:
            free = shutil.disk_usage(data_dir if data_dir.exists() else "/").free
            if free < need:
                raise SystemExit(f"{name} needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free: not building it")
            building = f"{name}_building"
            admin.execute(f'drop database if exists "{building}" with (force)')
            admin.execute(f'create database "{building}"')
            log(f"building {name} (scale {scale:g}) ...")
            t0 = time.perf_counter()
            from orchestration.migrate import migrate

            migrate(f"{base}/{building}", settings={"CALLFLOW_INVITE_RATE_PER_MINUTE": "10000000"})
            history_data.build(f"{base}/{building}", scale, log=log)
            built = time.perf_counter() - t0
            admin.execute(f'alter database "{building}" rename to "{name}"')
            admin.execute(f"comment on database \"{name}\" is 'bench.history scale {scale:g}: built in {built:.0f} s'")
            log(f"built {name} in {built:.0f} s")
        comment = admin.execute("select shobj_description(oid, 'pg_database') from pg_database where datname = %s",
                                (name,)).fetchone()[0] or ""
        built_seconds = float(m.group(1)) if (m := re.search(r"built in (\d+) s", comment)) else float("nan")
        size = admin.execute("select pg_database_size(%s)", (name,)).fetchone()[0]
    with psycopg.connect(url) as conn:
        heavy = history_data.heavy_user_id(conn)
    return History(url, name, built_seconds, size, reused, heavy)


# ---- what is measured on each database ----------------------------------------------------------

def postgres_cpu_seconds() -> float:
    """CPU seconds of the whole Postgres cluster so far: the postmaster and its live children, plus
    the children it has reaped (the postmaster's cutime and cstime: backends that have exited)."""
    pid = int(subprocess.run(["pgrep", "-o", "-u", "postgres", "-x", "postgres"], capture_output=True,
                             text=True).stdout.split()[0])
    reaped = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[13:15]
    return sum(cpu_of_processes([pid]).values()) + sum(int(v) for v in reaped) / os.sysconf("SC_CLK_TCK")


# The cluster's counters around a run (the other database is idle meanwhile): what the run cost
# Postgres besides its statements' plans: CPU, pages read from outside shared_buffers, WAL and its
# full-page images (the first change of a page after a checkpoint writes the whole page), dirty
# pages a backend had to write itself, checkpoints.
_DB_COUNTERS = """
select d.blks_read, d.blks_hit, w.wal_records, w.wal_fpi, w.wal_bytes::bigint,
       b.buffers_backend, b.checkpoints_timed + b.checkpoints_req as checkpoints
  from pg_stat_database d, pg_stat_wal w, pg_stat_bgwriter b
 where d.datname = current_database()
"""


def database_counters(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("select pg_stat_clear_snapshot()")
        row = conn.execute(_DB_COUNTERS).fetchone()
    return {**{k: float(v) for k, v in row.items()}, "cpu_s": postgres_cpu_seconds()}


def per_lifecycle(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / count for k in after}


@dataclass
class Figures:
    label: str
    rates: list[float] = field(default_factory=list)  # lifecycles/s at saturation, one per round
    sat_ringing: list[float] = field(default_factory=list)
    offered_ringing: list[float] = field(default_factory=list)
    offered_active: list[float] = field(default_factory=list)
    cpu_runs: list[dict[str, float]] = field(default_factory=list)  # ms of CPU per lifecycle by role, per round
    api_heavy: list[float] = field(default_factory=list)
    api_new: list[float] = field(default_factory=list)
    usage_command: float = float("nan")
    usage_output: str = ""
    statements: list["Statement"] = field(default_factory=list)
    migrate_seconds: float = float("nan")
    lock_waits: dict[str, float] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # the machine's 1-min load average around the saturation runs
    pruning_pairs: list["PruningPair"] = field(default_factory=list)
    database_runs: list[dict[str, float]] = field(default_factory=list)  # Postgres per lifecycle, per round
    offered_waits: list[list[str]] = field(default_factory=list)  # WaitSampler.top() of each offered-load run

    def database(self, counter: str) -> float:
        """A Postgres counter per lifecycle, from the round with the median Postgres CPU (nan: none)."""
        if not self.database_runs:
            return float("nan")
        return sorted(self.database_runs, key=lambda d: d["cpu_s"])[len(self.database_runs) // 2][counter]

    @property
    def rate(self) -> float:
        return percentile(self.rates, 50)

    @property
    def cpu_by_role(self) -> dict[str, float]:  # the round with the median callflow total
        return sorted(self.cpu_runs, key=_callflow_cpu)[len(self.cpu_runs) // 2] if self.cpu_runs else {}

    @property
    def cpu_ms(self) -> float:  # callflow's processes, ms of CPU per lifecycle (saturation)
        return _callflow_cpu(self.cpu_by_role)


def _callflow_cpu(by_role: dict[str, float]) -> float:
    return sum(v for k, v in by_role.items() if k in CALLFLOW_ROLES)


def _user(conn: psycopg.Connection) -> str:
    uid = str(uuid.uuid4())
    conn.execute("insert into auth.users (id, email) values (%s, %s)", (uid, f"{uid[:8]}@bench.test"))
    return uid


def _token(user_id: str) -> str:
    from config.settings import build_settings
    from orchestration.auth import dev_access_token

    return dev_access_token(build_settings(), user_id, ttl_seconds=3600)


def api_latencies(port: int, user_id: str, requests: int) -> list[float]:
    headers = {"Authorization": f"Bearer {_token(user_id)}"}
    out: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as client:
        for i in range(requests + 5):
            t = time.perf_counter()
            r = client.get("/api/calls")
            r.raise_for_status()
            if i >= 5:  # the first few warm the process's pool and plans
                out.append(time.perf_counter() - t)
    return out


def usage_command(env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "workers.cli", "usage"], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    elapsed = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"callflow usage failed: {out.stderr[-2000:]}")
    return elapsed, out.stdout.strip()


def lifecycle_runs(fig: Figures, url: str, heavy_user: str | None, args, first: bool = True) -> None:
    env = LIFECYCLE_ENV
    # No call of the round before live: answered and silent, the sweep would end them 120 s after
    # they began, all at once (a saturation run makes 1,000 in 6 s), inside this round's runs.
    hang_up_live_calls(url)
    with stack(env, workers=1, concurrency=args.concurrency, listener=True, beat=True, web=True, database_url=url) as s:
        log(f"{fig.label}: warm-up")
        asyncio.run(drive(url, min(200, args.count), in_flight=args.in_flight))
        if args.analyze_after_warmup:  # statistics that have seen live calls (see --help)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("analyze public.calls, public.call_invitations, public.call_participants")
        log(f"{fig.label}: {args.rate:g}/s for {args.rate_seconds:g} s")
        with WaitSampler(url) as waits:
            offered = asyncio.run(drive(url, round(args.rate * args.rate_seconds), rate=args.rate, watch_calls=True))
        fig.offered_waits.append(waits.top())
        log(f"{fig.label}: saturation, {args.count} lifecycles")
        fig.load.append(os.getloadavg()[0])
        # CPU of this stack's own processes: the machine is shared (another run's workers would count).
        db_before = database_counters(url)
        saturated = asyncio.run(drive(url, args.count, in_flight=args.in_flight, measure=True, cpu_of=s.cpu_by_role))
        fig.database_runs.append(per_lifecycle(db_before, database_counters(url), args.count))
        fig.load.append(os.getloadavg()[0])
        fig.rates.append(args.count / saturated.elapsed)
        fig.sat_ringing += saturated.ringing
        fig.offered_ringing += offered.ringing
        fig.offered_active += offered.active
        fig.cpu_runs.append({k: v * 1000 / args.count for k, v in saturated.cpu.items()})
        if not first:
            return
        log(f"{fig.label}: GET /api/calls x {args.api_requests}")
        with psycopg.connect(url, autocommit=True) as conn:
            new_user = _user(conn)
        if heavy_user:
            fig.api_heavy = api_latencies(s.web_port, heavy_user, args.api_requests)
        fig.api_new = api_latencies(s.web_port, new_user, args.api_requests)
        log(f"{fig.label}: callflow usage")
        fig.usage_command, fig.usage_output = usage_command(s.env)
        if heavy_user:  # last: its 6,000 calls stay live for the ring timeout (the sweeps' load)
            log(f"{fig.label}: {args.rate:g}/s for {PRUNING_RUN_SECONDS} s while pruning the oldest days in turns")
            pruning_run(fig, url, s.env["REDIS_URL"], args)


# One run at the offered rate, the pruner switched on and off in turns of PRUNING_WINDOW_SECONDS:
# its samples are told apart by whether their insert → ringing overlapped a tick of the pruner.
# Two runs one after the other (control, then pruning) differed by themselves by up to 100 ms of p99
# on this database (the live tables' autovacuum, checkpoints: a run has one or not), far more than
# the bound measured; samples of one run, taken in turns, share those.
# Runs of 60 s: the lifecycle runs' calls stay live until the 120 s ring timeout, and a run of 120 s
# met the sweep ending its first calls as silent.
PRUNING_RUN_SECONDS = 60
PRUNING_WINDOW_SECONDS = 10
PRUNING_DAYS = 1  # the oldest days pruned in a run (the done-when's "a day's worth"); its ticks then take 10-20 s
# A sample is a control one when no tick ran within this of its insert → ringing (a tick's WAL is
# still being flushed after its last batch commits).
PRUNING_LINGER_SECONDS = 1.0
# Each table's share of a tick (beat's ticks give each 2 s): short, so that a tick begun at the end
# of a turn on ends soon after it (with 2 s, ticks of up to 8 s ran through the turns off). The
# batches and the rests between them are the ones beat's ticks make.
PRUNING_TICK_SECONDS = 0.5


# The bench's calls (answered, nobody in the room) ended as their callers hanging up would, through
# the columns the product's room events write: those live at least `secs` seconds.
_HANG_UP = """update public.calls set status = 'completed', end_reason = 'hangup', ended_at = greatest(now(), created_at)
               where status = 'active' and created_at <= now() - make_interval(secs => %s)"""


def hang_up_live_calls(url: str, settle_seconds: float = 5.0) -> None:
    """The bench's calls still live (the sweep would end them after the ring timeout) ended at once."""
    with psycopg.connect(url, autocommit=True) as conn:
        for attempt in range(5):
            try:
                n = conn.execute(_HANG_UP, (0,)).rowcount
                break
            except psycopg.errors.DeadlockDetected:
                # The sweep ending the same silent calls, in another order: again, what is left.
                if attempt == 4:
                    raise
                time.sleep(1)
    log(f"hung up {n} calls earlier runs left live")
    time.sleep(settle_seconds)


# The pruning runs' calls end this long after they began, as their callers hang up (a call ended by
# the caller, through the same columns the product's room events write). Left live, a run's 3,000
# calls were hung up together at the next run's start, and that burst's dead rows brought the live
# tables' autovacuum into the next run: control p50 rose run after run (45 → 84 ms over four).
PRUNING_CALL_SECONDS = 15.0


def hang_up_as_callers_do(url: str, stop: threading.Event, call_seconds: float = PRUNING_CALL_SECONDS) -> None:
    """Once a second until `stop`: the calls live for `call_seconds` ended (the hang-ups of a steady
    rate of calls, spread as theirs are)."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.wait(1.0):
            try:
                conn.execute(_HANG_UP, (call_seconds,))
            except psycopg.errors.DeadlockDetected:
                pass  # the sweep ending one of them in another order: the next second's again


def _prune_in_turns(url: str, redis_url: str, now: datetime, ready, on, stop, results, idle: bool = False) -> None:
    """The pruning process: ticks of the real `orchestration.retention.prune` back to back while `on`
    is set, until `stop` is set or a tick prunes nothing; what it pruned and each tick's span
    (perf_counter, the machine's monotonic clock: the driver's too) into `results`. Its imports and
    connections are made before `ready`: a worker has them long before its tick, and a fresh
    interpreter importing callflow (a second of a core) is no cost of pruning's. `idle`: ticks that
    do nothing (the method's own noise: the two sets of samples differ by chance alone)."""
    import redis as redis_lib

    from orchestration.retention import Budget, prune

    client = redis_lib.Redis.from_url(redis_url)
    client.ping()
    pruned: dict[str, int] = {}
    ticks: list[tuple[float, float]] = []
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        ready.set()
        while not stop.is_set():
            if not on.wait(0.05):
                continue
            began = time.perf_counter()
            if idle:
                time.sleep(PRUNING_TICK_SECONDS)
                ticks.append((began, time.perf_counter()))
                continue
            out = prune(conn, client, days=1, now=now, budget=Budget(tick_seconds=PRUNING_TICK_SECONDS))
            ticks.append((began, time.perf_counter()))
            for table, n in out.rows.items():
                pruned[table] = pruned.get(table, 0) + n
            if not any(out.rows.values()) and out.batches:
                break  # the days are gone
    results.put((pruned, ticks))


@dataclass
class PruningPair:
    """One run's ringing samples in two sets: those whose insert → ringing overlapped a tick of the
    pruner, and the control ones, far from any tick."""
    unpruned_ringing: list[float]  # no tick within PRUNING_LINGER_SECONDS
    pruning_ringing: list[float]  # overlapping a tick
    pruned: dict[str, int]
    pruning_seconds: float  # the ticks' time
    pruning_waits: list[str] = field(default_factory=list)  # WaitSampler.top() of the run
    idle: bool = False  # the pruner did nothing (the method's own noise)

    @staticmethod
    def median_moved_ms(pairs: list["PruningPair"]) -> float:
        return percentile([p.p99_moved_ms for p in pairs], 50)

    @staticmethod
    def pooled(pairs: list["PruningPair"]) -> "PruningPair":
        """The samples of several runs as one: a p99 made by ten times as many samples, which one
        stall no longer decides."""
        pruned: dict[str, int] = {}
        for p in pairs:
            for k, v in p.pruned.items():
                pruned[k] = pruned.get(k, 0) + v
        return PruningPair([x for p in pairs for x in p.unpruned_ringing], [x for p in pairs for x in p.pruning_ringing],
                           pruned, sum(p.pruning_seconds for p in pairs), idle=all(p.idle for p in pairs))

    @property
    def p99_moved_ms(self) -> float:
        return self.moved_ms(99)

    def moved_ms(self, p: float) -> float:
        return (percentile(self.pruning_ringing, p) - percentile(self.unpruned_ringing, p)) * 1000

    def describe(self) -> str:
        return ("{} / {} / {}".format(*ms(self.unpruned_ringing, 50, 90, 99)) + " → "
                + "{} / {} / {}".format(*ms(self.pruning_ringing, 50, 90, 99))
                + f" ({len(self.unpruned_ringing):,} → {len(self.pruning_ringing):,} samples; "
                + f"{', '.join(f'{k} {v:,}' for k, v in self.pruned.items() if v) or 'nothing'} pruned in {self.pruning_seconds:.0f} s of ticks)")


def split_by_ticks(started: list[float], latencies: list[float],
                   ticks: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(control, pruning) latencies: pruning when [insert, ringing] overlaps a tick, control when it
    is PRUNING_LINGER_SECONDS from every tick; the others are left out."""
    control, pruning = [], []
    for at, latency in zip(started, latencies):
        end = at + latency
        if any(a <= end and at <= b for a, b in ticks):
            pruning.append(latency)
        elif not any(a - PRUNING_LINGER_SECONDS <= end and at <= b + PRUNING_LINGER_SECONDS for a, b in ticks):
            control.append(latency)
    return control, pruning


def print_pruning_waits(fig: Figures) -> None:
    """What the database's busy backends did in each pruning run (the pruner's own statements among them)."""
    for n, pair in enumerate(fig.pruning_pairs):
        print(f"{fig.label}, pruning run {n + 1}: backend-seconds by wait and statement")
        for line in pair.pruning_waits:
            print("  " + line)


def pruning_run(fig: Figures, url: str, redis_url: str, args) -> None:
    """`--pruning-rounds` runs at the offered rate while retention prunes the history's oldest days
    in turns (PRUNING_WINDOW_SECONDS on, as many off): ticks of the real
    `orchestration.retention.prune` back to back while on (beat runs one a minute: this is a
    minute's worth of ticks every tick's length), its horizon PRUNING_DAYS past the oldest row, in a
    process of its own (as a worker runs it: a thread of this one would share the driver's
    interpreter lock and stretch what the driver measures). The ringing latency of the samples that
    overlapped a tick beside that of the samples far from any is the cost pruning puts on it."""
    import multiprocessing

    for n in range(args.pruning_rounds):
        # `--pruning-alternate`: the pruner and an idle one take turns run by run, so both meet the
        # same drift of the database over the runs.
        idle = args.pruning_idle or (args.pruning_alternate and n % 2 == 1)
        order = n // 2 if args.pruning_alternate else n
        with psycopg.connect(url, autocommit=True) as conn:
            oldest = conn.execute("select min(received_at) from public.call_events").fetchone()[0]
        if oldest is None:
            return
        # Each run starts with no call of an earlier run live (the warm-up's, a run's last
        # PRUNING_CALL_SECONDS): the sweep would end them as silent 120 s later, in this one.
        hang_up_live_calls(url)
        context = multiprocessing.get_context("spawn")
        ready, on, stop, results = context.Event(), context.Event(), context.Event(), context.Queue()
        pruner = context.Process(target=_prune_in_turns, daemon=True,
                                 args=(url, redis_url, oldest + timedelta(days=PRUNING_DAYS + 1), ready, on, stop, results,
                                       idle))
        pruner.start()
        if not ready.wait(60):
            raise RuntimeError("the pruning process did not start")
        time.sleep(2)  # (its start-up's CPU out of the way)

        def turns() -> None:
            pruning = bool(order % 2)  # on first every other run: neither kind of turn always comes first
            while not stop.is_set():
                (on.set if pruning else on.clear)()
                stop.wait(PRUNING_WINDOW_SECONDS)
                pruning = not pruning

        switcher = threading.Thread(target=turns, daemon=True)
        hanging_up = threading.Thread(target=hang_up_as_callers_do, args=(url, stop), daemon=True)
        try:
            with WaitSampler(url) as waits:
                switcher.start()
                hanging_up.start()
                run = asyncio.run(drive(url, round(args.rate * PRUNING_RUN_SECONDS), rate=args.rate, watch_calls=True))
        finally:
            stop.set()
            pruned, ticks = results.get(timeout=120)
            pruner.join(30)
            hanging_up.join(30)
        control, pruning = split_by_ticks(run.ringing_started, run.ringing, ticks)
        fig.pruning_pairs.append(PruningPair(control, pruning, pruned, sum(b - a for a, b in ticks), waits.top(), idle))
        log(f"{fig.label}: {'idle ' if idle else ''}pruning in turns of {PRUNING_WINDOW_SECONDS} s: "
            f"{fig.pruning_pairs[-1].describe()}")


# ---- the statements, as auto_explain saw them ---------------------------------------------------

@dataclass
class Statement:
    query: str
    count: int
    max_ms: float
    plan: str  # the slowest execution's
    flags: list[str]
    durations: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return percentile(self.durations, 50)


_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.\d]* \w+ \[(\d+)\] ")
_DURATION = re.compile(r"LOG:  duration: ([\d.]+) ms  plan:")


def read_plans(offset: int, pids: set[int]) -> list[tuple[float, str, str]]:
    """(duration ms, query text, plan) of each auto_explain entry of `pids` after `offset`."""
    with SERVER_LOG.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    entries: list[tuple[float, str, str]] = []
    current: list[str] | None = None
    duration = 0.0

    def close() -> None:
        if current:
            # The query runs from "Query Text:" to the plan's top node, the first line with its cost.
            top = next((n for n, line in enumerate(current) if "(cost=" in line), len(current))
            query = "\n".join(current[:top]).strip()
            query = query[len("Query Text:"):].strip() if query.startswith("Query Text:") else query
            entries.append((duration, query, "\n".join(current)))

    for line in text.splitlines():
        m = _ENTRY.match(line)
        if m:
            close()
            current = None
            if int(m.group(1)) in pids and (d := _DURATION.search(line)):
                duration = float(d.group(1))
                current = []
        elif current is not None:
            current.append(line.replace("\t", "  ", 1) if line.startswith("\t") else line)
    close()
    return entries


def _normal(query: str) -> str:
    q = re.sub(r"\s+", " ", query).strip()
    q = re.sub(r"'[^']*'", "'?'", q)
    q = re.sub(r"\b\d+(\.\d+)?\b", "?", q)
    q = re.sub(r"\(\?(, \?)+\)", "(?...)", q)
    return q


def summarise(entries: list[tuple[float, str, str]]) -> list[Statement]:
    groups: dict[str, Statement] = {}
    for duration, query, plan in entries:
        key = _normal(query)
        st = groups.get(key)
        if st is None:
            groups[key] = st = Statement(query=query, count=0, max_ms=-1, plan=plan, flags=[])
        st.count += 1
        st.durations.append(duration)
        if duration > st.max_ms:
            st.max_ms, st.plan = duration, plan
    for st in groups.values():
        scanned = set(re.findall(r"Seq Scan on (?:\w+\.)?(\w+)", st.plan))
        st.flags = [f"Seq Scan on {t}" for t in sorted(scanned) if t in GROWING]
        if st.max_ms > SLOW_MS:
            st.flags.insert(0, f"max {st.max_ms:.1f} ms, p50 {st.p50_ms:.2f} ms"
                               + (" (waits on advisory locks)" if "pg_advisory" in st.query else ""))
    return sorted(groups.values(), key=lambda s: (-bool(s.flags), -s.max_ms))


class WaitSampler(threading.Thread):
    """What the database's busy backends were doing, every 50 ms during a run: (wait event, the
    statement's first words) counted, to say where a stalled second went. A sample with nobody
    waiting counts nothing; `CPU` is an active backend with no wait event."""

    INTERVAL = 0.05

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stopping = url, threading.Event()
        self.counts: dict[tuple[str, str], int] = {}
        self.by_second: dict[int, dict[tuple[str, str], int]] = {}  # the same, per second of the run
        self.samples = 0

    def run(self) -> None:
        dbname = psycopg.conninfo.conninfo_to_dict(self.url)["dbname"]
        with psycopg.connect(_admin(self.url), autocommit=True) as conn:
            while not self.stopping.wait(self.INTERVAL):
                rows = conn.execute(
                    """select coalesce(wait_event_type || ':' || wait_event, 'CPU'), left(regexp_replace(query, '\s+', ' ', 'g'), 70)
                         from pg_stat_activity
                        where datname = %s and state = 'active' and pid <> pg_backend_pid()""", (dbname,)).fetchall()
                self.samples += 1
                second = self.by_second.setdefault(int(self.samples * self.INTERVAL), {})
                for wait, query in rows:
                    self.counts[(wait, query)] = self.counts.get((wait, query), 0) + 1
                    second[(wait, query)] = second.get((wait, query), 0) + 1

    def __enter__(self) -> "WaitSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.join(5)

    def top(self, n: int = 8, busiest: int = 3) -> list[str]:
        """The most sampled (wait, statement) as backend-seconds; then the run's busiest seconds
        (most backend-samples) and what filled each."""

        def lines(counts: dict, k: int, indent: str = "") -> list[str]:
            ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
            return [f"{indent}{c * self.INTERVAL:6.2f} s  {wait:<28} {query}" for (wait, query), c in ranked]

        out = lines(self.counts, n)
        for second, counts in sorted(self.by_second.items(), key=lambda kv: -sum(kv[1].values()))[:busiest]:
            out.append(f"second {second}: {sum(counts.values()) * self.INTERVAL:.2f} backend-seconds")
            out += lines(counts, 3, "  ")
        return out


class PidWatch(threading.Thread):
    """The backends of one database, seen every 0.2 s (callflow's pools hold theirs for long)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.pids, self.stopping = url, set(), threading.Event()

    def run(self) -> None:
        with psycopg.connect(_admin(self.url), autocommit=True) as conn:
            while not self.stopping.is_set():
                name = self.url.rsplit("/", 1)[1]
                self.pids.update(r[0] for r in conn.execute(
                    "select pid from pg_stat_activity where datname = %s", (name,)).fetchall())
                time.sleep(0.2)


def _set_auto_explain(url: str, on: bool) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(_admin(url), autocommit=True) as conn:
        for key, value in AUTO_EXPLAIN.items():
            if on:
                conn.execute(f'alter database "{name}" set {key} = \'{value}\'')
            else:
                conn.execute(f'alter database "{name}" reset {key}')


def explained_statements(fig: Figures, url: str, heavy_user: str | None) -> None:
    from celery import Celery

    from orchestration import names

    env = {**KEEP_THE_YEAR, "CALLFLOW_RING_TIMEOUT_SECONDS": "3",
           "CALLFLOW_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS)}
    _set_auto_explain(url, True)
    watch = PidWatch(url)
    try:
        offset = SERVER_LOG.stat().st_size
        watch.start()
        with stack(env, workers=1, concurrency=4, listener=True, beat=True, web=True, database_url=url) as s:
            log(f"{fig.label}: statements under auto_explain")
            asyncio.run(drive(url, 30, in_flight=10, unanswered_every=3))
            routes(url, s.web_port, heavy_user)
            Celery("bench", broker=s.redis.url).send_task(names.CHECK_USAGE, queue=names.Q_SWEEPS)
            time.sleep(12)  # sweeps (1 s), outbox sweeps and the catch-up (5 s), the usage check
        watch.stopping.set()
        watch.join()
        time.sleep(0.5)
        fig.statements = summarise(read_plans(offset, watch.pids))
    finally:
        watch.stopping.set()
        _set_auto_explain(url, False)


def routes(url: str, port: int, heavy_user: str | None) -> None:
    """Every `/api/` route and `/metrics` once or twice, as a client would (refusals are fine)."""
    def client(user: str) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                            headers={"Authorization": f"Bearer {_token(user)}"})

    with psycopg.connect(url, autocommit=True) as conn:
        caller, *callees = (_user(conn) for _ in range(5))
    with client(caller) as a:
        for n, action in enumerate(("accept", "accept", "cancel", "decline")):
            r = a.post("/api/calls", json={"callee_ids": [callees[n]]})
            r.raise_for_status()
            inv, room = r.json()["invitations"][0]["id"], r.json()["room_name"]
            time.sleep(0.3)
            with client(callees[n]) as b:
                (a if action == "cancel" else b).post(f"/api/calls/{inv}/{action}")
                if action == "accept":
                    a.post("/api/livekit/token", json={"room_name": room})
                    b.post("/api/livekit/token", json={"invitation_id": inv})
        for user in (caller, callees[0], *([heavy_user] if heavy_user else [])):
            with client(user) as c:
                c.get("/api/calls").raise_for_status()
                c.get("/api/calls", params={"limit": 100}).raise_for_status()
                try:  # the snapshot, then whatever comes within a second
                    with c.stream("GET", "/api/calls/events", timeout=1.0) as stream:
                        deadline = time.perf_counter() + 1.0
                        for _line in stream.iter_lines():
                            if time.perf_counter() > deadline:
                                break
                except httpx.TimeoutException:
                    pass
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)


# ---- callflow migrate of a sample migration -----------------------------------------------------

def migrate_locks(fig: Figures, url: str) -> None:
    from orchestration.migrate import migrate

    folder = Path(tempfile.mkdtemp(prefix="callflow-history-migrations-"))
    for path in (ROOT / "supabase" / "migrations").glob("*.sql"):
        shutil.copy(path, folder / path.name)
    for name, sql in SAMPLE_MIGRATION.items():
        (folder / name).write_text(sql)
    done = threading.Event()
    waits = {t: 0.0 for t in HOT_TABLES}

    with psycopg.connect(url, autocommit=True) as conn:
        call_id = conn.execute("select id from public.calls order by created_at limit 1").fetchone()
        call_id = call_id[0] if call_id else conn.execute(
            "insert into public.calls (room_name, status) values ('history-probe', 'completed') returning id").fetchone()[0]
        a, b = _user(conn), _user(conn)
    # What a writer of each table does (service role, rolled back): its triggers and foreign-key
    # checks take the locks the real writes take (an invitation's call: a key-share lock on calls).
    writes = {
        "call_invitations": ("insert into public.call_invitations (room_name, caller_id, callee_id, call_id) "
                             "values ('history-probe', %(a)s, %(b)s, %(c)s)"),
        "calls": "insert into public.calls (room_name, status) values ('history-probe', 'completed')",
        "call_participants": ("insert into public.call_participants (call_id, identity, participant_sid) "
                              "values (%(c)s, %(a)s, 'PA_history_probe')"),
        "call_events": "insert into public.call_events (event_id, source, type) values ('history-probe', 'sweep', 'probe')",
    }

    def probe(table_name: str) -> None:
        with psycopg.connect(url) as conn:
            while not done.is_set():
                conn.execute("set local lock_timeout = '60s'")
                t = time.perf_counter()
                conn.execute(writes[table_name], {"a": a, "b": b, "c": call_id})
                waits[table_name] = max(waits[table_name], time.perf_counter() - t)
                conn.rollback()
                time.sleep(0.01)

    probes = [threading.Thread(target=probe, args=(t,), daemon=True) for t in HOT_TABLES]
    for p in probes:
        p.start()
    time.sleep(0.3)
    try:
        t = time.perf_counter()
        migrate(url, directory=folder)
        fig.migrate_seconds = time.perf_counter() - t
        time.sleep(0.3)
    finally:
        done.set()
        for p in probes:
            p.join()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(UNDO_SAMPLE)
            conn.execute("delete from public.callflow_migrations where name = any(%s)", (list(SAMPLE_MIGRATION),))
        shutil.rmtree(folder, ignore_errors=True)
    fig.lock_waits = waits


# ---- output -------------------------------------------------------------------------------------

def print_statements(fig: Figures) -> None:
    flagged = [s for s in fig.statements if s.flags]
    print(f"\n=== statements on the {fig.label} database: {len(fig.statements)} distinct, {len(flagged)} flagged "
          f"(over {SLOW_MS:g} ms, or a Seq Scan on a growing table); the slowest execution of each, "
          f"EXPLAIN (ANALYZE, BUFFERS) by auto_explain ===")
    for st in fig.statements:
        print(f"\n--- {st.count} run(s), p50 {st.p50_ms:.2f} ms, slowest {st.max_ms:.2f} ms"
              f"{'  FLAGGED: ' + '; '.join(st.flags) if st.flags else ''}")
        print(st.plan.rstrip())


def compare_statements(history: Figures, empty: Figures, top: int = 20) -> None:
    """The same statements on both databases, the most slowed by history first (medians)."""
    on_empty = {_normal(s.query): s for s in empty.statements}
    rows = []
    for st in history.statements:
        other = on_empty.get(_normal(st.query))
        if other is None:
            continue
        rows.append((st.p50_ms - other.p50_ms, st, other))
    rows.sort(key=lambda r: -r[0])
    print(f"\nstatements on both databases, most slowed by history first (top {top}; medians under auto_explain):")
    print(table([[f"{st.p50_ms:.2f}", f"{other.p50_ms:.2f}", f"{st.max_ms:.1f}", str(st.count),
                  re.sub(r"\s+", " ", st.query)[:110]] for _, st, other in rows[:top]],
                ["hist p50 ms", "empty p50 ms", "hist max ms", "runs", "statement"]))


def pruning_only(hist, args) -> None:
    fig = Figures("history")
    env = LIFECYCLE_ENV
    with stack(env, workers=1, concurrency=args.concurrency, listener=True, beat=True, web=True,
               database_url=hist.url) as s:
        log(f"{fig.label}: warm-up")
        asyncio.run(drive(hist.url, min(200, args.count), in_flight=args.in_flight))
        pruning_run(fig, hist.url, s.env["REDIS_URL"], args)
    real = [p for p in fig.pruning_pairs if not p.idle]
    idle = [p for p in fig.pruning_pairs if p.idle]
    rows = [[str(n + 1) + (" (idle)" if p.idle else ""), p.describe(), f"{p.p99_moved_ms:+.0f}"]
            for n, p in enumerate(fig.pruning_pairs)]
    rows += [[f"pooled, {len(runs)} {kind} runs", pooled.describe(), f"{pooled.p99_moved_ms:+.0f}"]
             for kind, runs in (("pruning", real), ("idle", idle)) if runs for pooled in [PruningPair.pooled(runs)]]
    print(table(rows, ["run", f"{args.rate:g}/s insert→ringing p50 / p90 / p99 ms: control samples → samples overlapping a tick",
                       "p99 moved ms"]))
    print_pruning_waits(fig)
    print(f"machine: {machine()}")
    for kind, runs in (("idle ticks", idle), ("pruning", real)):
        if runs:
            pooled = PruningPair.pooled(runs)
            print(f"{kind} moved ringing p99 by (median of {len(runs)} runs): {PruningPair.median_moved_ms(runs):+.0f} ms; "
                  f"(the runs' samples pooled): {pooled.p99_moved_ms:+.0f} ms; p90 {pooled.moved_ms(90):+.0f} ms, "
                  f"p50 {pooled.moved_ms(50):+.0f} ms")


def fmt_ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p) * 1000:.1f}" if values else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="1 = 5,000,000 calls and 100,000 users")
    ap.add_argument("--rebuild", action="store_true", help="build the history database again")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the history database and stop")
    ap.add_argument("--count", type=int, default=1000, help="lifecycles in the saturation run")
    ap.add_argument("--in-flight", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--rate-seconds", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--analyze-after-warmup", action="store_true",
                    help="ANALYZE calls, call_invitations and call_participants after the warm-up (while calls are "
                         "live); without it they are analyzed before the first round, with (next to) no call live, "
                         "as a quiet hour's autoanalyze leaves them on a big table (autoanalyze waits for 10 %% of "
                         "the rows to change)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="lifecycle rounds, alternating history and empty (the median rate; the machine is shared)")
    ap.add_argument("--api-requests", type=int, default=200, help="GET /api/calls per user")
    ap.add_argument("--pruning-rounds", type=int, default=1,
                    help="runs at the offered rate while pruning the oldest days in turns (on history, last)")
    ap.add_argument("--pruning-idle", action="store_true",
                    help="the pruning runs' turns with a pruner that does nothing: how far the two sets differ by chance")
    ap.add_argument("--pruning-alternate", action="store_true",
                    help="the pruning runs alternate: the pruner, then one that does nothing, and so on")
    ap.add_argument("--pruning-only", action="store_true",
                    help="on the history database only: the warm-up, then the pruning runs, and stop")
    args = ap.parse_args()

    hist = history_database(args.scale, args.rebuild)
    print(f"history database: {hist.name}, {hist.size_bytes / 2**30:.2f} GiB, built in {hist.built_seconds:.0f} s"
          f"{' (cached)' if hist.reused else ''}; heavy user {hist.heavy_user}", flush=True)
    if args.build_only:
        return
    if args.pruning_only:
        pruning_only(hist, args)
        return
    empty_url = services.create_database("callflow_history_empty", invite_rate_per_minute=10_000_000)
    history, empty = Figures("history"), Figures("empty")
    try:
        pairs = ((history, hist.url, hist.heavy_user), (empty, empty_url, None))
        for _fig, url, _heavy in pairs:  # statistics as a quiet hour leaves them (see --analyze-after-warmup)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("analyze public.calls, public.call_invitations, public.call_participants")
        for n in range(args.rounds):
            for fig, url, heavy in pairs:
                lifecycle_runs(fig, url, heavy, args, first=n == 0)
        for fig, url, heavy in pairs:
            explained_statements(fig, url, heavy)
            log(f"{fig.label}: callflow migrate of a sample migration")
            migrate_locks(fig, url)
    finally:
        services.drop_database(empty_url)

    with psycopg.connect(hist.url) as conn:
        counts = {t: conn.execute(f"select reltuples::bigint from pg_class where oid = 'public.{t}'::regclass").fetchone()[0]
                  for t in ("calls", "call_invitations", "call_participants", "call_events", "push_messages",
                            "notifications", "callflow_usage_deltas")}
    for fig in (history, empty):
        print_statements(fig)
    compare_statements(history, empty)
    print(f"\nmachine: {machine()}; load average (1 min) at the saturation runs' start and end: history "
          + " → ".join(f"{x:.1f}" for x in history.load) + ", empty " + " → ".join(f"{x:.1f}" for x in empty.load))
    print(f"history: {hist.name} (scale {args.scale:g}), {hist.size_bytes / 2**30:.2f} GiB, built in "
          f"{hist.built_seconds:.0f} s; rows (estimates): " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    for fig in (history, empty):
        for n, top in enumerate(fig.offered_waits):
            print(f"{fig.label}, {args.rate:g}/s run {n + 1}: backend-seconds by wait and statement")
            for line in top:
                print("  " + line)
    print_pruning_waits(history)
    for fig in (history, empty):
        print(f"CPU ms per lifecycle at saturation on {fig.label}, by process: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(fig.cpu_by_role.items(), key=lambda kv: -kv[1])))
    print(f"`callflow usage` on history:\n  " + history.usage_output.replace("\n", "\n  "))
    rows = [
        ["lifecycles/s at saturation", f"{history.rate:.1f}", f"{empty.rate:.1f}",
         f"{args.count} lifecycles, {args.in_flight} in flight"
         + (f"; median of {args.rounds} rounds, alternating: history "
            + ", ".join(f"{x:.0f}" for x in history.rates) + "; empty " + ", ".join(f"{x:.0f}" for x in empty.rates)
            if args.rounds > 1 else "")],
        ["  insert→ringing p50 / p99 ms", "{} / {}".format(*ms(history.sat_ringing, 50, 99)),
         "{} / {}".format(*ms(empty.sat_ringing, 50, 99)), "saturation"],
        [f"{args.rate:g}/s: insert→ringing p50 / p99 ms", "{} / {}".format(*ms(history.offered_ringing, 50, 99)),
         "{} / {}".format(*ms(empty.offered_ringing, 50, 99)), f"open loop, {args.rate_seconds:g} s"],
        [f"{args.rate:g}/s for {PRUNING_RUN_SECONDS} s, pruning in turns: insert→ringing p50 / p99 ms, control → pruning",
         "; ".join(p.describe() for p in history.pruning_pairs) or "n/a", "n/a",
         (f"p99 moved by (median of {len(history.pruning_pairs)}) "
          f"{PruningPair.median_moved_ms(history.pruning_pairs):+.0f} ms; " if history.pruning_pairs else "")
         + f"the oldest {PRUNING_DAYS} days a run; bound: p99 moved by at most 20 ms"],
        [f"{args.rate:g}/s: accept→active p50 / p99 ms", "{} / {}".format(*ms(history.offered_active, 50, 99)),
         "{} / {}".format(*ms(empty.offered_active, 50, 99)), ""],
        ["callflow CPU ms/lifecycle", f"{history.cpu_ms:.1f}", f"{empty.cpu_ms:.1f}",
         f"worker+listener+beat+web, saturation; history/empty {history.cpu_ms / empty.cpu_ms:.2f} (bound 1.10)"],
        ["Postgres CPU ms/lifecycle", *(f"{f.database('cpu_s') * 1000:.1f}" for f in (history, empty)),
         "the whole cluster (autovacuum included), saturation"],
        ["  pages read / hit in shared_buffers",
         *(f"{f.database('blks_read'):.1f} / {f.database('blks_hit'):.0f}" for f in (history, empty)),
         "per lifecycle; a read is from the OS cache or disk"],
        ["  WAL kB / full-page images",
         *(f"{f.database('wal_bytes') / 1024:.1f} / {f.database('wal_fpi'):.1f}" for f in (history, empty)), "per lifecycle"],
        ["  pages written by backends / checkpoints",
         *(f"{f.database('buffers_backend'):.2f} / {f.database('checkpoints') * args.count:.0f}" for f in (history, empty)),
         "per lifecycle / in the run"],
        ["GET /api/calls heavy user p50 / p99 ms", f"{fmt_ms(history.api_heavy, 50)} / {fmt_ms(history.api_heavy, 99)}",
         "n/a", f"{args.api_requests} requests, limit 20; bound p99 < 20 ms"],
        ["GET /api/calls new user p50 / p99 ms", f"{fmt_ms(history.api_new, 50)} / {fmt_ms(history.api_new, 99)}",
         f"{fmt_ms(empty.api_new, 50)} / {fmt_ms(empty.api_new, 99)}", "no calls"],
        ["callflow usage s", f"{history.usage_command:.2f}", f"{empty.usage_command:.2f}",
         "the command, Python start included; bound < 1 s"],
        ["statements seen / flagged", f"{len(history.statements)} / {sum(bool(s.flags) for s in history.statements)}",
         f"{len(empty.statements)} / {sum(bool(s.flags) for s in empty.statements)}",
         f"flagged: > {SLOW_MS:g} ms or Seq Scan on a growing table (plans above)"],
        ["  of which p50 > 5 ms / Seq Scan on a growing table",
         *(f"{sum(x.p50_ms > SLOW_MS for x in f.statements)} / {sum(any('Seq Scan' in g for g in x.flags) for x in f.statements)}"
           for f in (history, empty)), "the statement's median, not one run starved of CPU"],
        ["  slowest statement ms", f"{max((s.max_ms for s in history.statements), default=float('nan')):.1f}",
         f"{max((s.max_ms for s in empty.statements), default=float('nan')):.1f}", "under auto_explain (ANALYZE, BUFFERS)"],
        ["callflow migrate (sample) s", f"{history.migrate_seconds:.2f}", f"{empty.migrate_seconds:.2f}",
         "a nullable column on calls, then its index built concurrently"],
        *[[f"  longest lock wait on {t} ms", f"{history.lock_waits.get(t, float('nan')) * 1000:.0f}",
           f"{empty.lock_waits.get(t, float('nan')) * 1000:.0f}", "a rolled-back insert every 10 ms; bound 1000"]
          for t in HOT_TABLES],
    ]
    print()
    print(table(rows, ["figure", "history", "empty", "notes"]))
    print(f"history/empty lifecycle rate ratio: {history.rate / empty.rate:.2f}")


if __name__ == "__main__":
    main()
