"""The whole callflow stack for a benchmark run: a fresh database on the local cluster, a private
Redis, the real LiveKit server, workers, the listener and beat as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from devstack import services

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {sys.version.split()[0]}"


def pss_mib(pids: list[int]) -> float:
    """Proportional set size summed over processes (shared pages counted once overall)."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def process_tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid]
    for child in out:
        pids.extend(process_tree(int(child)))
    return pids


class Stack:
    def __init__(self, env_overrides: dict[str, str]) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="callflow-bench-"))
        self.env_overrides = env_overrides
        self.procs: list[services.Process] = []

    def start(self, workers: int = 1, concurrency: int = 4, listener: bool = True, beat: bool = False,
              pool: str = "prefork", web: bool = False, database_url: str | None = None) -> "Stack":
        """`web`: the `web` process runs too and LiveKit's webhooks go to it (as deployed); without
        it they go to a closed port (LiveKit retries each for ~15 s, then gives up). `database_url`:
        an existing, migrated database (kept at the end) instead of a fresh one (dropped)."""
        self.redis = services.RedisServer().start()
        self.own_database = database_url is None
        self.database_url = database_url or services.create_database("callflow_bench",
                                                                     invite_rate_per_minute=10_000_000)
        lk_port = services.free_port()
        self.env = dict(os.environ)
        self.env.update({
            "CALLFLOW_ENV": "development", "DATABASE_URL": self.database_url, "REDIS_URL": self.redis.url,
            "LIVEKIT_URL": f"ws://127.0.0.1:{lk_port}", "LIVEKIT_API_KEY": "devkey",
            "LIVEKIT_API_SECRET": "devsecret-devsecret-devsecret-0001", "CALLFLOW_LISTENER_SOURCE": "postgres",
            "CALLFLOW_OUTBOX_DIR": str(self.log_dir / "outbox"),
        })
        for key in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "RESEND_API_KEY", "RESEND_API_URL"):
            self.env.pop(key, None)
        self.env.update(self.env_overrides)
        webhook_url = "http://127.0.0.1:9/none"
        if web:
            web_port = self.web_port = services.free_port()
            webhook_url = f"http://127.0.0.1:{web_port}/livekit/webhook"
            self.web = services.web_server(self.env, self.log_dir, web_port)
            self.procs.append(self.web)
            services.wait_for(lambda: _answers(web_port), timeout=60, what="web ready")
        self.livekit = services.LiveKitServer(self.log_dir, webhook_url, "devkey",
                                              "devsecret-devsecret-devsecret-0001", port=lk_port).start()
        self.workers = [services.celery_worker(self.env, self.log_dir, name=f"bench{i}", concurrency=concurrency,
                                               extra=["-l", "WARNING", "--pool", pool])
                        for i in range(workers)]
        for w in self.workers:
            services.wait_for(lambda w=w: "ready." in w.log() or not w.alive() or _ready(w), timeout=60,
                              what="worker ready")
        self.procs.extend(self.workers)
        if listener:
            # Each stack has a fresh Redis, so its listener no watermark: by default it would catch
            # up on the last hour and enqueue every client change of it again (up to 50,000). On an
            # existing database that is the earlier runs' changes, which the workers re-judged ahead
            # of this run's ringing (bench.history: 50/s insert → ringing p50 3.2-3.8 s). A deployment
            # restarted with its Redis keeps its watermark: such a stack starts from the last minute.
            since = [] if self.own_database else ["--initial-horizon", "60"]
            self.listener = services.Process("listener", [sys.executable, "-m", "workers.listener", *since], self.env,
                                             self.log_dir).start()
            self.procs.append(self.listener)
        if beat:
            self.beat = services.celery_beat(self.env, self.log_dir)
            self.procs.append(self.beat)
        time.sleep(1.0)
        return self

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of this stack's own processes (not another run's on the same machine), by role."""
        return cpu_of_processes([p.proc.pid for p in self.procs if p.alive()])

    def worker_pss_mib(self) -> float:
        pids: list[int] = []
        for w in self.workers:
            if w.alive():
                pids.extend(process_tree(w.proc.pid))
        return pss_mib(pids)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.livekit.stop()
        self.redis.cleanup()
        if self.own_database:
            services.drop_database(self.database_url)


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _ready(worker: services.Process) -> bool:
    import redis
    from celery import Celery

    app = Celery("probe", broker=worker.env["REDIS_URL"])
    return bool(app.control.ping(timeout=0.5))


@contextmanager
def stack(env: dict[str, str] | None = None, **kwargs):
    s = Stack(env or {})
    try:
        yield s.start(**kwargs)
    finally:
        s.stop()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cpu_of_processes(pids: list[int]) -> dict[str, float]:
    """Cumulative CPU seconds (user+system) of these processes and their children, by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {}
    for pid in {p for root in pids for p in process_tree(root)}:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        groups[_role(cmdline)] = groups.get(_role(cmdline), 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return groups


def cpu_by_process() -> dict[str, float]:
    """Cumulative CPU seconds (user+system) of every process on the machine, grouped by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        groups[_role(cmdline)] = groups.get(_role(cmdline), 0.0) + seconds
    return groups


def machine_seconds() -> dict[str, float]:
    """Cumulative seconds of all cores (/proc/stat): busy, idle (with iowait), and steal (time the
    hypervisor gave to someone else while this machine wanted to run)."""
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return {"busy": (user + nice + system + irq + softirq) / ticks, "idle": (idle + iowait) / ticks,
            "steal": steal / ticks}


def _role(cmdline: str) -> str:
    for needle, role in (("celery -A workers.app worker", "celery worker"), ("workers.app worker", "celery worker"),
                         ("workers.app beat", "celery beat"), ("workers.listener", "listener"),
                         ("postgres", "postgres"), ("livekit-server", "livekit-server"), ("redis-server", "redis"),
                         ("bench.", "benchmark driver"), ("uvicorn", "web")):
        if needle in cmdline:
            return role
    return "other"


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0) > 0.05}
