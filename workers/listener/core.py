"""The listener's supervision: one source session at a time, reconnected forever.

    source session --(Change)--> asyncio queue --(batches)--> IngestSink (drops the worker's own
    echoes; Redis dedupe + enqueue)
    catch-up (on every (re)subscribe, every `catch_up_interval` s) --------^

A session is one connection + subscription of a source (`RealtimeSource`, `PostgresSource`). It
calls `mark_subscribing()` / `mark_live()` as it comes up and returns (or raises) when it ends,
for whatever reason: the supervisor then waits a capped exponential backoff with jitter and starts
the next one, forever. A session that went live was a success: the next wait is the first step
again, however many attempts it took to get there (the contract: every backoff starts again from
its first step after a success). Only a configuration error stops the process with a non-zero status.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from orchestration.backoff import backoff_delay
from orchestration.ingest import heartbeat
from orchestration.ingest.mapping import Change, MalformedChange
from orchestration.ingest.sink import IngestSink, catch_up

log = structlog.get_logger("callflow.listener")


@dataclass
class Options:
    catch_up_interval: float = 10.0     # periodic catch-up inside the listener (0: only on (re)subscribe)
    overlap_seconds: float = 30.0       # catch-up re-reads this much before the watermark
    initial_horizon_seconds: float = 3600.0
    backoff_base: float = 0.5
    backoff_max: float = 10.0           # so a listener is back within 10 s of its source (or the database)
    heartbeat_interval: float = 2.0
    ping_interval: float = 15.0         # websocket / connection liveness probe
    ping_timeout: float = 10.0
    system_timeout: float = 20.0        # Realtime: wait this long for "Subscribed to PostgreSQL"
    token_ttl: float = 3600.0           # Realtime: lifetime of minted access tokens
    batch_max: int = 500


class Source(Protocol):
    name: str

    async def session(self, listener: "Listener") -> None: ...


class SessionEnded(Exception):
    """A session is over (the reason is the message); the supervisor reconnects."""


class Listener:
    def __init__(self, source: Source, sink: IngestSink, database_url: str, options: Options | None = None,
                 listener_id: str | None = None) -> None:
        self.source = source
        self.sink = sink
        self.redis = sink.redis
        self.database_url = database_url
        self.options = options or Options()
        self.id = listener_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.stopping = asyncio.Event()
        self.queue: asyncio.Queue[Change] = asyncio.Queue()
        self._catch_up_wanted = asyncio.Event()
        self._catch_up_lock = asyncio.Lock()
        self._last_backoff_error: str | None = None
        self._went_live = False  # the current session reached `live`: its end starts the backoff afresh
        self.state: dict[str, Any] = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "source": source.name,
            "state": "starting", "connected": False, "since": time.time(), "last_event_at": None,
            "lag_seconds": None, "last_catch_up_at": None, "error": None, "received": 0, "enqueued": 0,
            "duplicates": 0, "echoes": 0, "malformed": 0, "reconnects": 0, "catch_up_enqueued": 0,
        }
        self._redis_ok = True

    # ---- state -----------------------------------------------------------------------------
    def set_state(self, state: str, error: str | None = None, **fields: Any) -> None:
        previous = self.state["state"]
        changed = state != previous
        if changed:
            self.state["since"] = time.time()
        self.state.update(state=state, connected=(state == "live"), error=error, **fields)
        # Each state change is logged once: a retry that fails the same way again is not news.
        quiet = (state == "connecting" and previous == "backoff") or (
            state == "backoff" and error == self._last_backoff_error) or (not changed and state != "backoff")
        if state == "backoff":
            self._last_backoff_error = error
        elif state == "live":
            self._last_backoff_error = None
        if not quiet:
            level = log.warning if error else log.info
            level("listener state", state=state, source=self.source.name,
                  **({"error": error} if error else {}), **fields)
        if changed:
            self._publish()

    def mark_subscribing(self) -> None:
        self.set_state("subscribing")

    def mark_live(self) -> None:
        self._went_live = True
        self.set_state("live", retry_in=None, attempt=None)
        self.request_catch_up()

    def request_catch_up(self) -> None:
        self._catch_up_wanted.set()

    # ---- input from sources ----------------------------------------------------------------
    def accept(self, change: Change | None) -> None:
        if change is None:
            return
        self.state["received"] += 1
        self.state["last_event_at"] = time.time()
        self.queue.put_nowait(change)

    def malformed(self, what: str, reason: str, sample: Any = None) -> None:
        self.state["malformed"] += 1
        text = sample if isinstance(sample, str) else repr(sample)
        log.warning("malformed change skipped", what=what, reason=reason,
                    sample=(text[:200] if sample is not None else None), source=self.source.name)

    def accept_or_skip(self, what: str, fn, raw: Any) -> None:
        try:
            self.accept(fn(raw))
        except MalformedChange as exc:
            self.malformed(what, str(exc), raw)
        except Exception as exc:  # noqa: BLE001 - a bad frame must never stop the listener
            self.malformed(what, f"{exc.__class__.__name__}: {exc}", raw)

    # ---- loops -----------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._supervise(), name="supervise"),
                 loop.create_task(self._drain(), name="drain"),
                 loop.create_task(self._catch_up_loop(), name="catch-up"),
                 loop.create_task(self._heartbeat_loop(), name="heartbeat")]
        await self.stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # flush what was received but not yet enqueued
        await self._flush_remaining()
        self.set_state("stopped")
        try:
            await asyncio.to_thread(heartbeat.remove, self.redis, self.id)
        except Exception:  # noqa: BLE001
            pass

    def stop(self) -> None:
        self.stopping.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self.options.backoff_base, self.options.backoff_max)

    async def _supervise(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            self.set_state("connecting")
            self._went_live = False
            try:
                await self.source.session(self)
                reason = "session ended"
            except asyncio.CancelledError:
                raise
            except SessionEnded as exc:
                reason = str(exc) or "session ended"
            except Exception as exc:  # noqa: BLE001 - every failure is a reason to reconnect
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                reason = f"{exc.__class__.__name__}: {first_line}"[:300]
            if self.stopping.is_set():
                return
            if self._went_live:  # a success, however short-lived: back to the first step
                attempt = 0
            attempt += 1
            self.state["reconnects"] += 1
            delay = self.backoff(attempt)
            self.set_state("backoff", error=reason, retry_in=round(delay, 2), attempt=attempt)
            if await self._sleep(delay):
                return

    async def _drain(self) -> None:
        batch: list[Change] = []
        failures = 0
        while True:
            if not batch:
                batch.append(await self.queue.get())
                while len(batch) < self.options.batch_max and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
            try:
                result = await asyncio.to_thread(self.sink.submit, batch)
            except asyncio.CancelledError:
                self._unsent = batch
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: keep the batch, retry
                failures += 1
                if failures == 1:
                    log.warning("enqueue failing, will retry", error=f"{exc.__class__.__name__}: {exc}"[:200],
                                pending=len(batch) + self.queue.qsize())
                await asyncio.sleep(backoff_delay(failures, 0.2, 2.0))
                continue
            if failures:
                log.info("enqueue recovered", after_failures=failures)
                failures = 0
            self._count(result, batch)
            batch = []

    def _count(self, result, batch: list[Change]) -> None:
        self.state["enqueued"] += len(result.enqueued)
        self.state["duplicates"] += result.duplicates
        self.state["echoes"] += result.echoes
        occurred = batch[-1].occurred_at
        if occurred:
            try:
                self.state["lag_seconds"] = round(max(0.0, time.time() - datetime.fromisoformat(occurred).timestamp()), 4)
            except ValueError:
                pass

    async def _flush_remaining(self) -> None:
        batch = list(getattr(self, "_unsent", []))
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        if batch:
            try:
                result = await asyncio.wait_for(asyncio.to_thread(self.sink.submit, batch), 10)
                self._count(result, batch)
            except Exception as exc:  # noqa: BLE001 - catch-up will find them
                log.warning("could not flush on stop; catch-up will enqueue them", pending=len(batch),
                            error=exc.__class__.__name__)

    def _catch_up_sync(self) -> Any:
        from orchestration.db import connect

        with connect(self.database_url, autocommit=True, connect_timeout=5,
                     application_name="callflow-listener-catch-up") as conn:
            return catch_up(conn, self.sink, source="postgres", overlap_seconds=self.options.overlap_seconds,
                            initial_horizon_seconds=self.options.initial_horizon_seconds,
                            on_malformed=lambda reason: self.malformed("row", reason))

    async def catch_up_now(self, reason: str) -> Any:
        async with self._catch_up_lock:
            result = await asyncio.to_thread(self._catch_up_sync)
        self.state["last_catch_up_at"] = time.time()
        if result.enqueued:
            self.state["catch_up_enqueued"] += len(result.enqueued)
            self.state["enqueued"] += len(result.enqueued)
            log.info("catch-up enqueued missed changes", reason=reason, enqueued=len(result.enqueued),
                     scanned=result.scanned)
        return result

    async def _catch_up_loop(self) -> None:
        failures = 0
        interval = self.options.catch_up_interval
        while True:
            timeout = interval if interval > 0 else None
            if failures:
                timeout = self.backoff(failures)
            try:
                await asyncio.wait_for(self._catch_up_wanted.wait(), timeout=timeout)
                reason = "subscribed"
            except asyncio.TimeoutError:
                reason = "retry" if failures else "periodic"
                if not failures and interval <= 0:
                    continue
            self._catch_up_wanted.clear()
            try:
                await self.catch_up_now(reason)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next attempt will read the same rows
                failures += 1
                if failures == 1:
                    log.warning("catch-up failing, will retry", error=f"{exc.__class__.__name__}: {exc}"[:200])
                continue
            if failures:
                log.info("catch-up recovered", after_failures=failures)
            failures = 0

    def _publish(self) -> None:
        try:
            heartbeat.publish(self.redis, self.state)
            if not self._redis_ok:
                log.info("heartbeat published again")
            self._redis_ok = True
        except Exception as exc:  # noqa: BLE001
            if self._redis_ok:
                log.warning("heartbeat not published", error=exc.__class__.__name__)
            self._redis_ok = False

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.to_thread(self._publish)
            await asyncio.sleep(self.options.heartbeat_interval)
