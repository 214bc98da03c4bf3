"""`POST /api/livekit/token`: LiveKit join tokens for the right users only; `GET /openapi.json`.

Order of checks: the Supabase access token (401), the caller's rate (429), the body (413, 422),
then the authorisation query (404, 403) and the token (200). Every answer carries
`Cache-Control: no-store`; no answer or log line ever contains a token or a secret.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import redis.asyncio as aioredis
from psycopg_pool import PoolTimeout
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.logging import get_logger
from config.settings import Settings, get_settings
from orchestration import names
from orchestration.auth import AuthUnavailable, InvalidToken, SupabaseTokenVerifier
from orchestration.join_tokens import JoinTokenStore, mint_join_token
from orchestration.rate_limit import RateLimiter
from workers.web.bodies import json_object
from workers.web.errors import ApiError, error_response

log = get_logger(__name__)

PATH = "/api/livekit/token"
MAX_BODY_BYTES = 16 * 1024
MAX_ROOM_NAME = 256
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class _Services:
    """Built on first use from the process's settings (the web app loads them at start)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.verifier: SupabaseTokenVerifier | None = None
        self.store: JoinTokenStore | None = None
        self.limiter: RateLimiter | None = None

    def get(self) -> "_Services":
        if self.settings is None:
            settings = get_settings()
            self.verifier = SupabaseTokenVerifier.from_settings(settings)
            self.store = JoinTokenStore(settings.database_url)
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=32, timeout=2, socket_timeout=2, socket_connect_timeout=2)
            client = aioredis.Redis(connection_pool=pool)
            self.limiter = RateLimiter(client, limit=settings.callflow_token_rate_per_minute, window_seconds=60,
                                       prefix=names.RATELIMIT_TOKEN_PREFIX)
            self.settings = settings
        return self


_services = _Services()


