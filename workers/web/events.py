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
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import psycopg
from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from orchestration.backoff import backoff_delay
from workers.web import calls
from workers.web.errors import ApiError
from workers.web.signed_in import signed_in_user

log = get_logger("callflow.web.events")

CHANNELS = ("callflow_invitations", "callflow_calls")
HEARTBEAT_SECONDS = 15.0
# Names the hub's connection in pg_stat_activity (its last query may be a probe, not its LISTEN).
HUB_APPLICATION_NAME = "callflow-web-event-hub"
PROBE_SECONDS = 5.0  # the hub's LISTEN connection is asked `select 1` after this long without a word
QUEUE_SIZE = 256
RESYNC = ("resync", None)
CLOSED = ("closed", None)


class ChangeHub:
    """Fan-out of row changes to per-user queues; the LISTEN connection starts with the first stream."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.streams: dict[str, set[asyncio.Queue]] = {}
        self._task: asyncio.Task | None = None

    def subscribe(self, user_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self.streams.setdefault(user_id, set()).add(queue)
        if self._task is None or self._task.done():
            if self._task is None:
                self.end_streams_on_shutdown()
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue) -> None:
        queues = self.streams.get(user_id)
        if queues is not None:
            queues.discard(queue)
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
        return sum(len(q) for q in self.streams.values())

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
                            await self._dispatch(notify.channel, notify.payload)
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

    async def _dispatch(self, channel: str, payload: str) -> None:
        if not self.streams:
            return  # nobody to tell: skip the read
        try:
            row_id = json.loads(payload)["id"]
        except (ValueError, KeyError, TypeError):
            return
        try:
            if channel == "callflow_invitations":
                row = await calls.store().invitation(row_id)
                if row is not None:
                    self._deliver({row["caller_id"], row["callee_id"]}, ("invitation", row))
            else:
                found = await calls.store().call_with_parties(row_id)
                if found is not None:
                    row, parties = found
                    self._deliver(parties, ("call", row))
        except Exception as exc:  # noqa: BLE001 - one unreadable row must not stop the hub
            if isinstance(exc, ApiError) and exc.status == 503:
                # The database is away: this change cannot be told, so every stream is stale and
                # ends now (its client reconnects for a fresh snapshot).
                log.warning("event hub: the database is away; streams closed", channel=channel)
                self.close_all()
                return
            log.warning("event hub: cannot read a changed row", channel=channel, error=exc.__class__.__name__)


_hub: ChangeHub | None = None


def hub() -> ChangeHub:
    global _hub
    if _hub is None:
        _hub = ChangeHub(get_settings().database_url)
    return _hub


Gauge("callflow_event_streams", "Open GET /api/calls/events streams of this web process").set_function(
    lambda: _hub.stream_count() if _hub is not None else 0)


def sse(event: str, row: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(row, separators=(',', ':'))}\n\n"


async def events(request: Request) -> StreamingResponse:
    user = await signed_in_user(request, query_token=True)
    expires_at = user.claims.get("exp") if isinstance(user.claims.get("exp"), (int, float)) else None
    changes = hub()
    queue = changes.subscribe(user.id)
    try:
        snapshot = await calls.store().live_invitations(user)
    except BaseException:
        changes.unsubscribe(user.id, queue)
        raise

    async def stream():
        try:
            yield "retry: 2000\n\n"
            for row in snapshot:
                yield sse("invitation", row)
            while True:
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
                    for live in await calls.store().live_invitations(user):
                        yield sse("invitation", live)
                else:
                    yield sse(kind, row)
        finally:
            changes.unsubscribe(user.id, queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


routes: list = [Route("/api/calls/events", events, methods=["GET"])]
