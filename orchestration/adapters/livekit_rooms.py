"""LiveKit's RoomService over Twirp (JSON over HTTP), synchronously, with kept-alive connections.

livekit-api's `LiveKitAPI` is asyncio + aiohttp; Celery's prefork workers are synchronous, and an
event loop per call costs more than the call. The Twirp API is plain JSON, so this adapter speaks
it directly over the standard library's `http.client`, one kept-alive connection per thread (0.32 ms
of CPU per CreateRoom here, where urllib3 took 0.63 ms and httpx 0.8-1.0 ms), with a short-lived admin
token minted by livekit-api's `AccessToken`.
"""

from __future__ import annotations

import http.client
import threading
from urllib.parse import urlsplit
import time
from datetime import timedelta

import orjson
from livekit import api

import structlog

from orchestration.ports import LiveParticipant, RoomError, RoomInfo, RoomRefused, RoomUnanswered

_TOKEN_TTL = 600
log = structlog.get_logger("callflow.livekit")


class LiveKitRooms:
    # One attempt per call (besides `_post`'s at once on a fresh connection, when a kept-alive one
    # was closed under it): whoever asks retries what got no answer on its own terms, and durably
    # (the sweep's looks again, room actions), so a LiveKit that never answers costs a ringing
    # invitation one timeout, not a series of them (three took 15 s to ring).
    def __init__(self, http_url: str, api_key: str, api_secret: str, timeout: float = 5.0, attempts: int = 1) -> None:
        url = urlsplit(http_url.rstrip("/"))
        self._connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._timeout = url.hostname or "", url.port, timeout
        self._base = url.path + "/twirp/livekit.RoomService/"
        self._key, self._secret = api_key, api_secret
        self._local = threading.local()  # each thread's kept-alive connection
        self._attempts = attempts
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _auth(self, room: str | None) -> str:
        """An admin token; per-room operations need `room_admin` for that very room."""
        key = room or ""
        with self._lock:
            now = time.time()
            cached = self._tokens.get(key)
            if cached is None or cached[1] - now < 60:
                grants = api.VideoGrants(room_create=True, room_list=True, room_admin=bool(room), room=room or "")
                jwt = (
                    api.AccessToken(self._key, self._secret)
                    .with_identity("callflow")
                    .with_grants(grants)
                    .with_ttl(timedelta(seconds=_TOKEN_TTL))
                    .to_jwt()
                )
                if len(self._tokens) > 1024:
                    self._tokens.clear()
                cached = self._tokens[key] = (jwt, now + _TOKEN_TTL)
            return cached[0]

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One POST on this thread's connection; a kept-alive connection the server closed since is
        replaced once at once (every RoomService call made here is idempotent)."""
        conn = getattr(self._local, "conn", None)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._local.conn = self._connection_class(self._host, self._port, timeout=self._timeout)
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._local.conn = None
                if not reused:
                    raise
                reused = False  # once more, on a new connection

    def _call(self, method: str, body: dict, *, not_found_ok: bool = False) -> dict | None:
        last: Exception | None = None
        for attempt in range(self._attempts):
            try:
                status, data = self._post(
                    self._base + method, orjson.dumps(body),
                    {"Authorization": f"Bearer {self._auth(body.get('room'))}", "Content-Type": "application/json"},
                )
            except (http.client.HTTPException, OSError) as exc:
                last = exc
            else:
                if status == 200:
                    return orjson.loads(data)
                code = _twirp_code(data)
                if code == "not_found" and not_found_ok:
                    return None
                if status < 500 and status != 429 and code not in ("unavailable", "resource_exhausted"):
                    raise RoomRefused(f"LiveKit {method} refused: HTTP {status} {code}")
                last = RoomError(f"LiveKit {method}: HTTP {status} {code}")
            if attempt + 1 < self._attempts:
                time.sleep(0.2 * (2**attempt))
        raise RoomUnanswered(f"LiveKit {method} gave no answer after {self._attempts} attempts: {last}")

    def create_room(self, name: str, *, empty_timeout: int, departure_timeout: int, max_participants: int,
                    metadata: str) -> RoomInfo:
        room = self._call("CreateRoom", {
            "name": name, "emptyTimeout": empty_timeout, "departureTimeout": departure_timeout,
            "maxParticipants": max_participants, "metadata": metadata,
        })
        return RoomInfo(name=room["name"], sid=room.get("sid", ""))

    def list_participants(self, room: str) -> list[LiveParticipant] | None:
        try:
            result = self._call("ListParticipants", {"room": room}, not_found_ok=True)
        except RoomError as exc:
            log.warning("LiveKit cannot list participants", room_name=room, error=str(exc))
            return None
        if result is None:
            return []
        return [
            LiveParticipant(identity=p.get("identity", ""), sid=p.get("sid", ""), state=str(p.get("state", "JOINING")))
            for p in result.get("participants", [])
        ]

    def existing_rooms(self, names: list[str]) -> set[str] | None:
        if not names:
            return set()
        try:
            result = self._call("ListRooms", {"names": names})
        except RoomError as exc:
            log.warning("LiveKit cannot list rooms", error=str(exc))
            return None
        return {room.get("name", "") for room in (result or {}).get("rooms", [])}

    def delete_room(self, room: str) -> None:
        self._call("DeleteRoom", {"room": room}, not_found_ok=True)

    def remove_participant(self, room: str, identity: str) -> None:
        self._call("RemoveParticipant", {"room": room, "identity": identity}, not_found_ok=True)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _twirp_code(data: bytes) -> str:
    try:
        return str(orjson.loads(data).get("code", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""
