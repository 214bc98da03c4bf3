"""A callflow stack of its own for the fault tests, with Toxiproxy between it and each dependency.

    test (clients, participants) ──────────────► Postgres, LiveKit (direct: media survives)
    web, worker, beat, listener ──► Toxiproxy ──► Postgres / Redis / LiveKit's API
    LiveKit ──webhooks──► web

Its own database, its own Redis (with its append-only file, so a restart keeps what was
acknowledged) and its own LiveKit server whose webhooks reach this stack's `web`: nothing the
rest of the run's worker or sweeps do can decide for it, and nothing cut here touches the rest.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import TEST_ENV, _wait_worker_ready, subprocess_env
from tests.support import services
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
    database_url = services.create_database("callflow_faults", invite_rate_per_minute=100_000)
    web_port = services.free_port()
    livekit = services.LiveKitServer(log_dir, f"http://127.0.0.1:{web_port}/livekit/webhook",
                                     TEST_ENV["LIVEKIT_API_KEY"], TEST_ENV["LIVEKIT_API_SECRET"]).start()
    pg = urlsplit(database_url)
    proxies = {
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
    stack = FaultStack(log_dir, toxiproxy, redis, database_url, livekit, web_port, proxies, env)
    try:
        yield stack
    finally:
        stack.stop()
        livekit.stop()
        toxiproxy.stop()
        redis.cleanup()
        from orchestration.db import close_pools

        close_pools()
        services.drop_database(database_url)


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