def _error(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return error_response(status, code, message, field, {**NO_STORE, **(headers or {})})


def _unauthorized(message: str, token_given: bool) -> JSONResponse:
    challenge = 'Bearer realm="callflow"' + (', error="invalid_token"' if token_given else "")
    return _error(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


class _BodyError(Exception):
    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _BodyError("body", f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyError("body", f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes) -> tuple[str | None, str | None]:
    """-> (room_name, invitation_id), exactly one set; raises _BodyError naming the field."""
    try:
        body = json_object(raw)  # every /api/ body's rule: a JSON object of text Postgres can store
    except ApiError as exc:
        raise _BodyError(exc.field or "body", exc.message) from None
    room_name = body.get("room_name")
    invitation_id = body.get("invitation_id")
    if room_name is not None and invitation_id is not None:
        raise _BodyError("invitation_id", "give room_name or invitation_id, not both")
    if room_name is None and invitation_id is None:
        raise _BodyError("room_name", "room_name or invitation_id is required")
    if room_name is not None:
        if not isinstance(room_name, str):
            raise _BodyError("room_name", "room_name must be a string")
        if not room_name.strip() or len(room_name) > MAX_ROOM_NAME:
            raise _BodyError("room_name", f"room_name must be 1 to {MAX_ROOM_NAME} characters, not blank")
        return room_name, None
    if not isinstance(invitation_id, str):
        raise _BodyError("invitation_id", "invitation_id must be a string (a UUID)")
    try:
        if len(invitation_id) > 64:
            raise ValueError
        parsed = uuid.UUID(invitation_id)
    except ValueError:
        raise _BodyError("invitation_id", "invitation_id must be a UUID") from None
    return None, str(parsed)


async def token_endpoint(request: Request) -> Response:
    # CORS (preflights included) is the ApiCors middleware's, as on every /api/ route.
    if request.method == "OPTIONS":
        return Response(status_code=204, headers={"Allow": "POST, OPTIONS"})
    return await issue_token(request)


async def issue_token(request: Request) -> Response:
    services = _services.get()
    settings = services.settings
    assert settings and services.verifier and services.store and services.limiter

    # 1. who is asking
    scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return _unauthorized("an Authorization: Bearer <Supabase access token> header is required", False)
    try:
        user = await services.verifier.verify(credentials)
    except InvalidToken as exc:
        log.info("token request refused", reason=str(exc))
        return _unauthorized(str(exc), True)
    except AuthUnavailable:
        log.warning("token request: signing keys unavailable")
        return _error(503, "unavailable", "the signing keys cannot be fetched; try again", headers={"Retry-After": "5"})

    if user.is_anonymous and not settings.callflow_allow_anonymous:
        return _error(403, "anonymous", "anonymous users may not join calls (CALLFLOW_ALLOW_ANONYMOUS is off)")

    # 2. how often
    try:
        rate = await services.limiter.hit(user.id)
    except RedisError as exc:  # fail open: a Redis outage must not stop calls being answered
        log.warning("token rate limiter unavailable", error=exc.__class__.__name__)
        rate = None
    if rate is not None and not rate.allowed:
        retry = rate.retry_after_seconds
        return _error(429, "rate_limited", f"too many token requests; retry in {retry} s",
                      headers={"Retry-After": str(retry)})

    # 3. what for
    try:
        room_name, invitation_id = parse_body(await _read_body(request))
    except _BodyError as exc:
        if exc.status == 413:
            return _error(413, "payload_too_large", exc.message)
        return _error(422, "invalid_request", exc.message, field=exc.field)

    # 4. may they
    try:
        decision = await services.store.authorise(user.id, room_name=room_name, invitation_id=invitation_id)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        log.warning("token request: database unavailable", error=exc.__class__.__name__)
        return _error(503, "unavailable", "the database is unavailable; try again", headers={"Retry-After": "2"})
    except psycopg.Error:
        log.exception("token request: database error")
        return _error(503, "unavailable", "the database could not answer; try again", headers={"Retry-After": "2"})
    if decision.outcome == "not_found":
        return _error(404, "not_found", decision.reason)
    if decision.outcome == "forbidden":
        log.info("token request forbidden", user_id=user.id, room_name=decision.room_name, invitation_id=invitation_id)
        return _error(403, "forbidden", decision.reason)

    # 5. the token
    assert decision.room_name is not None and settings.livekit_api_key and settings.livekit_api_secret
    minted = mint_join_token(
        api_key=settings.livekit_api_key,
        api_secret=settings.livekit_api_secret.get_secret_value(),
        user_id=user.id,
        room_name=decision.room_name,
        call_type=decision.call_type,
        ttl_seconds=settings.callflow_token_ttl_seconds,
        name=decision.display_name or user.display_name,
    )
    log.info("join token issued", user_id=user.id, room_name=decision.room_name, call_type=decision.call_type,
             expires_at=minted.expires_at_iso)
    return JSONResponse(
        {"token": minted.token, "server_url": settings.livekit_public_url, "identity": minted.identity,
         "expires_at": minted.expires_at_iso},
        headers=NO_STORE,
    )


# ---- OpenAPI ------------------------------------------------------------------------------------

def _error_schema_ref() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Error"}


def _error_response(description: str, code: str, example_message: str, field: str | None = None,
                    headers: dict | None = None) -> dict[str, Any]:
    example: dict[str, Any] = {"code": code, "message": example_message}
    if field:
        example["field"] = field
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _error_schema_ref(), "example": {"error": example}}},
    }
    if headers:
        out["headers"] = headers
    return out


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "callflow",
        "version": "0.1.0",
        "description": "LiveKit join tokens for the people of a call. Errors are JSON "
                       '`{"error": {"code", "message", "field"}}` (`field` only on 422); they never echo tokens.',
    },
    "paths": {
        PATH: {
            "post": {
                "operationId": "createLiveKitToken",
                "summary": "A LiveKit join token for a room of one of your calls",
                "description": (
                    "Give `room_name` or `invitation_id` (exactly one). Only the caller or a callee of a live "
                    "invitation of that room gets a token: `pending`, `ringing`, or `accepted` while its call is "
                    "`ringing` or `active`. The token's identity is your user id; it may join that room only, and "
                    "on an audio call publish the microphone only. Rate limited per user "
                    "(`CALLFLOW_TOKEN_RATE_PER_MINUTE`)."
                ),
                "security": [{"supabaseAccessToken": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/TokenRequest"},
                            "examples": {
                                "byRoom": {"value": {"room_name": "call-3f2a9c"}},
                                "byInvitation": {"value": {"invitation_id": "7d1e8a52-2c1f-4a4e-9a55-0b6f3f3c2b11"}},
                            },
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The join token",
                        "headers": {"Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenResponse"}}},
                    },
                    "401": _error_response(
                        "No, malformed, expired or otherwise unacceptable Supabase access token", "unauthorized",
                        "the access token has expired",
                        headers={"WWW-Authenticate": {"schema": {"type": "string"}}},
                    ),
                    "403": _error_response("You have no live invitation in that room (as caller or callee)",
                                           "forbidden", "you have no live invitation in this room"),
                    "404": _error_response("No such room or invitation", "not_found", "no such room"),
                    "413": _error_response(f"The body is larger than {MAX_BODY_BYTES} bytes", "payload_too_large",
                                           f"the body is larger than {MAX_BODY_BYTES} bytes"),
                    "422": _error_response("Malformed body; `field` names the culprit (`body` for the whole)",
                                           "invalid_request", "invitation_id must be a UUID", field="invitation_id"),
                    "429": _error_response(
                        "Too many token requests by this user", "rate_limited", "too many token requests; retry in 12 s",
                        headers={"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 1}}},
                    ),
                    "503": _error_response(
                        "A dependency (database, Auth signing keys) is unavailable; retry", "unavailable",
                        "the database is unavailable; try again",
                        headers={"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
                    ),
                },
            }
        }
    },
    "components": {
        "securitySchemes": {
            "supabaseAccessToken": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "The user's Supabase Auth access token (ES256/RS256 from the project's JWKS, or "
                               "HS256 with the legacy JWT secret); `aud` must be `authenticated`.",
            }
        },
        "schemas": {
            "TokenRequest": {
                "type": "object",
                "description": "Exactly one of `room_name`, `invitation_id`.",
                "oneOf": [{"required": ["room_name"]}, {"required": ["invitation_id"]}],
                "properties": {
                    "room_name": {"type": "string", "minLength": 1, "maxLength": MAX_ROOM_NAME, "pattern": r"\S",
                                  "description": "The LiveKit room of the call (`call_invitations.room_name`)."},
                    "invitation_id": {"type": "string", "format": "uuid",
                                      "description": "An invitation of the call (`call_invitations.id`)."},
                },
            },
            "TokenResponse": {
                "type": "object",
                "required": ["token", "server_url", "identity", "expires_at"],
                "properties": {
                    "token": {"type": "string", "description": "The LiveKit access token (JWT)."},
                    "server_url": {"type": "string", "description": "The LiveKit URL to connect to."},
                    "identity": {"type": "string", "description": "Your LiveKit identity: your Supabase user id."},
                    "expires_at": {"type": "string", "format": "date-time",
                                   "description": "When the token stops admitting joins (ISO 8601 UTC)."},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "enum": ["unauthorized", "forbidden", "not_found",
                                                                "invalid_request", "payload_too_large",
                                                                "rate_limited", "unavailable"]},
                            "message": {"type": "string"},
                            "field": {"type": "string", "description": "The malformed field (422 only)."},
                        },
                    }
                },
            },
        },
    },
}


async def openapi(_request: Request) -> Response:
    return JSONResponse(OPENAPI)


routes: list = [
    Route(PATH, token_endpoint, methods=["POST", "OPTIONS"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
