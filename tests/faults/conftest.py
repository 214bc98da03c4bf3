"""A callflow stack of its own for the fault tests, with Toxiproxy between it and each dependency.

    test (clients, participants) ──────────────► Postgres, LiveKit (direct: media survives)
    web, worker, beat, listener ──► Toxiproxy ──► Postgres / Redis / LiveKit's API
    LiveKit ──webhooks──► Toxiproxy ──► web

Its own Postgres cluster (so `pg_ctl restart` touches nothing else of the run), its own Redis
(with its append-only file, so a restart keeps what was acknowledged) and its own LiveKit server
whose webhooks reach this stack's `web`: nothing the rest of the run's worker or sweeps do can
decide for it, and nothing cut here touches the rest.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from devstack import services
from tests.conftest import TEST_ENV, _wait_worker_ready, subprocess_env
from tests.support.toxiproxy import Proxy, ToxiproxyServer

pytestmark = pytest.mark.e2e


class AofRedis(services.RedisServer):
    """A private Redis with its append-only file, restartable on the same port and folder."""

    def start(self) -> "AofRedis":
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        services.wait_for(lambda: redis.Redis(port=self.port).ping(), what="redis")
        return self


class PrivatePostgres:
    """A Postgres cluster of the fault tests' own, on a free port, restartable (`restart()`).

    As `scripts/stack.sh start_postgres` runs the project's: initdb as the `postgres` user (when
    run as root) in a folder it owns, password `postgres`, loopback only. fsync is off: a fast
    restart checkpoints first, and nothing here survives the run anyway."""

    def __init__(self) -> None:
        self.port = services.free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="callflow-faults-pg-"))
        self.data = self.dir / "data"
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
        self.bindir = Path(candidates[-1]) if candidates else Path(shutil.which("pg_ctl") or "pg_ctl").parent

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 90) -> None:
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:  # Postgres refuses to run as root
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> "PrivatePostgres":
        password = self.dir / "pw"
        password.write_text("postgres\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(password, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={password}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c max_connections=300 "
                  f"-c fsync=off -c shared_buffers=128MB", "start")
        return self

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every session ended, the server back once it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def via(url: str, proxy: Proxy) -> str:
    """`url` with its host:port replaced by the proxy's listen address."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + proxy.listen
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class FaultStack:
    log_dir: Path
    toxiproxy: ToxiproxyServer
    redis: AofRedis
    database_url: str          # direct (the test's own connections, the clients')
    livekit: services.LiveKitServer
    web_port: int
    proxies: dict[str, Proxy]
    env: dict[str, str]
    processes: dict[str, services.Process] = field(default_factory=dict)
    postgres: PrivatePostgres | None = None  # the cluster behind `database_url` (restartable)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, *names: str, **env) -> None:
        """Start these processes (`web`, `worker`, `beat`, `listener`), each once."""
        merged = {**self.env, **{k: str(v) for k, v in env.items()}}
        for name in names:
            if name in self.processes and self.processes[name].alive():
                continue
            if name == "web":
                proc = services.web_server(merged, self.log_dir, self.web_port)
                import httpx

                services.wait_for(lambda: httpx.get(f"{self.web_url}/healthz", timeout=1).status_code == 200
                                  or not proc.alive(), timeout=30, what="fault web /healthz")
            elif name == "worker":
                proc = services.celery_worker(merged, self.log_dir, name="faults", concurrency=2)
                _wait_worker_ready(proc)
            elif name == "beat":
                proc = services.celery_beat(merged, self.log_dir)
            elif name == "listener":
                proc = services.Process("listener", [str(services.VENV_BIN / "python"), "-m", "workers.listener"],
                                        merged, self.log_dir).start()
            else:
                raise ValueError(name)
            if not proc.alive():
                raise RuntimeError(f"{name} died:\n{proc.log()[-4000:]}")
            self.processes[name] = proc

    def stop(self, *names: str) -> None:
        for name in names or list(self.processes):
            proc = self.processes.pop(name, None)
            if proc:
                proc.stop()

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.clear()


@pytest.fixture(scope="package")
def fault_stack():
    log_dir = Path(tempfile.mkdtemp(prefix="callflow-faults-"))
    toxiproxy = ToxiproxyServer(log_dir).start()
    redis = AofRedis().start()
    postgres = PrivatePostgres().start()
    database_url = services.create_database("callflow_faults", invite_rate_per_minute=100_000,
                                            admin_url=postgres.admin_url)
    web_port = services.free_port()
    # LiveKit's webhooks reach web through a proxy too, so a test can make them lag.
    webhooks = toxiproxy.proxy("webhooks", f"127.0.0.1:{web_port}")
    livekit = services.LiveKitServer(log_dir, f"http://{webhooks.listen}/livekit/webhook",
                                     TEST_ENV["LIVEKIT_API_KEY"], TEST_ENV["LIVEKIT_API_SECRET"]).start()
    pg = urlsplit(database_url)
    proxies = {
        "webhooks": webhooks,
        "livekit": toxiproxy.proxy("livekit_api", f"127.0.0.1:{livekit.port}"),
        "postgres": toxiproxy.proxy("postgres", f"{pg.hostname}:{pg.port}"),
        "redis": toxiproxy.proxy("redis", f"127.0.0.1:{redis.port}"),
    }
    env = subprocess_env(
        DATABASE_URL=via(database_url, proxies["postgres"]),
        REDIS_URL=via(redis.url, proxies["redis"]),
        LIVEKIT_URL=f"ws://{proxies['livekit'].listen}",
        LIVEKIT_PUBLIC_URL=livekit.url,
        CALLFLOW_OUTBOX_DIR=str(log_dir / "outbox"),
        CALLFLOW_LISTENER_SOURCE="postgres",
    )
    stack = FaultStack(log_dir, toxiproxy, redis, database_url, livekit, web_port, proxies, env, postgres=postgres)
    try:
        yield stack
    finally:
        stack.stop()
        livekit.stop()
        toxiproxy.stop()
        redis.cleanup()
        from orchestration.db import close_pools

        close_pools()
        postgres.stop()


@pytest.fixture
def faults(fault_stack):
    """The fault stack, every proxy healed after the test whatever it cut."""
    yield fault_stack
    fault_stack.heal()


@pytest.fixture
def fdb(fault_stack):
    """A direct service-role connection to the fault stack's database (autocommit)."""
    from orchestration.db import connect

    with connect(fault_stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def fault_user(fdb):
    import json
    import uuid

    def make(name: str | None = None) -> str:
        uid = str(uuid.uuid4())
        fdb.execute("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
                    (uid, f"user-{uid[:8]}@example.test", json.dumps({"full_name": name} if name else {})))
        return uid

    return make


LONG_RING_TIMEOUT = 30


@pytest.fixture
def running_stack(faults):
    """The whole fault stack (web, worker, beat, listener) started for this test, stopped after it.
    Rings last 30 s: a client's answer held up by a fault is not a missed call."""
    faults.stop()
    faults.start("web", "worker", "beat", "listener", CALLFLOW_RING_TIMEOUT_SECONDS=LONG_RING_TIMEOUT)
    yield faults
    faults.stop()
