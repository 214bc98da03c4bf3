"""Real services for the tests and the benchmarks, started and stopped by the run itself.

- PostgreSQL: the local cluster of `scripts/stack.sh services` (started here if it is not up);
  every test run gets a fresh database with the production migrations applied.
- Redis: a private `redis-server` per test run on a free port (no persistence), so tests can
  flush and even stop it without touching the developer's stack.
- Celery worker / beat, the `web` process and the LiveKit server: real subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("CALLFLOW_TEST_ADMIN_URL", "postgresql://postgres:postgres@127.0.0.1:54322/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def ensure_postgres() -> None:
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=2).close()
        return
    except psycopg.OperationalError:
        pass
    subprocess.run([str(ROOT / "scripts" / "stack.sh"), "services"], check=True)
    wait_for(lambda: psycopg.connect(ADMIN_URL, connect_timeout=2).close() or True, what="postgres")


def create_database(prefix: str = "callflow_test", invite_rate_per_minute: int | None = None,
                    admin_url: str | None = None) -> str:
    """A fresh, migrated database. `invite_rate_per_minute`: for tests and benchmarks of other
    things that insert bursts of invitations as one client (the database's rule is 30 a minute).
    `admin_url`: on another cluster than the run's (the fault tests restart theirs)."""
    if admin_url is None:
        ensure_postgres()
    admin_url = admin_url or ADMIN_URL
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    base, _, _ = admin_url.rpartition("/")
    url = f"{base}/{name}"
    from orchestration.migrate import migrate

    migrate(url, settings={"CALLFLOW_INVITE_RATE_PER_MINUTE": str(invite_rate_per_minute)}
            if invite_rate_per_minute else None)
    return url


@contextlib.contextmanager
def scratch_database(prefix: str = "callflow_test", **kwargs) -> Iterator[str]:
    """A database of a test module's own (away from the run's worker and sweeps), dropped after."""
    url = create_database(prefix, **kwargs)
    try:
        yield url
    finally:
        from orchestration.db import close_pools

        close_pools()
        drop_database(url)


def drop_database(url: str, admin_url: str | None = None) -> None:
    name = url.rpartition("/")[2]
    try:
        with psycopg.connect(admin_url or ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
    except psycopg.Error:
        pass


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="callflow-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        wait_for(lambda: redis.Redis(port=self.port).ping(), what="redis")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Process:
    """A subprocess with its output in a log file, killed with its whole process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


def celery_worker(env: dict[str, str], log_dir: Path, name: str | None = None, concurrency: int = 2,
                  extra: list[str] | None = None) -> Process:
    """The Procfile's worker command (all queues), as a subprocess."""
    name = name or f"w{uuid.uuid4().hex[:6]}"
    argv = [str(VENV_BIN / "celery"), "-A", "workers.app", "worker", "-l", "INFO", "-n", f"{name}@%h",
            "--concurrency", str(concurrency), "--without-gossip", "--without-mingle"] + (extra or [])
    return Process(f"worker-{name}", argv, env, log_dir).start()


def celery_beat(env: dict[str, str], log_dir: Path) -> Process:
    schedule = log_dir / f"beat-schedule-{uuid.uuid4().hex[:6]}"
    argv = [str(VENV_BIN / "celery"), "-A", "workers.app", "beat", "-l", "INFO", "-s", str(schedule)]
    return Process("beat", argv, env, log_dir).start()


def web_server(env: dict[str, str], log_dir: Path, port: int) -> Process:
    argv = [str(VENV_BIN / "uvicorn"), "workers.web.app:app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    return Process("web", argv, {**env, "PORT": str(port)}, log_dir).start()


def livekit_binary() -> str | None:
    for candidate in (os.environ.get("CALLFLOW_LIVEKIT_BIN"), str(ROOT / ".local" / "bin" / "livekit-server"),
                      shutil.which("livekit-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class LiveKitServer:
    """The real open-source LiveKit server, loopback only, webhooks pointed at `webhook_url`."""

    def __init__(self, log_dir: Path, webhook_url: str, api_key: str, api_secret: str, port: int | None = None) -> None:
        self.fixed_port = port is not None
        self.port = port or free_port()
        self.tcp_port = free_port()
        self.udp_port = free_port()
        self.log_dir = log_dir
        self.webhook_url = webhook_url
        self.api_key, self.api_secret = api_key, api_secret
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> "LiveKitServer":
        binary = livekit_binary()
        if binary is None:
            raise RuntimeError("no livekit-server binary: run `scripts/stack.sh setup`")
        from config.settings import build_settings
        from orchestration.adapters.livekit_config import render_dev_config

        settings = build_settings(livekit_api_key=self.api_key, livekit_api_secret=self.api_secret)

        def up() -> bool:
            if not self.process.alive():
                return True
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        # A port free_port() saw free can be taken before LiveKit binds it (on all interfaces, its
        # media port), e.g. as the local port of another test's outgoing connection: try new ones.
        for _ in range(3):
            config = self.log_dir / f"livekit-{self.port}.yaml"
            config.write_text(render_dev_config(settings, self.webhook_url, self.port, self.tcp_port, self.udp_port))
            self.process = Process("livekit", [binary, "--config", str(config)], dict(os.environ), self.log_dir).start()
            wait_for(up, timeout=30, what="livekit-server")
            if self.process.alive() or "address already in use" not in self.process.log():
                break
            self.tcp_port, self.udp_port = free_port(), free_port()
            if not self.fixed_port:
                self.port = free_port()
        if not self.process.alive():
            raise RuntimeError(f"livekit-server exited:\n{self.process.log()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()
