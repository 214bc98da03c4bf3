"""Deduplicate and enqueue in one Redis round trip (redis.asyncio, for the `web` process).

One Lua script does both, atomically: `SET key NX EX ttl`; only if the mark is new, `LPUSH` the
pre-built Celery message onto the queue's list (what kombu's Redis transport does for priority 0).
If the push fails the mark is deleted in the same script, so a retry is never taken for a
duplicate. If the reply is lost (Redis stalled after running it) both are there: the retry then
finds the mark and is a duplicate, and the message is already queued. Either way: once, or
never with a 503 the sender retries.

Speed: requests that arrive together are pipelined together. `enqueue_once` puts its script call
on a pending list; a flush (scheduled for the next turn of the event loop) sends everything
pending as one write on one of a few dedicated connections and reads the replies in order. At
low load a batch is one call (one round trip, as before); under load one write and one read
serve dozens of requests, which is what keeps the `web` process near its bare HTTP rate. Each
batch is bounded by `timeout`; a call never waits for a batch longer than `timeout` before its
own is sent, so every caller has its answer within about twice `timeout`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

DEDUPE_PREFIX = "callflow:webhook:seen:"
# LiveKit retries for ~15 s and drops events older than 30 s: an hour is well past that, and the
# database's unique `call_events.event_id` is the final guard.
DEDUPE_TTL_SECONDS = 3600

ENQUEUE_ONCE_LUA = """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) then
  return 0
end
local pushed = redis.pcall('LPUSH', KEYS[2], ARGV[3])
if type(pushed) == 'table' and pushed.err then
  redis.call('DEL', KEYS[1])
  return redis.error_reply(pushed.err)
end
return 1
"""
ENQUEUE_ONCE_SHA = hashlib.sha1(ENQUEUE_ONCE_LUA.encode()).hexdigest()


class EnqueueUnavailable(Exception):
    """Redis could not take the message (and holds no mark for it), or did not answer in time."""


class RedisEnqueuer:
    """`await enqueue_once(dedupe_id, message)`: True when queued now, False for a duplicate.

    Must be used from one event loop (the ASGI server's); connections are made on first use.
    """

    def __init__(self, url: str, queue: str, *, ttl: int = DEDUPE_TTL_SECONDS, prefix: str = DEDUPE_PREFIX,
                 timeout: float = 1.0, max_inflight: int = 4, max_batch: int = 256) -> None:
        self.queue = queue
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        # No per-read socket timeout: each batch runs under one deadline (cheaper, and bounded).
        self._pool = aioredis.ConnectionPool.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=None, max_connections=max_inflight + 4,
        )
        self.client = aioredis.Redis(connection_pool=self._pool)  # ping (callers bound it)
        self._pending: deque[tuple[str, bytes, str, asyncio.Future, float]] = deque()
        self._idle: list[Any] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # counters for metrics: batches sent, calls sent in them
        self.calls = 0
        queue, ttl = queue.encode(), str(ttl).encode()
        self._evalsha_head = b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n" + ENQUEUE_ONCE_SHA.encode() + b"\r\n$1\r\n2\r\n"
        self._queue_ttl = b"\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(queue), queue, len(ttl), ttl)

    async def enqueue_once(self, dedupe_id: str, message: bytes, mark: str = "1") -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((self.prefix + dedupe_id, message, mark, future, loop.time()))
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _pack(self, key: str, mark: str, message: bytes) -> bytes:
        """`EVALSHA sha 2 key queue ttl mark message` in RESP (what redis-py would pack, cheaper)."""
        k, m = key.encode(), mark.encode()
        return b"".join((self._evalsha_head, b"$%d\r\n" % len(k), k, self._queue_ttl, b"$%d\r\n" % len(m), m,
                         b"\r\n$%d\r\n" % len(message), message, b"\r\n"))

    # ---- batching ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        too_old = loop.time() - self.timeout
        while self._pending and self._inflight < self.max_inflight:
            batch = []
            while self._pending and len(batch) < self.max_batch:
                item = self._pending.popleft()
                future = item[3]
                if future.done():  # its caller went away: never sent, never marked
                    continue
                if item[4] < too_old:  # waited a whole timeout behind stalled batches: not sent
                    future.set_exception(EnqueueUnavailable("Redis did not answer in time"))
                    continue
                batch.append(item)
            if not batch:
                continue
            self._inflight += 1
            self.batches += 1
            self.calls += len(batch)
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, bytes, str, asyncio.Future, float]]) -> None:
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        results: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(b"".join([self._pack(key, mark, message)
                                                         for key, message, mark, _f, _t in batch]),
                                               check_health=False)
                missing: list[int] = []
                for index in range(len(batch)):
                    try:
                        results.append(await conn.read_response())
                    except NoScriptError:
                        results.append(None)
                        missing.append(index)
                    except ResponseError as exc:
                        results.append(EnqueueUnavailable(f"Redis refused: {exc}"))
                if missing:  # Redis restarted or flushed its scripts: send the script itself
                    commands = [("EVAL", ENQUEUE_ONCE_LUA, 2, batch[i][0], self.queue, self.ttl, batch[i][2],
                                 batch[i][1]) for i in missing]
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    for index in missing:
                        try:
                            results[index] = await conn.read_response()
                        except ResponseError as exc:
                            results[index] = EnqueueUnavailable(f"Redis refused: {exc}")
        except (TimeoutError, RedisError, OSError) as exc:
            await conn.disconnect(nowait=True)
            error = EnqueueUnavailable(f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)
            results.extend([error] * (len(batch) - len(results)))
            # A reply that never came leaves "maybe queued": the sender's retry then finds the
            # mark (a duplicate, answered 200) and the message is on the queue; or neither is there.
            for i, result in enumerate(results):
                if result is None:
                    results[i] = error
        except BaseException:
            await conn.disconnect(nowait=True)
            for item in batch:
                if not item[3].done():
                    item[3].cancel()
            raise
        finally:
            self._idle.append(conn)
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        for item, result in zip(batch, results):
            future = item[3]
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result == 1)

    # ---- other ------------------------------------------------------------------------------------
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def aclose(self) -> None:
        for conn in self._idle:
            await conn.disconnect()
        self._idle.clear()
        await self.client.aclose()
        await self._pool.disconnect()
