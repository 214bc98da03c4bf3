"""Test run set-up: a fresh Postgres database and a private Redis for the whole run.

They are made in `pytest_configure`, before test modules are imported, so that every module
(and `workers.app`, which reads settings at import) sees the test run's environment. Tests that
need a worker, beat, the web process or LiveKit use the fixtures below.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from devstack import services

_state: dict = {}

# Short timings so lifecycle tests run in seconds; tests that need others start their own worker.
TEST_ENV = {
    "CALLFLOW_ENV": "development",
    "CALLFLOW_RING_TIMEOUT_SECONDS": "4",
    "CALLFLOW_SWEEP_INTERVAL_SECONDS": "0.5",
    "CALLFLOW_GRACE_SECONDS": "1.5",
    "LIVEKIT_API_KEY": "devkey",
    "LIVEKIT_API_SECRET": "devsecret-devsecret-devsecret-0001",
    "CALLFLOW_LISTENER_SOURCE": "postgres",
}


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is not None or _state:
        return
    config.add_cleanup(_leave_before_livekits_threads_can_abort_the_exit)  # the last clean-up to run
    log_dir = Path(tempfile.mkdtemp(prefix="callflow-test-logs-"))
    redis = services.RedisServer().start()
    database_url = services.create_database()
    _state.update(redis=redis, database_url=database_url, log_dir=log_dir)
    for key in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "RESEND_API_KEY", "RESEND_API_URL", "PORT"):
        os.environ.pop(key, None)
    os.environ.update(TEST_ENV)
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis.url
    os.environ["CALLFLOW_OUTBOX_DIR"] = str(log_dir / "outbox")
    # The run's LiveKit server and web process get fixed ports now, so every subprocess agrees.
    _state["livekit_port"] = services.free_port()
    _state["web_port"] = services.free_port()
    os.environ["LIVEKIT_URL"] = f"ws://127.0.0.1:{_state['livekit_port']}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit["status"] = int(exitstatus)


# How the run ends when LiveKit's client library was loaded. Its native library keeps runtime
# threads that may still call into Python (log records) after the interpreter has begun to shut
# down; Python then ends such a thread with a forced unwind, which cannot cross the library's
# Rust frames, and the process aborts ("panic in a function that cannot unwind") after a run
# whatever its result (seen once in three full runs). So, once every hook and clean-up of the run
# has run and the services are stopped, the process leaves with pytest's status without running
# the interpreter's shutdown.
_exit: dict = {}


def _leave_before_livekits_threads_can_abort_the_exit() -> None:
    if "livekit.rtc._ffi_client" in sys.modules and "status" in _exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit["status"])


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _state:
        return
    for name in ("beat", "worker", "web", "livekit"):
        if name in _state:
            _state[name].stop()
    _state["redis"].cleanup()
    services.drop_database(_state["database_url"])
    _state.clear()


@pytest.fixture(scope="session")
def log_dir() -> Path:
    return _state["log_dir"]


@pytest.fixture(scope="session")
def database_url() -> str:
    return _state["database_url"]


@pytest.fixture(scope="session")
def redis_server() -> services.RedisServer:
    return _state["redis"]


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def db(database_url):
    """A service-role connection (bypasses RLS, as the workers' does), autocommit."""
    from orchestration.db import connect

    with connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_user(db):
    """Insert an auth.users row; returns its id as a string."""

    def make(name: str | None = None, email: str | None = None, **meta) -> str:
        import json

        uid = str(uuid.uuid4())
        metadata = dict(meta)
        if name is not None:
            metadata["full_name"] = name
        db.execute(
            "insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
            (uid, email if email is not None else f"user-{uid[:8]}@example.test", json.dumps(metadata)),
        )
        return uid

    return make


def subprocess_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="session")
def livekit(log_dir) -> services.LiveKitServer:
    """The real LiveKit server for the run, its webhooks pointed at the run's `web` process."""
    server = services.LiveKitServer(
        log_dir, f"http://127.0.0.1:{_state['web_port']}/livekit/webhook",
        TEST_ENV["LIVEKIT_API_KEY"], TEST_ENV["LIVEKIT_API_SECRET"], port=_state["livekit_port"],
    ).start()
    _state["livekit"] = server
    return server


@pytest.fixture(scope="session")
def web(log_dir) -> str:
    """The run's `web` process; returns its base URL."""
    port = _state["web_port"]
    proc = services.web_server(subprocess_env(), log_dir, port)
    _state["web"] = proc
    import httpx

    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200 or not proc.alive(),
             timeout=30, what="web /healthz")
    if not proc.alive():
        raise RuntimeError(f"web died:\n{proc.log()[-4000:]}")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def worker(log_dir, livekit):
    """One real Celery worker (the Procfile's command: all queues) for the whole run."""
    proc = services.celery_worker(subprocess_env(), log_dir, name="main")
    _state["worker"] = proc
    _wait_worker_ready(proc)
    return proc


def _wait_worker_ready(proc: services.Process, timeout: float = 60) -> None:
    services.wait_for(lambda: "ready." in proc.log() or not proc.alive(), timeout=timeout, what=f"{proc.name} ready")
    if not proc.alive():
        raise RuntimeError(f"{proc.name} died:\n{proc.log()[-4000:]}")


@pytest.fixture(scope="session")
def beat(log_dir, worker):
    proc = services.celery_beat(subprocess_env(), log_dir)
    _state["beat"] = proc
    return proc


wait_for = services.wait_for
