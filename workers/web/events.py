"""`GET /api/calls/events`: a Server-Sent Events stream of the signed-in user's invitations and calls.

One Postgres LISTEN connection per `web` process (`ChangeHub`) serves every stream: the triggers
NOTIFY `callflow_invitations` / `callflow_calls` with a row's id; the hub reads that row once and
hands it to the streams of the users allowed to see it (an invitation's caller and callee; a
call's parties, as the RLS policies say). On connect a stream first sends the user's live
invitations; a comment line every `HEARTBEAT_SECONDS` keeps proxies from closing it. A stream
whose client cannot keep up is closed (the browser's EventSource reconnects and gets a fresh
snapshot), so one slow client never holds memory or the hub. So is every stream when the hub
loses its connection (Postgres restarted, or the network dropped it): changes made meanwhile are
not heard, and a client reconnecting gets a fresh snapshot (or a 503 while the database is away).

Bounds (issue 23):
- a user holds at most CALLFLOW_STREAMS_PER_USER open streams, across every web process (leases
  in Redis, `stream_slots`; this process's own count when Redis gives no answer): one more is
  429 `rate_limited`; a process holds at most CALLFLOW_STREAMS_PER_PROCESS: one more is 503
  `unavailable`.
- the hub reads changed rows in batches (every row of one channel waiting at the time, up to
  `HUB_BATCH`, in one statement: one read per row could not keep up with 50 calls a second),
  `HUB_READS` readers side by side, one row's reads in the order of its notifications (a row being
  read waits for its reader), each bounded in time; a batch that cannot be read yet (no connection
  within the wait, or a statement past its time: the database is slow or a lock holds it) is tried
  again with backoff while the other readers go on, so one stuck read stalls no other stream and
  loses no event. A batch still unreadable after `READ_GIVE_UP_SECONDS` ends every stream (its
  clients reconnect for a fresh snapshot).
- the streams' reads have a pool of their own (`store()`), apart from the API's, and the snapshots
  of connecting streams take at most `SNAPSHOT_READS` of its connections, so a burst of
  connections never starves the hub.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import psycopg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from orchestration.auth import User
from orchestration.backoff import backoff_delay
from workers.web.call_store import CallStore, DatabaseBusy
from workers.web.errors import ApiError
from workers.web.signed_in import signed_in_user
from workers.web.stream_slots import RENEW_SECONDS, StreamLeases

log = get_logger("callflow.web.events")

CHANNELS = ("callflow_invitations", "callflow_calls")
HEARTBEAT_SECONDS = 15.0
# Names the hub's connection in pg_stat_activity (its last query may be a probe, not its LISTEN).
HUB_APPLICATION_NAME = "callflow-web-event-hub"
PROBE_SECONDS = 5.0  # the hub's LISTEN connection is asked `select 1` after this long without a word
QUEUE_SIZE = 256
RESYNC = ("resync", None)
CLOSED = ("closed", None)

HUB_READS = 3  # readers of changed rows at once, each a batch of one channel's rows
HUB_BATCH = 100  # changed rows one read takes at most
SNAPSHOT_READS = 3  # connecting (or re-reading) streams' snapshots read at once
READ_WAIT_SECONDS = 2.0  # a read's wait for a connection, and each statement's time bound
READ_GIVE_UP_SECONDS = 30.0
STREAMS_RETRY_AFTER = "5"

STREAMS_REFUSED = Counter("callflow_event_streams_refused_total",
                          "GET /api/calls/events refused by a cap", ["cap"])

_store: CallStore | None = None


def store() -> CallStore:
    """The streams' own pool: the hub's reads and the snapshots, never waiting on API requests."""
    global _store
    if _store is None:
        _store = CallStore(get_settings().database_url, max_size=HUB_READS + SNAPSHOT_READS,
                           timeout=READ_WAIT_SECONDS, per_user=None,
                           statement_timeout_ms=int(READ_WAIT_SECONDS * 1000), name="callflow-events")
    return _store


class ChangeHub:
    """Fan-out of row changes to per-user queues; the LISTEN connection starts with the first stream."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.streams: dict[str, set[asyncio.Queue]] = {}
        self._count = 0
        self._task: asyncio.Task | None = None
        self._pending: dict[tuple[str, str], int] = {}  # (channel, row id) -> notifications not yet told
        self._waiting: dict[str, dict[str, None]] = {channel: {} for channel in CHANNELS}  # rows to read, in order
        self._reading: set[tuple[str, str]] = set()  # rows in a reader's hands
        self._readers: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._turn = 0

    def subscribe(self, user_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self.streams.setdefault(user_id, set()).add(queue)
        self._count += 1
        if self._task is None or self._task.done():
            if self._task is None:
                self.end_streams_on_shutdown()
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue) -> None:
        queues = self.streams.get(user_id)
        if queues is not None and queue in queues:
            queues.discard(queue)
            self._count -= 1
            if not queues:
                del self.streams[user_id]

    def close_all(self) -> None:
        for user_id, queues in list(self.streams.items()):
            for queue in list(queues):
                self.unsubscribe(user_id, queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(CLOSED)

    def end_streams_on_shutdown(self) -> None:
        """uvicorn waits for every open response before it stops, and a stream never ends by
        itself: on SIGINT/SIGTERM end them all, then let uvicorn's own handler run."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum, frame, previous=previous):
                loop.call_soon_threadsafe(self.close_all)
                previous(signum, frame)

            signal.signal(sig, handler)

    def stream_count(self) -> int:
        return self._count

    def user_stream_count(self, user_id: str) -> int:
        return len(self.streams.get(user_id, ()))

    def pending_reads(self) -> int:
        return sum(self._pending.values())

    def _deliver(self, user_ids, item) -> None:
        for user_id in user_ids:
            for queue in list(self.streams.get(user_id, ())):
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:  # too slow: end that stream (its client reconnects)
                    self.unsubscribe(user_id, queue)
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait(CLOSED)

    async def _listen_forever(self) -> None:
        failures = 0
        first = True
        while True:
            try:
                # Keepalives too: a connection the network dropped ends even while a probe waits.
                conn = await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=10,
                    keepalives_interval=5, keepalives_count=3, application_name=HUB_APPLICATION_NAME)
                async with conn:
                    for channel in CHANNELS:
                        await conn.execute(f"listen {channel}")
                    if not first:  # streams opened while we were away missed changes: they re-read
                        for queues in list(self.streams.values()):
                            for queue in list(queues):
                                if not queue.full():
                                    queue.put_nowait(RESYNC)
                    first, failures = False, 0
                    log.info("event hub listening", channels=",".join(CHANNELS))
                    while True:
                        async for notify in conn.notifies(timeout=PROBE_SECONDS):
                            self._changed(notify.channel, notify.payload)
                        # A connection the network (or a proxy) dropped without a word hears
                        # nothing, and nothing says so: ask.
                        await asyncio.wait_for(conn.execute("select 1"), PROBE_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the hub must outlive any database hiccup
                first = False
                failures += 1
                # What was said while nobody listened is lost: every open stream ends, and its
                # client reconnects for a fresh snapshot (the contract: streams close, clients reconnect).
                self.close_all()
                if failures == 1:
                    log.warning("event hub: LISTEN connection lost; streams closed, reconnecting",
                                error=exc.__class__.__name__)
                await asyncio.sleep(backoff_delay(failures, 0.5, 10.0))

    def _changed(self, channel: str, payload: str) -> None:
        """A notification: its row waits for a reader (in the order rows changed), never read by
        the LISTEN loop itself."""
        if not self.streams:
            return  # nobody to tell: skip the read
        try:
            row_id = str(json.loads(payload)["id"])
        except (ValueError, KeyError, TypeError):
            return
        key = (channel, row_id)
        self._pending[key] = self._pending.get(key, 0) + 1
        if key not in self._reading:  # a row in a reader's hands waits for it: its reads keep their order
            self._waiting[channel][row_id] = None
        self._start_readers()
        self._wake.set()

    def _start_readers(self) -> None:
        self._readers = {task for task in self._readers if not task.done()}
        loop = asyncio.get_running_loop()
        while len(self._readers) < HUB_READS:
            self._readers.add(loop.create_task(self._read_forever()))

    def _take(self) -> tuple[str, list[str]] | None:
        """The next batch: up to HUB_BATCH waiting rows of one channel, the channels in turn."""
        for _ in CHANNELS:
            channel = CHANNELS[self._turn % len(CHANNELS)]
            self._turn += 1
            waiting = self._waiting[channel]
            if waiting:
                ids = []
                for row_id in waiting:
                    ids.append(row_id)
                    if len(ids) == HUB_BATCH:
                        break
                for row_id in ids:
                    del waiting[row_id]
                    self._reading.add((channel, row_id))
                return channel, ids
        return None

    async def _read_forever(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            channel, ids = batch
            told = {row_id: self._pending.get((channel, row_id), 0) for row_id in ids}
            try:
                found = await self._read_until_done(channel, ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one unreadable batch must not stop the hub
                log.warning("event hub: cannot read changed rows", channel=channel, error=exc.__class__.__name__)
                found = {}
            for row_id in ids:
                key = (channel, row_id)
                self._reading.discard(key)
                if found is None:  # given up: every stream was ended
                    self._pending.pop(key, None)
                    continue
                item = found.get(row_id)
                # One event per change, as the notifications came: each tells the row as it is now.
                for _ in range(told[row_id] if item is not None else 0):
                    self._deliver(*item)
                left = self._pending.get(key, 0) - told[row_id]
                if left > 0:  # changed again while it was read: read again, after what waits now
                    self._pending[key] = left
                    self._waiting[channel][row_id] = None
                else:
                    self._pending.pop(key, None)

    async def _read_until_done(self, channel: str, ids: list[str]) -> dict | None:
        """The batch's rows ({id: (users to tell, (event, row))}, a row gone left out); a batch that
        cannot be read yet (no connection within the wait, or a statement past its time: the
        database is slow or a lock holds it) is tried again with backoff while other readers go on;
        None when it stayed unreadable for READ_GIVE_UP_SECONDS or the database is away (every
        stream ended: their clients reconnect for a fresh snapshot)."""
        failures, failing_since = 0, None
        while True:
            try:
                return await self._read(channel, ids)
            except DatabaseBusy:
                now = time.monotonic()
                failing_since = failing_since or now
                failures += 1
                if now - failing_since >= READ_GIVE_UP_SECONDS:
                    log.warning("event hub: changed rows stayed unreadable; streams closed", channel=channel,
                                seconds=round(now - failing_since, 1))
                    self.close_all()
                    return None
                if failures == 1:
                    log.info("event hub: changed rows cannot be read yet; trying again", channel=channel)
                await asyncio.sleep(backoff_delay(failures, 0.2, 2.0))
            except ApiError as exc:
                if exc.status != 503:
                    raise
                # The database is away: these changes cannot be told, so every stream is stale and
                # ends now (its client reconnects for a fresh snapshot).
                log.warning("event hub: the database is away; streams closed", channel=channel)
                self.close_all()
                return None

    @staticmethod
    async def _read(channel: str, ids: list[str]) -> dict:
        """{row id: (the users to tell, (event, row))} of the rows still there."""
        if channel == "callflow_invitations":
            rows = await store().invitations_by_id(ids)
            return {row_id: ({row["caller_id"], row["callee_id"]}, ("invitation", row)) for row_id, row in rows.items()}
        calls = await store().calls_with_parties(ids)
        return {row_id: (parties, ("call", row)) for row_id, (row, parties) in calls.items()}


_hub: ChangeHub | None = None


def hub() -> ChangeHub:
    global _hub
    if _hub is None:
        _hub = ChangeHub(get_settings().database_url)
    return _hub


Gauge("callflow_event_streams", "Open GET /api/calls/events streams of this web process").set_function(
    lambda: _hub.stream_count() if _hub is not None else 0)
Gauge("callflow_event_hub_reads_pending", "Changed rows this web process's event hub has still to read and tell"
      ).set_function(lambda: _hub.pending_reads() if _hub is not None else 0)


class _Leases:
    """The user's places across web processes (`stream_slots`), built on first use."""

    def __init__(self) -> None:
        self.leases: StreamLeases | None = None
        self._releasing: set[asyncio.Task] = set()
        self._quiet_until = 0.0

    def get(self) -> StreamLeases:
        if self.leases is None:
            settings = get_settings()
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=16, timeout=1, socket_timeout=1, socket_connect_timeout=1)
            self.leases = StreamLeases(aioredis.Redis(connection_pool=pool), limit=settings.callflow_streams_per_user)
        return self.leases

    def unanswered(self, exc: Exception) -> None:
        if time.monotonic() >= self._quiet_until:  # once a minute at most
            self._quiet_until = time.monotonic() + 60
            log.warning("event streams: Redis gives no answer; a user's streams are counted per process",
                        error=exc.__class__.__name__)

    async def acquire(self, user_id: str) -> str | None:
        """The lease, None past the cap; "" when Redis gives no answer (the process's count stands)."""
        try:
            return await self.get().acquire(user_id)
        except (RedisError, OSError) as exc:
            self.unanswered(exc)
            return ""

    async def renew(self, user_id: str, lease: str) -> None:
        try:
            await self.get().renew(user_id, lease)
        except (RedisError, OSError) as exc:
            self.unanswered(exc)

    def release_soon(self, user_id: str, lease: str) -> None:
        """From a stream's `finally` (it may be cancelled there): a task of its own."""
        async def release() -> None:
            try:
                await self.get().release(user_id, lease)
            except (RedisError, OSError) as exc:  # the lease runs out by itself
                self.unanswered(exc)

        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)


