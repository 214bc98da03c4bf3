"""Flower lists the tasks callflow pushes itself from the moment they are queued: every path that
pushes a pre-built message from Lua publishes the `task-sent` event `send_task` would, and a real
Celery event receiver feeding Flower's own state (`flower.events.EventsState`, what its task list
and `/api/tasks` read) sees it, with the message's id and name, before any worker has it. Celery's
state (and so Flower's list) shows such a task as PENDING with its `sent` time, until a worker's
`task-received` makes it RECEIVED."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from flower.events import EventsState
from flower.utils.tasks import iter_tasks

from devstack import services
from devstack.services import wait_for
from orchestration.adapters.celery_scheduler import BUCKET_TASK, CeleryScheduler, bucket_end
from orchestration.adapters.redis_enqueue import RedisEnqueuer
from orchestration.ingest.backlog import CHANGES, WEBHOOK_EVENTS, Backlog
from orchestration.ingest.mapping import TASK_NAME as CHANGES_TASK
from orchestration.ingest.mapping import Change
from orchestration.ingest.sink import IngestSink
from orchestration.adapters.celery_messages import CeleryMessageBuilder, task_sent_channel_of
from tests.conftest import subprocess_env

DB = 3


@pytest.fixture
def url(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def app_on(url: str) -> Celery:
    """A Celery app on the broker, configured as workers.app is where it matters here."""
    app = Celery("callflow", broker=url)
    app.conf.update(task_serializer="json", accept_content=["json"], task_send_sent_event=True)
    return app


class FlowerView:
    """What Flower sees: Celery's event receiver on the broker feeding Flower's `EventsState`
    (as `flower.events.Events.run` does), in a thread. `queue_lengths` records, as each event is
    handled, how many messages its queue still holds (a worker takes them off the list)."""

    def __init__(self, url: str) -> None:
        self.app = app_on(url)
        self.state = EventsState()
        self.events: list[dict] = []
        self.queue_lengths: dict[str, int] = {}
        self._broker = redis.Redis.from_url(url)
        self._lock = threading.Lock()
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict) -> None:
        with self._lock:
            if event["type"] == "task-sent":
                self.queue_lengths[event["uuid"]] = self._broker.llen(event["queue"])
            self.state.event(event)
            self.events.append(event)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> "FlowerView":
        subscribers = self._broker.pubsub_numpat()
        self._thread.start()
        wait_for(lambda: self._broker.pubsub_numpat() > subscribers, timeout=10, what="the event receiver to subscribe")
        return self

    def __exit__(self, *exc) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)
        self._broker.close()

    def sent(self, task_id: str, timeout: float = 5) -> dict:
        def find():
            with self._lock:
                return next((e for e in self.events if e["type"] == "task-sent" and e["uuid"] == task_id), None)

        return wait_for(find, timeout=timeout, what=f"task-sent for {task_id}")

    def listed_as(self, state: str) -> dict[str, object]:
        """Flower's task list filtered by state (`/api/tasks?state=...`, the dashboard's filter)."""
        with self._lock:
            return dict(iter_tasks(SimpleNamespace(state=self.state), state=state))

    def types_of(self, task_id: str) -> list[str]:
        with self._lock:
            return [e["type"] for e in self.events if e.get("uuid") == task_id]


def change(invitation_id: str) -> Change:
    return Change(invitation_id, "pending", "postgres", f"room-{invitation_id[:8]}", None, {})


def queued_ids(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]


def test_the_event_is_what_celery_send_task_publishes(url):
    """Same channel, envelope and fields as `send_task` with `task_send_sent_event` publishes
    through kombu's Redis transport; only per-message values differ."""
    client = redis.Redis.from_url(url)
    listener = client.pubsub()
    # This database's events only: PUBLISH is server-wide, and the run's own worker and web (another
    # database of the same Redis) announce their tasks too.
    listener.psubscribe(f"/{DB}.celeryev/*")
    listener.get_message(timeout=1)
    eta = datetime.fromtimestamp(2_000_000_000, tz=timezone.utc)
    probe = app_on(url)
    probe.send_task(BUCKET_TASK, args=[1.5], queue="timers", eta=eta)
    theirs = listener.get_message(timeout=5)
    _, sent_event = CeleryMessageBuilder.for_task(BUCKET_TASK, "timers").prebuilt([1.5], eta=eta)
    client.publish(task_sent_channel_of(client), sent_event)  # our event, on our channel
    ours = listener.get_message(timeout=5)
    listener.close()
    probe.close()

    assert ours["channel"] == theirs["channel"] == f"/{DB}.celeryev/task.sent".encode()
    ours_envelope, theirs_envelope = json.loads(ours["data"]), json.loads(theirs["data"])
    ours_body = json.loads(base64.b64decode(ours_envelope.pop("body")))
    theirs_body = json.loads(base64.b64decode(theirs_envelope.pop("body")))
    for envelope in (ours_envelope, theirs_envelope):
        envelope["properties"].pop("delivery_tag")
        envelope["headers"].pop("hostname")
    assert ours_envelope == theirs_envelope
    assert list(ours_body) == list(theirs_body), "the same fields, in Celery's order"
    volatile = {"hostname", "pid", "clock", "uuid", "root_id", "timestamp"}
    assert {k: v for k, v in ours_body.items() if k not in volatile} == \
        {k: v for k, v in theirs_body.items() if k not in volatile}
    assert ours_body["uuid"] == ours_body["root_id"] and ours_body["pid"] == theirs_body["pid"]
    assert abs(ours_body["timestamp"] - time.time()) < 5


