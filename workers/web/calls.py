"""`/api/calls`: start a call, answer, decline or cancel it, read the history — as the signed-in user.

Bodies are checked here (422 naming the field); everything else — who may insert into a room, the
invite rate, anonymous users, which status moves are allowed — is the database's to decide
(`call_store`), so this door gives nobody more than a supabase-js client has.
"""

from __future__ import annotations

import re
import secrets
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from workers.web.bodies import json_object
from workers.web.call_store import ACTIONS, CallStore
from workers.web.errors import ApiError
from workers.web.signed_in import signed_in_user

log = get_logger("callflow.web.calls")

MAX_BODY_BYTES = 16 * 1024
MAX_CALLEES = 20
MAX_ROOM_NAME = 256
MAX_HISTORY = 100
NO_STORE = {"Cache-Control": "no-store"}

_store: CallStore | None = None


def store() -> CallStore:
    global _store
    if _store is None:
        _store = CallStore(get_settings().database_url)
    return _store


def new_room_name() -> str:
    """Room names are capabilities: 128 random bits, so nobody can guess one and squat it."""
    return f"call-{secrets.token_urlsafe(16)}"


async def _json_body(request: Request) -> dict:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
    return json_object(raw)  # 422 for what is no JSON object, or holds text Postgres cannot store


def _uuid(value, field: str) -> str:
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(422, "invalid_request", f"{field} must be a UUID", field=field) from None


def parse_start_call(body: dict, caller_id: str) -> tuple[list[str], str, str]:
    """-> (callee_ids, call_type, room_name); raises a 422 ApiError naming the field."""
    callees = body.get("callee_ids")
    if not isinstance(callees, list) or not 1 <= len(callees) <= MAX_CALLEES:
        raise ApiError(422, "invalid_request", f"callee_ids must be a list of 1 to {MAX_CALLEES} user ids",
                       field="callee_ids")
    callee_ids = [_uuid(c, "callee_ids") for c in callees]
    if len(set(callee_ids)) != len(callee_ids):
        raise ApiError(422, "invalid_request", "callee_ids has the same user twice", field="callee_ids")
    if caller_id in callee_ids:
        raise ApiError(422, "invalid_request", "you cannot call yourself", field="callee_ids")
    call_type = body.get("call_type", "video")
    if call_type not in ("audio", "video"):
        raise ApiError(422, "invalid_request", "call_type must be audio or video", field="call_type")
    room_name = body.get("room_name")
    if room_name is None:
        room_name = new_room_name()
    elif (not isinstance(room_name, str) or not room_name.strip() or len(room_name) > MAX_ROOM_NAME
          or "\x00" in room_name):
        raise ApiError(422, "invalid_request", f"room_name must be 1 to {MAX_ROOM_NAME} characters, not blank",
                       field="room_name")
    return callee_ids, call_type, room_name


async def start_call(request: Request) -> Response:
    user = await signed_in_user(request)
    callee_ids, call_type, room_name = parse_start_call(await _json_body(request), user.id)
    invitations = await store().start_call(user, callee_ids, call_type, room_name)
    log.info("call started", user_id=user.id, room_name=room_name, callees=len(invitations))
    return JSONResponse({"room_name": room_name, "invitations": invitations}, status_code=201, headers=NO_STORE)


async def move_invitation(request: Request) -> Response:
    user = await signed_in_user(request)
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise ApiError(404, "not_found", "no such route")
    invitation_id = _uuid(request.path_params["invitation_id"], "invitation_id")
    row = await store().move_invitation(user, invitation_id, action)
    log.info("invitation moved", user_id=user.id, invitation_id=invitation_id, status=row["status"])
    return JSONResponse(row, headers=NO_STORE)


async def list_calls(request: Request) -> Response:
    user = await signed_in_user(request)
    raw = request.query_params.get("limit", "20")
    # ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and 5000-digit numbers
    # (past int()'s 4300-digit limit): both were 500s.
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_HISTORY:
        raise ApiError(422, "invalid_request", f"limit must be 1 to {MAX_HISTORY}", field="limit")
    return JSONResponse({"calls": await store().recent_calls(user, int(raw))}, headers=NO_STORE)


async def calls_root(request: Request) -> Response:
    return await (start_call if request.method == "POST" else list_calls)(request)


routes: list = [
    Route("/api/calls", calls_root, methods=["GET", "POST"]),
    Route("/api/calls/{invitation_id}/{action}", move_invitation, methods=["POST"]),
]
