"""Invitation changes are listed in Redis and taken by workers in batches (orchestration/ingest/sink.py):
what a task takes, what it takes again after a retry or a redelivery, how workers are nudged; and a
real worker deciding a burst of changes together."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from devstack.services import wait_for
from orchestration import names
from orchestration.ingest.mapping import Change
from orchestration.ingest.sink import CHANGES_KEY, NUDGE_KEY, IngestSink
from tests.support.calls import insert_invitation, wait_invitation

# A Redis database of these tests' own (no worker consumes it): what is listed can be read back.
PRIVATE_DB = 11


def change(invitation_id: str, status: str = "pending") -> Change:
    return Change(invitation_id, status, "postgres", f"room-{invitation_id[:8]}", None, {})


def nudges(client: redis.Redis) -> int:
    return sum(json.loads(raw)["headers"]["task"] == names.INVITATIONS_CHANGED
               for raw in client.lrange("events", 0, -1))


@pytest.fixture
def private(redis_server):
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{PRIVATE_DB}", decode_responses=True)
    client.flushdb()
    yield client, IngestSink(client)
    client.flushdb()
    client.close()


def test_changes_are_taken_oldest_first_in_batches_and_again_until_done(private):
    client, sink = private
    ids = [str(uuid.uuid4()) for _ in range(40)]
    assert len(sink.submit([change(i) for i in ids]).enqueued) == 40
    assert nudges(client) == 1, "one nudge for the whole batch"
    late = str(uuid.uuid4())
    assert len(sink.submit([change(ids[0]), change(late)]).enqueued) == 1, "the first was listed already"
    assert nudges(client) == 1, "no second nudge while one waits"

    first = sink.take("task-a", at_most=32)
    assert [c["invitation_id"] for c in first] == ids[:32]
    assert nudges(client) == 2, "more are waiting: another worker is nudged"
    # A retry of the same task, or its redelivery after its worker died: the same changes again.
    assert sink.take("task-a", at_most=32) == first
    sink.done("task-a")
    rest = sink.take("task-b", at_most=32)
    assert [c["invitation_id"] for c in rest] == ids[32:] + [late]
    sink.done("task-b")
    assert sink.take("task-c") == [] and client.llen(CHANGES_KEY) == 0


def test_a_task_spends_its_nudge_and_a_lost_nudge_is_made_good(private):
    client, sink = private
    sink.submit([change(str(uuid.uuid4()))])
    assert client.exists(NUDGE_KEY)
    sink.take("task-a")  # the nudged task starts: the next change nudges again
    assert not client.exists(NUDGE_KEY)
    client.delete("events")
    sink.submit([change(str(uuid.uuid4()))])
    assert nudges(client) == 1
    client.delete("events", NUDGE_KEY)  # that nudge lost (and its mark expired)
    assert sink.nudge_if_waiting() and nudges(client) == 1
    assert not sink.nudge_if_waiting(), "one nudge at a time"


@pytest.mark.usefixtures("worker")
def test_a_burst_of_changes_is_decided_by_a_real_worker(db, database_url, make_user, redis_client, livekit):
    pairs = [(make_user(), make_user()) for _ in range(40)]
    invitations = [insert_invitation(database_url, caller, callee) for caller, callee in pairs]
    # As the listener would: one submit, one nudge, the worker's tasks take them in batches.
    sink = IngestSink(redis_client)
    submitted = sink.submit([Change(inv["id"], "pending", "postgres", inv["room_name"], None, {})
                             for inv in invitations])
    # Listed now, or already (the session's beat catch-up lists the rows it finds, with the same marks).
    assert len(submitted.enqueued) + submitted.duplicates == 40
    for inv in invitations:
        assert wait_invitation(db, inv["id"], "ringing", timeout=30)["call_id"] is not None
    events = db.execute("select count(*) as n from public.call_events where event_id = any(%s)",
                        ([f"realtime:{inv['id']}:pending" for inv in invitations],)).fetchone()
    assert events["n"] == 40, "every change recorded once"
    # Nothing left waiting or held (the session's beat lists changes of other tests' rows too: eventually).
    wait_for(lambda: redis_client.llen(CHANGES_KEY) == 0 and not redis_client.keys(names.INGEST_TAKEN_PREFIX + "*"),
             timeout=20, what="every change taken and done")