_leases = _Leases()
_snapshot_slots: asyncio.Semaphore | None = None


async def live_invitations(user: User) -> list[dict]:
    """A stream's snapshot, in one of `SNAPSHOT_READS` places (waited for `READ_WAIT_SECONDS`)."""
    global _snapshot_slots
    _snapshot_slots = _snapshot_slots or asyncio.Semaphore(SNAPSHOT_READS)
    try:
        async with asyncio.timeout(READ_WAIT_SECONDS):
            await _snapshot_slots.acquire()
    except TimeoutError:
        raise DatabaseBusy("too many event streams are starting at once; try again") from None
    try:
        return await store().live_invitations(user)
    finally:
        _snapshot_slots.release()


def sse(event: str, row: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(row, separators=(',', ':'))}\n\n"


async def events(request: Request) -> StreamingResponse:
    user = await signed_in_user(request, query_token=True)
    settings = get_settings()
    expires_at = user.claims.get("exp") if isinstance(user.claims.get("exp"), (int, float)) else None
    changes = hub()
    # Both counts and the subscription with no await between: no two requests pass on one place.
    if changes.stream_count() >= settings.callflow_streams_per_process:
        STREAMS_REFUSED.labels("process").inc()
        log.warning("event streams: this process holds its cap", cap=settings.callflow_streams_per_process)
        raise ApiError(503, "unavailable", "this server holds all the event streams it can; try again",
                       headers={"Retry-After": STREAMS_RETRY_AFTER})
    if changes.user_stream_count(user.id) >= settings.callflow_streams_per_user:
        STREAMS_REFUSED.labels("user").inc()
        raise _too_many(settings.callflow_streams_per_user)
    queue = changes.subscribe(user.id)
    lease = None
    try:
        lease = await _leases.acquire(user.id)
        if lease is None:
            STREAMS_REFUSED.labels("user").inc()
            raise _too_many(settings.callflow_streams_per_user)
        snapshot = await live_invitations(user)
    except BaseException:
        changes.unsubscribe(user.id, queue)
        if lease:
            _leases.release_soon(user.id, lease)
        raise

    closed = False

    def close() -> None:
        """The stream's place back: once, from whichever end comes first."""
        nonlocal closed
        if not closed:
            closed = True
            changes.unsubscribe(user.id, queue)
            if lease:
                _leases.release_soon(user.id, lease)

    async def stream():
        renew_at = time.monotonic() + RENEW_SECONDS
        try:
            yield "retry: 2000\n\n"
            for row in snapshot:
                yield sse("invitation", row)
            while True:
                if lease and time.monotonic() >= renew_at:
                    await _leases.renew(user.id, lease)
                    renew_at = time.monotonic() + RENEW_SECONDS
                timeout = HEARTBEAT_SECONDS
                if expires_at is not None:
                    left = expires_at - time.time()
                    if left <= 0:
                        return  # the token ran out: the client reconnects with a fresh one
                    timeout = min(timeout, left)
                try:
                    kind, row = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    yield ": heartbeat\n\n"
                    continue
                if kind == "closed":
                    return
                if kind == "resync":
                    try:
                        live = await live_invitations(user)
                    except ApiError:
                        return  # the client reconnects for a fresh snapshot
                    for row in live:
                        yield sse("invitation", row)
                else:
                    yield sse(kind, row)
        finally:
            close()

    return _EventStream(stream(), close, media_type="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


class _EventStream(StreamingResponse):
    """Runs `close` however the response ends: also when the client went away before the body
    was first read from, where the generator (never started) would run no `finally` of its own and
    its place would stay counted for the life of the process."""

    def __init__(self, content, close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


def _too_many(limit: int) -> ApiError:
    return ApiError(429, "rate_limited", f"at most {limit} open event streams a user (CALLFLOW_STREAMS_PER_USER); "
                    "close one first", headers={"Retry-After": STREAMS_RETRY_AFTER})


routes: list = [Route("/api/calls/events", events, methods=["GET"])]
