"""`POST /livekit/webhook` over HTTP, against the real `web` process (uvicorn subprocess).

This module's web process writes to its own Redis database (no worker consumes it), so the tests
can read the webhook backlog and the `events` queue exactly as a worker would find them. Webhooks are signed with the real
SDK (livekit-api `AccessToken.with_sha256`), as LiveKit's server signs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
import redis
from livekit.api import AccessToken

from devstack import services
from orchestration.adapters.redis_enqueue import DEDUPE_PREFIX
from orchestration.ingest.backlog import WEBHOOK_EVENTS
from orchestration.webhooks import LIVEKIT_EVENT_TYPES, MAX_BODY_BYTES, body_sha256
from tests.conftest import subprocess_env, wait_for

KEY, SECRET = "devkey", "devsecret-devsecret-devsecret-0001"
ROTATED_KEY, ROTATED_SECRET = "rotated", "rotated-secret-rotated-secret-0003"


@dataclass
class Hook:
    base: str
    proc: services.Process
    redis: redis.Redis

    @property
    def url(self) -> str:
        return f"{self.base}/livekit/webhook"

    def queued(self) -> list[list]:
        """The webhook backlog, oldest first: each event's task arguments, [event, received_at]."""
        return [json.loads(raw) for raw in reversed(self.redis.lrange(WEBHOOK_EVENTS.items, 0, -1))]

    def nudges(self) -> list[tuple[dict, list]]:
        """The `events` queue, oldest first, as (envelope, args)."""
        out = []
        for raw in reversed(self.redis.lrange("events", 0, -1)):
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            out.append((envelope, args))
        return out


def start_hook_web(log_dir, redis_url: str, **env) -> tuple[services.Process, str]:
    port = services.free_port()
    proc = services.web_server(subprocess_env(REDIS_URL=redis_url, **env), log_dir, port)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200 or not proc.alive(), timeout=30,
             what="web /healthz")
    assert proc.alive(), proc.log()[-3000:]
    return proc, base


@pytest.fixture(scope="module")
def hook(log_dir, redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    proc, base = start_hook_web(log_dir, url, LIVEKIT_WEBHOOK_KEYS=f"{ROTATED_KEY}:{ROTATED_SECRET}")
    client = redis.Redis.from_url(url)
    yield Hook(base, proc, client)
    proc.stop()
    client.flushdb()
    client.close()


@pytest.fixture(autouse=True)
def _clean(hook):
    hook.redis.flushdb()


def make_event(kind: str = "room_started", room: str = "room-1", **extra) -> dict:
    event = {"event": kind, "id": f"EV_{uuid.uuid4().hex[:12]}", "createdAt": str(int(time.time())),
             "room": {"sid": "RM_" + room, "name": room, "emptyTimeout": 300, "creationTime": str(int(time.time()))}}
    event.update(extra)
    return event


def sign(body: bytes, key: str = KEY, secret: str = SECRET, ttl: timedelta | None = None) -> str:
    token = AccessToken(key, secret).with_sha256(body_sha256(body))
    if ttl is not None:
        token = token.with_ttl(ttl)
    return token.to_jwt()


def post(hook: Hook, body: bytes, authorization: str | None = "sign", **headers) -> httpx.Response:
    if authorization == "sign":
        authorization = sign(body)
    if authorization is not None:
        headers["Authorization"] = authorization
    headers.setdefault("Content-Type", "application/webhook+json")
    return httpx.post(hook.url, content=body, headers=headers, timeout=10)


def metric(hook: Hook, name: str, **labels) -> float:
    text = httpx.get(f"{hook.base}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def rejection_lines(hook: Hook, reason: str) -> int:
    return sum(1 for line in hook.proc.log().splitlines() if "webhook rejected" in line and f"reason={reason}" in line)


async def post_many(url: str, work: list[tuple[bytes, str]], connections: int = 50) -> list[int]:
    """POST every (body, token) over `connections` keep-alive connections; the status of each.

    A few lines of HTTP/1.1 on asyncio streams: httpx costs ~1 ms of client CPU a request, which
    on a 2-core machine would measure the client rather than the server.
    """
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    statuses: list[int] = [0] * len(work)
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(work):
        queue.put_nowait(item)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                index, (body, token) = queue.get_nowait()
                writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n"
                             f"Content-Type: application/webhook+json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                             + body)
                head = await reader.readuntil(b"\r\n\r\n")
                statuses[index] = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(connections))), 60)
    return statuses


