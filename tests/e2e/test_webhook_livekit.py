"""The real LiveKit server's webhooks, caused by real participants (`livekit.rtc`), reach the
consumer, pass its checks and are recorded by the worker.

The run's LiveKit (dev config, webhooks signed with the contract's key pair) posts to the run's
`web` process; the worker records every event in `call_events`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from livekit import api as lkapi
from livekit import rtc

from orchestration.adapters.redis_enqueue import DEDUPE_PREFIX

pytestmark = pytest.mark.e2e

LK_KEY, LK_SECRET = "devkey", "devsecret-devsecret-devsecret-0001"


def join_token(room: str, identity: str) -> str:
    return (lkapi.AccessToken(LK_KEY, LK_SECRET).with_identity(identity)
            .with_grants(lkapi.VideoGrants(room_join=True, room=room)).to_jwt())


def livekit_events(db, room: str) -> list[dict]:
    return db.execute("select event_id, type, source, payload from call_events where room_name = %s and source = 'livekit'"
                      " order by occurred_at, received_at", (room,)).fetchall()


def wait_types(db, room: str, wanted: set[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = livekit_events(db, room)
        if wanted <= {r["type"] for r in rows}:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"wanted {sorted(wanted)}, recorded {[r['type'] for r in rows]}")
        time.sleep(0.1)


def test_participants_joining_and_leaving_reach_the_worker_through_the_webhook(livekit, web, worker, db,
                                                                            redis_server, make_user):
    room_name = f"hook-e2e-{uuid.uuid4().hex[:8]}"
    alice, bob = make_user("Alice"), make_user("Bob")

    async def scenario() -> None:
        a, b = rtc.Room(), rtc.Room()
        await asyncio.wait_for(a.connect(livekit.url, join_token(room_name, alice)), 20)
        await asyncio.wait_for(b.connect(livekit.url, join_token(room_name, bob)), 20)
        try:
            # room_started, then both participant_joined, delivered and recorded.
            await asyncio.to_thread(wait_types, db, room_name, {"room_started", "participant_joined"})
            deadline = time.monotonic() + 20
            while sum(r["type"] == "participant_joined" for r in livekit_events(db, room_name)) < 2:
                assert time.monotonic() < deadline, [r["type"] for r in livekit_events(db, room_name)]
                await asyncio.sleep(0.1)
        finally:
            await a.disconnect()
            await b.disconnect()
        async with lkapi.LiveKitAPI(livekit.url.replace("ws://", "http://"), LK_KEY, LK_SECRET) as client:
            # Participants gone: close the room now instead of waiting for its departure timeout.
            await asyncio.to_thread(wait_types, db, room_name, {"participant_left"})
            try:
                await client.room.delete_room(lkapi.DeleteRoomRequest(room=room_name))
            except lkapi.TwirpError:
                pass  # already closed by the lifecycle (a 1:1 room is deleted once both left)

    asyncio.run(scenario())
    rows = wait_types(db, room_name, {"room_started", "participant_joined", "participant_left", "room_finished"})
    types = [r["type"] for r in rows]
    assert types.count("room_started") == 1 and types.count("room_finished") == 1
    joined = {r["payload"]["participant"]["identity"] for r in rows if r["type"] == "participant_joined"}
    assert joined == {alice, bob}
    left = {r["payload"]["participant"]["identity"] for r in rows
            if r["type"] in ("participant_left", "participant_connection_aborted")}
    assert left <= {alice, bob} and left
    # LiveKit's own ids, each recorded once, each marked seen by the consumer.
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)) and all(i.startswith("EV_") for i in ids)
    client = redis.Redis.from_url(redis_server.url)
    assert all(client.exists(DEDUPE_PREFIX + i) for i in ids)
    assert all(r["payload"]["room"]["name"] == room_name for r in rows)
