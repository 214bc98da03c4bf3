"""Small helpers for end-to-end lifecycle flows: what a test needs to look at rows and at LiveKit
besides `tests.support.calls` and `tests.support.participants`."""

from __future__ import annotations

import time

import jwt
from livekit import api, rtc

from tests.support.participants import API_KEY, API_SECRET, Participant

# The development HS256 secret of Supabase user tokens (the contract's development default).
DEV_SUPABASE_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


class Phone(Participant):
    """A `Participant` that remembers why LiveKit disconnected it (`rtc.DisconnectReason`)."""

    def __init__(self, livekit_url: str, identity: str, room: str) -> None:
        super().__init__(livekit_url, identity, room)
        self.reason = None
        self.left_by_itself = False
        self.room.on("disconnected", self._on_disconnected)

    def _on_disconnected(self, reason=None, *_):
        if self.reason is None:
            self.reason = reason

    async def leave(self) -> None:
        self.left_by_itself = True
        await super().leave()

    @property
    def sid(self) -> str:
        return self.room.local_participant.sid

    @property
    def reason_name(self) -> str:
        try:
            return rtc.DisconnectReason.Name(self.reason)
        except Exception:  # noqa: BLE001 - unknown or None
            return repr(self.reason)


def _lk(livekit) -> api.LiveKitAPI:
    return api.LiveKitAPI(livekit.url.replace("ws://", "http://"), API_KEY, API_SECRET)


async def delete_room(livekit, room_name: str) -> None:
    async with _lk(livekit) as client:
        await client.room.delete_room(api.DeleteRoomRequest(room=room_name))


async def room_sid(livekit, room_name: str) -> str | None:
    """The sid LiveKit serves `room_name` with now (None: no such room)."""
    async with _lk(livekit) as client:
        resp = await client.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
    return next((r.sid for r in resp.rooms if r.name == room_name), None)


async def participants_in_room(livekit, room_name: str) -> dict[str, int]:
    """identity → state (api.ParticipantInfo.JOINING, JOINED, ACTIVE, ...) as LiveKit lists them."""
    async with _lk(livekit) as client:
        try:
            resp = await client.room.list_participants(api.ListParticipantsRequest(room=room_name))
        except api.TwirpError:
            return {}
    return {p.identity: p.state for p in resp.participants}


async def identities_in_room(livekit, room_name: str) -> list[str]:
    return list(await participants_in_room(livekit, room_name))


def user_access_token(user_id: str, ttl: int = 600) -> str:
    """A Supabase-shaped user access token signed with the development secret (as `callflow dev-token`)."""
    now = int(time.time())
    claims = {"sub": user_id, "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + ttl,
              "email": "", "is_anonymous": False}
    return jwt.encode(claims, DEV_SUPABASE_JWT_SECRET, algorithm="HS256", headers={"typ": "JWT"})


def calls_in_room(db, room_name: str) -> list[dict]:
    return db.execute("select * from public.calls where room_name = %s order by created_at, id", (room_name,)).fetchall()


def sessions_of(db, call_id) -> list[dict]:
    return db.execute("select * from public.call_participants where call_id = %s order by joined_at, participant_sid",
                      (call_id,)).fetchall()


def session(db, participant_sid: str) -> dict | None:
    return db.execute("select * from public.call_participants where participant_sid = %s",
                      (participant_sid,)).fetchone()


def events_of(db, invitation_id: str, type_: str) -> list[dict]:
    return db.execute("select * from public.call_events where invitation_id = %s and type = %s order by id",
                      (invitation_id, type_)).fetchall()


def notifications_of(db, invitation_id: str) -> list[dict]:
    return db.execute("select * from public.notifications where invitation_id = %s", (invitation_id,)).fetchall()


def mark_change_taken(redis_client, invitation_id: str, status: str, ttl: int = 600) -> None:
    """Leave the listener's dedupe mark for a transition without its message: as if the listener
    took the change and its task was then lost (so the catch-up will not enqueue it either)."""
    from orchestration.ingest.mapping import dedupe_key

    redis_client.set(dedupe_key(invitation_id, status), "sent", ex=ttl)
