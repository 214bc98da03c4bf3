"""The per-user token rate limiter against the run's real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from orchestration.rate_limit import RateLimiter


def run(coro):
    return asyncio.run(coro)


def test_admits_limit_per_window_then_says_when(redis_server):
    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            limiter = RateLimiter(client, limit=3, window_seconds=1.0, prefix=f"test:{uuid.uuid4().hex}")
            decisions = [await limiter.hit("alice") for _ in range(5)]
            assert [d.allowed for d in decisions] == [True, True, True, False, False]
            assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
            refused = decisions[3]
            assert 0 < refused.retry_after_ms <= 1000 and refused.retry_after_seconds == 1
            assert (await limiter.hit("bob")).allowed  # per key
            await asyncio.sleep(refused.retry_after_ms / 1000 + 0.05)
            assert (await limiter.hit("alice")).allowed  # refused hits were not counted
        finally:
            await client.aclose()

    run(scenario())


def test_concurrent_hits_never_exceed_the_limit(redis_server):
    async def scenario():
        pool = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=8, timeout=5)
        client = aioredis.Redis(connection_pool=pool)
        try:
            limiter = RateLimiter(client, limit=30, window_seconds=60, prefix=f"test:{uuid.uuid4().hex}")
            decisions = await asyncio.gather(*(limiter.hit("carol") for _ in range(100)))
            assert sum(d.allowed for d in decisions) == 30
            assert all(1 <= d.retry_after_seconds <= 60 for d in decisions if not d.allowed)
        finally:
            await client.aclose()

    run(scenario())


def test_keys_expire_with_the_window(redis_server, redis_client):
    prefix = f"test:{uuid.uuid4().hex}"

    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await RateLimiter(client, limit=5, window_seconds=0.3, prefix=prefix).hit("dave")
        finally:
            await client.aclose()

    run(scenario())
    assert redis_client.exists(f"{prefix}:dave")
    time.sleep(0.4)
    assert not redis_client.exists(f"{prefix}:dave")
