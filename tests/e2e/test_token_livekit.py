"""Join tokens from `POST /api/livekit/token` against the real LiveKit server (`livekit.rtc`)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jwt
import pytest
from livekit import api as lkapi
from livekit import rtc

from devstack.standins.jwks_server import supabase_claims
from tests.integration.test_token_endpoint import LEGACY_SECRET, auth, invite, start_web  # noqa: F401 - auth fixture

pytestmark = pytest.mark.e2e

LK_KEY, LK_SECRET = "devkey", "devsecret-devsecret-devsecret-0001"


@pytest.fixture(scope="module")
def token_api(log_dir, auth, livekit):  # noqa: F811
    # LIVEKIT_URL is the run's LiveKit (conftest); LIVEKIT_PUBLIC_URL is left to default to it.
    proc, base = start_web(log_dir, auth, CALLFLOW_TOKEN_RATE_PER_MINUTE="1000", LIVEKIT_PUBLIC_URL=livekit.url)
    yield base
    proc.stop()


def get_token(base: str, user_token: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/api/livekit/token", headers={"Authorization": f"Bearer {user_token}"},
                      content=json.dumps(body), timeout=10)


async def connect(data: dict) -> rtc.Room:
    room = rtc.Room()
    await asyncio.wait_for(room.connect(data["server_url"], data["token"]), 20)
    return room


async def server_participants(livekit, room_name: str):
    async with lkapi.LiveKitAPI(livekit.url.replace("ws://", "http://"), LK_KEY, LK_SECRET) as client:
        resp = await client.room.list_participants(lkapi.ListParticipantsRequest(room=room_name))
        return {p.identity: p for p in resp.participants}


async def wait_until(predicate, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.1)


def test_caller_and_callee_of_a_ringing_call_join_with_their_tokens(token_api, livekit, auth, db, make_user):  # noqa: F811
    caller, callee, stranger = make_user("Caller Carla"), make_user("Callee Cleo"), make_user()
    inv = invite(db, caller, callee, call_type="video", status="ringing")

    caller_resp = get_token(token_api, auth.sign(caller, kid=auth.es.kid), {"room_name": inv["room"]})
    callee_resp = get_token(token_api, jwt.encode(supabase_claims(callee, auth.issuer), LEGACY_SECRET, "HS256"),
                            {"invitation_id": inv["id"]})
    assert caller_resp.status_code == 200 and callee_resp.status_code == 200, (caller_resp.text, callee_resp.text)
    assert get_token(token_api, auth.sign(stranger, kid=auth.rs.kid), {"room_name": inv["room"]}).status_code == 403
    a, b = caller_resp.json(), callee_resp.json()
    assert a["server_url"] == livekit.url

    async def scenario():
        room_a = await connect(a)
        room_b = await connect(b)
        try:
            assert room_a.name == inv["room"] and room_b.name == inv["room"]
            assert room_a.local_participant.identity == caller and room_b.local_participant.identity == callee
            await wait_until(lambda: _true(callee in room_a.remote_participants and caller in room_b.remote_participants))
            assert room_b.remote_participants[caller].name == "Caller Carla"
            assert room_a.remote_participants[callee].name == "Callee Cleo"
            on_server = await server_participants(livekit, inv["room"])
            assert set(on_server) == {caller, callee}
            # A video call may publish the camera.
            source = rtc.VideoSource(320, 240)
            track = rtc.LocalVideoTrack.create_video_track("camera", source)
            pub = await asyncio.wait_for(room_a.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)), 15)
            assert pub.sid
        finally:
            await room_a.disconnect()
            await room_b.disconnect()

    asyncio.run(scenario())


def test_audio_call_token_cannot_publish_a_camera_track(token_api, livekit, auth, db, make_user):  # noqa: F811
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee, call_type="audio", status="ringing")
    resp = get_token(token_api, auth.sign(caller, kid=auth.es.kid), {"invitation_id": inv["id"]})
    assert resp.status_code == 200, resp.text
    data = resp.json()

    async def scenario():
        room = await connect(data)
        try:
            perms = room.local_participant.permissions
            assert list(perms.can_publish_sources) == [rtc.TrackSource.SOURCE_MICROPHONE]
            # The microphone is allowed ...
            mic = rtc.LocalAudioTrack.create_audio_track("mic", rtc.AudioSource(48000, 1))
            await asyncio.wait_for(room.local_participant.publish_track(
                mic, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)), 15)
            # ... the camera is not: the server refuses the publication.
            cam = rtc.LocalVideoTrack.create_video_track("camera", rtc.VideoSource(320, 240))
            refused = False
            try:
                await asyncio.wait_for(room.local_participant.publish_track(
                    cam, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)), 15)
            except Exception as exc:  # noqa: BLE001 - the SDK raises (or times out) on a refused publication
                print(f"camera publication refused: {exc.__class__.__name__}: {exc}")
                refused = True
            await asyncio.sleep(1.0)
            me = (await server_participants(livekit, inv["room"]))[caller]
            sources = {t.source for t in me.tracks}
            assert lkapi.TrackSource.CAMERA not in sources
            assert lkapi.TrackSource.MICROPHONE in sources
            assert refused
        finally:
            await room.disconnect()

    asyncio.run(scenario())


def test_a_token_admits_to_its_own_room_only(token_api, livekit, auth, db, make_user):  # noqa: F811
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee, status="pending")
    data = get_token(token_api, auth.sign(caller, kid=auth.es.kid), {"room_name": inv["room"]}).json()
    claims = lkapi.TokenVerifier(LK_KEY, LK_SECRET).verify(data["token"])
    assert claims.video.room == inv["room"] and claims.video.room_join
    assert not claims.video.room_admin and not claims.video.room_create and not claims.video.room_list

    async def scenario():
        # LiveKit puts the holder in the token's room, whatever room the client has in mind.
        room = await connect(data)
        try:
            assert room.name == inv["room"]
            # The participant token is no API credential: listing rooms with it is refused.
            async with httpx.AsyncClient() as http:
                r = await http.post(f"{livekit.url.replace('ws://', 'http://')}/twirp/livekit.RoomService/ListRooms",
                                    headers={"Authorization": f"Bearer {data['token']}"}, json={})
                assert r.status_code in (401, 403), r.text
        finally:
            await room.disconnect()

    asyncio.run(scenario())


async def _true(value):
    return value