def test_every_lua_pushed_task_is_listed_as_sent_while_still_queued(url):
    """The listener's nudge (`IngestSink.submit`), web's (`RedisEnqueuer`), the nudge a take leaves
    for the rest, the beat's nudge for a backlog left waiting, and a ring-timeout countdown: each
    is announced once, with its message's id and name, while the message is still on its queue."""
    client = redis.Redis.from_url(url)
    with FlowerView(url) as flower:
        # The listener's path.
        sink = IngestSink(redis.Redis.from_url(url, decode_responses=True))
        first_change = change(str(uuid.uuid4()))
        sink.submit([first_change])
        [listener_nudge] = queued_ids(client, "events")

        # web's path: a batch of webhook events, one nudge.
        async def list_events() -> None:
            builder = CeleryMessageBuilder.for_task("callflow.livekit_events", "events")
            enqueuer = RedisEnqueuer(url, "events", builder.prebuilt)
            try:
                await asyncio.gather(*(enqueuer.enqueue_once(f"EV_{n}", b"[{}, null]") for n in range(40)))
            finally:
                await enqueuer.aclose()

        asyncio.run(list_events())
        [web_nudge] = [i for i in queued_ids(client, "events") if i != listener_nudge]

        # A worker's take of 32 leaves 8 waiting: it nudges another worker.
        builder = CeleryMessageBuilder.for_task("callflow.livekit_events", "events")
        backlog = Backlog(client, WEBHOOK_EVENTS, "events", builder.prebuilt)
        assert len(backlog.take("task-1")) == 32
        [take_nudge] = [i for i in queued_ids(client, "events") if i not in (listener_nudge, web_nudge)]

        # The beat's nudge for changes left waiting without one (their nudge spent).
        client.delete(CHANGES.nudged)
        assert sink.nudge_if_waiting()
        [beat_nudge] = [i for i in queued_ids(client, "events") if i not in (listener_nudge, web_nudge, take_nudge)]

        # Two countdowns, and a third deadline in a bucket already counted down: nothing for it.
        scheduler = CeleryScheduler(app_on(url))
        now = time.time()
        scheduler.ring_timeouts([("a", datetime.fromtimestamp(now + 30, tz=timezone.utc)),
                                 ("b", datetime.fromtimestamp(now + 31, tz=timezone.utc))])
        scheduler.ring_timeouts([("c", datetime.fromtimestamp(now + 30, tz=timezone.utc))])
        countdowns = queued_ids(client, "timers")
        assert len(countdowns) == 2

        expected = {listener_nudge: CHANGES_TASK, web_nudge: "callflow.livekit_events",
                    take_nudge: "callflow.livekit_events", beat_nudge: CHANGES_TASK,
                    **{task_id: BUCKET_TASK for task_id in countdowns}}
        for task_id, name in expected.items():
            event = flower.sent(task_id)
            assert event["name"] == name and event["root_id"] == task_id and event["retries"] == 0
            assert flower.queue_lengths[task_id] >= 1, "announced while its message waits on the queue"
        wait_for(lambda: len(flower.listed_as("PENDING")) >= len(expected), timeout=5, what="Flower's list")
        listed = flower.listed_as("PENDING")
        assert set(listed) == set(expected), "each task once, nothing else"
        for task_id, name in expected.items():
            assert listed[task_id].name == name and listed[task_id].sent is not None
            assert listed[task_id].received is None
        ends = sorted(json.loads(flower.sent(i)["args"])[0] for i in countdowns)
        assert ends == sorted({bucket_end(datetime.fromtimestamp(now + 30, tz=timezone.utc)),
                               bucket_end(datetime.fromtimestamp(now + 31, tz=timezone.utc))})
        etas = {json.loads(m)["headers"]["id"]: json.loads(m)["headers"]["eta"] for m in client.lrange("timers", 0, -1)}
        for task_id in countdowns:  # the countdown's eta, as send_task(eta=...) announces it
            assert flower.sent(task_id)["eta"] == etas[task_id] is not None
        # Nothing pushed, nothing said: a listing of duplicates, takes that leave nothing waiting.
        before = len(flower.events)
        assert sink.submit([first_change]).duplicates == 1
        assert backlog.take("task-2") == [[{}, None]] * 8
        assert len(sink.take("task-3")) == 1 and not sink.nudge_if_waiting()
        time.sleep(0.3)
        assert len(flower.events) == before


