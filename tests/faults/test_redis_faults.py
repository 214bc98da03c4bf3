"""When Redis gives no answer (the contract's "When a dependency gives no answer"): `web` answers
LiveKit's webhooks 503 (LiveKit retries), the listener holds what it has read until Redis takes
it, and after a restart the append-only file keeps what was acknowledged. Each scenario prints its
figures (tests/faults/load.py)."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from orchestration import names
from orchestration.db import connect
from tests.conftest import TEST_ENV
from tests.faults.conftest import LONG_RING_TIMEOUT
from tests.faults.load import (
    CallLoad,
    LiveKitLikeWebhooks,
    failures_since,
    make_pairs,
    median,
    percentile,
    report,
    ring_delays,
    settle,
    wait_recorded,
)

pytestmark = pytest.mark.e2e

RATE = 20
HOOKS_PER_SECOND = 10


@pytest.fixture
def stack(running_stack):
    return running_stack


def db(stack):
    return connect(stack.database_url, autocommit=True, connect_timeout=5)


def test_redis_cut_for_20_seconds_while_webhooks_arrive_and_calls_are_made(stack):
    with db(stack) as conn:
        pairs = make_pairs(conn, RATE * 60)
    began = time.time()
    load = CallLoad(stack.database_url, pairs, RATE).start()
    hooks = LiveKitLikeWebhooks(stack.web_url, HOOKS_PER_SECOND, TEST_ENV["LIVEKIT_API_KEY"],
                                TEST_ENV["LIVEKIT_API_SECRET"]).start()
    time.sleep(5)
    proxy = stack.proxies["redis"]
    proxy.cut()
    cut_at = time.time()
    time.sleep(20)
    proxy.restore()
    restored_at = time.time()
    time.sleep(8)
    load.stop()
    hooks.stop()
    load.finish(timeout=90)
    with db(stack) as conn:
        found = settle(conn, load, timeout=90)
    recorded = wait_recorded(stack.database_url, hooks.accepted)
    failed = failures_since(stack, began)

    baseline = ring_delays(load, found, (began, cut_at))
    hit = ring_delays(load, found, (cut_at, restored_at))
    later = ring_delays(load, found, (restored_at, load.stopped))
    rang_by = max((found.rows[lc.invitation_id]["ringing_at"].timestamp() for lc in load.lifecycles
                   if lc.first_try < restored_at and found.rows[lc.invitation_id]["ringing_at"] is not None),
                  default=restored_at)
    report("redis cut", fault="toxiproxy cut of callflow's Redis", fault_s=restored_at - cut_at,
           load=f"{RATE}/s lifecycles ({len(load.lifecycles)} calls, "
                f"{sum(1 for lc in load.lifecycles if cut_at <= lc.first_try <= restored_at)} begun during the cut), "
                f"{HOOKS_PER_SECOND}/s webhooks ({len(hooks.sent)})",
           ring_p50_before_s=median(baseline), ring_max_hit_s=max(hit, default=float("nan")),
           ring_p50_hit_s=median(hit), ring_p50_after_s=median(later), ring_p99_after_s=percentile(later, 0.99),
           webhook_503s=hooks.answers(503), webhooks_accepted=len(hooks.accepted),
           webhooks_livekit_gave_up=len(hooks.dropped),
           calls_wrongly_ended=len(found.wrong), calls_unsettled=len(found.unsettled),
           events_lost=len(found.events_lost) + len(set(hooks.accepted) - recorded), failed_tasks=len(failed),
           recovered_s=max(0.0, rang_by - restored_at))
    print("logs", stack.log_dir)
    assert hooks.answers(503) > 0, "web never said 503 while Redis was away"
    assert not [s for s in hooks.sent.values() if any(code >= 500 and code != 503 for code in s)], \
        "web answered a 5xx other than 503"
    assert set(hooks.accepted) <= recorded, f"accepted webhooks never recorded: {sorted(set(hooks.accepted) - recorded)[:5]}"
    assert not found.wrong, f"calls ended otherwise than their clients asked: {found.wrong[:5]}"
    assert not found.unsettled, f"calls never settled: {found.unsettled[:5]}"
    assert not found.events_lost, f"client transitions never recorded: {found.events_lost[:5]}"
    assert not failed, f"tasks failed: {failed[:5]}"
    for name in ("web", "worker", "beat", "listener"):
        assert stack.processes[name].alive(), f"{name} died:\n{stack.processes[name].log()[-3000:]}"
    # Worker, listener and beat try Redis again every 2 s at most (kombu's schedule reached 10 s).
    assert rang_by - restored_at < 10


def test_what_redis_acknowledged_survives_its_restart(stack):
    """Nothing consumes while Redis restarts (the worker is stopped): the listed changes, the
    webhook events and their nudges live only in Redis, and its append-only file brings them back."""
    stack.stop("worker")
    with db(stack) as conn:
        pairs = make_pairs(conn, 40)
    load = CallLoad(stack.database_url, pairs, 20).start()
    hooks = LiveKitLikeWebhooks(stack.web_url, 20, TEST_ENV["LIVEKIT_API_KEY"], TEST_ENV["LIVEKIT_API_SECRET"]).start()
    time.sleep(2)
    hooks.stop()
    load.stop()
    time.sleep(2)  # the listener lists the last changes; the append-only file is written every second
    with redis_lib.Redis.from_url(stack.redis.url) as client:
        listed = client.llen(names.INGEST_CHANGES)
        hooks_listed = client.llen(names.WEBHOOK_EVENTS)
    assert listed and hooks_listed

    restart_at = time.time()
    stack.redis.stop()
    stack.redis.start()
    restarted_s = time.time() - restart_at
    with redis_lib.Redis.from_url(stack.redis.url) as client:
        assert client.llen(names.INGEST_CHANGES) == listed
        assert client.llen(names.WEBHOOK_EVENTS) == hooks_listed
    stack.start("worker", CALLFLOW_RING_TIMEOUT_SECONDS=LONG_RING_TIMEOUT)
    load.finish(timeout=60)
    with db(stack) as conn:
        found = settle(conn, load, timeout=60)
    recorded = wait_recorded(stack.database_url, hooks.accepted)
    report("redis restart (append-only file)", fault="redis-server stopped and started (SIGTERM)",
           fault_s=restarted_s, load=f"{len(load.lifecycles)} calls and {len(hooks.accepted)} webhooks waiting in Redis",
           changes_kept=f"{listed}/{listed}", webhooks_kept=f"{len(recorded)}/{len(hooks.accepted)}",
           calls_wrongly_ended=len(found.wrong), events_lost=len(found.events_lost) + len(set(hooks.accepted) - recorded))
    assert set(hooks.accepted) <= recorded
    assert not found.wrong and not found.unsettled and not found.events_lost, (found.wrong, found.unsettled,
                                                                                found.events_lost)
