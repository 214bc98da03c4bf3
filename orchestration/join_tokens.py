"""LiveKit join tokens: who may join which room, and the token they get.

Authorisation (the contract): a user gets a token for a room only as one of its parties, and who
the parties are is the database's one definition, `callflow_room_parties(room)`: the one the insert
rule and the removals ask, run here on the service connection (`DATABASE_URL`, as the workers';
clients may not execute it). One statement answers everything, on an async psycopg pool
(autocommit: a single read needs no transaction): whether the room or invitation exists (a live
invitation, a call, or any invitation of the asking user, all found by index: no scan of the whole
table for unknown names), whether the user is a party, what they may publish, and their display
name. `tests/integration/test_rules_match_sql.py` holds this route and the domain's `room_parties`
equal to the function; `python -m bench.token` measures the route.

The token: identity = the Supabase user id, name = the user's display name, `room_join` for that
room only; an audio call may publish the microphone only, a video call camera, microphone and
screen share (video when one of the rows that make the user a party is video: an invitation of
theirs, or the live call they are the caller of); TTL `CALLFLOW_TOKEN_TTL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

import jwt
from livekit.api import AccessToken, VideoGrants
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from orchestration.db import RECONNECT_SECONDS, check_open_async

AUDIO_SOURCES = ["microphone"]
VIDEO_SOURCES = ["camera", "microphone", "screen_share", "screen_share_audio"]

QUERY = """
with target as (
  select room_name, caller_id, callee_id
    from public.call_invitations
   where id = %(invitation_id)s::uuid
), room as (
  select coalesce(%(room_name)s::text, (select room_name from target)) as name
), live_call as (
  select id, caller_id, call_type from public.calls
   where room_name = (select name from room) and status in ('ringing', 'active')
), party as (
  -- who may join: the database's one definition of the room's parties
  select exists (select 1 from public.callflow_room_parties((select name from room)) p
                  where p = %(user_id)s::uuid) as yes
)
select (select name from room) as room_name,
       exists (select 1 from target) as invitation_found,
       exists (select 1 from target where caller_id = %(user_id)s::uuid or callee_id = %(user_id)s::uuid) as invitation_party,
       (exists (select 1 from public.call_invitations
                 where room_name = (select name from room) and status in ('pending', 'ringing', 'accepted'))
        or exists (select 1 from public.calls where room_name = (select name from room))
        or exists (select 1 from public.call_invitations
                    where (caller_id = %(user_id)s::uuid or callee_id = %(user_id)s::uuid)
                      and room_name = (select name from room))) as room_found,
       (select yes from party) as party,
       -- what a party may publish: a video call's sources when one of the rows that make them a party
       -- is video (the domain's reading of those rows: an accepted invitation counts while it has
       -- no call yet or belongs to the room's live call); only asked of a party
       (select yes from party)
       and (exists (select 1 from public.call_invitations i
                     where i.room_name = (select name from room) and i.call_type = 'video'
                       and (i.caller_id = %(user_id)s::uuid or i.callee_id = %(user_id)s::uuid)
                       and (i.status in ('pending', 'ringing')
                            or (i.status = 'accepted'
                                and (i.call_id is null or i.call_id = (select id from live_call)))))
            or exists (select 1 from live_call where caller_id = %(user_id)s::uuid and call_type = 'video')) as video,
       (select coalesce(nullif(btrim(u.raw_user_meta_data->>'full_name'), ''),
                        nullif(btrim(u.raw_user_meta_data->>'name'), ''))
          from auth.users u where u.id = %(user_id)s::uuid) as display_name
"""


@dataclass(frozen=True)
class JoinGrant:
    """The token route's answer to "may this user join this room?" (not the lifecycle's
    `orchestration.domain.decision.Decision`): granted with the room and call type, or why not."""

    outcome: Literal["granted", "forbidden", "not_found"]
    room_name: str | None = None
    call_type: Literal["audio", "video"] = "video"
    display_name: str | None = None
    reason: str = ""


def query_params(user_id: str, *, room_name: str | None = None, invitation_id: str | None = None) -> dict:
    return {
        "user_id": uuid.UUID(user_id),
        "room_name": room_name,
        "invitation_id": uuid.UUID(invitation_id) if invitation_id is not None else None,
    }


def decide(row: dict, *, by_invitation: bool) -> JoinGrant:
    """The contract's rule, from the query's answer."""
    if by_invitation:
        if not row["invitation_found"]:
            return JoinGrant("not_found", reason="no such invitation")
        if not row["invitation_party"]:
            return JoinGrant("forbidden", reason="this invitation is not yours")
    elif not row["room_found"]:
        return JoinGrant("not_found", reason="no such room")
    if not row["party"]:
        return JoinGrant("forbidden", room_name=row["room_name"],
                        reason="you have no live invitation in this room")
    return JoinGrant("granted", room_name=row["room_name"], call_type="video" if row["video"] else "audio",
                    display_name=row["display_name"])


class JoinTokenStore:
    """The authorisation query on its own small async pool (opened on first use)."""

    def __init__(self, database_url: str, *, max_size: int = 8, timeout: float = 5.0) -> None:
        self.database_url = database_url
        self.max_size = max_size
        self.timeout = timeout
        self._pool: AsyncConnectionPool | None = None
        self._lock: asyncio.Lock | None = None

    async def _get_pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    pool = AsyncConnectionPool(
                        self.database_url, min_size=1, max_size=self.max_size, open=False,
                        kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": 5},
                        timeout=self.timeout, check=check_open_async, reconnect_timeout=RECONNECT_SECONDS,
                        name="callflow-token",
                    )
                    await pool.open(wait=False)
                    self._pool = pool
        return self._pool

    async def authorise(self, user_id: str, *, room_name: str | None = None,
                        invitation_id: str | None = None) -> JoinGrant:
        if (room_name is None) == (invitation_id is None):
            raise ValueError("give exactly one of room_name, invitation_id")
        params = query_params(user_id, room_name=room_name, invitation_id=invitation_id)
        pool = await self._get_pool()
        async with pool.connection() as conn:
            cur = await conn.execute(QUERY, params)
            row = await cur.fetchone()
        assert row is not None
        return decide(row, by_invitation=invitation_id is not None)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


@dataclass(frozen=True)
class JoinToken:
    token: str
    identity: str
    expires_at: dt.datetime

    @property
    def expires_at_iso(self) -> str:
        return self.expires_at.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def mint_join_token(*, api_key: str, api_secret: str, user_id: str, room_name: str,
                    call_type: Literal["audio", "video"], ttl_seconds: int, name: str | None = None) -> JoinToken:
    grants = VideoGrants(
        room_join=True,
        room=room_name,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_publish_sources=list(AUDIO_SOURCES if call_type == "audio" else VIDEO_SOURCES),
    )
    access = (
        AccessToken(api_key, api_secret)
        .with_identity(user_id)
        .with_grants(grants)
        .with_ttl(dt.timedelta(seconds=ttl_seconds))
    )
    if name:
        access = access.with_name(name)
    token = access.to_jwt()
    # The exact expiry the token carries (to_jwt stamps its own clock).
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    return JoinToken(token=token, identity=user_id, expires_at=dt.datetime.fromtimestamp(exp, dt.timezone.utc))