def test_nothing_is_published_when_task_sent_events_are_off(url):
    client = redis.Redis.from_url(url)
    with FlowerView(url) as flower:
        app = app_on(url)
        app.conf.task_send_sent_event = False
        CeleryScheduler(app).ring_timeouts([("a", datetime.fromtimestamp(time.time() + 30, tz=timezone.utc))])
        builder = CeleryMessageBuilder.for_task(CHANGES_TASK, "events", sent_events=False)
        backlog = Backlog(client, CHANGES, "events", builder.prebuilt)
        client.lpush(CHANGES.items, b"{}")
        assert backlog.nudge_if_waiting()
        assert client.llen("timers") == 1 and client.llen("events") == 1
        time.sleep(0.5)
        assert flower.events == []


def test_flower_sees_sent_before_a_real_worker_receives_it(url, log_dir):
    """The Procfile's worker with task events switched on as Flower does (`enable_events`): for a
    nudge listed by web's path and a countdown, Flower's state goes PENDING (sent) → RECEIVED →
    STARTED → SUCCESS, `task-sent` first."""
    client = redis.Redis.from_url(url)
    with FlowerView(url) as flower:  # subscribed before the worker starts (which subscribes too)
        worker = services.celery_worker(subprocess_env(REDIS_URL=url), log_dir, name=f"sent{uuid.uuid4().hex[:4]}")
        try:
            wait_for(lambda: flower.app.control.broadcast("enable_events", reply=True, timeout=1) or not worker.alive(),
                     timeout=45, what="the worker to switch its task events on")
            assert worker.alive(), worker.log()[-3000:]
            token = uuid.uuid4().hex
            builder = CeleryMessageBuilder.for_task("callflow.ping", "events")

            async def list_event() -> None:
                enqueuer = RedisEnqueuer(url, "events", lambda: builder.prebuilt([token]))
                try:
                    assert await enqueuer.enqueue_once(f"EV_{token}", b"[{}, null]")
                finally:
                    await enqueuer.aclose()

            asyncio.run(list_event())
            nudge = wait_for(lambda: next((e for e in list(flower.events) if e["type"] == "task-sent"), None),
                             timeout=5, what="the nudge's task-sent")
            assert nudge["name"] == "callflow.ping" and nudge["args"] == repr([token])
            scheduler = CeleryScheduler(flower.app)
            scheduler.ring_timeouts([("a", datetime.fromtimestamp(time.time() + 1, tz=timezone.utc))])
            countdown = wait_for(lambda: next((e["uuid"] for e in list(flower.events)
                                               if e["type"] == "task-sent" and e["name"] == BUCKET_TASK), None),
                                 timeout=5, what="the countdown's task-sent")
            for task_id in (nudge["uuid"], countdown):
                wait_for(lambda: "task-succeeded" in flower.types_of(task_id) or not worker.alive(), timeout=30,
                         what=f"the worker to run {task_id}")
                assert worker.alive(), worker.log()[-3000:]
                types = flower.types_of(task_id)
                assert types[0] == "task-sent" and types[1] == "task-received", types
                task = flower.state.tasks[task_id]
                assert task.state == "SUCCESS" and task.sent <= task.received <= task.started
            assert client.get(f"callflow:ping:{token}")
            assert "ERROR" not in worker.log(), worker.log()[-3000:]
        finally:
            worker.stop()
