"""Real LiveKit participants through the Python SDK (`livekit.rtc`)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from livekit import api, rtc

API_KEY = "devkey"
API_SECRET = "devsecret-devsecret-devsecret-0001"


def join_token(identity: str, room: str, name: str | None = None) -> str:
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_identity(identity)
        .with_name(name or identity[:8])
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_ttl(timedelta(minutes=10))
        .to_jwt()
    )


class Participant:
    def __init__(self, livekit_url: str, identity: str, room: str) -> None:
        self.url, self.identity, self.room_name = livekit_url, identity, room
        self.room = rtc.Room()
        self.disconnected = asyncio.Event()
        self.room.on("disconnected", lambda *_: self.disconnected.set())

    async def join(self) -> "Participant":
        await self.room.connect(self.url, join_token(self.identity, self.room_name))
        return self

    async def leave(self) -> None:
        await self.room.disconnect()

    @property
    def connected(self) -> bool:
        return self.room.isconnected() and not self.disconnected.is_set()


async def eventually(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")
