"""`POST /livekit/webhook`: LiveKit's signed webhooks, verified, deduplicated, listed for the workers.

A plain ASGI endpoint (no Request object; `FastPath` spares it the router): headers first (size,
then the token, before any of the body is read), then the body streamed with a running count,
then the body hash, the event's shape, and one Redis round trip (`RedisEnqueuer`, shared with
the requests arriving at the same time) that lists the event on the webhook backlog and nudges a
worker (`callflow.livekit_events` takes the waiting events in batches). A `Bearer ` prefix on the token is tolerated (LiveKit
sends the bare JWT). Answers:
200 accepted or duplicate; 401 / 400 / 413 per the contract; 503 when Redis cannot take it
(`Retry-After: 1`; LiveKit retries). Each rejection is logged once (reason, never the token) and
counted; accepted events are counted by type, the Redis step timed.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from orchestration import names
from orchestration.adapters.redis_enqueue import EnqueueUnavailable, RedisEnqueuer
from orchestration.adapters.celery_messages import CeleryMessageBuilder
from orchestration.webhooks import (
    MAX_BODY_BYTES,
    InvalidEvent,
    PayloadTooLarge,
    WebhookRejected,
    WebhookVerifier,
    livekit_event_args,
    parse_event,
)

TASK_NAME = names.LIVEKIT_EVENTS  # the nudge: takes the waiting events
QUEUE = names.Q_EVENTS

log = get_logger("callflow.web.webhook")

WEBHOOKS_REJECTED = Counter(
    "callflow_webhooks_rejected_total", "LiveKit webhook requests refused, by reason", ["reason"],
)
for _reason in ("unsigned", "malformed_token", "unknown_key", "bad_signature", "expired", "not_yet_valid",
                "hash_mismatch", "not_json", "bad_shape", "too_large", "redis_unavailable"):
    WEBHOOKS_REJECTED.labels(_reason)

_JSON_HEADERS = [(b"content-type", b"application/json")]


class _HotMetrics:
    """The accepted path's metrics as plain numbers, exposed at scrape time.

    prometheus_client's Counter/Histogram take a lock per increment; the endpoint runs on one
    event loop, so ints do. Exposed as `callflow_webhooks_received_total{event,outcome}`,
    `callflow_webhook_enqueue_seconds` (histogram) and the pipelining counters.
    """

    BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.received: dict[tuple[str, bool], int] = {}
        self.buckets = [0] * (len(self.BUCKETS) + 1)
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(self.BUCKETS, seconds)] += 1
        self.seconds += seconds

    def collect(self):
        received = CounterMetricFamily("callflow_webhooks_received", "Verified LiveKit webhooks by event type and outcome",
                                       labels=["event", "outcome"])
        for (event, fresh), count in sorted(self.received.items()):
            received.add_metric([event, "enqueued" if fresh else "duplicate"], count)
        yield received
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.BUCKETS), "+Inf"), self.buckets):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily("callflow_webhook_enqueue_seconds", "Time of the dedupe+enqueue Redis round trip",
                                    buckets=cumulative, sum_value=self.seconds)
        enqueuer = endpoint._enqueuer
        yield CounterMetricFamily("callflow_webhook_redis_batches", "Pipelined Redis writes of webhook events",
                                  value=enqueuer.batches if enqueuer else 0)
        yield CounterMetricFamily("callflow_webhook_redis_calls", "Dedupe+enqueue calls sent in those writes",
                                  value=enqueuer.calls if enqueuer else 0)


HOT = _HotMetrics()
_second = [0, ""]


def _utc_now_iso() -> str:
    """`datetime.now(timezone.utc).isoformat()` (microseconds, +00:00), the date part cached per second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1e6):06d}+00:00"


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_OK_ACCEPTED = b'{"status":"accepted"}'
_OK_DUPLICATE = b'{"status":"duplicate"}'
_OK_HEADERS = {
    fresh: [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    for fresh, body in ((True, _OK_ACCEPTED), (False, _OK_DUPLICATE))
}
_UNAVAILABLE = _error_body("unavailable", "the event queue is unavailable; retry later")


async def _respond(send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Disconnected(Exception):
    pass


class LiveKitWebhook:
    """The ASGI endpoint. Its Redis client is made lazily, inside the server's event loop."""

    def __init__(self, verifier: WebhookVerifier | None = None, redis_url: str | None = None,
                 max_body: int = MAX_BODY_BYTES) -> None:
        settings = get_settings()
        self.verifier = verifier or WebhookVerifier(settings.webhook_keys())
        self.redis_url = redis_url or settings.redis_url
        self.max_body = max_body
        self.builder = CeleryMessageBuilder.for_task(TASK_NAME, QUEUE)
        self._enqueuer: RedisEnqueuer | None = None

    @property
    def enqueuer(self) -> RedisEnqueuer:
        if self._enqueuer is None:
            self._enqueuer = RedisEnqueuer(self.redis_url, QUEUE, self.builder.prebuilt)
        return self._enqueuer

    async def _reject(self, send, exc: WebhookRejected, **context) -> None:
        WEBHOOKS_REJECTED.labels(exc.reason).inc()
        log.warning("webhook rejected", reason=exc.reason, status=exc.status, **context)
        # A 413 is answered before the body is read: close the connection rather than drain it.
        extra = [(b"connection", b"close")] if exc.status == 413 else None
        await _respond(send, exc.status, _error_body(exc.code, exc.message), extra)

    async def _read_body(self, receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(self.max_body)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def __call__(self, scope, receive, send) -> None:
        authorization = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                content_length = value
        try:
            if content_length is not None:
                try:
                    declared = int(content_length)
                except ValueError:
                    raise InvalidEvent("bad_request", "malformed Content-Length") from None
                if declared > self.max_body:
                    raise PayloadTooLarge(self.max_body)
            claims = self.verifier.verify_token(authorization)
            body = await self._read_body(receive)
            self.verifier.check_body(claims, body)
            event = parse_event(body)
        except WebhookRejected as exc:
            await self._reject(send, exc)
            return
        except _Disconnected:
            WEBHOOKS_REJECTED.labels("client_disconnected").inc()
            return

        received_at = _utc_now_iso()
        event_type = event["event"]
        started = time.perf_counter()
        try:
            fresh = await self.enqueuer.enqueue_once(event["id"], livekit_event_args(body, received_at))
        except EnqueueUnavailable as exc:
            WEBHOOKS_REJECTED.labels("redis_unavailable").inc()
            log.warning("webhook rejected", reason="redis_unavailable", status=503, event_id=event["id"],
                        event_type=event_type, error=str(exc)[:200])
            await _respond(send, 503, _UNAVAILABLE, [(b"retry-after", b"1")])
            return
        HOT.observe(time.perf_counter() - started)
        key = (event_type, fresh)
        HOT.received[key] = HOT.received.get(key, 0) + 1
        await send({"type": "http.response.start", "status": 200, "headers": _OK_HEADERS[fresh]})
        await send({"type": "http.response.body", "body": _OK_ACCEPTED if fresh else _OK_DUPLICATE})


endpoint = LiveKitWebhook()


class FastPath:
    """ASGI middleware: `POST /livekit/webhook` goes straight to the endpoint.

    Inside Starlette's outermost error middleware, but past its exception middleware and router
    (a few closures and a regex per request): the webhook is the `web` process's hot path. Any
    other request, or a path this does not recognise (e.g. under a root_path), takes the normal
    route, which serves the same endpoint.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/livekit/webhook" and scope["method"] == "POST":
            await endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


REGISTRY.register(HOT)

routes: list = [Route("/livekit/webhook", endpoint, methods=["POST"])]
