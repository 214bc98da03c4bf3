"""The README's run command brings the whole stack up with no configuration, and Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from devstack import services

pytestmark = pytest.mark.e2e


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(autouse=True)
def _e2e_stack():
    """Overrides the e2e stack fixture: this test brings up a stack of its own."""


def test_run_starts_every_process_and_ctrl_c_stops_them(log_dir):
    if _busy(7880) or _busy(8000):
        pytest.skip("a development stack (LiveKit 7880 / web 8000) is already running here")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CALLFLOW_", "LIVEKIT_", "DATABASE_URL", "REDIS_URL", "SUPABASE_", "RESEND_"))}
    env["FLOWER_PORT"] = str(services.free_port())
    log = open(log_dir / "make-run.log", "wb")
    proc = subprocess.Popen(["make", "run"], cwd=services.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def up():
            return (httpx.get("http://127.0.0.1:8000/readyz", timeout=1).status_code == 200
                    and httpx.get(f"http://127.0.0.1:{env['FLOWER_PORT']}/", timeout=1).status_code in (200, 401)
                    and _busy(7880))

        services.wait_for(up, timeout=120, interval=0.5, what="make run: web, flower and LiveKit up")
        doctor = subprocess.run([str(services.VENV_BIN / "callflow"), "doctor"], env=env, capture_output=True,
                                text=True, timeout=60)
        services.wait_for(lambda: "OK   listener" in subprocess.run(
            [str(services.VENV_BIN / "callflow"), "doctor"], env=env, capture_output=True, text=True, timeout=60).stdout,
            timeout=30, interval=1, what="listener heartbeat")
        assert doctor.stdout.count("OK ") >= 6, doctor.stdout
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    time.sleep(1)
    assert not _busy(8000) and not _busy(7880) and not _busy(int(env["FLOWER_PORT"]))
    leftovers = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left after Ctrl-C: {leftovers}"
