"""`RedisEnqueuer` against a real Redis: batches, duplicates inside a batch, nudges, deadlines."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from orchestration.adapters.redis_enqueue import DEDUPE_PREFIX, EnqueueUnavailable, RedisEnqueuer
from orchestration.ingest.backlog import WEBHOOK_EVENTS
from orchestration.adapters.celery_messages import PreBuiltTask

LISTED = WEBHOOK_EVENTS.items
_nudges = iter(range(1_000_000))


def nudge() -> PreBuiltTask:
    """A marked stand-in for a nudge message, without a `task-sent` event (test_task_sent_events has those)."""
    return PreBuiltTask(b"nudge-%d" % next(_nudges), b"")


@pytest.fixture
def url(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def run(coro):
    return asyncio.run(coro)


def test_duplicates_inside_one_batch_are_queued_once(url):
    async def go():
        enqueuer = RedisEnqueuer(url, "events", nudge)
        try:
            ids = ["a", "b", "a", "c", "b", "a"]
            results = await asyncio.gather(*(enqueuer.enqueue_once(i, f"msg-{i}".encode()) for i in ids))
            return results, enqueuer.batches
        finally:
            await enqueuer.aclose()

    results, batches = run(go())
    assert results == [True, True, False, True, False, False]
    assert batches == 1, "calls made in the same turn of the loop go to Redis together"
    client = redis.Redis.from_url(url)
    assert client.lrange(LISTED, 0, -1) == [b"msg-c", b"msg-b", b"msg-a"]  # LPUSH: oldest at the right
    [one] = client.lrange("events", 0, -1)  # and one nudge for all of them
    assert one.startswith(b"nudge-") and client.ttl(WEBHOOK_EVENTS.nudged) > 0
    assert 3500 < client.ttl(DEDUPE_PREFIX + "a") <= 3600


def test_large_bursts_are_split_into_bounded_batches_and_all_land(url):
    async def go():
        enqueuer = RedisEnqueuer(url, "events", nudge, max_batch=50, max_inflight=2)
        try:
            ids = [uuid.uuid4().hex for _ in range(1000)]
            results = await asyncio.gather(*(enqueuer.enqueue_once(i, i.encode()) for i in ids))
            return ids, results, enqueuer.batches
        finally:
            await enqueuer.aclose()

    ids, results, batches = run(go())
    assert results == [True] * 1000 and batches >= 20
    client = redis.Redis.from_url(url)
    # Two batches in flight may reach Redis in either order; LiveKit itself waits for each answer
    # before it sends a room's next event, so a room's order never rests on batch order.
    queued = client.lrange(LISTED, 0, -1)
    assert len(queued) == 1000 and sorted(queued) == sorted(i.encode() for i in ids)


def test_every_caller_gets_an_answer_within_about_twice_the_timeout_when_redis_stalls(url):
    client = redis.Redis.from_url(url)

    async def go():
        enqueuer = RedisEnqueuer(url, "events", nudge, timeout=0.5, max_inflight=1)
        try:
            assert await enqueuer.enqueue_once("warm", b"w")
            client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
            started = time.monotonic()
            first = [asyncio.ensure_future(enqueuer.enqueue_once(f"x{i}", f"x{i}".encode())) for i in range(5)]
            await asyncio.sleep(0.3)  # these wait behind the stalled batch
            later = [asyncio.ensure_future(enqueuer.enqueue_once(f"y{i}", f"y{i}".encode())) for i in range(5)]
            outcomes = await asyncio.gather(*first, *later, return_exceptions=True)
            return outcomes, time.monotonic() - started
        finally:
            await enqueuer.aclose()

    outcomes, elapsed = run(go())
    assert all(isinstance(o, EnqueueUnavailable) for o in outcomes), outcomes
    assert elapsed < 1.6
    client.execute_command("CLIENT", "UNPAUSE")
    # Nothing that answered "unavailable" left a mark without its message.
    time.sleep(0.2)
    for key in client.keys(DEDUPE_PREFIX + "*"):
        event_id = key.decode().removeprefix(DEDUPE_PREFIX)
        assert client.lpos(LISTED, b"w" if event_id == "warm" else event_id.encode()) is not None


def test_redis_down_is_unavailable_and_then_it_works_again(redis_server):
    from devstack.services import RedisServer

    server = RedisServer().start()
    try:
        async def go():
            enqueuer = RedisEnqueuer(server.url, "events", nudge, timeout=0.5)
            try:
                assert await enqueuer.enqueue_once("a", b"a")
                server.stop()
                with pytest.raises(EnqueueUnavailable):
                    await enqueuer.enqueue_once("b", b"b")
                await asyncio.to_thread(server.start)
                assert await enqueuer.enqueue_once("b", b"b")  # reconnects; the script is reloaded
                assert not await enqueuer.enqueue_once("b", b"b")
            finally:
                await enqueuer.aclose()

        run(go())
        assert redis.Redis.from_url(server.url).lrange(LISTED, 0, -1) == [b"b"]
    finally:
        server.cleanup()


def test_a_nudge_waits_for_its_worker_and_a_listing_after_its_take_nudges_again(url):
    """One nudge at a time while it waits (its mark), whatever the number of events; once a worker
    has taken it (the take deletes the mark), the next event nudges again."""
    from orchestration.ingest.backlog import Backlog

    client = redis.Redis.from_url(url)

    async def go(ids):
        enqueuer = RedisEnqueuer(url, "events", nudge)
        try:
            for i in ids:  # one Redis call each
                assert await enqueuer.enqueue_once(i, b"[{}, null]")
        finally:
            await enqueuer.aclose()

    run(go(["a", "b", "c"]))
    assert client.llen(LISTED) == 3 and client.llen("events") == 1
    backlog = Backlog(client, WEBHOOK_EVENTS, "events", nudge)
    assert len(backlog.take("task-1")) == 3 and not client.exists(WEBHOOK_EVENTS.nudged)
    run(go(["d"]))
    assert client.llen("events") == 2
    backlog.done("task-1")
    assert backlog.take("task-2") == [[{}, None]]
