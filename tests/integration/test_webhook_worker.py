"""The seam to the workers: what the webhook consumer writes onto Redis is what a real
`celery -A workers.app worker` consumes, and accepted webhooks end up in `call_events` once."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import httpx
import redis

from devstack import services
from orchestration.adapters.redis_enqueue import RedisEnqueuer
from orchestration.ingest.backlog import WEBHOOK_EVENTS
from orchestration.adapters.celery_messages import CeleryMessageBuilder
from tests.conftest import subprocess_env, wait_for
from tests.integration.test_webhook_http import make_event, post_many, sign


def db_url(redis_server, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


def test_the_message_is_what_celery_send_task_writes(redis_server):
    """Same envelope, headers and properties as `app.send_task(...)` through kombu's Redis
    transport; only the per-message ids and the per-process origin differ."""
    from celery import Celery

    url = db_url(redis_server, 9)
    client = redis.Redis.from_url(url)
    client.flushdb()
    probe = Celery("callflow", broker=url)
    probe.conf.update(task_serializer="json", accept_content=["json"],
                      task_routes={"callflow.livekit_events": {"queue": "events"}})
    probe.send_task("callflow.livekit_events", args=[])
    [theirs] = [json.loads(m) for m in client.lrange("events", 0, -1)]
    # Processes that import workers.app stamp a publish time on what Celery sends (queue ages for
    # /metrics); pre-built messages go without, and are aged from when a scrape first sees them.
    theirs["headers"].pop("published_at", None)
    # The webhook consumer's nudge (workers/web/webhook.py).
    ours = json.loads(CeleryMessageBuilder.for_task("callflow.livekit_events", "events").build_from_json(b"[]", "()"))
    client.flushdb()
    probe.close()

    def shape(value):
        return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else type(value).__name__

    assert shape(ours) == shape(theirs)
    volatile_headers = {"id", "root_id", "argsrepr", "origin"}
    assert {k: v for k, v in ours["headers"].items() if k not in volatile_headers} == \
        {k: v for k, v in theirs["headers"].items() if k not in volatile_headers}
    volatile_props = {"correlation_id", "reply_to", "delivery_tag"}
    assert {k: v for k, v in ours["properties"].items() if k not in volatile_props} == \
        {k: v for k, v in theirs["properties"].items() if k not in volatile_props}
    assert {k: ours[k] for k in ("content-type", "content-encoding")} == \
        {k: theirs[k] for k in ("content-type", "content-encoding")}
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))


def test_a_countdown_message_is_what_send_task_with_an_eta_writes(redis_server):
    """The ring-timeout buckets' countdowns are pre-built too: the eta header as Celery writes it."""
    from datetime import datetime, timezone

    from celery import Celery

    url = db_url(redis_server, 9)
    client = redis.Redis.from_url(url)
    client.flushdb()
    probe = Celery("callflow", broker=url)
    probe.conf.update(task_serializer="json", accept_content=["json"])
    eta = datetime(2030, 1, 1, 0, 0, 0, 50000, tzinfo=timezone.utc)
    probe.send_task("callflow.ring_timeouts_due", args=[eta.timestamp()], queue="timers", eta=eta)
    [theirs] = [json.loads(m) for m in client.lrange("timers", 0, -1)]
    theirs["headers"].pop("published_at", None)
    ours = json.loads(CeleryMessageBuilder.for_task("callflow.ring_timeouts_due", "timers")
                      .build([eta.timestamp()], eta=eta))
    client.flushdb()
    probe.close()
    volatile_headers = {"id", "root_id", "origin"}
    assert ours["headers"]["eta"] == theirs["headers"]["eta"] == eta.isoformat()
    assert {k: v for k, v in ours["headers"].items() if k not in volatile_headers} == \
        {k: v for k, v in theirs["headers"].items() if k not in volatile_headers}
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))