# ---- accepted ---------------------------------------------------------------------------------------

def test_signed_event_is_queued_for_the_lifecycle_task(hook):
    event = make_event("room_started")
    body = json.dumps(event).encode()
    before = metric(hook, "callflow_webhooks_received_total", event="room_started", outcome="enqueued")
    resp = post(hook, body)
    assert resp.status_code == 200, resp.text
    [args] = hook.queued()
    [(envelope, nudge_args)] = hook.nudges()  # one nudge: a worker takes what waits
    assert envelope["headers"]["task"] == "callflow.livekit_events" and nudge_args == []
    assert envelope["properties"]["delivery_info"]["routing_key"] == "events"
    assert args[0] == event
    received_at = args[1]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$", received_at)
    assert hook.redis.ttl(DEDUPE_PREFIX + event["id"]) > 600
    assert metric(hook, "callflow_webhooks_received_total", event="room_started", outcome="enqueued") == before + 1
    assert metric(hook, "callflow_webhook_enqueue_seconds_count") >= 1


def test_every_livekit_event_type_is_accepted(hook):
    events = []
    for kind in LIVEKIT_EVENT_TYPES:
        extra = {}
        if kind.startswith("participant"):
            extra["participant"] = {"sid": "PA_1", "identity": "u1", "state": "ACTIVE", "joinedAt": "1700000000"}
        if kind.startswith("track"):
            extra["participant"] = {"sid": "PA_1", "identity": "u1"}
            extra["track"] = {"sid": "TR_1", "type": "AUDIO", "source": "MICROPHONE"}
        if kind.startswith("egress"):
            extra["egressInfo"] = {"egressId": "EG_1", "roomName": "room-1", "status": "EGRESS_ACTIVE"}
        if kind.startswith("ingress"):
            extra["ingressInfo"] = {"ingressId": "IN_1", "roomName": "room-1", "state": {"status": "ENDPOINT_PUBLISHING"}}
        event = make_event(kind, **extra)
        events.append(event)
        resp = post(hook, json.dumps(event).encode())
        assert resp.status_code == 200, (kind, resp.text)
    assert [args[0] for args in hook.queued()] == events


def test_fields_a_newer_server_adds_are_ignored_and_passed_on(hook):
    event = make_event("participant_joined", participant={"sid": "PA_9", "identity": "u9", "shinyNewField": {"a": 1}},
                       somethingFromLiveKit2030=["x"])
    event["room"]["newRoomThing"] = True
    body = json.dumps(event, indent=2).encode()  # whitespace too: the body goes on as sent
    assert post(hook, body).status_code == 200
    [args] = hook.queued()
    assert args[0] == event


def test_bearer_prefix_and_rotation_key_are_accepted(hook):
    body = json.dumps(make_event()).encode()
    assert post(hook, body, authorization=f"Bearer {sign(body)}").status_code == 200
    other = json.dumps(make_event()).encode()
    assert post(hook, other, authorization=sign(other, ROTATED_KEY, ROTATED_SECRET)).status_code == 200
    assert len(hook.queued()) == 2


def test_a_replayed_event_is_queued_once(hook):
    event = make_event("participant_left", participant={"sid": "PA_2", "identity": "u2"})
    body = json.dumps(event).encode()
    token = sign(body)
    answers = [post(hook, body, authorization=token) for _ in range(3)]
    # Also re-signed, as LiveKit's retry of the same event would be.
    answers.append(post(hook, body))
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[0].json() == {"status": "accepted"}
    assert all(a.json() == {"status": "duplicate"} for a in answers[1:])
    assert len(hook.queued()) == 1


