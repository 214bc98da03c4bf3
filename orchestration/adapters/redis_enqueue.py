"""Deduplicate and list in one Redis round trip (redis.asyncio, for the `web` process).

One Lua script does both, atomically, for each event: `SET mark NX EX ttl`; only if the mark is
new, `LPUSH` the event (its task arguments) onto the webhook backlog (`orchestration.ingest.backlog`),
and, when something was listed and no nudge is waiting, one pre-built `callflow.livekit_events`
message onto the queue (and its `task-sent` event, for Flower): the workers take the waiting events
in batches. If the listing fails the mark is deleted in the same script, so a retry is never taken
for a duplicate. If the reply is lost (Redis stalled after running it) both are there: the retry
then finds the mark and is a duplicate, and the event is listed. Either way: once, or never with a
503 the sender retries. (A nudge that could not be pushed is made good by the beat within seconds;
the event is listed.)

Speed: requests that arrive together go to Redis together. `enqueue_once` puts its event on a
pending list; a flush (scheduled for the next turn of the event loop) sends everything pending
as ONE script call (marks as KEYS, events as ARGV; the script loops, one result per event) on
one of a few dedicated connections. At low load a batch is one event (one round trip, as
before); under load one call serves dozens of requests, for Redis as for us, which is what keeps
the `web` process near its bare HTTP rate. Each batch is bounded by `timeout`; an event never
waits longer than `timeout` before its batch is sent, so every caller has its answer within about
twice `timeout`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from orchestration import names
from orchestration.ingest.backlog import LIST_ONCE_LUA, WEBHOOK_EVENTS, BacklogKeys
from orchestration.adapters.celery_messages import PreBuiltTask, task_sent_channel_of

DEDUPE_PREFIX = names.WEBHOOK_SEEN_PREFIX
DEDUPE_TTL_SECONDS = names.WEBHOOK_SEEN_TTL_SECONDS  # why an hour: see orchestration.names

# The backlog's script (`orchestration.ingest.backlog.LIST_ONCE_LUA`), sent as raw RESP below.
LIST_ONCE_SHA = hashlib.sha1(LIST_ONCE_LUA.encode()).hexdigest()


class EnqueueUnavailable(Exception):
    """Redis could not take the event (and holds no mark for it), or did not answer in time."""


class RedisEnqueuer:
    """`await enqueue_once(dedupe_id, item)`: True when listed now, False for a duplicate.
    `nudge()` makes a new nudge (a task message with an id of its own, and its `task-sent` event:
    `CeleryMessageBuilder.prebuilt`) for each Redis call.

    Must be used from one event loop (the ASGI server's); connections are made on first use.
    """

    def __init__(self, url: str, queue: str, nudge: Callable[[], PreBuiltTask], *,
                 keys: BacklogKeys = WEBHOOK_EVENTS, ttl: int = DEDUPE_TTL_SECONDS, prefix: str = DEDUPE_PREFIX,
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
        self._pending: deque[tuple[str, bytes, asyncio.Future, float]] = deque()
        self._idle: list[Any] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # counters for metrics: batches sent, calls sent in them
        self.calls = 0
        self.nudge = nudge
        # What follows the marks in every call: the backlog, nudge mark and queue, then ttl and the
        # `task-sent` channel.
        self._tail = b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in (
            keys.items.encode(), keys.nudged.encode(), queue.encode(), str(ttl).encode(),
            task_sent_channel_of(self._pool)))

    async def enqueue_once(self, dedupe_id: str, item: bytes) -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((self.prefix + dedupe_id, item, future, loop.time()))
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _pack(self, command: bytes, batch: list) -> bytes:
        """`EVALSHA|EVAL script n+3 mark... list nudged queue ttl channel nudge event item...` in
        RESP (no per-argument objects)."""
        script = LIST_ONCE_SHA.encode() if command == b"EVALSHA" else LIST_ONCE_LUA.encode()
        numkeys = b"%d" % (len(batch) + 3)
        parts = [b"*%d\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            3 + 2 * len(batch) + 7, len(command), command, len(script), script, len(numkeys), numkeys)]
        for item in batch:
            key = item[0].encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(key), key))
        nudge, sent_event = self.nudge()
        parts.append(self._tail)
        parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(nudge), nudge, len(sent_event), sent_event))
        for item in batch:
            parts.append(b"$%d\r\n" % len(item[1]))
            parts.append(item[1])
            parts.append(b"\r\n")
        return b"".join(parts)

    # ---- batching ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        too_old = loop.time() - self.timeout
        while self._pending and self._inflight < self.max_inflight:
            batch = []
            while self._pending and len(batch) < self.max_batch:
                item = self._pending.popleft()
                future = item[2]
                if future.done():  # its caller went away: never sent, never marked
                    continue
                if item[3] < too_old:  # waited a whole timeout behind stalled batches: not sent
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

    async def _run(self, batch: list[tuple[str, bytes, asyncio.Future, float]]) -> None:
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        results: list[Any] | None = None
        error: EnqueueUnavailable | None = None
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(self._pack(b"EVALSHA", batch), check_health=False)
                try:
                    results = await conn.read_response()
                except NoScriptError:  # Redis restarted or flushed its scripts: send the script itself
                    await conn.send_packed_command(self._pack(b"EVAL", batch), check_health=False)
                    results = await conn.read_response()
        except ResponseError as exc:  # the script as a whole refused (nothing of it ran)
            error = EnqueueUnavailable(f"Redis refused: {exc}")
        except (TimeoutError, RedisError, OSError) as exc:
            # A reply that never came leaves "maybe queued": the sender's retry then finds the
            # mark (a duplicate, answered 200) and the event is listed; or neither is there.
            await conn.disconnect(nowait=True)
            error = EnqueueUnavailable(f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)
        except BaseException:
            await conn.disconnect(nowait=True)
            for item in batch:
                if not item[2].done():
                    item[2].cancel()
            raise
        finally:
            self._idle.append(conn)
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        if results is None or len(results) != len(batch):
            error = error or EnqueueUnavailable("unexpected reply from Redis")
            results = [error] * len(batch)
        for item, result in zip(batch, results):
            future = item[2]
            if future.done():
                continue
            if result == 1 or result == 0:
                future.set_result(result == 1)
            elif isinstance(result, EnqueueUnavailable):
                future.set_exception(result)
            else:
                text = result.decode(errors="replace") if isinstance(result, bytes) else str(result)
                future.set_exception(EnqueueUnavailable(f"Redis refused: {text}"))

    # ---- other ------------------------------------------------------------------------------------
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def aclose(self) -> None:
        for conn in self._idle:
            await conn.disconnect()
        self._idle.clear()
        await self.client.aclose()
        await self._pool.disconnect()
