"""Development only (404 in production): the local users, and a user access token for one of them.

What `callflow dev-token` prints, for the demo page's sign-in where no Supabase Auth runs locally.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import get_settings
from orchestration.auth import dev_access_token
from workers.web import calls
from workers.web.errors import ApiError

SESSION_TTL_SECONDS = 3600


def _development_only() -> None:
    if get_settings().is_production:
        raise ApiError(404, "not_found", "no such route")


async def dev_users(_request: Request) -> Response:
    _development_only()
    return JSONResponse({"users": await calls.store().local_users()}, headers={"Cache-Control": "no-store"})


async def dev_session(request: Request) -> Response:
    _development_only()
    body = await calls._json_body(request)
    user_id = calls._uuid(body.get("user_id"), "user_id")
    profile = await calls.store().user_profile(user_id)
    if profile is None:
        raise ApiError(404, "not_found", "no such local user")
    token = dev_access_token(get_settings(), user_id, email=profile["email"],
                             user_metadata=profile["raw_user_meta_data"] or {}, ttl_seconds=SESSION_TTL_SECONDS)
    return JSONResponse({"access_token": token, "user_id": user_id, "expires_in": SESSION_TTL_SECONDS},
                        headers={"Cache-Control": "no-store"})


routes: list = [
    Route("/api/dev/users", dev_users, methods=["GET"]),
    Route("/api/dev/session", dev_session, methods=["POST"]),
]