def test_a_burst_of_1000_events_for_one_room_lands_exactly_once_each(hook):
    events = [make_event("track_published", room="burst-room", track={"sid": f"TR_{n}"},
                         participant={"sid": f"PA_{n % 7}", "identity": f"u{n % 7}"}) for n in range(1000)]
    requests = []
    for event in events:
        body = json.dumps(event).encode()
        requests.append((body, sign(body)))
    # Every event twice (LiveKit retrying after a timeout), all interleaved, 50 at a time.
    work = requests + requests[::-1]

    started = time.monotonic()
    statuses = asyncio.run(post_many(hook.url, work, connections=50))
    assert statuses == [200] * 2000
    ids = [args[0]["id"] for args in hook.queued()]
    assert len(ids) == 1000 and set(ids) == {e["id"] for e in events}
    # Nudges, not a task per event: one at a time (its mark lasts 2 s while no worker takes it).
    assert 1 <= len(hook.nudges()) <= 2 + (time.monotonic() - started) / 2
    assert time.monotonic() - started < 20


# ---- rejected: 401 ----------------------------------------------------------------------------------

def expect_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == code
    assert set(resp.json()["error"]) <= {"code", "message"}


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "unsigned"),
    ("empty", "unsigned"),
    ("unknown_key", "unknown_key"),
    ("bad_signature", "bad_signature"),
    ("expired", "expired"),
    ("hash_mismatch", "hash_mismatch"),
    ("garbage", "malformed_token"),
])
def test_unauthorized_requests_are_refused_logged_once_and_counted(hook, case, reason):
    body = json.dumps(make_event()).encode()
    authorization = {
        "unsigned": None,
        "empty": "",
        "unknown_key": sign(body, "stranger", SECRET),
        "bad_signature": sign(body, KEY, "wrong-secret-wrong-secret-wrong-0"),
        "expired": sign(body, ttl=timedelta(minutes=-10)),
        "hash_mismatch": sign(body + b" "),
        "garbage": "not-a-jwt",
    }[case]
    counted = metric(hook, "callflow_webhooks_rejected_total", reason=reason)
    logged = rejection_lines(hook, reason)
    expect_error(post(hook, body, authorization=authorization), 401, "unauthorized")
    assert hook.queued() == [] and hook.redis.keys(DEDUPE_PREFIX + "*") == []
    assert metric(hook, "callflow_webhooks_rejected_total", reason=reason) == counted + 1
    wait_for(lambda: rejection_lines(hook, reason) == logged + 1, timeout=5, what="one log line")
    if authorization:
        assert authorization not in hook.proc.log()


def test_a_token_for_another_body_does_not_authorise_this_one(hook):
    good = json.dumps(make_event()).encode()
    evil = json.dumps(make_event("room_finished")).encode()
    expect_error(post(hook, evil, authorization=sign(good)), 401, "unauthorized")
    assert hook.queued() == []


# ---- rejected: 400 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b"{}", b'{"event": "room_started"}', b'{"id": "EV_1"}',
    b'{"event": "room_started", "id": "EV_1", "room": "not-an-object"}', b'{"event": 1, "id": "EV_1"}',
    b'{"event": "room_started", "id": "EV_1", "createdAt": NaN}', b"\xc3\x28",
])
def test_signed_bodies_that_are_not_webhook_events_are_400(hook, body):
    expect_error(post(hook, body), 400, "invalid_request")
    assert hook.queued() == []


# ---- rejected: 413 ----------------------------------------------------------------------------------

def test_exactly_1_mib_is_accepted(hook):
    event = make_event("room_started", padding="")
    size = len(json.dumps(event).encode())
    event["padding"] = "x" * (MAX_BODY_BYTES - size)
    body = json.dumps(event).encode()
    assert len(body) == MAX_BODY_BYTES
    assert post(hook, body).status_code == 200


def test_declared_body_over_1_mib_is_refused_before_it_is_sent(hook):
    host, port = hook.base.removeprefix("http://").split(":")
    counted = metric(hook, "callflow_webhooks_rejected_total", reason="too_large")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST /livekit/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/webhook+json\r\n"
                     f"Authorization: {sign(b'x')}\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
                     + b"{" * 1000)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "payload_too_large"
    assert metric(hook, "callflow_webhooks_rejected_total", reason="too_large") == counted + 1