def test_the_nudge_pushed_by_the_lua_script_is_run_by_a_real_worker(log_dir, redis_server):
    """The Procfile's worker command, on its own Redis database, runs the nudge that `RedisEnqueuer`
    (the webhook's path) pushed with a batch of events: here a `callflow.ping` message built by
    `CeleryMessageBuilder`, so that running it leaves a mark."""
    url = db_url(redis_server, 8)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    worker = services.celery_worker(subprocess_env(REDIS_URL=url), log_dir, name=f"hookseam{uuid.uuid4().hex[:4]}")
    try:
        ids = [uuid.uuid4().hex for _ in range(20)]
        token = uuid.uuid4().hex
        builder = CeleryMessageBuilder.for_task("callflow.ping", "events")

        async def push() -> list[bool]:
            enqueuer = RedisEnqueuer(url, "events", lambda: builder.prebuilt([token]))
            try:
                return await asyncio.gather(*(enqueuer.enqueue_once(i, b"[{}, null]") for i in ids),
                                            enqueuer.enqueue_once(ids[0], b"[{}, null]"))
            finally:
                await enqueuer.aclose()

        results = asyncio.run(push())
        assert results.count(True) == 20 and results.count(False) == 1
        wait_for(lambda: client.get(f"callflow:ping:{token}") or not worker.alive(), timeout=45,
                 what="the worker to run the pushed nudge")
        assert worker.alive(), worker.log()[-3000:]
        assert client.llen("events") == 0 and client.llen(WEBHOOK_EVENTS.items) == 20
        assert "Received unregistered task" not in worker.log()
        assert "ERROR" not in worker.log(), worker.log()[-3000:]
    finally:
        worker.stop()
        client.flushdb()


def test_accepted_webhooks_are_recorded_once_in_call_events(web, worker, db):
    room = f"hook-{uuid.uuid4().hex[:8]}"
    kinds = ["room_started", "track_published", "track_unpublished", "egress_started", "egress_updated",
             "egress_ended", "ingress_started", "ingress_ended", "room_finished"]
    events = []
    for kind in kinds:
        extra = {}
        if kind.startswith("egress"):
            extra["egressInfo"] = {"egressId": "EG_1", "roomName": room}
        if kind.startswith("ingress"):
            extra["ingressInfo"] = {"ingressId": "IN_1", "roomName": room}
        if kind.startswith("track"):
            extra["track"] = {"sid": "TR_1"}
            extra["participant"] = {"sid": "PA_1", "identity": "someone"}
        events.append(make_event(kind, room=room, **extra))
    # 1,000 more for the same room, each sent twice: every one recorded exactly once.
    events += [make_event("track_published", room=room, track={"sid": f"TR_{n}"},
                          participant={"sid": "PA_1", "identity": "someone"}) for n in range(1000)]
    work = []
    for event in events:
        body = json.dumps(event).encode()
        work.append((body, sign(body)))
    statuses = asyncio.run(post_many(f"{web}/livekit/webhook", work + work[:200], connections=20))
    assert statuses == [200] * len(statuses)

    ids = [e["id"] for e in events]

    def recorded() -> int:
        return db.execute("select count(*) as n from call_events where event_id = any(%s)", (ids,)).fetchone()["n"]

    deadline = time.monotonic() + 50
    while recorded() < len(ids) and time.monotonic() < deadline:
        time.sleep(0.25)
    rows = db.execute("select event_id, source, type, room_name from call_events where event_id = any(%s)",
                      (ids,)).fetchall()
    assert len(rows) == len(ids) == len({r["event_id"] for r in rows})
    by_id = {r["event_id"]: r for r in rows}
    for event in events[: len(kinds)]:
        row = by_id[event["id"]]
        assert (row["source"], row["type"], row["room_name"]) == ("livekit", event["event"], room)
    assert httpx.get(f"{web}/readyz", timeout=5).status_code == 200


def test_events_of_many_rooms_are_decided_in_batches_and_a_bad_one_holds_up_no_other(web, worker, db, redis_client):
    """Events of 60 rooms arrive at once (taken together, one transaction per round of rooms);
    an item the worker cannot parse, listed among them, fails its batch: every other event of
    that batch goes on alone and is recorded, and nothing is left waiting or taken."""
    rooms = [f"many-{uuid.uuid4().hex[:8]}" for _ in range(60)]
    events = [make_event(kind, room=room) for room in rooms for kind in ("room_started", "room_finished")]
    # Listed as `web` would, behind the good ones' first half: a room that is not an object.
    redis_client.lpush(WEBHOOK_EVENTS.items, json.dumps([{"event": "room_started", "id": f"EV_bad_{uuid.uuid4().hex}",
                                                          "room": "not an object"}, None]))
    work = []
    for event in events:
        body = json.dumps(event).encode()
        work.append((body, sign(body)))
    statuses = asyncio.run(post_many(f"{web}/livekit/webhook", work, connections=30))
    assert statuses == [200] * len(work)
    ids = [e["id"] for e in events]
    wait_for(lambda: db.execute("select count(*) as n from call_events where event_id = any(%s)",
                                (ids,)).fetchone()["n"] == len(ids), timeout=45, what="every event recorded")
    wait_for(lambda: redis_client.llen(WEBHOOK_EVENTS.items) == 0 and not redis_client.keys(WEBHOOK_EVENTS.taken_prefix + "*"),
             timeout=10, what="every event taken and every batch done")
    assert "a batch failed; each item goes on alone" in worker.log()
