"""`workers.leases.one_at_a_time` on the real Redis: a holder that dies frees the lease within its
length; a holder that runs past its length keeps it; a second holder is refused meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from workers.leases import one_at_a_time


def _key() -> str:
    return f"test:lease:{uuid.uuid4().hex[:8]}"


def test_a_holder_that_runs_past_the_lease_keeps_it_and_frees_it_when_done(redis_client):
    key = _key()
    with one_at_a_time(redis_client, key, lease_seconds=0.6) as first:
        assert first
        deadline = time.monotonic() + 2.0  # more than three lease lengths
        while time.monotonic() < deadline:
            with one_at_a_time(redis_client, key, lease_seconds=0.6) as second:
                assert not second, "a second holder got in while the first was still working"
            time.sleep(0.1)
    with one_at_a_time(redis_client, key, lease_seconds=0.6) as after:
        assert after, "the lease was not freed when its holder finished"


def test_a_holder_killed_with_sigkill_frees_the_lease_within_its_length(redis_server, redis_client):
    key = _key()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, redis
        from workers.leases import one_at_a_time
        client = redis.Redis.from_url({redis_server.url!r})
        with one_at_a_time(client, {key!r}, lease_seconds=1.5) as mine:
            assert mine
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2.0)  # past one length: the renewals keep it
        with one_at_a_time(redis_client, key, lease_seconds=1.5) as while_alive:
            assert not while_alive
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=5)
        killed = time.monotonic()
        while True:
            with one_at_a_time(redis_client, key, lease_seconds=1.5) as mine:
                if mine:
                    break
            assert time.monotonic() - killed < 1.5 + 0.5, "the dead holder's lease outlived its length"
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