def test_streamed_body_over_1_mib_is_refused_while_streaming(hook):
    body = json.dumps(make_event(padding="y" * (MAX_BODY_BYTES + 10))).encode()
    sent = 0

    def chunks():
        nonlocal sent
        for i in range(0, len(body), 64 * 1024):
            sent += 64 * 1024
            yield body[i:i + 64 * 1024]

    try:
        resp = httpx.post(hook.url, content=chunks(), headers={"Authorization": sign(body)}, timeout=10)
    except httpx.HTTPError:
        pytest.fail("the server should answer 413, not drop the connection")
    expect_error(resp, 413, "payload_too_large")
    assert hook.queued() == []


# ---- health -----------------------------------------------------------------------------------------

def test_health_ready_and_metrics(hook):
    assert httpx.get(f"{hook.base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{hook.base}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "postgres": "ok"}
    metrics = httpx.get(f"{hook.base}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("callflow_webhooks_received_total", "callflow_webhooks_rejected_total",
                 "callflow_webhook_enqueue_seconds_bucket"):
        assert name in metrics.text


def test_other_methods_are_not_allowed(hook):
    assert httpx.get(hook.url).status_code == 405


# ---- Redis trouble ----------------------------------------------------------------------------------

def test_a_failing_push_leaves_no_mark_and_the_retry_lands(hook):
    # The backlog's key holding a string makes LPUSH fail inside the script (WRONGTYPE).
    hook.redis.set(WEBHOOK_EVENTS.items, "not a list")
    event = make_event()
    body = json.dumps(event).encode()
    token = sign(body)
    resp = post(hook, body, authorization=token)
    expect_error(resp, 503, "unavailable")
    assert resp.headers["retry-after"] == "1"
    assert not hook.redis.exists(DEDUPE_PREFIX + event["id"]), "the mark must be undone with the failed push"
    hook.redis.delete(WEBHOOK_EVENTS.items)
    assert post(hook, body, authorization=token).json() == {"status": "accepted"}
    assert [args[0]["id"] for args in hook.queued()] == [event["id"]]


def test_a_failing_nudge_still_lists_the_event_and_leaves_no_nudge_mark(hook):
    # The event is listed (the answer is 200: LiveKit need not retry); without a nudge mark left
    # behind, the next event, or the beat's look for waiting events, nudges a worker.
    hook.redis.set("events", "not a list")
    event = make_event()
    assert post(hook, json.dumps(event).encode()).json() == {"status": "accepted"}
    assert [args[0]["id"] for args in hook.queued()] == [event["id"]]
    assert not hook.redis.exists(WEBHOOK_EVENTS.nudged)
    hook.redis.delete("events")
    assert post(hook, json.dumps(make_event()).encode()).json() == {"status": "accepted"}
    assert len(hook.queued()) == 2 and len(hook.nudges()) == 1


def test_a_lost_script_cache_is_reloaded(hook):
    hook.redis.script_flush()
    body = json.dumps(make_event()).encode()
    assert post(hook, body).json() == {"status": "accepted"}
    assert len(hook.queued()) == 1


BUSY_SCRIPT = """
local t0 = redis.call('TIME')
repeat
  local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
return 1
"""


@pytest.mark.parametrize("stall", ["busy_script", "client_pause"])
def test_a_stalled_redis_answers_503_and_never_leaves_a_mark_without_the_message(hook, stall):
    """Redis stalls past the web process's deadline (1 s). Whether the script then runs (busy
    server: the mark and the message are both there, the retry is a duplicate) or never runs
    (the paused command dies with its connection: neither is there, the retry is queued), the
    event ends up on the queue exactly once after LiveKit's retry."""
    event = make_event()
    body = json.dumps(event).encode()
    if stall == "busy_script":
        blocker = threading.Thread(target=lambda: redis.Redis(
            **{k: hook.redis.connection_pool.connection_kwargs[k] for k in ("host", "port", "db")}
        ).eval(BUSY_SCRIPT, 0, 2_000_000))
        blocker.start()
    else:
        hook.redis.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    time.sleep(0.1)
    started = time.monotonic()
    resp = post(hook, body)
    assert time.monotonic() - started < 3
    expect_error(resp, 503, "unavailable")
    if stall == "busy_script":
        blocker.join()
    wait_for(lambda: hook.redis.ping(), timeout=5, what="redis back")
    time.sleep(1.2)
    marked = bool(hook.redis.exists(DEDUPE_PREFIX + event["id"]))
    queued = [args[0]["id"] for args in hook.queued()]
    assert marked == (queued == [event["id"]]), (marked, queued)
    retry = post(hook, body)
    assert retry.json() == {"status": "duplicate" if marked else "accepted"}
    assert [args[0]["id"] for args in hook.queued()] == [event["id"]]


class ReplyDelayingProxy:
    """A TCP proxy to Redis that can hold Redis's replies back: the command runs, its answer is late."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = services.free_port()
        self.delay = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader, writer, delayed: bool) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        asyncio.ensure_future(self._pipe(client_reader, upstream_writer, False))
        asyncio.ensure_future(self._pipe(upstream_reader, client_writer, True))

    def start(self) -> "ReplyDelayingProxy":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop).result(5)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_a_reply_lost_after_the_script_ran_makes_the_retry_a_duplicate(log_dir, redis_server):
    """Redis ran the script but its answer came too late: 503, and both the mark and the message
    are there, so LiveKit's retry is answered `duplicate` and the event is queued exactly once."""
    proxy = ReplyDelayingProxy(redis_server.port).start()
    db = redis_server.url.rsplit("/", 1)[0] + "/6"
    proc, base = start_hook_web(log_dir, f"redis://127.0.0.1:{proxy.port}/6")
    try:
        hook = Hook(base, proc, redis.Redis.from_url(db))
        hook.redis.flushdb()
        assert post(hook, json.dumps(make_event()).encode()).status_code == 200  # connections made
        hook.redis.flushdb()
        event = make_event()
        body = json.dumps(event).encode()
        token = sign(body)
        proxy.delay = 1.5
        expect_error(post(hook, body, authorization=token), 503, "unavailable")
        assert hook.redis.exists(DEDUPE_PREFIX + event["id"])
        assert [args[0]["id"] for args in hook.queued()] == [event["id"]]
        proxy.delay = 0
        time.sleep(1)
        assert post(hook, body, authorization=token).json() == {"status": "duplicate"}
        assert [args[0]["id"] for args in hook.queued()] == [event["id"]]
        assert post(hook, json.dumps(make_event()).encode()).json() == {"status": "accepted"}
    finally:
        proc.stop()
        proxy.stop()


def test_redis_down_is_503_then_the_retry_lands_once_it_is_back(log_dir):
    server = services.RedisServer().start()
    proc, base = start_hook_web(log_dir, server.url)
    try:
        hook = Hook(base, proc, redis.Redis.from_url(server.url))
        event = make_event("participant_joined", participant={"sid": "PA_3", "identity": "u3"})
        body = json.dumps(event).encode()
        token = sign(body)
        assert post(hook, body, authorization=token).json() == {"status": "accepted"}
        hook.redis.flushdb()

        server.stop()
        resp = post(hook, body, authorization=token)
        expect_error(resp, 503, "unavailable")
        assert resp.headers["retry-after"] == "1"
        assert "redis_unavailable" in proc.log()
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unreachable"
        assert ready.json()["error"]["code"] == "unavailable"

        server.start()  # same port: LiveKit's retry of the same delivery
        resp = post(hook, body, authorization=token)
        assert resp.json() == {"status": "accepted"}, resp.text
        assert post(hook, body, authorization=token).json() == {"status": "duplicate"}
        assert [args[0]["id"] for args in hook.queued()] == [event["id"]]
        # /readyz answers from a one-second cache: the 503 above may be served once more
        services.wait_for(lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, timeout=3,
                          what="/readyz 200 again")
    finally:
        proc.stop()
        server.cleanup()
