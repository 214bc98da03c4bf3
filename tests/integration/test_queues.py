"""Every queue of the Celery app is consumed by the Procfile's worker command."""

import shlex
import uuid
from pathlib import Path

from devstack import services
from tests.conftest import subprocess_env, wait_for

from orchestration import names

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def test_procfile_names_match_the_contract():
    assert set(procfile()) == {"web", "listener", "worker", "beat", "flower"}


def test_every_queue_is_consumed_by_the_procfile_worker(log_dir, redis_client):
    from workers.app import QUEUES, app

    argv = shlex.split(procfile()["worker"])
    assert argv[:4] == ["celery", "-A", "workers.app", "worker"]
    assert "-Q" not in argv and "--queues" not in argv, "the Procfile worker must consume every queue"
    argv[0] = str(services.VENV_BIN / "celery")
    proc = services.Process("procfile-worker", argv + ["-n", f"procfile-{uuid.uuid4().hex[:6]}@%h"],
                            subprocess_env(), log_dir).start()
    try:
        tokens = {}
        for queue in QUEUES:
            token = uuid.uuid4().hex
            tokens[queue] = token
            app.send_task(names.PING, args=[token], queue=queue)
        for queue, token in tokens.items():
            wait_for(lambda: redis_client.get(names.ping_key(token)), timeout=30, what=f"queue {queue} consumed")
    finally:
        proc.stop()
